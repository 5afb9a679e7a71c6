"""Acceptance: client-side timeouts (issue 5).

client_idle, idle_transaction, query (+ cancel_wait when the statement ignores
the cancel) and client_login each end with the right SQLSTATE, are logged, and
leave the server clean for the next client: no open transaction and no lock,
checked through a direct connection (pg_stat_activity, pg_locks).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from helpers import (
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    direct,
    error_fields,
    fresh_database,
    query_message,
    startup_packet,
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

ACTIVITY_SQL = """
SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS in_xact,
       count(*) FILTER (WHERE state = 'active') AS active
FROM pg_stat_activity
WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()
"""
LOCKS_SQL = """
SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
WHERE d.datname = $1 AND l.locktype IN ('advisory', 'relation') AND l.pid <> pg_backend_pid()
"""


async def assert_clean(pg: TempPostgres, dbname: str) -> None:
    """No backend of DBNAME sits in a transaction, runs something or holds a lock."""
    conn = await direct(pg, dbname)
    try:
        row = await wait_until(
            lambda: conn.fetchrow(ACTIVITY_SQL, dbname),
            lambda r: r["in_xact"] == 0 and r["active"] == 0,
            timeout=15,
            what="no open transaction / running statement",
        )
        assert row["in_xact"] == 0
        assert await conn.fetchval(LOCKS_SQL, dbname) == 0, "a lock survived the timeout"
    finally:
        await close_quietly(conn)


async def expect_fatal(raw: RawClient, timeout: float = 15) -> dict[str, str]:
    """Read until the connection closes; return the ErrorResponse fields pgmux sent."""
    messages = await raw.read_until_closed(timeout)
    errors = [error_fields(body) for kind, body in messages if kind == b"E"]
    assert errors, f"closed without an ErrorResponse: {messages!r}"
    return errors[0]


async def raw_login(mux, dbname: str) -> RawClient:
    raw = await RawClient.open(mux)
    await raw.login(APP_USER, APP_PASSWORD, dbname)
    return raw


async def test_client_idle_timeout_per_database(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    idle_db, other_db = fresh_database(pg), fresh_database(pg)
    # Off globally, 1s for one database: the override is what fires.
    mux = pgmux(
        {
            "timeouts": {"client_idle": 0},
            "databases": {idle_db: {"host": pg.host, "port": pg.port, "client_idle": "1s"}},
        }
    )
    timed = await raw_login(mux, idle_db)
    spared = await raw_login(mux, other_db)
    try:
        assert (await timed.query("SELECT 1")).rows == [["1"]]
        assert (await spared.query("SELECT 1")).rows == [["1"]]
        start = time.monotonic()
        error = await expect_fatal(timed)
        assert error["C"] == "57P05", error
        assert "client_idle" in error["M"]
        assert time.monotonic() - start >= 0.8  # not before the limit
        # The other database has no client_idle: its client still works.
        assert (await spared.query("SELECT 2")).rows == [["2"]]
    finally:
        await timed.close()
        await spared.close()
    assert "client_idle_timeout" in mux.logs()
    await assert_clean(pg, idle_db)


async def test_client_idle_spares_busy_clients(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """A statement running longer than client_idle is not idleness."""
    mux = pgmux({"timeouts": {"client_idle": "1s"}})
    conn = await connect_asyncpg(mux)
    try:
        await conn.execute("SELECT pg_sleep(2)")
        assert await conn.fetchval("SELECT 7") == 7
    finally:
        await close_quietly(conn)


async def test_idle_transaction_timeout_rolls_back_and_reuses(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    setup = await direct(pg, dbname)
    await setup.execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0)")
    await setup.execute("GRANT ALL ON t TO app")
    await close_quietly(setup)
    mux = pgmux({"timeouts": {"idle_transaction": "1s"}, "pool": {"size": 1}})

    raw = await raw_login(mux, dbname)
    try:
        assert (await raw.query("BEGIN")).status == "T"
        result = await raw.query(
            "UPDATE t SET v = 99 WHERE id = 1; SELECT pg_advisory_xact_lock(42);"
            " SELECT pg_backend_pid()"
        )
        assert result.status == "T", result
        backend = result.rows[-1][0]
        error = await expect_fatal(raw)
        assert error["C"] == "25P03", error
        assert "idle_transaction" in error["M"]
    finally:
        await raw.close()
    await assert_clean(pg, dbname)

    # The next client gets the same server (rolled back, not closed), and the
    # update is gone.
    conn = await connect_asyncpg(mux, dbname)
    try:
        assert str(await conn.fetchval("SELECT pg_backend_pid()")) == backend
        assert await conn.fetchval("SELECT v FROM t WHERE id = 1") == 0
        assert await conn.fetchval("SELECT pg_try_advisory_xact_lock(42)") is True
    finally:
        await close_quietly(conn)
    assert "idle_transaction_timeout" in mux.logs()


async def test_idle_transaction_spares_idle_outside_transaction(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    mux = pgmux({"timeouts": {"idle_transaction": "1s"}})
    conn = await connect_asyncpg(mux)
    try:
        await asyncio.sleep(2)
        assert await conn.fetchval("SELECT 3") == 3
    finally:
        await close_quietly(conn)


async def test_query_timeout_cancels_on_server(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux({"timeouts": {"query": "1s"}, "pool": {"size": 1}})
    conn = await connect_asyncpg(mux, dbname)
    try:
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        start = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError) as info:
            await conn.execute("SELECT pg_sleep(30)")
        took = time.monotonic() - start
        assert info.value.sqlstate == "57014"
        assert took < 15, f"the query ran {took:.1f}s: it was not cancelled"
        # The client stays connected and the server is reused, clean.
        assert await conn.fetchval("SELECT 5") == 5
        assert await conn.fetchval("SELECT pg_backend_pid()") == backend
        # Inside a transaction: the transaction is aborted, as with PostgreSQL's own.
        tr = conn.transaction()
        await tr.start()
        await conn.execute("SELECT pg_advisory_xact_lock(7)")
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.execute("SELECT pg_sleep(30)")
        await tr.rollback()
    finally:
        await close_quietly(conn)
    await assert_clean(pg, dbname)
    assert "query_timeout" in mux.logs()


async def test_query_timeout_cancel_wait_ends_stubborn_statement(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    """A statement that swallows the cancel: after cancel_wait the client gets
    57014 "canceling statement due to query timeout" and the server is dropped."""
    dbname = fresh_database(pg)
    setup = await direct(pg, dbname)
    await setup.execute(
        """
        CREATE FUNCTION stubborn() RETURNS int LANGUAGE plpgsql AS $$
        BEGIN
          FOR i IN 1..6 LOOP
            BEGIN
              PERFORM pg_sleep(1);
            EXCEPTION WHEN query_canceled THEN NULL;
            END;
          END LOOP;
          RETURN 1;
        END $$
        """
    )
    await close_quietly(setup)
    mux = pgmux({"timeouts": {"query": "1s", "cancel_wait": "1s"}, "pool": {"size": 1}})
    raw = await raw_login(mux, dbname)
    try:
        await raw.send(
            b"Q" + (len("SELECT stubborn()") + 5).to_bytes(4, "big") + b"SELECT stubborn()\0"
        )
        error = await expect_fatal(raw, timeout=20)
        assert error["C"] == "57014", error
        assert error["M"] == "canceling statement due to query timeout"
    finally:
        await raw.close()
    await assert_clean(pg, dbname)
    logs = mux.logs()
    assert "query_timeout" in logs and "cancel_wait_timeout" in logs
    # The pool still serves.
    conn = await connect_asyncpg(mux, dbname)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await close_quietly(conn)


async def test_client_login_timeout(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(
        {
            "timeouts": {"client_login": "2s"},
            "databases": {dbname: {"host": pg.host, "port": pg.port, "client_login": "1s"}},
        }
    )
    # Silent: never sends a startup packet (global limit, 2s).
    silent = await RawClient.open(mux)
    # Sends its startup packet, then never answers the password request: the
    # database's own limit (1s) applies.
    stalled = await RawClient.open(mux)
    await stalled.send(startup_packet({"user": APP_USER, "database": dbname}))
    try:
        error = await expect_fatal(silent)
        assert error["C"] == "08P01" and error["M"] == "client_login_timeout", error
        messages = await stalled.read_until_closed(15)
        errors = [error_fields(body) for kind, body in messages if kind == b"E"]
        assert errors and errors[0]["M"] == "client_login_timeout", messages
    finally:
        await silent.close()
        await stalled.close()
    assert mux.logs().count("client_login_timeout") >= 2
    # A normal login still works.
    conn = await connect_asyncpg(mux, dbname)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await close_quietly(conn)


async def test_query_timeout_times_each_pipelined_query(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    """30 pipelined 0.1s queries take 3s in all, each well under query=1s: none is cancelled."""
    mux = pgmux({"timeouts": {"query": "1s"}})
    raw = await raw_login(mux, "appdb")
    try:
        count = 30
        await raw.send(query_message("SELECT pg_sleep(0.1)") * count)
        errors, ready = [], 0
        while ready < count:
            msg = await raw.read_message(20)
            assert msg is not None, "pgmux closed the connection"
            kind, body = msg
            if kind == b"E":
                errors.append(error_fields(body))
            elif kind == b"Z":
                ready += 1
        assert not errors, errors
    finally:
        await raw.close()
    assert "query_timeout" not in mux.logs()


async def test_transaction_timeout_ends_busy_transaction_and_cleans(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    """timeouts.transaction (PgBouncer's transaction_timeout) counts a
    transaction's whole time, even while it keeps sending statements; the
    user's value overrides the global one."""
    dbname = fresh_database(pg)
    mux = pgmux(
        {
            "timeouts": {"transaction": "60s"},
            "users": {APP_USER: {"transaction": "2s"}},
            "pool": {"size": 1},
        }
    )
    raw = await raw_login(mux, dbname)
    try:
        assert (await raw.query("BEGIN")).status == "T"
        await raw.query("SELECT pg_advisory_xact_lock(43)")
        for _ in range(3):  # never idle for long: idle_transaction would not fire
            await asyncio.sleep(0.5)
            assert (await raw.query("SELECT 1")).status == "T"
        error = await expect_fatal(raw)
        assert (error["C"], error["M"]) == (
            "25P04",
            "terminating connection due to transaction timeout",
        )
    finally:
        await raw.close()
    await assert_clean(pg, dbname)
    assert "transaction_timeout" in mux.logs()


@pytest.mark.parametrize(
    ("timeout", "text"),
    [("idle_transaction", "idle transaction timeout"), ("transaction", "transaction timeout")],
)
async def test_pgbouncer_error_codes_end_transactions_with_08p01(
    pg: TempPostgres, pgmux: PgmuxFactory, timeout: str, text: str
) -> None:
    """error_codes: pgbouncer (a pgbouncer.ini's): the client is ended with
    PgBouncer's FATAL 08P01 and text, which drivers raise as a connection error."""
    dbname = fresh_database(pg)
    mux = pgmux({"timeouts": {timeout: "1s"}, "pool": {"size": 1}, "error_codes": "pgbouncer"})
    raw = await raw_login(mux, dbname)
    try:
        assert (await raw.query("BEGIN")).status == "T"
        error = await expect_fatal(raw)
        assert (error["C"], error["M"]) == ("08P01", text), error
    finally:
        await raw.close()
    await assert_clean(pg, dbname)

"""Acceptance: session state under transaction pooling (`pool.session_state`).

Each kind of state that would outlive a transaction on a shared server (a
session SET of an unreported parameter, a session advisory lock, LISTEN, a
WITH HOLD cursor, a temporary table, an SQL PREPARE) is tried under each mode,
over the simple and the extended protocol, with a pool of one server so the
next client necessarily gets the same backend:

* pin    the next client waits (query_wait_timeout) until the first one
         clears the state or disconnects, and then finds none of it;
* reset  the next client gets the same backend with the state gone;
* error  the statement is refused with 0A000, says why and what to use
         instead, the connection stays usable and nothing reached the server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    assert_error_or_closed,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    direct,
    fresh_database,
    query_message,
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

LOCK_KEY = 9_009_001


@dataclass(frozen=True)
class Kind:
    """One kind of session state: how to make it, clear it, and see it."""

    create: str
    clear: str
    probe: str  # run on the server that holds (or held) the state
    present: Any
    absent: Any


KINDS = {
    "set": Kind(
        create="SET work_mem = '7MB'",
        clear="RESET ALL",
        probe="SELECT current_setting('work_mem') = '7MB'",
        present=True,
        absent=False,
    ),
    "advisory_lock": Kind(
        create=f"SELECT pg_advisory_lock({LOCK_KEY})",
        clear="SELECT pg_advisory_unlock_all()",
        probe="SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        f" AND objid = {LOCK_KEY} AND pid = pg_backend_pid()",
        present=1,
        absent=0,
    ),
    "listen": Kind(
        create="LISTEN ss_channel",
        clear="UNLISTEN *",
        probe="SELECT count(*) FROM pg_listening_channels()",
        present=1,
        absent=0,
    ),
    "hold_cursor": Kind(
        create="DECLARE ss_cursor CURSOR WITH HOLD FOR SELECT 1",
        clear="CLOSE ALL",
        probe="SELECT count(*) FROM pg_cursors WHERE name = 'ss_cursor'",
        present=1,
        absent=0,
    ),
    "temp_table": Kind(
        create="CREATE TEMP TABLE ss_tmp (v int)",
        clear="DISCARD TEMP",
        probe="SELECT to_regclass('pg_temp.ss_tmp') IS NOT NULL",
        present=True,
        absent=False,
    ),
    "prepare": Kind(
        create="PREPARE ss_prep AS SELECT 1",
        clear="DEALLOCATE ALL",
        probe="SELECT count(*) FROM pg_prepared_statements WHERE name = 'ss_prep'",
        present=1,
        absent=0,
    ),
}

# Alternative ways to clear a kind of state (pin only lets go once it is gone).
OTHER_CLEARS = [
    ("set", "DISCARD ALL"),
    ("advisory_lock", "DISCARD ALL"),
    ("listen", "DISCARD ALL"),
    ("temp_table", "DISCARD ALL"),
    ("prepare", "DISCARD ALL"),
    ("hold_cursor", "DISCARD ALL"),
]

PID = "SELECT pg_backend_pid()"
LOCKS_HELD = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1"


def config(mode: str, size: int = 1) -> dict[str, Any]:
    # listen_mode: pin treats LISTEN as session state like the others (the
    # relay, listen_mode's default, is tested in test_listen_notify.py)
    return {
        "pool": {"size": size, "session_state": mode, "listen_mode": "pin"},
        "timeouts": {"query_wait": "1s"},
    }


async def run(conn: asyncpg.Connection, sql: str, protocol: str) -> None:
    """Simple protocol: Query. Extended: Parse/Bind/Describe/Execute/Sync."""
    if protocol == "simple":
        await conn.execute(sql)
    else:
        await conn.fetch(sql)


async def probe(conn: asyncpg.Connection, kind: Kind) -> Any:
    return await conn.fetchval(kind.probe)


async def expect_query_wait_timeout(mux: Any) -> None:
    """A second client finds no server: the only one is pinned."""
    other = await RawClient.open(mux)
    try:
        await other.login(APP_USER, APP_PASSWORD, APP_DB)
        await other.send(query_message("SELECT 1"))
        replies = await other.read_until_closed(timeout=20)
    finally:
        await other.close()
    error = assert_error_or_closed(replies)
    assert error is not None, replies
    assert error["C"] == "08P01", error
    assert "query_wait_timeout" in error["M"]


async def gets_server(mux: Any) -> tuple[asyncpg.Connection, int]:
    """A client that gets a server within query_wait, and its backend pid."""
    conn = await connect_asyncpg(mux)
    try:
        pid = await asyncio.wait_for(conn.fetchval(PID), 20)
    except BaseException:
        await close_quietly(conn)
        raise
    return conn, pid


# -- pin -------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("name", list(KINDS))
async def test_pin_holds_server_until_state_cleared(
    pgmux: PgmuxFactory, name: str, protocol: str
) -> None:
    kind = KINDS[name]
    mux = pgmux(config("pin"))
    holder = await connect_asyncpg(mux)
    second = None
    try:
        pid = await holder.fetchval(PID)
        await run(holder, kind.create, protocol)
        await expect_query_wait_timeout(mux)
        # The holder keeps its server and its state across transactions.
        for _ in range(3):
            assert await holder.fetchval(PID) == pid
            assert await probe(holder, kind) == kind.present
        await run(holder, kind.clear, protocol)
        second, second_pid = await gets_server(mux)
        assert second_pid == pid
        assert await probe(second, kind) == kind.absent
        # Both share the one server again, turn by turn.
        assert await holder.fetchval(PID) == pid
    finally:
        await close_quietly(holder, second)


@pytest.mark.parametrize(("name", "clear"), OTHER_CLEARS)
async def test_pin_released_by_discard_all(pgmux: PgmuxFactory, name: str, clear: str) -> None:
    kind = KINDS[name]
    mux = pgmux(config("pin"))
    holder = await connect_asyncpg(mux)
    second = None
    try:
        pid = await holder.fetchval(PID)
        await holder.execute(kind.create)
        await expect_query_wait_timeout(mux)
        await holder.execute(clear)
        second, second_pid = await gets_server(mux)
        assert second_pid == pid
        assert await probe(second, kind) == kind.absent
    finally:
        await close_quietly(holder, second)


@pytest.mark.parametrize("name", list(KINDS))
async def test_pin_state_never_outlives_its_client(
    pg: TempPostgres, pgmux: PgmuxFactory, name: str
) -> None:
    """The holder disconnects without clearing: the next client finds nothing of it."""
    kind = KINDS[name]
    mux = pgmux(config("pin"))
    holder = await connect_asyncpg(mux)
    monitor = await direct(pg)
    second = None
    try:
        await holder.execute(kind.create)
        assert await probe(holder, kind) == kind.present
        await holder.close()
        second, _ = await gets_server(mux)
        assert await probe(second, kind) == kind.absent
        locks = await monitor.fetchval(LOCKS_HELD, LOCK_KEY)
        assert locks == 0
    finally:
        await close_quietly(holder, second, monitor)


async def test_pin_advisory_lock_never_leaks(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """Two servers, many clients taking turns with one session lock: the lock is
    only ever held by the client that took it, and never by a client that did not."""
    mux = pgmux(config("pin", size=2))
    monitor = await direct(pg)
    clients = [await connect_asyncpg(mux) for _ in range(4)]
    try:
        for round_ in range(3):
            for i, taker in enumerate(clients):
                assert await taker.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY) is True
                holder_pid = await taker.fetchval(PID)
                # Every other client that gets a server is on the other backend
                # and cannot take the lock; none of them holds it.
                for other in clients:
                    if other is taker:
                        continue
                    other_pid = await other.fetchval(PID)
                    assert other_pid != holder_pid, (round_, i)
                    assert await other.fetchval(KINDS["advisory_lock"].probe) == 0
                    # (the transaction-level try: a failed session-level try would pin too)
                    assert (
                        await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_KEY)
                        is False
                    )
                lockers = await monitor.fetch(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = $1"
                    " AND granted",
                    LOCK_KEY,
                )
                assert [r["pid"] for r in lockers] == [holder_pid]
                if (i + round_) % 2:
                    assert await taker.fetchval("SELECT pg_advisory_unlock_all()::text") == ""
                else:
                    await taker.close()  # leaves without unlocking
                    clients[i] = await connect_asyncpg(mux)
                # Unlocked, or cleaned by pgmux once the holder left (that takes a moment).
                await wait_until(
                    lambda: monitor.fetchval(LOCKS_HELD, LOCK_KEY),
                    lambda held: held == 0,
                    timeout=10,
                    what="advisory lock released",
                )
    finally:
        await close_quietly(*clients, monitor)


async def test_pin_advisory_lock_is_a_mutex(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """Concurrent clients use a session advisory lock around a read-modify-write.

    If a server went back to the pool with the lock held, the next client on it
    would get the lock at once (advisory locks are re-entrant per session) while
    the owner is still in its critical section, and an update would be lost.
    """
    dbname = fresh_database(pg)
    mux = pgmux({**config("pin", size=2), "timeouts": {"query_wait": "30s"}})
    setup = await direct(pg, dbname)
    await setup.execute(
        "CREATE TABLE counter (v int); INSERT INTO counter VALUES (0);GRANT ALL ON counter TO app"
    )
    rounds, workers = 5, 6

    async def worker(n: int) -> None:
        conn = await connect_asyncpg(mux, dbname)
        try:
            for r in range(rounds):
                if n % 2:
                    await conn.execute(f"SELECT pg_advisory_lock({LOCK_KEY})")  # simple protocol
                else:
                    await conn.fetchval("SELECT pg_advisory_lock($1)", LOCK_KEY)  # extended
                value = await conn.fetchval("SELECT v FROM counter")
                await asyncio.sleep(0.01)  # let the others try to get in
                await conn.execute(f"UPDATE counter SET v = {value + 1}")
                if r == rounds - 1 and n % 3 == 0:
                    return  # leave holding the lock: it must not pass to anyone
                await conn.fetchval("SELECT pg_advisory_unlock_all()::text")
        finally:
            await close_quietly(conn)

    try:
        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(workers))), 60)
        assert await setup.fetchval("SELECT v FROM counter") == rounds * workers
        await wait_until(
            lambda: setup.fetchval(LOCKS_HELD, LOCK_KEY),
            lambda held: held == 0,
            timeout=10,
            what="advisory lock released after its holders left",
        )
    finally:
        await close_quietly(setup)


# -- reset -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("name", list(KINDS))
async def test_reset_cleans_state_on_release(
    pg: TempPostgres, pgmux: PgmuxFactory, name: str, protocol: str
) -> None:
    kind = KINDS[name]
    mux = pgmux(config("reset"))
    first = await connect_asyncpg(mux)
    monitor = await direct(pg)
    second = None
    try:
        pid = await first.fetchval(PID)
        await run(first, kind.create, protocol)
        # No waiting: the server comes back as soon as it is clean.
        second, second_pid = await gets_server(mux)
        assert second_pid == pid
        assert await probe(second, kind) == kind.absent
        assert await probe(first, kind) == kind.absent
        locks = await monitor.fetchval(LOCKS_HELD, LOCK_KEY)
        assert locks == 0
        assert await first.fetchval("SELECT 40 + 2") == 42
    finally:
        await close_quietly(first, second, monitor)


async def test_reset_keeps_transaction_local_state(pgmux: PgmuxFactory) -> None:
    """Inside one transaction the state is there; it is cleaned only on release."""
    mux = pgmux(config("reset"))
    conn = await connect_asyncpg(mux)
    try:
        async with conn.transaction():
            await conn.execute("SET work_mem = '7MB'")
            assert await conn.fetchval("SHOW work_mem") == "7MB"
            assert await conn.fetchval("SELECT pg_advisory_lock($1)::text", LOCK_KEY) == ""
            assert await conn.fetchval(KINDS["advisory_lock"].probe) == 1
        assert await conn.fetchval("SHOW work_mem") != "7MB"
        assert await conn.fetchval(KINDS["advisory_lock"].probe) == 0
    finally:
        await close_quietly(conn)


# -- error -----------------------------------------------------------------------------

ADVICE = {
    "set": "SET LOCAL",
    "advisory_lock": "pg_advisory_xact_lock",
    "listen": "session",
    "hold_cursor": "WITH HOLD",
    "temp_table": "ON COMMIT DROP",
    "prepare": "protocol-level",
}


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("name", list(KINDS))
async def test_error_refuses_statement(pgmux: PgmuxFactory, name: str, protocol: str) -> None:
    kind = KINDS[name]
    mux = pgmux(config("error"))
    conn = await connect_asyncpg(mux)
    second = None
    try:
        pid = await conn.fetchval(PID)
        with pytest.raises(asyncpg.PostgresError) as info:
            await run(conn, kind.create, protocol)
        assert info.value.sqlstate == "0A000", info.value
        text = str(info.value)
        assert "pool.session_state" in text
        assert ADVICE[name] in text, text
        # The connection stays usable and nothing reached the server.
        assert await conn.fetchval("SELECT 40 + 2") == 42
        assert await probe(conn, kind) == kind.absent
        second, second_pid = await gets_server(mux)
        assert second_pid == pid
        assert await probe(second, kind) == kind.absent
    finally:
        await close_quietly(conn, second)


async def test_error_refusal_inside_transaction_keeps_protocol_in_step(
    pgmux: PgmuxFactory,
) -> None:
    """A refusal mid-transaction aborts it as PostgreSQL's own error would."""
    mux = pgmux(config("error"))
    conn = await connect_asyncpg(mux)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("CREATE TEMP TABLE ok_tmp (v int) ON COMMIT DROP")
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute("LISTEN refused_channel")
        assert info.value.sqlstate == "0A000"
        with pytest.raises(asyncpg.PostgresError) as aborted:
            await conn.fetchval("SELECT 1")
        assert aborted.value.sqlstate == "25P02"
        await tx.rollback()
        assert await conn.fetchval("SELECT 40 + 2") == 42
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    finally:
        await close_quietly(conn)


def test_error_refusal_over_psql(pgmux: PgmuxFactory) -> None:
    """psql (simple protocol, one session for the whole script) sees the refusal
    with its SQLSTATE and goes on with the next statement."""
    mux = pgmux(config("error"))
    script = "SET work_mem = '7MB';\nSHOW work_mem;\nSELECT pg_advisory_xact_lock(1)::text;\n"
    done = subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "VERBOSITY=verbose", "-h", mux.host,
         "-p", str(mux.port), "-U", APP_USER, "-d", APP_DB],
        input=script, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PGPASSWORD": APP_PASSWORD, "PGCONNECT_TIMEOUT": "10"},
    )  # fmt: skip
    assert "0A000" in done.stderr, done.stderr
    assert "SET LOCAL" in done.stderr
    assert done.returncode == 0, done.stderr
    shown = done.stdout.splitlines()
    assert shown and shown[0] != "7MB", done.stdout  # the SET never reached the server
    assert "ERROR" not in done.stderr.split("0A000", 1)[1], done.stderr  # the rest ran


# -- what must not pin -------------------------------------------------------------------

NOT_SESSION_STATE = {
    "set_local": "BEGIN; SET LOCAL work_mem = '7MB'; COMMIT",
    "reported_timezone": "SET TimeZone = 'Asia/Tokyo'",
    "reported_application_name": "SET application_name = 'not-pinned'",
    "xact_advisory_lock": f"BEGIN; SELECT pg_advisory_xact_lock({LOCK_KEY}); COMMIT",
    "temp_on_commit_drop": "BEGIN; CREATE TEMP TABLE ss_drop (v int) ON COMMIT DROP; COMMIT",
    "cursor_without_hold": "BEGIN; DECLARE ss_plain CURSOR FOR SELECT 1; COMMIT",
    "set_transaction": "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; COMMIT",
}


@pytest.mark.parametrize("mode", ["pin", "error"])
@pytest.mark.parametrize("what", list(NOT_SESSION_STATE))
async def test_transaction_scoped_statements_are_not_session_state(
    pgmux: PgmuxFactory, mode: str, what: str
) -> None:
    mux = pgmux(config(mode))
    conn = await connect_asyncpg(mux)
    second = None
    try:
        pid = await conn.fetchval(PID)
        await conn.execute(NOT_SESSION_STATE[what])
        second, second_pid = await gets_server(mux)  # not pinned, not refused
        assert second_pid == pid
        await close_quietly(second)
        second = None
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await close_quietly(conn, second)


async def test_reported_parameter_follows_its_client(pgmux: PgmuxFactory) -> None:
    """SET TimeZone neither pins nor leaks: pgmux re-applies each client's value."""
    mux = pgmux(config("pin"))
    tokyo = await connect_asyncpg(mux)
    other = await connect_asyncpg(mux)
    try:
        default = await other.fetchval("SHOW TimeZone")
        await tokyo.execute("SET TimeZone = 'Asia/Tokyo'")
        for _ in range(3):
            assert await other.fetchval("SHOW TimeZone") == default
            assert await tokyo.fetchval("SHOW TimeZone") == "Asia/Tokyo"
    finally:
        await close_quietly(tokyo, other)


# -- LISTEN / NOTIFY -------------------------------------------------------------------


async def test_psycopg_listener_receives_notify(pgmux: PgmuxFactory) -> None:
    mux = pgmux(config("pin", size=2))
    listener = await connect_psycopg(mux)
    sender = await connect_asyncpg(mux)
    try:
        await listener.execute("LISTEN ss_events")
        await sender.execute("NOTIFY ss_events, 'first'")
        await sender.fetchval("SELECT pg_notify('ss_events', $1)", "second")
        got = []
        async for note in listener.notifies(timeout=10, stop_after=2):
            got.append((note.channel, note.payload))
        assert got == [("ss_events", "first"), ("ss_events", "second")]
        # Still in step for ordinary queries afterwards.
        cur = await listener.execute("SELECT 40 + 2")
        assert await cur.fetchone() == (42,)
    finally:
        await close_quietly(listener, sender)


async def test_asyncpg_add_listener_receives_notify(pgmux: PgmuxFactory) -> None:
    mux = pgmux(config("pin", size=2))
    listener = await connect_asyncpg(mux)
    sender = await connect_asyncpg(mux)
    got: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("ss_async", lambda *args: got.put_nowait(args[3]))
        for i in range(3):
            await sender.execute(f"NOTIFY ss_async, 'n{i}'")
            assert await asyncio.wait_for(got.get(), 10) == f"n{i}"
            assert await listener.fetchval("SELECT $1::int + 1", i) == i + 1
        # The sender never got the listener's server.
        listen_pid = await listener.fetchval(PID)
        assert await sender.fetchval(PID) != listen_pid
    finally:
        await close_quietly(listener, sender)


async def test_listener_unlisten_lets_go_of_server(pgmux: PgmuxFactory) -> None:
    mux = pgmux(config("pin"))
    listener = await connect_psycopg(mux)
    second = None
    try:
        await listener.execute("LISTEN ss_gone")
        await expect_query_wait_timeout(mux)
        await listener.execute("UNLISTEN *")
        second, _ = await gets_server(mux)
        assert await second.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    finally:
        await close_quietly(listener, second)

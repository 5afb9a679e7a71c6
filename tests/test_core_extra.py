"""Acceptance, the finer points: what the other test_core_* files leave implicit.

- a failed transaction leaves the SAME server usable (rolled back, not replaced);
- a hostile client inside a transaction on the only server: killed alone, its
  transaction rolled back, the bystander waiting for that server carries on;
- server_lifetime also retires an idle server nobody uses, and min_size
  opens its replacement;
- reserve_size, FIFO waiting, max_db_connections and max_user_connections.

Every wait is a bounded poll; nothing asserts on how fast something happened.
"""

from __future__ import annotations

import asyncio
import struct

import asyncpg
import pytest
from helpers import (
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    assert_error_or_closed,
    bystander,
    close_quietly,
    connect_asyncpg,
    direct,
    fresh_database,
    message,
    query_message,
    server_connections,
    unique,
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

ONE_SERVER = {"pool": {"size": 1}, "timeouts": {"query_wait": "20s"}}
REPORT_USER, REPORT_PASSWORD = "report", "report-secret"

IDLE_IN_TRANSACTION_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = $1 AND state LIKE 'idle in transaction%'
"""


def make_table(pg: TempPostgres, dbname: str) -> str:
    name = unique("t")
    pg.sql(f"CREATE TABLE {name} (v int); ALTER TABLE {name} OWNER TO app", dbname)
    return name


async def hold_transaction(conn: asyncpg.Connection) -> asyncpg.transaction.Transaction:
    tx = conn.transaction()
    await tx.start()
    await conn.fetchval("SELECT 1")
    return tx


async def assert_no_open_transaction(conn: asyncpg.Connection) -> None:
    """SAVEPOINT works only inside a transaction block: an error here means none is open."""
    with pytest.raises(asyncpg.NoActiveSQLTransactionError):
        await conn.execute("SAVEPOINT probe")


# -- criterion 2: a transaction that fails midway ---------------------------------


async def test_failed_transaction_leaves_the_same_server_clean(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    table = make_table(pg, dbname)
    mux = pgmux(ONE_SERVER)
    monitor = await direct(pg, dbname)
    a = await connect_asyncpg(mux, dbname)
    b = await connect_asyncpg(mux, dbname)
    try:
        backend = await a.fetchval("SELECT pg_backend_pid()")
        await a.execute("BEGIN")
        await a.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await a.fetchval("SELECT 1 / 0")
        # The failed transaction ('E') still owns the only server.
        waiting = asyncio.create_task(b.fetchrow(f"SELECT pg_backend_pid(), count(*) FROM {table}"))
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await a.fetchval("SELECT 2")
        await asyncio.sleep(0.3)
        assert not waiting.done(), "another client got the server of a failed transaction"
        await a.execute("ROLLBACK")

        # The very same backend, rolled back: reused, not closed and replaced.
        assert tuple(await asyncio.wait_for(waiting, 15)) == (backend, 0)
        await assert_no_open_transaction(b)
        assert await monitor.fetchval(IDLE_IN_TRANSACTION_SQL, dbname) == 0
        async with a.transaction():
            await a.execute(f"INSERT INTO {table} VALUES (2)")
        assert await b.fetchval(f"SELECT array_agg(v) FROM {table}") == [2]
        assert await a.fetchval("SELECT pg_backend_pid()") == backend
    finally:
        await close_quietly(a, b, monitor)


# -- criterion 5: hostile input from a client holding the only server --------------

HOSTILE_MID_TRANSACTION = {
    "garbage": bytes(range(256)),
    "oversized-length": b"Q" + struct.pack("!I", 64 << 20) + b"SELECT '" + bytes(4096),
    "length-below-4": b"Q" + struct.pack("!I", 2),
    "unknown-type": message(b"\x01", b"junk"),
}


@pytest.mark.parametrize(
    "payload", list(HOSTILE_MID_TRANSACTION.values()), ids=list(HOSTILE_MID_TRANSACTION)
)
async def test_hostile_client_inside_a_transaction(
    pg: TempPostgres, pgmux: PgmuxFactory, payload: bytes
) -> None:
    dbname = fresh_database(pg)
    table = make_table(pg, dbname)
    mux = pgmux({**ONE_SERVER, "limits": {"max_packet_size": "1MiB"}})
    monitor = await direct(pg, dbname)
    raw = await RawClient.open(mux)
    try:
        async with bystander(mux):
            await raw.login(APP_USER, APP_PASSWORD, dbname)
            got = await raw.query(f"BEGIN; INSERT INTO {table} VALUES (1)")
            assert got.status == "T" and not got.errors, got
            # The bystander now waits for the one server; the hostile bytes follow.
            await raw.send(payload + query_message("COMMIT"))
            messages = await raw.read_until_closed(timeout=20)
            assert b"C" not in [kind for kind, _ in messages], "the COMMIT after it ran"
            assert_error_or_closed([m for m in messages if m[0] != b"Z"])
        # Its transaction went with it: nothing committed, nothing left open.
        assert await monitor.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await monitor.fetchval(IDLE_IN_TRANSACTION_SQL, dbname) == 0
        conn = await connect_asyncpg(mux, dbname)
        try:
            await assert_no_open_transaction(conn)
        finally:
            await close_quietly(conn)
    finally:
        await raw.close()
        await close_quietly(monitor)


# -- criterion 4: server_lifetime on an idle server, min_size refills ------------


async def test_idle_server_past_lifetime_is_replaced_to_min_size(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(
        {
            "pool": {"size": 2, "min_size": 1},
            "timeouts": {"server_lifetime": "1s", "server_idle": "1h"},
        }
    )
    monitor = await direct(pg)
    client = await connect_asyncpg(mux, dbname)  # creates the pool; then stays silent

    async def backends() -> list[int]:
        rows = await monitor.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = "
            "'client backend'",
            dbname,
        )
        return sorted(r["pid"] for r in rows)

    try:
        first = await client.fetchval("SELECT pg_backend_pid()")
        # No client traffic from here on: only the janitor can retire it.
        after = await wait_until(
            backends,
            lambda pids: first not in pids and len(pids) == 1,
            timeout=20,
            what="the old idle server closed and one new server open (min_size 1)",
        )
        assert after[0] != first
        assert await client.fetchval("SELECT pg_backend_pid()") != first
    finally:
        await close_quietly(client, monitor)


# -- limits: reserve, FIFO, max_db_connections, max_user_connections -------------


async def test_reserve_size_after_reserve_timeout(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(
        {
            "pool": {"size": 1, "reserve_size": 1, "reserve_timeout": "500ms"},
            "timeouts": {"query_wait": "30s"},
        }
    )
    monitor = await direct(pg)
    holder = await connect_asyncpg(mux, dbname)
    waiter = await connect_asyncpg(mux, dbname)
    try:
        tx = await hold_transaction(holder)
        held = await holder.fetchval("SELECT pg_backend_pid()")
        # Without the reserve this waits until query_wait (30s) and fails.
        got = await asyncio.wait_for(waiter.fetchval("SELECT pg_backend_pid()"), 20)
        assert got != held
        assert await server_connections(monitor, dbname) == 2
        await tx.commit()
    finally:
        await close_quietly(holder, waiter, monitor)


async def test_waiting_clients_are_served_first_come_first_served(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(ONE_SERVER)
    holder = await connect_asyncpg(mux, dbname)
    waiters = [await connect_asyncpg(mux, dbname) for _ in range(5)]
    try:
        tx = await hold_transaction(holder)
        tasks = []
        for conn in waiters:
            tasks.append(asyncio.create_task(conn.fetchval("SELECT clock_timestamp()")))
            await asyncio.sleep(0.3)  # so pgmux queues them in this order
        assert not any(task.done() for task in tasks)
        await tx.commit()
        served = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        # One server, so each ran after the previous one finished: in queue order.
        assert served == sorted(served)
    finally:
        await close_quietly(holder, *waiters)


@pytest.mark.parametrize("scope", ["max_db_connections", "max_user_connections"])
async def test_db_and_user_server_caps(pg: TempPostgres, pgmux: PgmuxFactory, scope: str) -> None:
    """Two pools under one cap of 1: the second waits while the first holds the server."""
    first_db = fresh_database(pg)
    if scope == "max_db_connections":
        # Same database, two users: two pools sharing the database's cap.
        config = {"databases": {"*": {"max_db_connections": 1}}}
        logins = [(first_db, APP_USER, APP_PASSWORD), (first_db, REPORT_USER, REPORT_PASSWORD)]
    else:
        # Same user, two databases: two pools sharing the user's cap.
        config = {"users": {REPORT_USER: {"max_user_connections": 1}}}
        second_db = fresh_database(pg)
        logins = [
            (first_db, REPORT_USER, REPORT_PASSWORD),
            (second_db, REPORT_USER, REPORT_PASSWORD),
        ]
    mux = pgmux({**config, "pool": {"size": 4}, "timeouts": {"query_wait": "1s"}})
    holder = await connect_asyncpg(mux, *logins[0])
    other = await connect_asyncpg(mux, *logins[1])
    again = None
    try:
        tx = await hold_transaction(holder)
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncio.wait_for(other.fetchval("SELECT 1"), 20)
        assert "query_wait_timeout" in str(info.value)
        await tx.commit()
        # The slot goes to the other pool once the first gives its server back.
        again = await connect_asyncpg(mux, *logins[1])
        assert await asyncio.wait_for(again.fetchval("SELECT 'served'"), 20) == "served"
        assert await holder.fetchval("SELECT 2") == 2
    finally:
        await close_quietly(holder, other, again)

"""Acceptance: the pool-level timeouts PgBouncer 1.25 added or changed.

- timeouts.pool_idle (PgBouncer's pool_idle_timeout): a pool with no client
  and no server for that long is removed; one with a client, or with the
  timeout 0 (globally or for its database), stays.
- The reserve pool: a client that waited reserve_timeout and gets a server
  from the reserve is named in PgBouncer's warning "taking connection from
  reserve_pool"; nothing is logged while the pool itself has room.
- timeouts.query over a client still queued for a server: PgBouncer counts a
  query's wait as part of it, so the client is ended with "08P01
  query_timeout" after `query`, long before query_wait.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

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
    server_connections,
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

ADMIN = ("admin", "admin-secret")
CONSOLE = {"admin": {"users": [ADMIN[0]]}}
PTR = r"0x[0-9a-f]+"
ACTIVITY_SQL = """
SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS in_xact,
       count(*) FILTER (WHERE state = 'active') AS active
FROM pg_stat_activity
WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()
"""


async def pool_databases(mux: Any) -> set[str]:
    """The databases SHOW POOLS lists a pool for."""
    console = await connect_asyncpg(mux, "pgbouncer", ADMIN[0], ADMIN[1])
    try:
        return {row["database"] for row in await console.fetch("SHOW POOLS")}
    finally:
        await close_quietly(console)


async def run_once(mux: Any, dbname: str) -> None:
    conn = await connect_asyncpg(mux, dbname)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await close_quietly(conn)


async def hold_transaction(
    conn: asyncpg.Connection, lock: int = 17
) -> asyncpg.transaction.Transaction:
    """Open a transaction on CONN holding advisory lock LOCK: in transaction
    mode it keeps its server."""
    tx = conn.transaction()
    await tx.start()
    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
    return tx


async def raw_login(mux: Any, dbname: str) -> RawClient:
    raw = await RawClient.open(mux)
    await raw.login(APP_USER, APP_PASSWORD, dbname)
    return raw


# -- pool_idle ------------------------------------------------------------------


async def test_pool_idle_removes_only_unused_pools(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """server_idle closes every idle server; pool_idle then removes the pool
    nobody is connected to, and keeps the one with a client and the one whose
    database turns pool_idle off."""
    gone_db, kept_db, off_db = (fresh_database(pg) for _ in range(3))
    mux = pgmux(
        {
            **CONSOLE,
            "timeouts": {"server_idle": "1s", "pool_idle": "1s"},
            "databases": {off_db: {"host": pg.host, "port": pg.port, "pool_idle": 0}},
        }
    )
    monitor = await direct(pg)
    stays = await connect_asyncpg(mux, kept_db)
    try:
        assert await stays.fetchval("SELECT 1") == 1  # its server goes back to the pool
        await run_once(mux, gone_db)
        await run_once(mux, off_db)
        assert {gone_db, kept_db, off_db} <= await pool_databases(mux)
        await wait_until(
            lambda: pool_databases(mux),
            lambda pools: gone_db not in pools,
            timeout=15,
            what=f"{gone_db}'s pool removed",
        )
        assert re.search(rf"pool_idle_removed.*{gone_db}", mux.logs()), mux.logs()
        await asyncio.sleep(1.5)  # a pool_idle more: the others would be gone by now
        pools = await pool_databases(mux)
        assert kept_db in pools, "a pool with a connected client was removed"
        assert off_db in pools, "a pool with pool_idle 0 was removed"
        assert await server_connections(monitor, gone_db, kept_db, off_db) == 0
        # The client of the kept pool works on; the removed pool comes back on demand.
        assert await stays.fetchval("SELECT 2") == 2
        await run_once(mux, gone_db)
        assert gone_db in await pool_databases(mux)
    finally:
        await close_quietly(stays, monitor)


async def test_pool_idle_waits_for_the_pool_servers(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """A pool whose idle servers are still open (server_idle not reached) is in use."""
    dbname = fresh_database(pg)
    mux = pgmux({**CONSOLE, "timeouts": {"server_idle": "30s", "pool_idle": "1s"}})
    monitor = await direct(pg)
    try:
        await run_once(mux, dbname)
        await asyncio.sleep(2.5)  # two pool_idle periods with only an idle server
        assert dbname in await pool_databases(mux)
        assert await server_connections(monitor, dbname) == 1
        assert "pool_idle_removed" not in mux.logs()
    finally:
        await close_quietly(monitor)


# -- the reserve pool warning ---------------------------------------------------------


def reserve_config(size: int) -> dict[str, Any]:
    return {
        "pool": {"size": size, "reserve_size": 1, "reserve_timeout": "500ms"},
        "logging": {"format": "pgbouncer"},
        "timeouts": {"query_wait": "10s"},
    }


def local_port(conn: asyncpg.Connection) -> int:
    port: int = conn._transport.get_extra_info("sockname")[1]
    return port


async def test_reserve_pool_taken_is_logged(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(reserve_config(size=1))
    monitor = await direct(pg)
    holder = await connect_asyncpg(mux, dbname)
    waiter = await connect_asyncpg(mux, dbname)
    try:
        tx = await hold_transaction(holder)
        start = time.monotonic()
        await asyncio.wait_for(waiter.fetchval("SELECT 1"), 8)  # on the reserve's server
        assert time.monotonic() - start >= 0.4, "served before reserve_timeout"
        assert await server_connections(monitor, dbname) == 2
        await tx.commit()
        # PgBouncer's line, on the client that waited.
        line = (
            rf" WARNING C-{PTR}: {dbname}/app@127\.0\.0\.1:{local_port(waiter)}"
            r" taking connection from reserve_pool$"
        )
        assert len(re.findall(line, mux.logs(), re.M)) == 1, mux.logs()
    finally:
        await close_quietly(holder, waiter, monitor)


async def test_reserve_pool_not_logged_while_pool_has_room(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(reserve_config(size=2))
    monitor = await direct(pg)
    holder = await connect_asyncpg(mux, dbname)
    other = await connect_asyncpg(mux, dbname)
    try:
        tx = await hold_transaction(holder)
        other_tx = await hold_transaction(other, lock=18)  # the pool's second server
        await asyncio.sleep(1)  # longer than reserve_timeout, with no one waiting
        assert await server_connections(monitor, dbname) == 2
        await other_tx.commit()
        await tx.commit()
    finally:
        await close_quietly(holder, other, monitor)
    assert "taking connection from reserve_pool" not in mux.logs()


# -- query timeout while waiting for a server --------------------------------------


async def test_query_timeout_ends_client_waiting_for_a_server(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    """The only server is held by a transaction idle between statements (a
    running statement would itself be cancelled by `query`); the next client's
    query never gets a server and ends after `query`, not `query_wait`."""
    dbname = fresh_database(pg)
    mux = pgmux({"pool": {"size": 1}, "timeouts": {"query": "1s", "query_wait": "10s"}})
    holder = await connect_asyncpg(mux, dbname)
    waiter = await raw_login(mux, dbname)
    try:
        tx = await hold_transaction(holder)
        backend = await holder.fetchval("SELECT pg_backend_pid()")
        start = time.monotonic()
        await waiter.send(query_message("SELECT 1"))
        messages = await waiter.read_until_closed(15)
        took = time.monotonic() - start
        errors = [error_fields(body) for kind, body in messages if kind == b"E"]
        assert errors, f"closed without an ErrorResponse: {messages!r}"
        assert (errors[0]["S"], errors[0]["C"], errors[0]["M"]) == (
            "FATAL",
            "08P01",
            "query_timeout",
        )
        assert 0.9 <= took < 5, f"ended after {took:.1f}s"
        assert b"D" not in [kind for kind, _ in messages], "the query ran"
        # The holder's transaction is untouched, and ends normally.
        assert await holder.fetchval("SELECT pg_backend_pid()") == backend
        await tx.commit()
        assert await holder.fetchval("SELECT pg_try_advisory_xact_lock(17)") is True
    finally:
        await waiter.close()
        await close_quietly(holder)
    assert "wait_failed" in mux.logs()
    conn = await direct(pg, dbname)
    try:
        row = await conn.fetchrow(ACTIVITY_SQL, dbname)
        assert (row["in_xact"], row["active"]) == (0, 0)
    finally:
        await close_quietly(conn)


async def test_query_timeout_counts_the_wait_for_a_server(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    """PgBouncer times a query from its arrival (request_time), so the wait
    counts: 1.2s queued plus 1.5s running is over query=2s and is cancelled
    while it runs, although neither part alone reaches 2s."""
    dbname = fresh_database(pg)
    mux = pgmux({"pool": {"size": 1}, "timeouts": {"query": "2s", "query_wait": "10s"}})
    holder = await connect_asyncpg(mux, dbname)
    waiter = await connect_asyncpg(mux, dbname)
    try:
        tx = await hold_transaction(holder)
        start = time.monotonic()
        query = asyncio.create_task(waiter.execute("SELECT pg_sleep(1.5)"))
        await asyncio.sleep(1.2)
        await tx.commit()  # the server goes to the waiter
        with pytest.raises(asyncpg.QueryCanceledError) as info:
            await asyncio.wait_for(query, 10)
        assert info.value.sqlstate == "57014"
        assert time.monotonic() - start < 2.6
        assert await waiter.fetchval("SELECT 1") == 1  # cancelled, not disconnected
    finally:
        await close_quietly(holder, waiter)

"""Acceptance: pool limits and the janitor's timeouts.

query_wait_timeout, max_client_conn, server_idle (down to min_size) and
server_lifetime, each observed from the outside: the error a client gets, or
the server connections PostgreSQL itself reports in pg_stat_activity.
Durations are short (about a second) and every wait is a bounded poll, never
an assertion on how fast something happened.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
from helpers import (
    PgmuxFactory,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    direct,
    fresh_database,
    server_connections,
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)


async def hold_transaction(conn: asyncpg.Connection) -> asyncpg.transaction.Transaction:
    tx = conn.transaction()
    await tx.start()
    await conn.fetchval("SELECT 1")
    return tx


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_query_wait_timeout(pgmux: PgmuxFactory, driver: str) -> None:
    mux = pgmux({"pool": {"size": 1}, "timeouts": {"query_wait": "1s"}})
    holder = await connect_asyncpg(mux)
    waiter = None
    try:
        tx = await hold_transaction(holder)
        if driver == "asyncpg":
            waiter = await connect_asyncpg(mux)
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncio.wait_for(waiter.fetchval("SELECT 1"), 20)
            sqlstate, text = info.value.sqlstate, str(info.value)
            # The FATAL error and the close can reach asyncpg in one read; it then
            # reports 08003 "connection was closed" with pgmux's message appended.
            if sqlstate == "08003":
                sqlstate = "08P01"
        else:
            waiter = await connect_psycopg(mux)
            with pytest.raises(psycopg.Error) as info:
                await asyncio.wait_for(waiter.execute("SELECT 1"), 20)
            sqlstate, text = info.value.sqlstate, str(info.value)
        assert sqlstate == "08P01", text
        assert "query_wait_timeout" in text
        # The holder was not disturbed, and the server is free again after it.
        assert await holder.fetchval("SELECT 2") == 2
        await tx.commit()
        fresh = await connect_asyncpg(mux)
        assert await fresh.fetchval("SELECT 3") == 3
        await fresh.close()
    finally:
        await close_quietly(holder, waiter)


async def test_max_client_conn(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"listen": {"max_client_conn": 3}})
    conns = [await connect_asyncpg(mux) for _ in range(3)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            extra = await connect_asyncpg(mux)
            await extra.close()
        assert info.value.sqlstate == "53300"
        assert "no more connections allowed (max_client_conn)" in str(info.value)
        # The ones inside the limit are unaffected...
        for i, conn in enumerate(conns):
            assert await conn.fetchval("SELECT $1::int", i) == i
        # ...and a slot freed by a disconnect can be taken again.
        await conns.pop().close()

        async def try_connect() -> asyncpg.Connection | None:
            try:
                return await connect_asyncpg(mux)
            except asyncpg.TooManyConnectionsError:
                return None

        again = await wait_until(
            try_connect, lambda c: c is not None, timeout=10, what="a free client slot"
        )
        assert again is not None
        conns.append(again)
        assert await again.fetchval("SELECT 'in'") == "in"
    finally:
        await close_quietly(*conns)


async def test_server_idle_closes_servers_down_to_min_size(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(
        {
            "pool": {"size": 4, "min_size": 1},
            "timeouts": {"server_idle": "1s", "server_lifetime": "1h"},
        }
    )
    monitor = await direct(pg)
    clients = [await connect_asyncpg(mux, dbname) for _ in range(4)]
    try:
        # Four clients in a transaction each: four servers.
        txs = await asyncio.gather(*(hold_transaction(c) for c in clients))
        assert await server_connections(monitor, dbname) == 4
        for tx in txs:
            await tx.commit()

        await wait_until(
            lambda: server_connections(monitor, dbname),
            lambda n: n == 1,
            timeout=20,
            what="idle servers closed down to min_size 1",
        )
        # It stays at min_size (never below), and the pool still works.
        for _ in range(10):
            await asyncio.sleep(0.3)
            assert await server_connections(monitor, dbname) == 1
        assert await clients[0].fetchval("SELECT 'ok'") == "ok"
    finally:
        await close_quietly(monitor, *clients)


async def test_server_lifetime_replaces_old_servers(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(
        {
            "pool": {"size": 1, "min_size": 0},
            "timeouts": {"server_lifetime": "1s", "server_idle": "1h"},
        }
    )
    monitor = await direct(pg)
    client = await connect_asyncpg(mux, dbname)
    try:
        first = await client.fetchval("SELECT pg_backend_pid()")

        # A server past its lifetime is not taken away in the middle of a transaction.
        tx = await hold_transaction(client)
        await asyncio.sleep(1.5)
        assert await client.fetchval("SELECT pg_backend_pid()") == first
        await tx.commit()

        async def pid() -> int:
            await asyncio.sleep(0.2)
            return int(await client.fetchval("SELECT pg_backend_pid()"))

        await wait_until(pid, lambda p: p != first, timeout=20, what="a new server after lifetime")
        # The old backend is really gone, not just set aside.
        await wait_until(
            lambda: monitor.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first),
            lambda n: n == 0,
            timeout=10,
            what="the expired backend closed",
        )
        assert await server_connections(monitor, dbname) <= 1
    finally:
        await close_quietly(monitor, client)

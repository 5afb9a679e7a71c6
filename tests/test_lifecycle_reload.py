"""Acceptance: reload on SIGHUP (issue 5).

With 50 clients running queries, a reload that changes a pool's size, adds a
database and removes another applies without breaking any of them; a changed
host moves connected clients to new servers without dropping them; a file with
a syntax error is rejected, logged, and the old configuration keeps serving.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import asyncpg
import pytest
from helpers import (
    Bystander,
    PgmuxFactory,
    close_quietly,
    conftest_attr,
    connect_asyncpg,
    direct,
    fresh_database,
    server_connections,
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)


def db_entry(pg: TempPostgres, **extra: Any) -> dict[str, Any]:
    return {"host": pg.host, "port": pg.port, **extra}


async def peak_servers(pg: TempPostgres, mux: Any, dbname: str, clients: int) -> int:
    """Run CLIENTS concurrent pg_sleep(1) through pgmux; the servers PostgreSQL saw."""
    conns = [await connect_asyncpg(mux, dbname) for _ in range(clients)]
    watcher = await direct(pg)
    try:
        tasks = [asyncio.create_task(c.execute("SELECT pg_sleep(1)")) for c in conns]
        peak = 0
        while not all(t.done() for t in tasks):
            peak = max(peak, await server_connections(watcher, dbname))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        return peak
    finally:
        await close_quietly(watcher, *conns)


async def test_reload_with_50_running_clients(
    pg: TempPostgres, pgmux: PgmuxFactory, request: pytest.FixtureRequest
) -> None:
    remove = conftest_attr(request.config, "REMOVE")
    busy, added, removed = fresh_database(pg), fresh_database(pg), fresh_database(pg)
    mux = pgmux(
        {
            "listen": {"workers": 1},
            "pool": {"size": 4, "max_server_connections": 30},
            "databases": {"*": remove, busy: db_entry(pg), removed: db_entry(pg)},
        }
    )
    assert await peak_servers(pg, mux, busy, 8) <= 4
    # A client of the database that goes away, idle between transactions.
    leaving = await connect_asyncpg(mux, removed)
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await connect_asyncpg(mux, added)

    conns = [await connect_asyncpg(mux, busy) for _ in range(50)]
    runners = [Bystander(c) for c in conns]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    try:
        await asyncio.sleep(0.5)
        mux.write_config(
            {
                "listen": {"workers": 1},
                "pool": {"size": 4, "max_server_connections": 30},
                "databases": {
                    "*": remove,
                    busy: db_entry(pg, pool_size=8),
                    added: db_entry(pg),
                },
            }
        )
        mux.signal(signal.SIGHUP)
        await wait_until(
            lambda: asyncio.sleep(0, mux.logs()), lambda logs: "reload" in logs, timeout=10
        )
        await asyncio.sleep(1.5)  # keep the 50 running across the reload
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    try:
        errors = [e for r in runners for e in r.errors]
        assert not errors, f"clients broken by the reload: {errors[:5]}"
        assert all(r.ok > 0 for r in runners)
        # The connected clients are the same connections, still working.
        assert all([await c.fetchval("SELECT 1") == 1 for c in conns])
    finally:
        await close_quietly(*conns)

    # New database: usable now.
    conn = await connect_asyncpg(mux, added)
    assert await conn.fetchval("SELECT current_database()") == added
    await close_quietly(conn)
    # Removed database: new logins refused, its idle client closed, its servers gone.
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await connect_asyncpg(mux, removed)
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await leaving.fetchval("SELECT 1")
    await close_quietly(leaving)
    watcher = await direct(pg)
    try:
        await wait_until(lambda: server_connections(watcher, removed), lambda n: n == 0, timeout=10)
    finally:
        await close_quietly(watcher)
    # Pool size change: up to 8 servers now.
    assert 4 < await peak_servers(pg, mux, busy, 8) <= 8


async def test_reload_changed_host_keeps_clients(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux({"databases": {dbname: db_entry(pg)}})
    conn = await connect_asyncpg(mux, dbname)
    try:
        tr = conn.transaction()
        await tr.start()  # mid-transaction during the reload
        assert str(await conn.fetchval("SELECT inet_client_addr()")) == "127.0.0.1"
        # Same PostgreSQL, now through its unix socket (trust): servers change.
        mux.write_config({"databases": {dbname: {"host": pg.socket_dir, "port": pg.port}}})
        mux.signal(signal.SIGHUP)
        await wait_until(
            lambda: asyncio.sleep(0, mux.logs()),
            lambda logs: "pool_reconfigured" in logs,
            timeout=10,
        )
        # The open transaction goes on, on its old server...
        assert str(await conn.fetchval("SELECT inet_client_addr()")) == "127.0.0.1"
        await tr.commit()
        # ...and the next one runs on a server opened with the new settings.
        assert await conn.fetchval("SELECT inet_client_addr()") is None
    finally:
        await close_quietly(conn)


async def test_reload_bad_config_keeps_running(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux()
    conn = await connect_asyncpg(mux)
    try:
        mux.config_path.write_text("pool:\n  size: [unclosed\n")
        mux.signal(signal.SIGHUP)
        logs = await wait_until(
            lambda: asyncio.sleep(0, mux.logs()),
            lambda text: "reload_failed" in text,
            timeout=10,
        )
        assert "YAML syntax error" in logs
        assert await conn.fetchval("SELECT 1") == 1
        fresh = await connect_asyncpg(mux)
        assert await fresh.fetchval("SELECT 2") == 2
        await close_quietly(fresh)
        # A file that parses but is invalid is refused the same way.
        mux.write_config({"pool": {"size": -1}})
        mux.signal(signal.SIGHUP)
        logs = await wait_until(
            lambda: asyncio.sleep(0, mux.logs()),
            lambda text: text.count("reload_failed") >= 2,
            timeout=10,
        )
        assert "pool.size" in logs
        assert await conn.fetchval("SELECT 3") == 3
        assert mux.proc.poll() is None
    finally:
        await close_quietly(conn)

"""Acceptance: `listen.workers: 2` — several processes on one port.

Clients are spread over the workers by SO_REUSEPORT; the global server limit
holds across them (static split); a CancelRequest that the kernel hands to the
wrong worker still cancels; SIGTERM stops every worker; a dead worker is
replaced. Which worker serves a client is read from the low byte of the
BackendKeyData pid it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

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
from pgmux.proxy.config import parse_config
from pgmux.proxy.workers import share, worker_config, worker_of

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

WORKERS = {"listen": {"workers": 2}}


def children(pid: int) -> set[int]:
    """The direct children of PID (the workers of a supervisor)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


async def wait_for_workers(pid: int, count: int) -> set[int]:
    async def probe() -> set[int]:
        return children(pid)

    return await wait_until(probe, lambda c: len(c) == count, timeout=15, what="workers")


# -- the split of limits (pure) ----------------------------------------------------


def test_limits_are_split_among_workers() -> None:
    assert [share(12, 2, i) for i in range(2)] == [6, 6]
    assert [share(13, 2, i) for i in range(2)] == [7, 6]
    assert [share(1, 2, i) for i in range(2)] == [1, 1]  # at least one each
    assert share(0, 2, 1) == 0  # unlimited stays unlimited
    config = parse_config(
        {
            "listen": {"workers": 2, "max_client_conn": 1000},
            "pool": {"size": 12, "max_server_connections": 12, "min_size": 1},
            "databases": {"hubs": {"pool_size": 9, "max_db_connections": 9}},
            "users": {"report": {"max_user_connections": 2}},
        }
    )
    parts = [worker_config(config, 2, i) for i in range(2)]
    assert sum(p.max_server_connections for p in parts) == 12
    assert sum(p.pool.size for p in parts) == 12
    assert sum(p.pool.min_size for p in parts) == 1
    assert sum(p.listen.max_client_conn for p in parts) == 1000
    assert [p.databases["hubs"].pool.size for p in parts] == [5, 4]
    assert sum(p.databases["hubs"].pool.max_db_connections for p in parts) == 9
    assert [p.users["report"].max_user_connections for p in parts] == [1, 1]


# -- a running multi-worker pgmux -----------------------------------------------------


async def test_clients_on_both_workers_within_the_global_limit(
    pgmux: PgmuxFactory, pg: TempPostgres
) -> None:
    dbname = fresh_database(pg)
    mux = pgmux({**WORKERS, "pool": {"size": 12, "max_server_connections": 12}})
    observer = await direct(pg)
    clients = [await connect_asyncpg(mux, dbname=dbname) for _ in range(40)]
    try:
        seen_workers = {worker_of(c.get_server_pid()) for c in clients}
        assert seen_workers == {0, 1}, "40 connections all landed on one worker"
        peak = 0
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, await server_connections(observer, dbname))
                await asyncio.sleep(0.02)

        async def work(conn, n: int) -> None:
            for i in range(5):
                async with conn.transaction():
                    await conn.execute("SELECT pg_sleep(0.02)")
                    assert await conn.fetchval("SELECT $1::int", n * 10 + i) == n * 10 + i

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(asyncio.gather(*(work(c, n) for n, c in enumerate(clients))), 60)
        stop.set()
        await watcher
        peak = max(peak, await server_connections(observer, dbname))
        assert 0 < peak <= 12, f"peak server connections {peak} > the global 12"
    finally:
        await close_quietly(observer, *clients)


async def test_cancel_landing_on_the_wrong_worker_still_cancels(pgmux: PgmuxFactory) -> None:
    mux = pgmux(WORKERS)
    victim = await connect_psycopg(mux)
    forwarded = 0
    try:
        owner = worker_of(victim.info.backend_pid)
        # Each cancel is a new TCP connection, so the kernel picks its worker
        # by hashing the new source port: about half land on the other one.
        for _attempt in range(24):
            before = mux.logs().count("cancel_to_worker")
            query = asyncio.create_task(victim.execute("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.2)  # let the query reach PostgreSQL
            assert not query.done(), "pg_sleep returned early"
            await asyncio.to_thread(victim.cancel)
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(query, 20)
            await asyncio.sleep(0.1)
            forwarded += mux.logs().count("cancel_to_worker") > before
            if forwarded >= 2:
                break
        assert forwarded >= 1, f"no cancel reached a worker other than {owner} in 24 tries"
        assert (await (await victim.execute("SELECT 7")).fetchone()) == (7,)
    finally:
        await close_quietly(victim)


async def test_sigterm_stops_every_worker(pgmux: PgmuxFactory) -> None:
    mux = pgmux(WORKERS)
    workers = await wait_for_workers(mux.pid, 2)
    conn = await connect_asyncpg(mux)
    assert await conn.fetchval("SELECT 1") == 1
    await close_quietly(conn)
    mux.signal(signal.SIGTERM)
    assert await asyncio.to_thread(mux.wait, 20) == 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "a worker outlived the supervisor"
    with pytest.raises(OSError):
        await connect_asyncpg(mux, timeout=3)


async def test_a_dead_worker_is_replaced(pgmux: PgmuxFactory) -> None:
    mux = pgmux(WORKERS)
    workers = await wait_for_workers(mux.pid, 2)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)

    async def probe() -> set[int]:
        return children(mux.pid)

    await wait_until(
        probe, lambda c: len(c) == 2 and victim not in c, timeout=20, what="a new worker"
    )
    # Every connection succeeds again, whichever worker the kernel picks.
    conns = [await connect_asyncpg(mux) for _ in range(12)]
    try:
        assert {worker_of(c.get_server_pid()) for c in conns} == {0, 1}
        for i, conn in enumerate(conns):
            assert await conn.fetchval("SELECT $1::int", i) == i
    finally:
        await close_quietly(*conns)


async def test_metrics_gather_every_worker(
    pgmux: PgmuxFactory, free_port: Callable[..., int]
) -> None:
    port = free_port()
    mux = pgmux({**WORKERS, "admin": {"http": {"address": "127.0.0.1", "port": port}}})
    conns = [await connect_asyncpg(mux) for _ in range(12)]
    try:
        for conn in conns:
            assert await conn.fetchval("SELECT 1") == 1

        async def scrape() -> str:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return ""
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            body = (await asyncio.wait_for(reader.read(), 10)).decode()
            writer.close()
            return body

        text = await wait_until(scrape, lambda t: 'worker="1"' in t, timeout=15, what="scrape")
        assert 'worker="0"' in text
        types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
        assert types and len(types) == len(set(types)), "a metric family repeated"
    finally:
        await close_quietly(*conns)


async def test_sighup_reloads_every_worker(pgmux: PgmuxFactory, pg: TempPostgres) -> None:
    mux = pgmux(WORKERS)
    await wait_for_workers(mux.pid, 2)
    alias = {"databases": {"aliasdb": {"host": pg.host, "port": pg.port, "dbname": "appdb"}}}
    mux.write_config({**WORKERS, **alias})
    mux.signal(signal.SIGHUP)

    async def reloaded() -> int:
        return mux.logs().count("reload")

    await wait_until(reloaded, lambda n: n >= 2, timeout=15, what="both workers reloading")
    conns = [await connect_asyncpg(mux, dbname="aliasdb") for _ in range(16)]
    try:
        assert {worker_of(c.get_server_pid()) for c in conns} == {0, 1}
        for conn in conns:
            assert await conn.fetchval("SELECT current_database()") == "appdb"
    finally:
        await close_quietly(*conns)

"""Fault suite: kill -9 of one pgmux worker (listen.workers 2) under transfer load.

24 clients move money between accounts, spread over both workers by
SO_REUSEPORT (each knows its worker from the low byte of its BackendKeyData
pid). One worker gets SIGKILL. The supervisor replaces it promptly (the time
until the new process exists and until it serves a query is measured); only
the dead worker's clients see errors, the other worker's clients go on
without one; no acknowledged commit is lost and the sum of balances holds;
afterwards the console (SHOW POOLS, SHOW SERVERS) and pg_stat_activity agree
that no server is left held, not even in the shared ledger the dead worker
had counted its servers in.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest
from faultload import SETUP_SQL, check_books, start_load, stop_load
from helpers import PgmuxFactory, close_quietly, connect_asyncpg, direct, fresh_database, wait_until
from test_admin_console import admin_psycopg, console_config, show
from test_workers import children

from pgmux.proxy.core.peers import worker_of
from pgmux.tempgres import TempPostgres

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

CLIENTS = 24
POOL_SIZE = 4
REPLACED_WITHIN = 5.0  # generous: the supervisor forks at once for a worker that ran > 1 s

ACTIVITY_SQL = """
SELECT count(*) AS backends,
       count(*) FILTER (WHERE state <> 'idle') AS busy
FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = $1
"""


def died_worker(logs: str, pid: int) -> int | None:
    """The index the supervisor logged for dead worker PID (worker_died ... pid=P worker=N)."""
    for line in logs.splitlines():
        if "worker_died" in line and re.search(rf"\bpid={pid}\b", line):
            found = re.search(r"\bworker=(\d+)", line)
            return int(found.group(1)) if found else None
    return None


async def served_by(mux: object, dbname: str, index: int, deadline: float) -> float:
    """When a new connection first landed on worker INDEX and ran a query."""
    while time.monotonic() < deadline:
        conn = None
        try:
            conn = await connect_asyncpg(mux, dbname, timeout=2)
            if worker_of(conn.get_server_pid()) == index and await conn.fetchval("SELECT 1") == 1:
                return time.monotonic()
        except (OSError, TimeoutError):
            pass
        finally:
            await close_quietly(conn)
        await asyncio.sleep(0.01)
    raise AssertionError(f"no connection reached a new worker {index}")


async def test_kill_9_of_one_worker_under_transfer_load(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    pg.sql(SETUP_SQL, dbname)
    mux = pgmux(
        {
            "listen": {"workers": 2},
            "pool": {"mode": "transaction", "size": POOL_SIZE},
            "timeouts": {"query_wait": "30s"},
            **console_config(),
        }
    )
    load, stop, tasks = start_load(mux, CLIENTS, dbname)
    try:

        async def connected() -> list[int]:
            return [c.worker for c in load.clients if not c.commits]

        await wait_until(connected, lambda idle: not idle, timeout=30, what="every client's commit")
        on_worker = {c.number: c.worker for c in load.clients}
        assert set(on_worker.values()) == {0, 1}, f"clients not on both workers: {on_worker}"
        assert load.acknowledged, f"no commit before the kill ({load.errors} errors)"
        victim = min(children(mux.pid))
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        async def workers() -> set[int]:
            return children(mux.pid)

        await wait_until(
            workers, lambda c: len(c) == 2 and victim not in c, timeout=20, interval=0.01
        )
        replaced = time.monotonic()
        index = died_worker(mux.logs(), victim)
        assert index in (0, 1), f"no worker_died for pid {victim} in the log"
        serving = await served_by(mux, dbname, index, time.monotonic() + 20)
        affected = {n for n, w in on_worker.items() if w == index}

        async def still_down() -> list[int]:
            return [n for n in affected if not any(t > serving for t in load.clients[n].commits)]

        await wait_until(still_down, lambda down: not down, timeout=20, what="its clients back")
        back = time.monotonic()
        await asyncio.sleep(0.5)  # the load runs on against both workers
    finally:
        await stop_load(stop, tasks)
    survivor = 1 - index
    print(
        f"kill -9 of worker {index}: new process after {(replaced - killed) * 1000:.0f} ms, "
        f"serving after {(serving - killed) * 1000:.0f} ms, all {len(affected)} of its clients "
        f"committed again after {(back - killed) * 1000:.0f} ms; "
        f"{sum(1 for c in load.clients if c.errors)} clients saw {load.errors} errors; "
        f"{len(load.acknowledged)} commits acknowledged"
    )
    assert replaced - killed < REPLACED_WITHIN, f"worker replaced after {replaced - killed:.2f} s"
    on_survivor = [(c.number, e) for c in load.clients for e in c.errors if e[1] == survivor]
    assert not on_survivor, f"clients of the surviving worker {survivor} saw errors: {on_survivor}"
    unaffected = [c.number for c in load.clients if c.errors and on_worker[c.number] == survivor]
    assert not unaffected, f"clients of worker {survivor} saw errors: {unaffected}"
    assert load.hangs == 0, f"{load.hangs} transactions hung"
    check_books(load, lambda query: pg.sql(query, dbname))
    await nothing_held(mux, pg, dbname)


async def nothing_held(mux: object, pg: TempPostgres, dbname: str) -> None:
    """Console and PostgreSQL agree: no client, no active server, ledger slots all free."""
    console = await admin_psycopg(mux)
    observer = await direct(pg)
    try:

        async def state() -> tuple[int, ...]:
            pools = [r for r in await show(console, "POOLS") if r["database"] == dbname]
            servers = [r for r in await show(console, "SERVERS") if r["database"] == dbname]
            row = await observer.fetchrow(ACTIVITY_SQL, dbname)
            return (
                sum(r["cl_active"] + r["cl_waiting"] for r in pools),
                sum(r["sv_active"] for r in pools),
                sum(1 for s in servers if s["state"] != "idle"),
                len(servers) - row["backends"],  # a server counted that PostgreSQL lacks
                row["busy"],
            )

        await wait_until(state, lambda s: s == (0, 0, 0, 0, 0), timeout=15, what="pools settled")
        # The dead worker's ledger slots were freed: the pool opens its full size again.
        conns = [await connect_asyncpg(mux, dbname) for _ in range(2 * POOL_SIZE)]
        try:
            holders = [c.transaction() for c in conns[:POOL_SIZE]]
            for conn, tx in zip(conns, holders, strict=False):
                await asyncio.wait_for(tx.start(), 10)
                await asyncio.wait_for(conn.execute("SELECT 1"), 10)  # a server each
            assert (await observer.fetchrow(ACTIVITY_SQL, dbname))["busy"] == POOL_SIZE
            for tx in holders:
                await tx.rollback()
        finally:
            await close_quietly(*conns)
    finally:
        await close_quietly(console, observer)

"""Acceptance: `listen.workers: 2` — several processes on one port.

Clients are spread over the workers by SO_REUSEPORT; every limit holds across
them (the shared ledger) and one pool's servers move to whichever worker has
clients waiting, so a pool of one server serves both; a CancelRequest that the kernel hands to the
wrong worker still cancels; SIGTERM stops every worker; a dead worker is
replaced. Which worker serves a client is read from the low byte of the
BackendKeyData pid it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

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
from test_admin_console import admin_psycopg, console_config, show

from pgmux.proxy.base import ids
from pgmux.proxy.base.ledger import Ledger, LedgerFull, scope_key
from pgmux.proxy.config import Config, LimitsConfig
from pgmux.proxy.core.peers import MAX_WORKERS, pid_of_worker, worker_of
from pgmux.proxy.daemon.peers import worker_config
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


# -- the ledger: limits shared by the workers (pure) --------------------------------


def _take_in_child(ledger: Ledger, index: int, row: int, limit: int, out) -> None:
    ledger.index = index
    out.put(ledger.take([(row, limit)]))


def test_ledger_counts_across_processes() -> None:
    ledger = Ledger(2)
    row = ledger.row(scope_key("pool", "appdb", "app"))
    results = multiprocessing.get_context("fork").SimpleQueue()
    child = multiprocessing.get_context("fork").Process(
        target=_take_in_child, args=(ledger, 1, row, 2, results)
    )
    child.start()
    child.join(10)
    assert results.get() is None  # worker 1 counted one server
    assert ledger.take([(row, 2)]) is None  # worker 0: the second of 2
    assert ledger.take([(row, 2)]) == 0  # a third would exceed pool.size 2
    assert ledger.total(row) == 2
    ledger.clear_worker(1)  # worker 1 died: its servers went with it
    assert ledger.take([(row, 2)]) is None
    assert ledger.total(row) == 2


def _die_holding_the_lock(ledger: Ledger, index: int) -> None:
    ledger.index = index
    ledger._locked().__enter__()  # and never leaves: SIGKILL at the wrong moment
    os._exit(0)


def test_a_worker_killed_holding_the_ledger_lock_does_not_keep_it() -> None:
    ledger = Ledger(2)
    row = ledger.row(scope_key("pool", "appdb", "app"))
    child = multiprocessing.get_context("fork").Process(
        target=_die_holding_the_lock, args=(ledger, 1)
    )
    child.start()
    child.join(10)
    ledger.clear_worker(1)  # the supervisor, seeing worker 1 gone
    started = time.monotonic()
    assert ledger.take([(row, 2)]) is None
    waited = time.monotonic() - started
    assert waited < 1.0, f"the lock stayed with the dead worker ({waited:.1f} s)"


def test_ledger_take_checks_every_limit_before_counting() -> None:
    ledger = Ledger(2)
    pool, db = ledger.row(scope_key("pool", "a", "u")), ledger.row(scope_key("db", "a"))
    assert ledger.take([(pool, 5), (db, 1)]) is None
    assert ledger.take([(pool, 5), (db, 1)]) == 1  # the database cap, second in the list
    assert (ledger.total(pool), ledger.total(db)) == (1, 1)  # nothing half-counted
    ledger.give([pool, db])
    assert (ledger.total(pool), ledger.total(db)) == (0, 0)


def test_a_full_ledger_refuses_the_new_scope_only() -> None:
    ledger = Ledger(2, slots=2)
    first = ledger.row(scope_key("pool", "a", "u"))
    ledger.row(scope_key("db", "a"))
    with pytest.raises(LedgerFull) as refused:
        ledger.row(scope_key("pool", "b", "u"))
    assert refused.value.sqlstate == "53300"
    assert ledger.row(scope_key("pool", "a", "u")) == first  # known scopes still work


def test_ledger_hands_a_server_to_the_worker_with_fewer_then_the_oldest_waiter() -> None:
    ledger = Ledger(3)
    row = ledger.row(scope_key("pool", "appdb", "app"))
    assert ledger.taker(row, 0, None) is None  # nobody waits anywhere: keep it
    for worker, (servers, waiting, since) in enumerate([(2, 1, 5.0), (1, 1, 9.0), (1, 2, 7.0)]):
        ledger.index = worker
        for _ in range(servers):
            ledger.take([(row, 0)])
        ledger.set_waiting(row, waiting, since)
    ledger.index = 0
    # all three would have 1 server: the first client waiting longest wins
    assert ledger.taker(row, 1, 8.0) == 2
    assert ledger.taker(row, 1, 5.0) is None  # worker 0's own client waits longest
    assert ledger.taker(row, 0, 9.5) is None  # fewer servers here than anywhere else
    assert ledger.taker(row, 2, 1.0) == 2  # more here: even an older waiter yields
    ledger.move([row], 2)
    assert [ledger.count_of(row, w) for w in range(3)] == [1, 1, 2]


# -- a worker's share, its cancel pids and connection ids (pure) ---------------------


def test_only_the_login_guard_is_split_between_workers() -> None:
    config = Config(limits=LimitsConfig(max_logins_in_progress=5))
    shares = [worker_config(config, 2, index) for index in range(2)]
    assert [c.limits.max_logins_in_progress for c in shares] == [3, 2]
    assert all(c.listen.max_client_conn == config.listen.max_client_conn for c in shares)
    unlimited = Config(limits=LimitsConfig(max_logins_in_progress=0))
    assert worker_config(unlimited, 2, 1).limits.max_logins_in_progress == 0
    assert worker_config(config, 1, 0) is config


def test_a_cancel_pid_names_its_worker_and_stays_positive() -> None:
    for index in (0, 1, MAX_WORKERS - 1):
        for random_bits in (1, 0x7FFFFFFF, 0x12345678):
            pid = pid_of_worker(random_bits, index)
            assert 0 <= pid <= 0x7FFFFFFF
            assert worker_of(pid) == index


def test_connection_ids_of_workers_never_collide() -> None:
    numbered: list[list[int]] = []
    try:
        for index in range(3):
            ids.configure(index, 3)
            numbered.append([ids.next_client_id() for _ in range(2)])
            # clients and servers share the sequence (PgBouncer's socket ids)
            numbered[-1] += [ids.next_server_id() for _ in range(2)]
    finally:
        ids.configure(0, 1)
    assert numbered[1] == [2, 5, 8, 11]
    everyone = [n for worker in numbered for n in worker]
    assert len(set(everyone)) == len(everyone)


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


async def one_client_per_worker(mux, dbname: str) -> tuple[list, dict[int, object]]:
    """Connect until each worker has a client (the kernel hashes the source port)."""
    clients, by_worker = [], {}
    for _ in range(40):
        conn = await connect_asyncpg(mux, dbname=dbname)
        clients.append(conn)
        by_worker.setdefault(worker_of(conn.get_server_pid()), conn)
        if len(by_worker) == 2:
            break
    assert set(by_worker) == {0, 1}, "40 connections all landed on one worker"
    return clients, by_worker


async def test_one_server_serves_the_clients_of_both_workers(
    pgmux: PgmuxFactory, pg: TempPostgres
) -> None:
    """pool.size 1 means one backend in all: it moves to the worker whose
    client waits, with its session and its prepared statements."""
    dbname = fresh_database(pg)
    mux = pgmux({**WORKERS, **console_config(), "pool": {"size": 1}})
    observer = await direct(pg)
    clients, by_worker = await one_client_per_worker(mux, dbname)
    console = await admin_psycopg(mux)
    try:
        first, second = by_worker[0], by_worker[1]
        statement = await first.prepare("SELECT $1::int + 1")  # a named statement
        backends = set()
        for i in range(5):
            backends.add(await first.fetchval("SELECT pg_backend_pid()"))
            backends.add(await second.fetchval("SELECT pg_backend_pid()"))
            assert await statement.fetchval(i) == i + 1
        assert len(backends) == 1, f"pool.size 1 opened {len(backends)} backends"
        assert await server_connections(observer, dbname) == 1
        # Whichever worker the console landed on, it counts both workers' clients.
        pools = [r for r in await show(console, "POOLS") if r["database"] == dbname]
        assert sum(r["cl_active"] + r["cl_waiting"] for r in pools) == len(clients)
        assert sum(r["sv_active"] + r["sv_idle"] for r in pools) == 1
        seen = {r["database"] for r in await show(console, "CLIENTS")}
        assert dbname in seen
    finally:
        await close_quietly(observer, console, *clients)


async def test_console_commands_act_on_every_worker(pgmux: PgmuxFactory, pg: TempPostgres) -> None:
    dbname = fresh_database(pg)
    mux = pgmux({**WORKERS, **console_config()})
    clients, by_worker = await one_client_per_worker(mux, dbname)
    console = await admin_psycopg(mux)
    try:
        await console.execute("PAUSE")
        queries = [asyncio.create_task(c.fetchval("SELECT 1")) for c in by_worker.values()]
        await asyncio.sleep(0.5)
        assert not any(q.done() for q in queries), "a worker ran a query while paused"
        await console.execute("RESUME")
        assert await asyncio.wait_for(asyncio.gather(*queries), 10) == [1, 1]
        # SHOW CLIENTS lists both workers' clients; KILL_CLIENT reaches either.
        ids = [r["id"] for r in await show(console, "CLIENTS") if r["database"] == dbname]
        assert len(ids) == len(clients) == len(set(ids))
        for client_id in ids:
            cur = await console.execute(f"KILL_CLIENT {client_id}")
            assert cur.statusmessage == "KILL_CLIENT"
        for conn in by_worker.values():
            # The FATAL may reach asyncpg while it is idle; then its state machine
            # complains (InternalClientError) instead of raising the FATAL itself.
            killed = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
            with pytest.raises((*killed, OSError)):
                await conn.fetchval("SELECT 1")
    finally:
        await close_quietly(console, *clients)


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

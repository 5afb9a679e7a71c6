"""Acceptance: signals to a running pgmux (issue 5).

SIGTERM lets 50 in-flight transactions commit, refuses new connections and
exits 0; a second SIGTERM and SIGQUIT exit at once; SIGINT refuses queued
requests and waits for the servers in use; SIGUSR1 / SIGUSR2 pause and resume;
the pidfile exists while pgmux runs and is gone after.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import asyncpg
import pytest
from helpers import (
    PgmuxFactory,
    close_quietly,
    connect_asyncpg,
    direct,
    fresh_database,
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

ONE_PROCESS = {"listen": {"workers": 1}}  # signals go to the daemon itself


def refused(mux) -> bool:
    try:
        with socket.create_connection((mux.host, mux.port), timeout=2):
            return False
    except OSError:
        return True


async def backends(pg: TempPostgres, dbname: str) -> int:
    conn = await direct(pg, dbname)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                " AND backend_type = 'client backend' AND state <> 'idle'"
                " AND pid <> pg_backend_pid()",
                dbname,
            )
        )
    finally:
        await close_quietly(conn)


async def make_table(pg: TempPostgres, dbname: str) -> None:
    conn = await direct(pg, dbname)
    try:
        await conn.execute("CREATE TABLE done (id int PRIMARY KEY)")
        await conn.execute("GRANT ALL ON done TO app")
    finally:
        await close_quietly(conn)


async def count_rows(pg: TempPostgres, dbname: str) -> int:
    conn = await direct(pg, dbname)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM done"))
    finally:
        await close_quietly(conn)


async def transaction(conn: asyncpg.Connection, i: int, hold: float) -> str:
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO done VALUES ($1)", i)
            await conn.execute(f"SELECT pg_sleep({hold})")
        return "committed"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


async def test_sigterm_lets_50_transactions_commit(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    await make_table(pg, dbname)
    mux = pgmux(
        {
            **ONE_PROCESS,
            "pool": {"size": 10, "max_server_connections": 12},
            "timeouts": {"shutdown_grace": "60s", "query_wait": "60s"},
        }
    )
    conns = [await connect_asyncpg(mux, dbname) for _ in range(50)]
    try:
        tasks = [asyncio.create_task(transaction(c, i, 1.0)) for i, c in enumerate(conns)]
        # Every transaction is under way: 10 on servers, 40 queued behind them.
        await wait_until(lambda: backends(pg, dbname), lambda n: n >= 9, timeout=15)
        start = time.monotonic()
        mux.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert mux.proc.poll() is None, "pgmux exited with transactions in flight"
        assert refused(mux), "pgmux still accepts connections after SIGTERM"
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert outcomes == ["committed"] * 50, outcomes
        code = await asyncio.to_thread(mux.wait, 60)
        print(f"SIGTERM: 50 transactions committed, exit after {time.monotonic() - start:.2f}s")
        assert code == 0
    finally:
        await close_quietly(*conns)
    assert await count_rows(pg, dbname) == 50
    assert "shutdown_started" in mux.logs()


async def test_second_sigterm_exits_now(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux({**ONE_PROCESS, "timeouts": {"shutdown_grace": "60s"}})
    conn = await connect_asyncpg(mux)
    try:
        task = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.5)
        mux.signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert mux.proc.poll() is None, "the first SIGTERM did not wait for the query"
        mux.signal(signal.SIGTERM)
        assert await asyncio.to_thread(mux.wait, 10) == 0
        with pytest.raises((asyncpg.PostgresError, ConnectionError, OSError)):
            await asyncio.wait_for(task, 10)
    finally:
        await close_quietly(conn)
    assert "shutdown_immediate" in mux.logs()


async def test_sigquit_exits_now(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux({**ONE_PROCESS, "timeouts": {"shutdown_grace": "60s"}})
    conn = await connect_asyncpg(mux)
    try:
        tr = conn.transaction()
        await tr.start()
        task = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.5)
        mux.signal(signal.SIGQUIT)
        assert await asyncio.to_thread(mux.wait, 10) == 0
        with pytest.raises((asyncpg.PostgresError, ConnectionError, OSError)):
            await asyncio.wait_for(task, 10)
    finally:
        await close_quietly(conn)


async def test_shutdown_grace_bounds_the_wait(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux({**ONE_PROCESS, "timeouts": {"shutdown_grace": "1s"}})
    conn = await connect_asyncpg(mux)
    try:
        tr = conn.transaction()
        await tr.start()  # a transaction that never ends
        await conn.execute("SELECT 1")
        start = time.monotonic()
        mux.signal(signal.SIGTERM)
        assert await asyncio.to_thread(mux.wait, 20) == 0
        assert time.monotonic() - start >= 0.8
    finally:
        await close_quietly(conn)


async def test_sigint_refuses_queued_and_waits_for_servers(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    await make_table(pg, dbname)
    mux = pgmux({**ONE_PROCESS, "pool": {"size": 1}, "timeouts": {"shutdown_grace": "60s"}})
    holder = await connect_asyncpg(mux, dbname)
    queued = await connect_asyncpg(mux, dbname)
    try:
        held = asyncio.create_task(transaction(holder, 1, 1.5))
        await wait_until(lambda: backends(pg, dbname), lambda n: n == 1, timeout=10)
        waiting = asyncio.create_task(queued.fetchval("SELECT 42"))
        await asyncio.sleep(0.3)
        mux.signal(signal.SIGINT)
        # The queued request is refused at once, before the holder finishes.
        with pytest.raises((asyncpg.PostgresError, ConnectionError, OSError)) as info:
            await asyncio.wait_for(waiting, 10)
        assert not held.done()
        if isinstance(info.value, asyncpg.PostgresError):
            # 57P01 from pgmux; asyncpg may report only the close (08003) when
            # the error lands in the middle of its Parse/Describe round trip.
            assert info.value.sqlstate in {"57P01", "08003"}, info.value
        assert await asyncio.wait_for(held, 30) == "committed"
        assert await asyncio.to_thread(mux.wait, 30) == 0
    finally:
        await close_quietly(holder, queued)
    assert await count_rows(pg, dbname) == 1


async def test_sigusr1_pauses_sigusr2_resumes(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux(ONE_PROCESS)
    conn = await connect_asyncpg(mux)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        mux.signal(signal.SIGUSR1)
        await asyncio.sleep(0.5)
        task = asyncio.create_task(conn.fetchval("SELECT 2"))
        await asyncio.sleep(1.0)
        assert not task.done(), "a transaction ran while pgmux was paused"
        mux.signal(signal.SIGUSR2)
        assert await asyncio.wait_for(task, 10) == 2
        assert mux.proc.poll() is None
    finally:
        await close_quietly(conn)


async def test_pidfile_written_and_removed(
    pg: TempPostgres, pgmux: PgmuxFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pidfile = tmp_path_factory.mktemp("pid") / "pgmux.pid"
    mux = pgmux({**ONE_PROCESS, "pidfile": str(pidfile)})
    assert pidfile.read_text().strip() == str(mux.pid)
    mux.signal(signal.SIGTERM)
    assert await asyncio.to_thread(mux.wait, 20) == 0
    assert not pidfile.exists()


async def test_pidfile_of_running_pgmux_refuses_second_start(
    pg: TempPostgres, pgmux: PgmuxFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pidfile = tmp_path_factory.mktemp("pid") / "pgmux.pid"
    first = pgmux({**ONE_PROCESS, "pidfile": str(pidfile)})
    with pytest.raises(RuntimeError, match="already running"):
        pgmux({**ONE_PROCESS, "pidfile": str(pidfile)})
    assert pidfile.read_text().strip() == str(first.pid)
    # A stale file (its process is gone) is simply replaced.
    first.signal(signal.SIGKILL)
    await asyncio.to_thread(first.wait, 10)
    assert pidfile.exists()
    second = pgmux({**ONE_PROCESS, "pidfile": str(pidfile)})
    assert pidfile.read_text().strip() == str(second.pid)

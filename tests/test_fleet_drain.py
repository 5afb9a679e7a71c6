"""SIGTERM drains at transaction boundaries, and /ready says so at once.

Four clients share one server and keep it busy back to back: at any moment
one runs a transaction and the others are queued, idle only for the instant
between a COMMIT's answer and their next BEGIN. A drain that waited for idle
moments would let them run on; pgmux lets each go right after the transaction
it had in progress or queued at SIGTERM (57P01 on its next BEGIN). Every
transaction a client saw committed is in the table, and only those. /ready
answers 503 from the first moment of the shutdown while a transaction still
runs, and /health keeps answering.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import asyncpg
import pytest
from helpers import close_quietly, connect_asyncpg, direct, fresh_database

from pgmux.tempgres import TempPostgres, free_port

pytestmark = pytest.mark.timeout(90)

GRACE = 30
CLIENTS = 4


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def make_table(pg: TempPostgres, dbname: str) -> None:
    conn = await direct(pg, dbname)
    try:
        await conn.execute("CREATE TABLE done (client int, seq int)")
        await conn.execute("GRANT ALL ON done TO app")
    finally:
        await close_quietly(conn)


async def busy_client(mux: Any, dbname: str, cid: int, acked: list[tuple[int, int, float]]) -> str:
    """Transactions back to back until pgmux lets this client go; how it ended."""
    conn = await connect_asyncpg(mux, dbname)
    phase = "begin"
    try:
        for seq in range(5000):
            phase = "begin"
            await conn.execute("BEGIN")
            phase = "body"
            await conn.execute(f"INSERT INTO done VALUES ({cid}, {seq}); SELECT pg_sleep(0.01)")
            phase = "commit"
            await conn.execute("COMMIT")
            acked.append((cid, seq, time.monotonic()))
        return "never stopped"
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        return f"{phase}: {getattr(exc, 'sqlstate', None) or type(exc).__name__}"
    finally:
        conn.terminate()


async def test_sigterm_lets_busy_clients_go_at_the_boundary(pg: TempPostgres, pgmux: Any) -> None:
    dbname = fresh_database(pg)
    await make_table(pg, dbname)
    mux = pgmux(
        {
            "listen": {"workers": 1},
            "pool": {"size": 1, "max_server_connections": 1},
            "timeouts": {"shutdown_grace": f"{GRACE}s", "query_wait": "30s"},
        }
    )
    acked: list[tuple[int, int, float]] = []
    tasks = [asyncio.create_task(busy_client(mux, dbname, cid, acked)) for cid in range(CLIENTS)]
    while len(acked) < 20:
        await asyncio.sleep(0.05)
    start = time.monotonic()
    mux.signal(signal.SIGTERM)
    code = await asyncio.to_thread(mux.wait, GRACE + 10)
    elapsed = time.monotonic() - start
    endings = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    after = Counter(cid for cid, _seq, at in acked if at > start)
    print(f"busy drain: exit after {elapsed:.2f}s, commits after SIGTERM {dict(after)}, {endings}")
    assert code == 0
    assert all(ending.startswith("begin: ") for ending in endings), endings
    # Its transaction in progress (or queued) at SIGTERM, and one more whose
    # COMMIT answer was already on its way: nothing new starts after that.
    assert max(after.values(), default=0) <= 2, after
    conn = await direct(pg, dbname)
    try:
        rows = sorted(tuple(r) for r in await conn.fetch("SELECT client, seq FROM done"))
    finally:
        await close_quietly(conn)
    assert rows == sorted((cid, seq) for cid, seq, _at in acked)


async def test_ready_turns_false_at_the_first_moment(pg: TempPostgres, pgmux: Any) -> None:
    http = free_port()
    mux = pgmux(
        {
            "listen": {"workers": 1},
            "timeouts": {"shutdown_grace": f"{GRACE}s"},
            "admin": {"http": {"address": "127.0.0.1", "port": http}},
        }
    )
    conn = await connect_asyncpg(mux)
    try:
        assert await asyncio.to_thread(http_status, http, "/ready") == 200
        await conn.execute("BEGIN")
        mux.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        # Inside its transaction the client is still served; the balancer is told to stop.
        assert await asyncio.to_thread(http_status, http, "/ready") == 503
        assert await asyncio.to_thread(http_status, http, "/health") == 200
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("COMMIT")
        assert await asyncio.to_thread(mux.wait, 10) == 0
    finally:
        conn.terminate()


async def test_session_clients_go_when_outside_a_transaction(pg: TempPostgres, pgmux: Any) -> None:
    """Session mode: a client keeps its server, so "between transactions" means
    linked but idle. The idle one gets 57P01 at once; the one inside a
    transaction commits, then gets 57P01; pgmux exits long before the grace."""
    dbname = fresh_database(pg)
    await make_table(pg, dbname)
    mux = pgmux(
        {
            "listen": {"workers": 1},
            "pool": {"mode": "session"},
            "timeouts": {"shutdown_grace": f"{GRACE}s"},
        }
    )
    idle = await connect_asyncpg(mux, dbname)
    busy = await connect_asyncpg(mux, dbname)
    try:
        await busy.execute("BEGIN")
        await busy.execute("INSERT INTO done VALUES (1, 1)")
        start = time.monotonic()
        mux.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert await _closed_by_pgmux(idle), "an idle session client was kept"
        await busy.execute("COMMIT")
        code = await asyncio.to_thread(mux.wait, GRACE + 10)
        elapsed = time.monotonic() - start
        print(f"session drain: exit after {elapsed:.2f}s")
        assert code == 0 and elapsed < GRACE / 3
    finally:
        idle.terminate()
        busy.terminate()
    conn = await direct(pg, dbname)
    try:
        assert await conn.fetchval("SELECT count(*) FROM done") == 1
    finally:
        await close_quietly(conn)


async def _closed_by_pgmux(conn: asyncpg.Connection) -> bool:
    if conn.is_closed():
        return True
    try:
        await conn.execute("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError):
        return True
    return False

"""Acceptance: cancel requests (issue 5).

pgmux hands each client a BackendKeyData of its own; a CancelRequest with that
key reaches the server running that client's query (PostgreSQL answers 57014),
drivers' own cancel works (asyncpg, psycopg 3), a forged key or a cancel for an
idle client does nothing, and a server handed on to another client never gets a
cancel meant for the previous one.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

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
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

CANCEL_REQUEST_CODE = 80877102
# A cancelled pg_sleep(30) ends well before this; a missed cancel would not.
CANCELLED_WITHIN = 10.0


def send_cancel(mux: Any, pid: int, key: int) -> None:
    """A raw CancelRequest to pgmux (what libpq sends), then wait for the close."""
    with socket.create_connection((mux.host, mux.port), timeout=10) as sock:
        sock.sendall(struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, pid, key & 0xFFFFFFFF))
        assert sock.recv(1) == b""  # pgmux closes without an answer, like PostgreSQL


def key_of(conn: asyncpg.Connection) -> tuple[int, int]:
    """The BackendKeyData asyncpg received (pgmux's, not PostgreSQL's)."""
    protocol = conn._protocol  # asyncpg keeps the key there; no public accessor
    return protocol.backend_pid, protocol.backend_secret


async def sleeping(pg: TempPostgres, dbname: str) -> int:
    conn = await direct(pg, dbname)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                " AND query LIKE '%pg_sleep(%' AND state = 'active' AND pid <> pg_backend_pid()",
                dbname,
            )
        )
    finally:
        await close_quietly(conn)


async def test_own_backend_key(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux()
    conn = await connect_asyncpg(mux)
    try:
        pid, _ = key_of(conn)
        real = await conn.fetchval("SELECT pg_backend_pid()")
        assert pid != real, "pgmux passed PostgreSQL's own key through"
    finally:
        await close_quietly(conn)


async def test_asyncpg_cancel(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux()
    conn = await connect_asyncpg(mux, dbname)
    try:
        start = time.monotonic()
        # wait_for cancels the coroutine; asyncpg then sends a CancelRequest
        # and waits for the query to end.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.execute("SELECT pg_sleep(30)"), 0.5)
        assert await conn.fetchval("SELECT 1") == 1
        took = time.monotonic() - start
        print(f"asyncpg: pg_sleep(30) cancelled after {took:.2f}s")
        assert took < CANCELLED_WITHIN
        assert await sleeping(pg, dbname) == 0
    finally:
        await close_quietly(conn)


async def test_psycopg_cancel(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux()
    conn = await connect_psycopg(mux, dbname)
    try:
        task = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        await wait_until(lambda: sleeping(pg, dbname), lambda n: n == 1, timeout=10)
        start = time.monotonic()
        if hasattr(conn, "cancel_safe"):
            await conn.cancel_safe()
        else:
            conn.cancel()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(task, 30)
        took = time.monotonic() - start
        print(f"psycopg: pg_sleep(30) cancelled {took:.2f}s after the cancel")
        assert took < CANCELLED_WITHIN
        cur = await conn.execute("SELECT 2")
        assert (await cur.fetchone()) == (2,)
    finally:
        await close_quietly(conn)


async def test_forged_key_cancels_nothing(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux()
    conn = await connect_asyncpg(mux)
    try:
        pid, key = key_of(conn)
        task = asyncio.create_task(conn.fetchval("SELECT 1 FROM pg_sleep(2)"))
        await asyncio.sleep(0.3)
        send_cancel(mux, pid, key ^ 0x5A5A5A5A)  # right pid, wrong key
        send_cancel(mux, pid ^ 0x1234, key)  # a pid nobody has
        send_cancel(mux, pid + 1, key + 1)
        assert await asyncio.wait_for(task, 30) == 1, "the query did not complete"
        assert "cancel_forwarded" not in mux.logs()
    finally:
        await close_quietly(conn)


async def test_cancel_of_idle_client_is_ignored(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """Client A's key, sent while A is idle, must not hit B on A's old server."""
    mux = pgmux({"pool": {"size": 1}})
    a = await connect_asyncpg(mux)
    b = await connect_asyncpg(mux)
    try:
        a_backend = await a.fetchval("SELECT pg_backend_pid()")
        a_pid, a_key = key_of(a)
        task = asyncio.create_task(b.fetchval("SELECT 1 FROM pg_sleep(2)"))
        await asyncio.sleep(0.3)
        # With pool size 1, B runs on the very server A used.
        assert await active(pg, a_backend) == 1
        for _ in range(3):
            send_cancel(mux, a_pid, a_key)
        assert await asyncio.wait_for(task, 30) == 1, "B's query was cancelled by A's key"
        assert await a.fetchval("SELECT 1") == 1
    finally:
        await close_quietly(a, b)


async def active(pg: TempPostgres, backend: int) -> int:
    """1 if that PostgreSQL backend is running a statement now, else 0."""
    conn = await direct(pg)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                backend,
            )
        )
    finally:
        await close_quietly(conn)


async def test_twenty_concurrent_cancels_hit_only_their_own(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    mux = pgmux({"pool": {"size": 30, "max_server_connections": 40}})
    cancellers = [await connect_asyncpg(mux, dbname) for _ in range(20)]
    bystanders = [await connect_asyncpg(mux, dbname) for _ in range(10)]
    try:
        doomed = [asyncio.create_task(c.fetchval("SELECT 1 FROM pg_sleep(30)")) for c in cancellers]
        spared = [asyncio.create_task(c.fetchval("SELECT 1 FROM pg_sleep(3)")) for c in bystanders]
        await wait_until(lambda: sleeping(pg, dbname), lambda n: n == 30, timeout=15)
        loop = asyncio.get_running_loop()
        # All 20 CancelRequests at once, each with its own client's key.
        await asyncio.gather(
            *(loop.run_in_executor(None, send_cancel, mux, *key_of(c)) for c in cancellers)
        )
        results = await asyncio.wait_for(
            asyncio.gather(*doomed, return_exceptions=True), CANCELLED_WITHIN
        )
        assert all(isinstance(r, asyncpg.QueryCanceledError) for r in results), results
        assert await asyncio.wait_for(asyncio.gather(*spared), 30) == [1] * 10
        # Each cancelled client goes on working.
        for conn in cancellers:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await close_quietly(*cancellers, *bystanders)

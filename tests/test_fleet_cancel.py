"""Cancels across instances: three peered pgmux behind HAProxy (docs/scaling.md).

psycopg's cancel opens a new connection to the address it connected to, the
balancer, which hands it to any instance. 100 cancels (half from protocol 3.2
clients with 32-byte, fleet-signed keys) each stop the right `pg_sleep(30)`
within a second, most of them forwarded by the instance that got the request
to the one whose key it is. Forged keys sent through the balancer cancel
nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from typing import Any

import psycopg
import pytest
from fleet import Balancer, make_fleet, need_haproxy, start_haproxy
from helpers import connect_psycopg

from pgmux.protocol import messages
from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 10
ROUNDS = 10  # 100 cancels
LIMIT = 1.0  # seconds from the cancel to the query's error


async def cancel_round(conn: psycopg.AsyncConnection[Any]) -> float:
    """pg_sleep(30), cancelled through the balancer; seconds until it stopped."""
    query = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.3)  # the query is on its server
    assert not query.done(), query
    start = time.monotonic()
    await conn.cancel_safe(timeout=5)
    try:
        await asyncio.wait_for(query, 10)
    except psycopg.errors.QueryCanceled:
        return time.monotonic() - start
    raise AssertionError("pg_sleep(30) finished without being cancelled")


async def forged_cancels(balancer: Balancer, pid: int, count: int) -> None:
    for _ in range(count):
        _reader, writer = await asyncio.open_connection(balancer.host, balancer.port)
        writer.write(messages.cancel_request(pid, secrets.token_bytes(4)))
        await writer.drain()
        writer.close()


async def test_cancels_find_their_instance(pg: TempPostgres, pgmux: Any, tmp_path) -> None:
    need_haproxy()
    fleet = make_fleet(
        pgmux, 3, {"pool": {"size": 5, "max_server_connections": 5}}, secret="fleet-secret"
    )
    for index in range(3):
        await fleet.wait_ready(index)
    balancer = start_haproxy(tmp_path, fleet.backends)
    conns = []
    try:
        for i in range(CONNECTIONS):
            extra = {"max_protocol_version": "3.2"} if i % 2 else {}
            conns.append(await connect_psycopg(balancer, **extra))
        assert {c.info.backend_pid >> 16 & 0xFF for c in conns} <= {1, 2, 3}

        # Forged keys for a running query's pid: nothing happens to it.
        victim = conns[0]
        query = asyncio.create_task(victim.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        await forged_cancels(balancer, victim.info.backend_pid, 20)
        await asyncio.sleep(1.0)
        assert not query.done(), "a forged key cancelled a query"
        await victim.cancel_safe(timeout=5)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(query, 10)

        latencies: list[float] = []
        for _round in range(ROUNDS):
            latencies += await asyncio.gather(*(cancel_round(c) for c in conns))
        for conn in conns:  # every connection still works after its cancels
            assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)
    finally:
        for conn in conns:
            await conn.close()
        balancer.stop()
    forwarded = sum(mux.logs().count("cancel_to_peer") for mux in fleet.instances)
    latencies.sort()
    print(
        f"fleet cancels: {len(latencies)}, forwarded to a peer {forwarded},"
        f" latency median {latencies[len(latencies) // 2] * 1000:.0f} ms,"
        f" max {latencies[-1] * 1000:.0f} ms"
    )
    assert len(latencies) == CONNECTIONS * ROUNDS
    assert latencies[-1] < LIMIT, latencies[-5:]
    assert forwarded >= 20, "the balancer never sent a cancel to the wrong instance?"


async def test_cancels_across_instances_and_their_workers(
    pg: TempPostgres, pgmux: Any, tmp_path
) -> None:
    """Two instances of two workers each: a cancel may cross an instance and
    then a worker (the forwarded request lands on any worker of its owner)."""
    need_haproxy()
    fleet = make_fleet(pgmux, 2, {"pool": {"size": 4, "max_server_connections": 4}}, workers=2)
    for index in range(2):
        await fleet.wait_ready(index)
    balancer = start_haproxy(tmp_path, fleet.backends)
    conns = []
    try:
        conns = [await connect_psycopg(balancer) for _ in range(4)]
        assert {c.info.backend_pid & 0xFF for c in conns} <= {0, 1}  # the worker byte
        latencies: list[float] = []
        for _round in range(5):
            latencies += await asyncio.gather(*(cancel_round(c) for c in conns))
    finally:
        for conn in conns:
            await conn.close()
        balancer.stop()
    print(f"fleet x workers cancels: 20, max {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < LIMIT


def test_key_layout_is_visible_to_clients(pgmux: Any) -> None:
    """A peered instance's BackendKeyData names it in bytes 1-2 (PgBouncer's place)."""
    mux = pgmux({"peers": {"peer_id": 513, "members": [{"id": 513, "host": "127.0.0.1"}]}})
    with psycopg.connect(mux.dsn(), autocommit=True) as conn:
        raw = struct.pack("!I", conn.info.backend_pid)
        assert raw[1] + (raw[2] << 8) == 513

"""Rolling restart of three pgmux instances behind HAProxy (docs/scaling.md).

100 clients run short write transactions through HAProxy and reconnect when
pgmux lets them go. Each instance in turn gets SIGTERM, drains and exits, and
starts again on the same port. Every commit a client saw acknowledged is in
the table and nothing else is; no operation hangs; the only errors clients
see are 57P01 (or a closed connection) at a transaction boundary, i.e. on the
BEGIN of a transaction that never started; a draining instance exits long
before its shutdown grace.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from fleet import Balancer, Fleet, make_fleet, need_haproxy, ready, start_haproxy
from helpers import APP_PASSWORD, APP_USER, close_quietly, direct, fresh_database

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(150)

CLIENTS = 100
OP_TIMEOUT = 15.0  # an operation slower than this counts as a hang
GRACE = 30.0
# How asyncpg reports the FATAL 57P01 that arrived while it was idle: 08003
# (ConnectionDoesNotExistError) or InterfaceError ("connection is closed").
BOUNDARY_CODES = {"57P01", "08006", "08003", "InterfaceError", "closed"}


@dataclass
class Outcome:
    acked: set[tuple[int, int]] = field(default_factory=set)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (phase, code)
    connect_errors: list[str] = field(default_factory=list)
    hangs: int = 0


async def connect(balancer: Balancer, dbname: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=balancer.host,
        port=balancer.port,
        user=APP_USER,
        password=APP_PASSWORD,
        database=dbname,
        timeout=OP_TIMEOUT,
        statement_cache_size=0,
    )


def code_of(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", None) or type(exc).__name__)


async def one_transaction(conn: asyncpg.Connection, cid: int, seq: int, out: Outcome) -> bool:
    """BEGIN, INSERT, COMMIT; False when the connection is gone (reconnect)."""
    if conn.is_closed():  # pgmux closed it while idle: the boundary itself
        out.errors.append(("begin", "closed"))
        return False
    phase = "begin"
    try:
        await asyncio.wait_for(conn.execute("BEGIN"), OP_TIMEOUT)
        phase = "insert"
        await asyncio.wait_for(
            conn.execute("INSERT INTO ledger VALUES ($1, $2)", cid, seq), OP_TIMEOUT
        )
        phase = "commit"
        await asyncio.wait_for(conn.execute("COMMIT"), OP_TIMEOUT)
    except TimeoutError:
        out.hangs += 1
        out.errors.append((phase, "hang"))
        return False
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        out.errors.append((phase, code_of(exc)))
        return False
    except asyncpg.InternalClientError:
        # asyncpg read the FATAL 57P01 that came while it was idle as a state clash
        out.errors.append((phase, "closed"))
        return False
    out.acked.add((cid, seq))
    return True


async def client(cid: int, balancer: Balancer, dbname: str, stop: asyncio.Event, out: Outcome):
    conn: asyncpg.Connection | None = None
    seq = 0
    deadline = time.monotonic() + 120
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if conn is None:
                try:
                    conn = await asyncio.wait_for(connect(balancer, dbname), OP_TIMEOUT)
                except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
                    out.connect_errors.append(code_of(e))
                    await asyncio.sleep(0.05)
                    continue
            seq += 1
            if not await one_transaction(conn, cid, seq, out):
                conn.terminate()
                conn = None
            await asyncio.sleep(0)  # no think time: the next BEGIN follows the COMMIT at once
    finally:
        if conn is not None:
            await close_quietly(conn)


async def restart(fleet: Fleet, index: int) -> dict[str, float]:
    """SIGTERM, wait for the exit, start again on the same port, wait for /ready."""
    mux = fleet.instances[index]
    start = time.monotonic()
    mux.signal(signal.SIGTERM)
    await asyncio.sleep(0.05)
    assert (
        not await asyncio.to_thread(ready, fleet.http_ports[index]) or mux.proc.poll() is not None
    )
    code = await asyncio.to_thread(mux.wait, GRACE + 10)
    exited = time.monotonic()
    assert code == 0, mux.logs()[-3000:]
    await asyncio.to_thread(fleet.start, index)
    await fleet.wait_ready(index)
    return {"drain": exited - start, "back": time.monotonic() - start}


async def test_rolling_restart_loses_nothing(pg: TempPostgres, pgmux: Any, tmp_path) -> None:
    need_haproxy()
    dbname = fresh_database(pg)
    conn = await direct(pg, dbname)
    try:
        await conn.execute("CREATE TABLE ledger (client int, seq int, PRIMARY KEY (client, seq))")
        await conn.execute("GRANT ALL ON ledger TO app")
    finally:
        await close_quietly(conn)
    fleet = make_fleet(
        pgmux,
        3,
        {
            "pool": {"size": 4, "max_server_connections": 4},
            "timeouts": {"shutdown_grace": f"{GRACE:.0f}s", "query_wait": "30s"},
        },
    )
    for index in range(3):
        await fleet.wait_ready(index)
    balancer = start_haproxy(tmp_path, fleet.backends)
    stop = asyncio.Event()
    out = Outcome()
    tasks = [asyncio.create_task(client(i, balancer, dbname, stop, out)) for i in range(CLIENTS)]
    timings = []
    try:
        await asyncio.sleep(2)
        before = len(out.acked)
        for index in range(3):
            timings.append(await restart(fleet, index))
            await asyncio.sleep(1.5)  # HAProxy sees it up; clients come back to it
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), OP_TIMEOUT * 2)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        balancer.stop()
    conn = await direct(pg, dbname)
    try:
        rows = {(r["client"], r["seq"]) for r in await conn.fetch("SELECT * FROM ledger")}
    finally:
        await close_quietly(conn)
    kinds = Counter(out.errors)
    print(
        f"rolling restart: {len(out.acked)} commits ({before} before the first SIGTERM),"
        f" errors {dict(kinds)}, connect errors {Counter(out.connect_errors)},"
        f" per instance {[{k: round(v, 2) for k, v in t.items()} for t in timings]}"
    )
    assert out.hangs == 0
    assert out.acked - rows == set(), "acknowledged commits lost"
    assert rows == out.acked, "a commit the client did not see acknowledged"
    assert {phase for phase, _ in out.errors} <= {"begin"}, kinds
    assert {code for _, code in out.errors} <= BOUNDARY_CODES, kinds
    assert out.errors, "no client was moved: the restarts did not reach any client"
    assert len(out.acked) > before + CLIENTS, "the fleet did not keep serving"
    assert all(t["drain"] < GRACE - 10 for t in timings), timings

"""High availability: a database with several hosts, over real streaming replication.

A primary and its streaming standby (tests/replication.py) stand behind one
pgmux database. New server logins try the hosts in turn and skip a host that
is down or not what target_session_attrs asks for; load_balance_hosts spreads
them. The failover test stops the primary with `-m immediate` under transfer
load and promotes the standby: every client commits again soon after, every
acknowledged commit is on the new primary, nothing hangs, and the only errors
are the connection failures of transactions that were in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultload import SETUP_SQL, check_books, start_load, stop_load
from helpers import APP_DB, PgmuxFactory, connect_asyncpg
from replication import ReplicationPair, freeze, replication_pair, thaw

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

CLIENTS = 32
RESUME_WITHIN = 5.0  # every client commits again within this of the promotion
# How a transaction cut by the failover reaches asyncpg: pgmux's 08006 ("server
# conn crashed?") or PostgreSQL's 57P01, then the closed connection under it.
CONNECTION_CUT = (
    "08006",
    "57P01",
    "server conn crashed?",
    "terminating connection due to administrator command",
    "the underlying connection is closed",
    "connection was closed in the middle of operation",
    # asyncpg still consuming the 08006 when its transaction block sends ROLLBACK
    "cannot switch to state 15; another operation (2) is in progress",
)


@pytest.fixture
def pair() -> Iterator[ReplicationPair]:
    with replication_pair() as made:
        yield made


def ha_database(pair: ReplicationPair, order: str = "primary,standby", **extra: Any) -> dict:
    clusters = {"primary": pair.primary, "standby": pair.standby}
    chosen = [clusters[name] for name in order.split(",")]
    return {
        "host": [c.host for c in chosen],
        "port": [c.port for c in chosen],
        **extra,
    }


def pgmux_for(pgmux: PgmuxFactory, database: dict, size: int = 4) -> Any:
    return pgmux(
        {
            "databases": {APP_DB: database},
            "pool": {"mode": "transaction", "size": size},
            "timeouts": {"query_wait": "20s", "server_connect": "2s"},
        }
    )


async def server_port(mux: Any) -> int:
    conn = await connect_asyncpg(mux)
    try:
        return int(await conn.fetchval("SELECT inet_server_port()"))
    finally:
        await conn.close()


async def test_host_down_is_skipped_for_the_next(
    pg: TempPostgres, pgmux: PgmuxFactory, dead_port: int
) -> None:
    dead = dead_port
    mux = pgmux_for(pgmux, {"host": ["127.0.0.1", pg.host], "port": [dead, pg.port]})
    assert await server_port(mux) == pg.port


async def show_hosts(mux: Any) -> dict[int, dict[str, Any]]:
    """SHOW HOSTS on the console, by port."""
    conn = await connect_asyncpg(mux, dbname="pgmux", user="admin", password="admin-secret")
    try:
        return {int(row["port"]): dict(row) for row in await conn.fetch("SHOW HOSTS")}
    finally:
        await conn.close()


async def test_a_host_marked_down_is_tried_last(
    pg: TempPostgres, pgmux: PgmuxFactory, dead_port: int
) -> None:
    """One failed login marks the dead host down (health.failures 1): the next
    logins go to the live host without trying it again; SHOW HOSTS says so."""
    dead = dead_port
    mux = pgmux(
        {
            "databases": {APP_DB: {"host": ["127.0.0.1", pg.host], "port": [dead, pg.port]}},
            "pool": {"mode": "session", "size": 4},
            "health": {"failures": 1, "interval": "60s"},
            "admin": {"users": ["admin"]},
        }
    )
    conns = [await connect_asyncpg(mux) for _ in range(3)]  # three server logins
    try:
        ports = {int(await c.fetchval("SELECT inet_server_port()")) for c in conns}
    finally:
        for conn in conns:
            await conn.close()
    assert ports == {pg.port}
    hosts = await show_hosts(mux)
    assert hosts[dead]["state"] == "down" and hosts[dead]["failures"] == 1, hosts[dead]
    assert hosts[dead]["last_error"] and hosts[dead]["last_check"]
    assert (hosts[pg.port]["state"], hosts[pg.port]["role"]) == ("up", "primary")


@pytest.mark.parametrize(
    ("attrs", "order", "expect"),
    [
        ("read-write", "standby,primary", "primary"),
        ("primary", "standby,primary", "primary"),
        ("read-only", "primary,standby", "standby"),
        ("standby", "primary,standby", "standby"),
        ("prefer-standby", "primary,standby", "standby"),
        ("any", "standby,primary", "standby"),
    ],
)
async def test_target_session_attrs_picks_the_host(
    pair: ReplicationPair, pgmux: PgmuxFactory, attrs: str, order: str, expect: str
) -> None:
    mux = pgmux_for(pgmux, ha_database(pair, order, target_session_attrs=attrs))
    wanted = pair.primary if expect == "primary" else pair.standby
    assert await server_port(mux) == wanted.port


async def test_prefer_standby_falls_back_to_the_primary(
    pair: ReplicationPair, pgmux: PgmuxFactory
) -> None:
    pair.standby.stop("immediate")
    mux = pgmux_for(pgmux, ha_database(pair, target_session_attrs="prefer-standby"))
    assert await server_port(mux) == pair.primary.port


async def test_round_robin_spreads_new_servers(pair: ReplicationPair, pgmux: PgmuxFactory) -> None:
    mux = pgmux(
        {
            "databases": {APP_DB: ha_database(pair, load_balance_hosts="round-robin")},
            "pool": {"mode": "session", "size": 4},
        }
    )
    conns = [await connect_asyncpg(mux) for _ in range(4)]
    try:
        ports = [int(await c.fetchval("SELECT inet_server_port()")) for c in conns]
    finally:
        for conn in conns:
            await conn.close()
    assert sorted(set(ports)) == sorted({pair.primary.port, pair.standby.port}), ports


async def test_no_matching_host_keeps_clients_waiting(
    pair: ReplicationPair, pgmux: PgmuxFactory
) -> None:
    """Only a standby up and read-write asked: the client waits; a promotion serves it."""
    pair.primary.stop("immediate")
    mux = pgmux_for(pgmux, ha_database(pair, target_session_attrs="read-write"))
    waiting = asyncio.create_task(server_port(mux))
    await asyncio.sleep(1.0)
    assert not waiting.done(), "the client did not wait for a primary"
    await asyncio.to_thread(pair.promote)
    assert await asyncio.wait_for(waiting, 10) == pair.standby.port


@pytest.mark.fault
async def test_failover_under_transfer_load(pair: ReplicationPair, pgmux: PgmuxFactory) -> None:
    primary, standby = pair.primary, pair.standby
    primary.sql(SETUP_SQL, APP_DB)
    pair.wait_replayed()
    mux = pgmux_for(pgmux, ha_database(pair, target_session_attrs="read-write"))
    load, stop, tasks = start_load(mux, CLIENTS)
    try:
        await asyncio.sleep(1.0)
        before = len(load.acknowledged)
        assert before, f"no commit before the failover ({load.errors} errors)"
        struck = time.monotonic()
        await asyncio.to_thread(primary.stop, "immediate")
        await asyncio.to_thread(pair.promote)
        promoted = time.monotonic()
        deadline = promoted + RESUME_WITHIN + 5
        while time.monotonic() < deadline and load.all_committed_after(promoted) is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # the load runs on against the new primary
    finally:
        await stop_load(stop, tasks)
    first = load.first_commit_after(promoted)
    every = load.all_committed_after(promoted)
    errors = [error for c in load.clients for (_, _, error) in c.errors]
    print(
        f"failover: promoted {promoted - struck:.2f} s after the stop; first commit "
        f"{'never' if first is None else f'{(first - promoted) * 1000:.0f} ms'} later, all "
        f"{CLIENTS} clients {'never' if every is None else f'{(every - promoted) * 1000:.0f} ms'}"
        f" later; {len(load.acknowledged)} commits ({before} before), {len(errors)} errors"
    )
    assert load.hangs == 0, f"{load.hangs} transactions hung"
    check_books(load, lambda query: standby.sql(query, APP_DB))
    assert every is not None and every - promoted < RESUME_WITHIN, (
        f"not every client committed within {RESUME_WITHIN} s of the promotion"
    )
    unexpected = [e for e in errors if not any(cut in e for cut in CONNECTION_CUT)]
    assert not unexpected, f"errors other than a cut connection: {unexpected[:5]}"


@pytest.mark.fault
async def test_hung_primary_is_cut_by_the_health_check(
    pair: ReplicationPair, pgmux: PgmuxFactory
) -> None:
    """The primary stops answering without closing anything (SIGSTOP): the
    probe marks it down, its servers are cut (08006, not a hang) and the
    clients go on at the promoted standby."""
    primary, standby = pair.primary, pair.standby
    primary.sql(SETUP_SQL, APP_DB)
    pair.wait_replayed()
    mux = pgmux(
        {
            "databases": {APP_DB: ha_database(pair, target_session_attrs="read-write")},
            "pool": {"mode": "transaction", "size": 4},
            "timeouts": {"query_wait": "20s", "server_connect": "1s"},
            "health": {"interval": "0.3s", "timeout": "0.5s", "failures": 2},
        }
    )
    load, stop, tasks = start_load(mux, 16)
    frozen: list[int] = []
    try:
        await asyncio.sleep(1.0)
        assert load.acknowledged, f"no commit before the fault ({load.errors} errors)"
        frozen = freeze(primary)
        await asyncio.to_thread(pair.promote)
        promoted = time.monotonic()
        deadline = promoted + RESUME_WITHIN + 5
        while time.monotonic() < deadline and load.all_committed_after(promoted) is None:
            await asyncio.sleep(0.01)
    finally:
        await stop_load(stop, tasks)
        thaw(frozen)
    every = load.all_committed_after(promoted)
    errors = [error for c in load.clients for (_, _, error) in c.errors]
    print(
        f"hung primary: all 16 clients "
        f"{'never' if every is None else f'{(every - promoted) * 1000:.0f} ms'} after the "
        f"promotion; {len(load.acknowledged)} commits, {len(errors)} errors"
    )
    assert load.hangs == 0, f"{load.hangs} transactions hung"
    check_books(load, lambda query: standby.sql(query, APP_DB))
    assert every is not None and every - promoted < RESUME_WITHIN, (
        f"not every client committed within {RESUME_WITHIN} s of the promotion"
    )
    unexpected = [e for e in errors if not any(cut in e for cut in CONNECTION_CUT)]
    assert not unexpected, f"errors other than a cut connection: {unexpected[:5]}"

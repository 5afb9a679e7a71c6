"""Which hosts are in rotation: a lagging standby (max_replica_lag), a host
down at startup that comes back, and a switchover that retires the old
primary's servers. Over real streaming replication (tests/replication.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import APP_DB, PgmuxFactory, close_quietly, connect_asyncpg, wait_until
from replication import ReplicationPair, replication_pair
from test_ha import ha_database, show_hosts

pytestmark = pytest.mark.timeout(90)

INTERVAL = 0.5  # health.interval of these tests


@pytest.fixture
def pair() -> Iterator[ReplicationPair]:
    with replication_pair(synchronous=False) as made:
        yield made


def rotation_pgmux(pgmux: PgmuxFactory, database: dict, mode: str = "session") -> Any:
    return pgmux(
        {
            "databases": {APP_DB: database},
            "pool": {"mode": mode, "size": 4},
            "timeouts": {"query_wait": "20s", "server_connect": "2s"},
            "health": {"interval": f"{INTERVAL}s", "timeout": "2s", "failures": 1},
            "admin": {"users": ["admin"]},
        }
    )


async def in_recovery(mux: Any) -> bool:
    """What a new client's server says: True on a standby."""
    conn = await connect_asyncpg(mux)
    try:
        return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    finally:
        await conn.close()


async def test_a_lagging_standby_leaves_rotation_and_rejoins(
    pair: ReplicationPair, pgmux: PgmuxFactory
) -> None:
    """prefer-standby reads go to the standby; with its replay paused and a
    few MB written on the primary it lags over max_replica_lag (1MB): its idle
    server closes and reads land on the primary; resumed, it rejoins."""
    standby = pair.standby.port
    mux = rotation_pgmux(
        pgmux, ha_database(pair, target_session_attrs="prefer-standby", max_replica_lag="1MB")
    )
    assert await in_recovery(mux), "a prefer-standby read did not go to the standby"
    pair.standby.sql("SELECT pg_wal_replay_pause()")
    pair.primary.sql(
        "CREATE TABLE filler AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, 4000)",
        APP_DB,
    )
    lagging = await wait_until(
        lambda: show_hosts(mux),
        lambda hosts: hosts[standby]["in_rotation"] == 0,
        timeout=15,
        what="the paused standby out of rotation",
    )
    assert lagging[standby]["replica_lag_bytes"] > 1 << 20, lagging[standby]
    assert lagging[pair.primary.port]["in_rotation"] == 1
    assert not await in_recovery(mux), "a read went to the lagging standby"
    assert "host_lagging" in mux.logs()

    pair.standby.sql("SELECT pg_wal_replay_resume()")
    caught_up = await wait_until(
        lambda: show_hosts(mux),
        lambda hosts: hosts[standby]["in_rotation"] == 1,
        timeout=15,
        what="the resumed standby back in rotation",
    )
    assert caught_up[standby]["replica_lag_bytes"] < 1 << 20, caught_up[standby]
    # The primary's idle server serves one client; the second needs a new login.
    conns = [await connect_asyncpg(mux) for _ in range(2)]
    try:
        seen = {bool(await c.fetchval("SELECT pg_is_in_recovery()")) for c in conns}
    finally:
        await close_quietly(*conns)
    assert True in seen, "no new server went to the standby once it caught up"


async def test_lag_in_seconds_counts_a_caught_up_standby_as_current(
    pair: ReplicationPair, pgmux: PgmuxFactory
) -> None:
    """max_replica_lag in seconds: an idle pair (nothing to replay) is not
    lagging however old the last replayed commit is."""
    mux = rotation_pgmux(
        pgmux, ha_database(pair, target_session_attrs="prefer-standby", max_replica_lag="1s")
    )
    assert await in_recovery(mux)
    await asyncio.sleep(1.5)  # the last replayed commit is now older than the limit
    hosts = await wait_until(
        lambda: show_hosts(mux),
        lambda hosts: hosts[pair.standby.port]["replica_lag_seconds"] is not None,
        timeout=10,
        what="a measured lag",
    )
    entry = hosts[pair.standby.port]
    assert (float(entry["replica_lag_seconds"]), entry["in_rotation"]) == (0.0, 1), entry
    assert await in_recovery(mux)


async def test_host_down_at_startup_rejoins_within_two_intervals(
    pair: ReplicationPair, pgmux: PgmuxFactory
) -> None:
    """The first host is down when pgmux starts: pgmux serves from the other;
    once it is back, a probe marks it up within two health intervals and the
    next new server goes to it."""
    pair.standby.stop("immediate")
    mux = rotation_pgmux(pgmux, ha_database(pair, "standby,primary"))
    assert not await in_recovery(mux), "not served by the host that is up"
    hosts = await show_hosts(mux)
    assert hosts[pair.standby.port]["state"] == "down", hosts

    await asyncio.to_thread(pair.standby.start)
    back = time.monotonic()
    await wait_until(
        lambda: show_hosts(mux),
        lambda hosts: hosts[pair.standby.port]["state"] == "up",
        timeout=10,
        interval=0.05,
        what="the recovered host up",
    )
    rejoined = time.monotonic() - back
    print(f"recovered host up {rejoined * 1000:.0f} ms after it accepted connections")
    assert rejoined < 2 * INTERVAL + 1.0, f"rejoined after {rejoined:.2f} s"
    conns = [await connect_asyncpg(mux) for _ in range(2)]
    try:
        seen = {bool(await c.fetchval("SELECT pg_is_in_recovery()")) for c in conns}
    finally:
        await close_quietly(*conns)
    assert True in seen, "no new server went to the recovered host"


async def old_primary_backends(pair: ReplicationPair) -> int:
    query = f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{APP_DB}' AND usename = 'app'"
    return int(await asyncio.to_thread(pair.primary.sql, query))


async def test_switchover_retires_the_old_primarys_servers(
    pair: ReplicationPair, pgmux: PgmuxFactory
) -> None:
    """The primary is made read-only and the standby promoted (a switchover,
    the old primary still up). The first login that finds the new primary
    retires the old one's servers: each finishes the transaction on it and
    closes when released, and the clients' next transactions go to the new one."""
    pair.primary.sql("CREATE TABLE t (n int); GRANT ALL ON t TO app", APP_DB)
    mux = rotation_pgmux(pgmux, ha_database(pair, target_session_attrs="read-write"), "transaction")
    holder, other, third = [await connect_asyncpg(mux) for _ in range(3)]
    try:
        first, second = holder.transaction(), other.transaction()
        await first.start()
        await holder.execute("INSERT INTO t VALUES (1)")
        await second.start()
        await other.execute("SELECT 1")
        assert await old_primary_backends(pair) == 2

        pair.primary.sql("ALTER SYSTEM SET default_transaction_read_only = on")
        pair.primary.sql("SELECT pg_reload_conf()")
        await asyncio.to_thread(pair.promote)
        # Both servers are busy: a new login, which skips the read-only host.
        assert await third.fetchval("SELECT inet_server_port()") == pair.standby.port
        await holder.execute("INSERT INTO t VALUES (2)")  # the transaction goes on
        await first.commit()
        await second.commit()
        await wait_until(
            lambda: old_primary_backends(pair),
            lambda count: count == 0,
            timeout=10,
            what="the old primary's servers closed",
        )
        assert await holder.fetchval("SELECT inet_server_port()") == pair.standby.port
    finally:
        await close_quietly(holder, other, third)
    assert pair.primary.sql("SELECT count(*) FROM t", APP_DB) == "2"
    assert "server_primary_moved" in mux.logs()

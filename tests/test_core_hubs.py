"""Acceptance: the four hubs of DESIGN.md behind pgmux.

151 client connections (asyncpg for the node-postgres hubs, psycopg 3 for the
Prisma hubs) against a PostgreSQL whose max_connections is 100: without a
pooler they cannot even connect. Through pgmux every transaction must be
correct and PostgreSQL must never see more than 12 connections from it.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import direct, server_connections, wait_until

from pgmux.hubsim import HUBS, PeakSampler, check_hubs, prepare_cluster, run_hubs

MAX_SERVER_CONNECTIONS = 12
LOAD_SECONDS = 3.0
HUB_DATABASES = [hub.database for hub in HUBS]


def hub_users(pg: Any) -> dict[str, str]:
    return {
        "app": "app-secret",
        "admin": "admin-secret",
        pg.superuser: pg.password,
        **{hub.user: hub.password for hub in HUBS},
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "pool_size",
    [
        pytest.param(3, id="pools-sum-to-12"),
        # 4 x 6 = 24 > 12: only pool.max_server_connections keeps PostgreSQL at 12,
        # and pools must hand idle servers over to the pools that wait.
        pytest.param(6, id="global-cap-12"),
    ],
)
async def test_151_hub_clients_share_12_server_connections(
    pg: Any, pgmux: Any, pool_size: int
) -> None:
    assert sum(hub.connections for hub in HUBS) == 151
    prepare_cluster(pg)
    mux = pgmux(
        {
            "pool": {
                "mode": "transaction",
                "size": pool_size,
                "max_server_connections": MAX_SERVER_CONNECTIONS,
            },
            "timeouts": {"query_wait": "30s"},
        },
        users=hub_users(pg),
    )
    monitor = await direct(pg)
    try:
        # Backends of an earlier test's pgmux may still be on their way out.
        await wait_until(
            lambda: server_connections(monitor, *HUB_DATABASES),
            lambda n: n == 0,
            timeout=15,
            what="no leftover hub backends",
        )
        async with PeakSampler(monitor, HUB_DATABASES, interval=0.02) as sampler:
            results = await run_hubs(mux.host, mux.port, LOAD_SECONDS)
        checks = await check_hubs(lambda db: direct(pg, db), results)
    finally:
        await monitor.close()

    failures = {name: r.errors for name, r in results.items() if r.failed}
    assert not failures, f"transactions failed: {failures}"
    for result in results.values():
        assert len(result.per_client) == result.hub.connections, result.hub.name
        assert result.committed > 0, f"{result.hub.name} committed nothing"
    bad = [c for c in checks if not c.ok]
    assert not bad, f"counters do not add up: {bad}"
    assert sampler.samples > 10
    assert 0 < sampler.peak <= MAX_SERVER_CONNECTIONS, (
        f"PostgreSQL saw {sampler.peak} connections from pgmux"
    )

"""The health check: every `health.interval`, one login to each host of the
multi-host databases, bounded by `health.timeout`.

A login that works tells the host's role; `health.failures` failures in a row
mark the host down (hostbook.py). A host that goes down, or stops answering
without closing its connections (a hung or cut-off machine), takes its
servers with it: idle ones close, and a linked one is cut, so its client gets
08006 now instead of waiting on a server that will never answer. New logins
try that host last until it answers again.

The probe logs in as a pool of that database does (its credentials), with a
server connection that never joins the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.core.states import SERVER_IDLE
from pgmux.proxy.datapath import server_login
from pgmux.proxy.datapath.hostbook import BOOK, DOWN, targets
from pgmux.proxy.datapath.server import ServerConnection, ServerError, ServerLost

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.server import ServerCredentials
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.health")

_ROLE_SQL = "SELECT 1 / pg_is_in_recovery()::int"  # fails on a primary
_running: set[int] = set()  # id() of the registries whose probe loop runs


def ensure_running(registry: Registry) -> None:
    """Start the probe loop of REGISTRY once (the first multi-host login does)."""
    if id(registry) in _running:
        return
    _running.add(id(registry))
    spawn(_loop(registry))


async def _loop(registry: Registry) -> None:
    try:
        while not registry.shutting_down:
            health = registry.config.health
            await asyncio.sleep(health.interval)
            await asyncio.gather(*(_probe(pool, creds) for pool, creds in _hosts(registry)))
    finally:
        _running.discard(id(registry))


def _hosts(registry: Registry) -> list[tuple[Pool, ServerCredentials]]:
    """One pool (and its login at that host) for each host of a multi-host database."""
    found: dict[tuple[str, int], tuple[Pool, ServerCredentials]] = {}
    for pool in list(registry.pools.values()):
        hosts = targets(pool.database)
        if len(hosts) < 2 or pool.closed:
            continue
        for host, port in hosts:
            creds = dataclasses.replace(pool.credentials, host=host, port=port)
            found.setdefault((host, port), (pool, creds))
    return list(found.values())


async def _probe(pool: Pool, creds: ServerCredentials) -> None:
    where = (creds.host, creds.port)
    health = pool.registry.config.health
    probe = ServerConnection(pool, creds)  # never in pool.servers: the pool ignores it
    try:
        await asyncio.wait_for(_login_and_ask(probe, creds, health.timeout), health.timeout)
        role = "primary"
    except ServerError:
        role = "standby"  # logged in; the statement failed: in recovery
    except (OSError, TimeoutError, ServerLost, ProtocolError) as exc:
        probe.abort()
        was_down = BOOK.entry(where).status == DOWN
        BOOK.failed(where, server_login.describe(exc), health.failures, health.interval)
        if BOOK.entry(where).status == DOWN and not was_down:
            log.warning("host_down", host=creds.host, port=creds.port, error=str(exc))
            cut_servers(pool.registry, where)
        return
    probe.close()
    BOOK.succeeded(where, role)


async def _login_and_ask(probe: ServerConnection, creds: ServerCredentials, timeout: float) -> None:
    await server_login.connect(probe, creds, timeout)
    await probe.wait_login(timeout)
    await probe.query(_ROLE_SQL, timeout)


def cut_servers(registry: Registry, where: tuple[str, int]) -> None:
    """Every server to WHERE closes: idle ones quietly, linked ones cutting their client."""
    for pool in list(registry.pools.values()):
        for server in list(pool.servers):
            if (server.credentials.host, server.credentials.port) != where:
                continue
            if server.state is SERVER_IDLE or server.client is not None:
                pool.close_server(server, "host down")
            else:
                server.close_when_released = True

"""The health check: every `health.interval`, one login to each host of the
multi-host databases, bounded by `health.timeout`.

A login that works tells the host's role; `health.failures` failures in a row
mark the host down (hostbook.py). A host that goes down, or stops answering
without closing its connections (a hung or cut-off machine), takes its
servers with it: idle ones close, and a linked one is cut, so its client gets
08006 now instead of waiting on a server that will never answer. New logins
try that host last until it answers again.

The probe's one statement also reads each host's WAL position: the
primary's current LSN, a standby's replay and receive LSNs and the time of
its last replayed commit. From a round's answers, each standby's lag (WAL
bytes behind the primary it follows, seconds behind) goes into the host book;
a database's `max_replica_lag` takes a standby lagging more out of rotation:
new logins skip it and its idle servers of that database close (linked ones
once released), until a round finds it caught up.

The probe logs in as a pool of that database does (its credentials), with a
server connection that never joins the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.core.states import SERVER_IDLE
from pgmux.proxy.datapath import replication, server_login
from pgmux.proxy.datapath.hostbook import BOOK, DOWN, UNKNOWN, targets
from pgmux.proxy.datapath.server import ServerConnection, ServerError, ServerLost

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.server import ServerCredentials
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.health")

# What the probe asks each host, in one round trip. The server connection
# reads no rows (server.py skips them), so the answer comes back in the error
# of a failing cast: `invalid input syntax for type integer: "probe|..."`.
# Fields: in recovery; the primary's current or the standby's replay LSN and
# its receive LSN (bytes from 0/0); seconds since the last replayed commit.
_REPORT_SQL = (
    "SELECT format('probe|%s|%s|%s|%s', pg_is_in_recovery(),"
    " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn,"
    " pg_last_wal_receive_lsn() - '0/0'::pg_lsn,"
    " extract(epoch FROM now() - pg_last_xact_replay_timestamp()))::int"
)
_REPORT = re.compile(r'"probe\|([tf])\|([\d.]*)\|([\d.]*)\|(-?[\d.e+-]*)"')
_running: set[int] = set()  # id() of the registries whose probe loop runs


@dataclass(frozen=True, slots=True)
class Report:
    """One host's answer: its role and where its WAL is."""

    role: str
    lsn: int | None = None  # a primary's current LSN, a standby's replay LSN
    received: int | None = None  # a standby's receive LSN
    replay_age: float | None = None  # seconds since the last replayed commit


def parse_report(message: str) -> Report:
    match = _REPORT.search(message)
    if match is None:
        return Report(UNKNOWN)
    standby, lsn, received, age = match.groups()

    def number(text: str) -> float | None:
        return float(text) if text else None

    lsn_value, received_value = number(lsn), number(received)
    return Report(
        "standby" if standby == "t" else "primary",
        None if lsn_value is None else int(lsn_value),
        None if received_value is None else int(received_value),
        number(age),
    )


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
            hosts = _hosts(registry)
            reports = await asyncio.gather(*(_probe(pool, creds) for pool, creds in hosts))
            found = {(c.host, c.port): r for (_, c), r in zip(hosts, reports, strict=True) if r}
            replication.note_lags(registry, found)
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


async def _probe(pool: Pool, creds: ServerCredentials) -> Report | None:
    """Log in to one host and ask for its report; None if it did not answer."""
    where = (creds.host, creds.port)
    health = pool.registry.config.health
    probe = ServerConnection(pool, creds)  # never in pool.servers: the pool ignores it
    try:
        await asyncio.wait_for(_login_and_ask(probe, creds, health.timeout), health.timeout)
        report = Report(UNKNOWN)  # the cast cannot succeed; kept for the type
    except ServerError as exc:
        report = parse_report(str(exc))  # logged in; the answer is in the error
    except (OSError, TimeoutError, ServerLost, ProtocolError) as exc:
        probe.abort()
        was_down = BOOK.entry(where).status == DOWN
        BOOK.failed(where, server_login.describe(exc), health.failures, health.interval)
        if BOOK.entry(where).status == DOWN and not was_down:
            log.warning("host_down", host=creds.host, port=creds.port, error=str(exc))
            cut_servers(pool.registry, where)
        return None
    probe.close()
    BOOK.succeeded(where, report.role)
    return report


async def _login_and_ask(probe: ServerConnection, creds: ServerCredentials, timeout: float) -> None:
    await server_login.connect(probe, creds, timeout)
    await probe.wait_login(timeout)
    await probe.query(_REPORT_SQL, timeout)


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

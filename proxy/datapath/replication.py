"""A standby's replication lag, and `max_replica_lag`'s rotation.

After each health-check round (probe.py) every standby of a multi-host
database gets its lag in the host book: the WAL bytes its replay is behind
the current position of the primary listed with it, and the seconds since
its last replayed commit, counted 0 when it replayed everything it received
(an idle primary sends nothing, and its standby is not behind).

A database with `max_replica_lag` takes a standby lagging more than that
out of rotation: new server logins skip it (hosts.in_rotation), and its
servers of that database close, idle ones now and linked ones when their
client releases them, so no transaction is cut. The next round that finds
it caught up puts it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.proxy.base.log import get_logger
from pgmux.proxy.core.states import SERVER_IDLE
from pgmux.proxy.datapath.hostbook import BOOK, targets

if TYPE_CHECKING:
    from pgmux.proxy.config import DatabaseConfig
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.probe import Report
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.health")

Where = tuple[str, int]


def note_lags(registry: Registry, reports: dict[Where, Report]) -> None:
    """Record each standby's lag from one round's REPORTS, then apply max_replica_lag."""
    for database in list(registry.config.databases.values()):
        hosts = targets(database)
        if len(hosts) > 1:
            _note_database(hosts, reports)
    for pool in list(registry.pools.values()):
        if pool.database.max_replica_lag and not pool.closed:
            _apply_limit(pool)


def _note_database(hosts: list[Where], reports: dict[Where, Report]) -> None:
    primary_lsns = [
        report.lsn
        for where in hosts
        if (report := reports.get(where)) is not None and report.role == "primary"
    ]
    primary_lsn = max((lsn for lsn in primary_lsns if lsn is not None), default=None)
    for where in hosts:
        report = reports.get(where)
        if report is None or report.role != "standby":
            continue
        health = BOOK.entry(where)
        if primary_lsn is not None and report.lsn is not None:
            health.lag_bytes = max(0, primary_lsn - report.lsn)
        health.lag_seconds = seconds_behind(report)


def seconds_behind(report: Report) -> float | None:
    """0 when the standby replayed all it received; else the age of its last replayed commit."""
    if report.lsn is not None and report.received is not None and report.lsn >= report.received:
        return 0.0
    if report.replay_age is None:
        return None
    return max(0.0, report.replay_age)


def _apply_limit(pool: Pool) -> None:
    database = pool.database
    for where in targets(database):
        lagging = BOOK.lagging(where, database.max_replica_lag)
        _log_change(database, where, lagging)
        if lagging:
            _retire_lagging(pool, where)


def _log_change(database: DatabaseConfig, where: Where, lagging: bool) -> None:
    key = (database.name, where)
    if lagging == (key in BOOK.out_of_rotation):
        return
    health = BOOK.entry(where)
    fields = {
        "db": database.name,
        "host": where[0],
        "port": where[1],
        "lag_bytes": health.lag_bytes,
        "lag_seconds": health.lag_seconds,
    }
    if lagging:
        BOOK.out_of_rotation.add(key)
        log.warning("host_lagging", **fields)
    else:
        BOOK.out_of_rotation.discard(key)
        log.info("host_caught_up", **fields)


def _retire_lagging(pool: Pool, where: Where) -> None:
    for server in list(pool.servers):
        if (server.credentials.host, server.credentials.port) != where:
            continue
        if server.state is SERVER_IDLE:
            pool.close_server(server, "replica lag")
        else:
            server.close_when_released = True

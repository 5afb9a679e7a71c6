"""SHOW HOSTS: each host of every multi-host database, as this worker sees it.

The state, role and last outcome come from the logins' host book
(datapath/hostbook.py); a host no login has tried yet reads `unknown`.
A standby's replication lag is the health probe's last measure (empty when
not known); `in_rotation` is 0 while the database's max_replica_lag keeps
the host out of its new server logins.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pgmux.proxy.config import FALLBACK_DATABASE
from pgmux.proxy.datapath.hostbook import BOOK, targets

if TYPE_CHECKING:
    from pgmux.proxy.registry import Registry

HOSTS_SPEC = "ssississqsi"
HOSTS_COLUMNS = (
    "database", "host", "port", "state", "role", "failures", "last_check", "last_error",
    "replica_lag_bytes", "replica_lag_seconds", "in_rotation",
)  # fmt: skip


def host_rows(registry: Registry) -> list[tuple[Any, ...]]:
    rows = []
    for name, database in registry.config.databases.items():
        hosts = targets(database)
        if name == FALLBACK_DATABASE or len(hosts) < 2:
            continue
        for where in hosts:
            health = BOOK.entry(where)
            rows.append(
                (
                    *(name, health.host, health.port, health.status, health.role),
                    *(health.failures, _when(health.last_check), health.last_error),
                    *(health.lag_bytes, _seconds(health.lag_seconds)),
                    int(not health.lagging(database.max_replica_lag)),
                )
            )
    return rows


def _when(wall: float) -> str:
    if not wall:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def _seconds(lag: float | None) -> str | None:
    return None if lag is None else f"{lag:.3f}"

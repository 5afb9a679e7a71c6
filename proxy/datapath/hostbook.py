"""What this worker knows of each host of a multi-host database.

Every server login to a database with several hosts (hosts.py) reports here
how it went: a host whose logins fail `health.failures` times in a row is
marked down, and new logins try it last, after the hosts that work, until
`health.interval` has passed; then it is tried in its place again (the
recheck), and one login that works marks it up. Its role (primary, standby)
is what its last login saw, and the health probe (probe.py) adds a standby's
replication lag: a database's `max_replica_lag` keeps a standby lagging more
than that out of its new logins. SHOW HOSTS on the console lists this book.

The book is per worker process: with `listen.workers > 1` each worker logs
in, probes and marks hosts on its own, so their views agree within about one
`health.interval`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgmux.proxy.config import DatabaseConfig, ReplicaLag

UP, DOWN, UNKNOWN = "up", "down", "unknown"


def targets(database: DatabaseConfig) -> list[tuple[str, int]]:
    """The (host, port) pairs of DATABASE, in the configured order."""
    hosts = database.host_list or (database.host,)
    ports = database.port_list or (database.port,)
    if len(ports) == 1:
        ports = ports * len(hosts)
    return list(zip(hosts, ports, strict=True))


@dataclass(slots=True)
class HostHealth:
    host: str
    port: int
    status: str = UNKNOWN  # up, down or unknown (not a connection state)
    role: str = UNKNOWN  # primary or standby, as the last login saw it
    failures: int = 0  # failed logins in a row
    down_until: float = 0.0  # monotonic: tried last until then
    last_check: float = 0.0  # wall clock of the last login's outcome
    last_error: str = ""
    # A standby's lag at the last probe (None: not a standby, or not known):
    # WAL bytes its replay is behind the primary's current position, and
    # seconds since its last replayed commit (0 when it replayed all it received).
    lag_bytes: int | None = None
    lag_seconds: float | None = None

    def lagging(self, limit: ReplicaLag) -> bool:
        """A standby further behind than LIMIT (an unknown lag is not over it)."""
        if self.role != "standby" or not limit:
            return False
        over_bytes = bool(limit.bytes) and (self.lag_bytes or 0) > limit.bytes
        over_time = bool(limit.seconds) and (self.lag_seconds or 0.0) > limit.seconds
        return over_bytes or over_time


class HostBook:
    def __init__(self) -> None:
        self.hosts: dict[tuple[str, int], HostHealth] = {}
        # (database name, host) of the standbys max_replica_lag keeps out (to log changes)
        self.out_of_rotation: set[tuple[str, tuple[str, int]]] = set()

    def entry(self, where: tuple[str, int]) -> HostHealth:
        health = self.hosts.get(where)
        if health is None:
            health = self.hosts[where] = HostHealth(*where)
        return health

    def skipped(self, where: tuple[str, int], now: float) -> bool:
        """Down and not due for its recheck: tried only after the others."""
        health = self.hosts.get(where)
        return health is not None and health.status == DOWN and now < health.down_until

    def lagging(self, where: tuple[str, int], limit: ReplicaLag) -> bool:
        health = self.hosts.get(where)
        return health is not None and health.lagging(limit)

    def succeeded(self, where: tuple[str, int], role: str) -> None:
        health = self.entry(where)
        if role != "standby":
            health.lag_bytes = health.lag_seconds = None
        health.status, health.role, health.failures = UP, role, 0
        health.last_check, health.last_error = time.time(), ""

    def mismatched(self, where: tuple[str, int], role: str, error: str) -> None:
        """The host answered but is not what the login asked for: up, another role."""
        self.succeeded(where, role)
        self.hosts[where].last_error = error

    def failed(self, where: tuple[str, int], error: str, failures: int, interval: float) -> None:
        health = self.entry(where)
        health.failures += 1
        health.last_check, health.last_error = time.time(), error
        if health.failures >= failures:
            health.status = DOWN
            health.down_until = time.monotonic() + interval


BOOK = HostBook()  # one per worker process: the hosts are the same for every pool

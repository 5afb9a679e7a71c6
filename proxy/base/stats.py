"""Counters kept on the data path: plain integer adds, nothing else per message.

Names follow PgBouncer's SHOW STATS (total_xact_count, total_query_count,
total_received, total_sent, total_xact_time, total_query_time, total_wait_time)
so the console and the metrics endpoint read them without translation.
Times are kept in float seconds and shown in microseconds, as PgBouncer does.

The three latency histograms only append each value on the data path; the
values go into their buckets in batches (one sort per batch, when /metrics is
scraped or a batch is full), which costs a fraction of a bisect per value.
metrics.py turns them into Prometheus histograms.
"""

from __future__ import annotations

import time
from bisect import bisect_right

# Upper bounds in seconds, shared by the wait, transaction and query histograms.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Values a histogram keeps unbucketed at most (about 32 KiB of floats).
FOLD_AT = 1024


class Histogram:
    """Counts per LATENCY_BUCKETS bound (the last slot is +Inf) and their sum.

    `pending` holds values not yet in a bucket (PoolStats appends them and
    folds at FOLD_AT); read counts through cumulative().
    """

    __slots__ = ("_counts", "_sum", "pending")

    def __init__(self) -> None:
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0
        self.pending: list[float] = []

    def fold(self) -> None:
        """Put the pending values into their buckets (a bound's bucket includes it)."""
        pending = self.pending
        if not pending:
            return
        pending.sort()
        counts = self._counts
        below = 0
        for i, bound in enumerate(LATENCY_BUCKETS):
            upto = bisect_right(pending, bound)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(pending) - below
        self._sum += sum(pending)
        pending.clear()

    @property
    def counts(self) -> list[int]:
        self.fold()
        return self._counts

    @property
    def sum(self) -> float:
        self.fold()
        return self._sum

    def cumulative(self) -> list[int]:
        total, out = 0, []
        for count in self.counts:
            total += count
            out.append(total)
        return out


# The counters SHOW STATS averages over a stats period, in PoolStats.snapshot() order.
PERIOD_FIELDS = (
    "server_assignments",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_client_parse_count",
    "total_server_parse_count",
    "total_bind_count",
    "total_client_login_count",
)


class PoolStats:
    __slots__ = (
        "abandoned_cleaned",
        "born",
        "connect_errors",
        "errors",
        "newer",
        "older",
        "query_hist",
        "server_assignments",
        "servers_opened",
        "session_resets",
        "timeouts",
        "total_bind_count",
        "total_client_login_count",
        "total_client_parse_count",
        "total_query_count",
        "total_query_time",
        "total_received",
        "total_sent",
        "total_server_parse_count",
        "total_wait_time",
        "total_xact_count",
        "total_xact_time",
        "wait_hist",
        "wait_timeouts",
        "xact_hist",
    )

    def __init__(self) -> None:
        self.born = time.monotonic()
        self.total_xact_count = 0
        self.total_query_count = 0
        self.total_received = 0  # bytes from clients
        self.total_sent = 0  # bytes to clients
        self.total_xact_time = 0.0  # seconds a server was linked to a client
        self.total_wait_time = 0.0  # seconds clients waited for a server
        self.total_query_time = 0.0  # seconds from a request to its ReadyForQuery
        self.server_assignments = 0
        self.servers_opened = 0
        self.connect_errors = 0
        self.wait_timeouts = 0
        self.abandoned_cleaned = 0
        self.total_client_parse_count = 0  # named Parse messages from clients
        self.total_server_parse_count = 0  # Parse messages pgmux sent to servers
        self.total_bind_count = 0  # Binds of named statements
        self.total_client_login_count = 0  # clients that logged in to this pool
        self.session_resets = 0  # servers cleaned of session state (session_state: reset)
        self.timeouts: dict[str, int] = {}  # client_idle, idle_transaction, query, ...
        self.errors: dict[str, int] = {}  # server_connect, server_lost, ...
        self.wait_hist = Histogram()
        self.xact_hist = Histogram()
        self.query_hist = Histogram()
        # (time, counters) at the last two stats_period ticks, for the averages
        self.newer: tuple[float, tuple[float, ...]] | None = None
        self.older: tuple[float, tuple[float, ...]] | None = None

    def add_timeout(self, name: str) -> None:
        self.timeouts[name] = self.timeouts.get(name, 0) + 1

    def add_error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    # add_wait, add_xact and add_query run once per transaction / ReadyForQuery:
    # the histogram's observe() is inlined (one call less on the data path).

    def add_wait(self, seconds: float) -> None:
        self.total_wait_time += seconds
        pending = self.wait_hist.pending
        pending.append(seconds)
        if len(pending) >= FOLD_AT:
            self.wait_hist.fold()

    def add_xact(self, seconds: float) -> None:
        self.total_xact_count += 1
        self.total_xact_time += seconds
        pending = self.xact_hist.pending
        pending.append(seconds)
        if len(pending) >= FOLD_AT:
            self.xact_hist.fold()

    def add_query(self, seconds: float) -> None:
        self.total_query_count += 1
        self.total_query_time += seconds
        pending = self.query_hist.pending
        pending.append(seconds)
        if len(pending) >= FOLD_AT:
            self.query_hist.fold()

    # --- stats_period -------------------------------------------------------

    def snapshot(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in PERIOD_FIELDS)

    def tick(self, now: float) -> None:
        """A stats_period ended: the averages now cover the period just closed."""
        if self.newer is None:
            # A pool born mid-period starts from zero at its birth.
            self.newer = (self.born, (0.0,) * len(PERIOD_FIELDS))
        self.older = self.newer
        self.newer = (now, self.snapshot())

    def averages(self) -> dict[str, float]:
        """Per-second rates and per-event durations over the last full stats period."""
        return averages(self.older, self.newer)


def averages(
    older: tuple[float, tuple[float, ...]] | None, newer: tuple[float, tuple[float, ...]] | None
) -> dict[str, float]:
    """PgBouncer's avg_* values between two snapshots (zeros before two ticks)."""
    out = dict.fromkeys(PERIOD_FIELDS, 0.0)
    if older is None or newer is None or newer[0] <= older[0]:
        return out
    seconds = newer[0] - older[0]
    pairs = zip(PERIOD_FIELDS, newer[1], older[1], strict=True)
    delta = {name: new - old for name, new, old in pairs}
    for name in (
        "server_assignments",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_client_parse_count",
        "total_server_parse_count",
        "total_bind_count",
        "total_client_login_count",
    ):
        out[name] = delta[name] / seconds
    for time_name, count_name in (
        ("total_xact_time", "total_xact_count"),
        ("total_query_time", "total_query_count"),
        ("total_wait_time", "server_assignments"),
    ):
        if delta[count_name] > 0:
            out[time_name] = delta[time_name] / delta[count_name]
    return out


class GlobalStats:
    """Events that belong to no pool (a login that failed before one was chosen)."""

    def __init__(self) -> None:
        self.login_failures: dict[str, int] = {}  # by SQLSTATE
        self.logins = 0

    def login_failed(self, code: str) -> None:
        self.login_failures[code] = self.login_failures.get(code, 0) + 1


GLOBAL = GlobalStats()

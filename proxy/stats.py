"""Counters kept on the data path: plain integer adds, nothing else per message.

Names follow PgBouncer's SHOW STATS (total_xact_count, total_query_count,
total_received, total_sent, total_xact_time, total_query_time, total_wait_time)
so the console and the metrics endpoint read them without translation.
"""

from __future__ import annotations


class PoolStats:
    __slots__ = (
        "abandoned_cleaned",
        "connect_errors",
        "server_assignments",
        "servers_opened",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_wait_time",
        "total_xact_count",
        "total_xact_time",
        "wait_timeouts",
    )

    def __init__(self) -> None:
        self.total_xact_count = 0
        self.total_query_count = 0
        self.total_received = 0  # bytes from clients
        self.total_sent = 0  # bytes to clients
        self.total_xact_time = 0.0  # seconds a server was linked to a client
        self.total_wait_time = 0.0  # seconds clients waited for a server
        self.server_assignments = 0
        self.servers_opened = 0
        self.connect_errors = 0
        self.wait_timeouts = 0
        self.abandoned_cleaned = 0

    def add_wait(self, seconds: float) -> None:
        self.total_wait_time += seconds

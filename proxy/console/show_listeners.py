"""SHOW LISTENERS: LISTEN/NOTIFY through each pool's relay (docs/listen-notify.md).

One row per pool whose clients ever listened (pool.listen_mode: relay):
how many clients listen on how many channels, the relay's server (its
SHOW SERVERS id, 0 while it is not connected), and since the start of this
worker the notifications handed to clients, those lost with a client whose
queue overflowed (pool.notify_queue), the longest queue seen, and how often
the relay came back after losing its server. With several workers each has
its own relay per pool: the console shows a row for each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.proxy.console.show import Result, table

if TYPE_CHECKING:
    from pgmux.proxy.registry import Registry

LISTENERS_COLUMNS = (
    "database", "user", "clients", "channels", "relay_server_id", "relay_pid",
    "notifications_relayed", "notifications_dropped", "queue_high_water", "relay_reconnects",
)  # fmt: skip


def show_listeners(registry: Registry, now: float) -> Result:
    rows = []
    for pool, relay in registry.relays.items():
        server = relay.server
        rows.append((
            pool.dbname, pool.user, relay.clients, len(relay.listeners),
            server.id if server is not None else 0,
            server.backend_pid if server is not None else 0,
            relay.relayed, relay.dropped, relay.queue_high_water, relay.reconnects,
        ))  # fmt: skip
    return table("ssiiiiqqiq", LISTENERS_COLUMNS, rows)

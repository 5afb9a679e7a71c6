"""SHOW SOCKETS / ACTIVE_SOCKETS, and the PgBouncer tables pgmux has no rows for.

SOCKETS lists every client and server in one table, with PgBouncer's state
names (cl_active, sv_idle, ...); ACTIVE_SOCKETS only those with a transaction
running (PgBouncer: those with bytes in their buffers, which pgmux does not
keep per socket). PgBouncer's debug columns (recv_pos ... send_avail) are
left out: pgmux's buffers have no such positions, and made-up zeros would
mislead. PEERS and PEER_POOLS (pgmux has no [peers]: its workers share one
listener) and DNS_HOSTS / DNS_ZONES (pgmux keeps no DNS cache) answer with
PgBouncer's columns and no rows, so scripts that show them all keep working.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pgmux.proxy.console.show import (
    SOCKET_COLUMNS,
    SOCKET_TYPES,
    Result,
    _client_row,
    _server_row,
    client_state,
    consoles,
    server_state,
    table,
)
from pgmux.proxy.console.show_listeners import show_listeners

if TYPE_CHECKING:
    from pgmux.proxy.registry import Registry


def _socket_rows(registry: Registry, now: float, active_only: bool) -> list[Sequence[Any]]:
    wall = time.time()
    rows: list[Sequence[Any]] = []
    if not active_only:
        rows += [_client_row(c, "cl_active", now, wall) for c in consoles(registry)]
    for pool in registry.pools.values():
        for client in sorted(pool.clients, key=lambda c: c.id):
            state = client_state(client)
            if not active_only or state == "active":
                # PgBouncer's lists: a logged-in client is cl_active, idle or not.
                shown = "cl_waiting" if state == "waiting" else "cl_active"
                rows.append(_client_row(client, shown, now, wall))
        for server in sorted(pool.servers, key=lambda s: s.id):
            state = server_state(pool, server)
            if not active_only or state == "active":
                row = _server_row(pool, server, now, wall)
                shown = "sv_login" if state == "new" else f"sv_{state}"
                rows.append((*row[:4], shown, *row[5:]))
    return rows


def show_sockets(registry: Registry, now: float) -> Result:
    return table(SOCKET_TYPES, SOCKET_COLUMNS, _socket_rows(registry, now, active_only=False))


def show_active_sockets(registry: Registry, now: float) -> Result:
    return table(SOCKET_TYPES, SOCKET_COLUMNS, _socket_rows(registry, now, active_only=True))


def show_peers(registry: Registry, now: float) -> Result:
    return table("isii", ("peer_id", "host", "port", "pool_size"), [])


def show_peer_pools(registry: Registry, now: float) -> Result:
    names = ("peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel",
             "sv_login")  # fmt: skip
    return table("iiiii", names, [])


def show_dns_hosts(registry: Registry, now: float) -> Result:
    return table("sqs", ("hostname", "ttl", "addrs"), [])


def show_dns_zones(registry: Registry, now: float) -> Result:
    return table("sqi", ("zonename", "serial", "count"), [])


MORE_SHOW = {
    "listeners": show_listeners,
    "sockets": show_sockets,
    "active_sockets": show_active_sockets,
    "peers": show_peers,
    "peer_pools": show_peer_pools,
    "dns_hosts": show_dns_hosts,
    "dns_zones": show_dns_zones,
}

"""Client and server connection ids (SHOW CLIENTS / SHOW SERVERS, KILL_CLIENT).

Clients and servers share one sequence, as PgBouncer's PgSocket ids do: a
client that logs in and gets a new server takes two ids in a row. Alone,
pgmux numbers 1, 2, 3... Under listen.workers the console shows every
worker's connections and KILL_CLIENT takes any of their ids, so worker i of N
numbers i+1, i+1+N, i+1+2N... and no two workers hand out the same id.
"""

from __future__ import annotations

import itertools

_socket_ids = itertools.count(1)


def configure(index: int, count: int) -> None:
    """Number this process's connections as worker INDEX of COUNT."""
    global _socket_ids
    _socket_ids = itertools.count(index + 1, count)


def next_client_id() -> int:
    return next(_socket_ids)


def next_server_id() -> int:
    return next(_socket_ids)

"""Client and server connection ids (SHOW CLIENTS / SHOW SERVERS, KILL_CLIENT).

Alone, pgmux numbers 1, 2, 3... Under listen.workers the console shows every
worker's connections and KILL_CLIENT takes any of their ids, so worker i of N
numbers i+1, i+1+N, i+1+2N... and no two workers hand out the same id.
"""

from __future__ import annotations

import itertools

_client_ids = itertools.count(1)
_server_ids = itertools.count(1)


def configure(index: int, count: int) -> None:
    """Number this process's connections as worker INDEX of COUNT."""
    global _client_ids, _server_ids
    _client_ids = itertools.count(index + 1, count)
    _server_ids = itertools.count(index + 1, count)


def next_client_id() -> int:
    return next(_client_ids)


def next_server_id() -> int:
    return next(_server_ids)

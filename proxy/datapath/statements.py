"""Prepared statements under pgmux's own names, shared by every pool.

One Statement per distinct (query text, parameter types); its server-side
name is derived from those bytes, so every worker gives it the same name and
a server moving between workers keeps its statements.
"""

from __future__ import annotations

import hashlib

from pgmux.protocol.extended import build_parse, parse_query_text
from pgmux.proxy.datapath import session_state

_GLOBAL_CACHE_LIMIT = 100_000


class Statement:
    """One distinct (query, parameter types), under pgmux's server-side name."""

    __slots__ = ("name", "parse", "rest", "text", "watched")

    def __init__(self, name: bytes, rest: bytes) -> None:
        self.name = name
        self.rest = rest  # the Parse after its name: query text and parameter types
        self.parse = build_parse(name, rest)
        self.text = parse_query_text(rest)
        # Session-state detection looks at the text only of statements that may need it.
        self.watched = self.text if session_state.needs_text(self.text) else b""


def statement_name(rest: bytes) -> bytes:
    """pgmux's server-side name for a text: derived from the text itself, so
    every worker process gives it the same name and a server that moves
    between workers keeps its statements."""
    return b"pgmux_" + hashlib.blake2b(rest, digest_size=12).hexdigest().encode()


class StatementCache:
    """Shared by all pools: the same text gets the same server-side name everywhere."""

    def __init__(self, limit: int = _GLOBAL_CACHE_LIMIT) -> None:
        self._by_key: dict[bytes, Statement] = {}
        self._limit = limit

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, rest: bytes) -> Statement:
        statement = self._by_key.get(rest)
        if statement is None:
            if len(self._by_key) >= self._limit:
                # Clients and servers hold their Statements themselves; a
                # forgotten text gets the same name again when it comes back.
                self._by_key.pop(next(iter(self._by_key)))
            statement = Statement(statement_name(rest), rest)
            self._by_key[rest] = statement
        return statement

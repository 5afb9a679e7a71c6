"""Name handling for extended-query messages (Parse, Bind, Describe, Close).

Bodies stay bytes: a statement is renamed by splitting off its name and
gluing a new one on, without decoding the query text or the parameters.
"""

from __future__ import annotations

from struct import Struct

from .errors import ProtocolError

_HEADER = Struct("!cI").pack


def _cstring(body: bytes, start: int) -> int:
    """Index of the NUL that ends the string starting at `start`."""
    end = body.find(b"\0", start)
    if end < 0:
        raise ProtocolError("invalid message format: missing string terminator")
    return end


def split_parse(body: bytes) -> tuple[bytes, bytes]:
    """Parse body -> (statement name, everything after it: query, parameter types)."""
    end = _cstring(body, 0)
    return body[:end], body[end + 1 :]


def parse_query_text(rest: bytes) -> bytes:
    """The query text of a Parse body's tail (as split_parse returns it)."""
    return rest[: _cstring(rest, 0)]


def bind_names(body: bytes) -> tuple[int, int]:
    """Bind body -> where its portal name and its statement name end (their NULs)."""
    portal_end = _cstring(body, 0)
    return portal_end, _cstring(body, portal_end + 1)


def rename_bind(body: bytes, portal_end: int, name_end: int, name: bytes) -> bytes:
    """The Bind message of `body` (as bind_names split it) for statement `name`."""
    length = len(body) - (name_end - portal_end - 1) + len(name) + 4
    return b"".join((_HEADER(b"B", length), body[: portal_end + 1], name, body[name_end:]))


def split_target(body: bytes) -> tuple[int, bytes]:
    """Describe / Close body -> (b'S' or b'P' as int, name)."""
    if len(body) < 2:
        raise ProtocolError("invalid message format: Describe/Close too short")
    end = _cstring(body, 1)
    return body[0], body[1:end]


def _message(kind: bytes, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return _HEADER(kind, len(payload) + 4) + payload


def build_parse(name: bytes, rest: bytes) -> bytes:
    return _message(b"P", name, b"\0", rest)


def build_describe_statement(name: bytes) -> bytes:
    return _message(b"D", b"S", name, b"\0")


def build_close_statement(name: bytes) -> bytes:
    return _message(b"C", b"S", name, b"\0")


def command_tag(body: bytes) -> bytes:
    """CommandComplete body -> its tag without the NUL (b'SELECT 1')."""
    end = body.find(b"\0")
    return body if end < 0 else body[:end]

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


def split_bind(body: bytes) -> tuple[bytes, bytes, bytes]:
    """Bind body -> (portal name, statement name, parameters and formats)."""
    portal_end = _cstring(body, 0)
    name_end = _cstring(body, portal_end + 1)
    return body[:portal_end], body[portal_end + 1 : name_end], body[name_end + 1 :]


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


def build_bind(portal: bytes, name: bytes, rest: bytes) -> bytes:
    return _message(b"B", portal, b"\0", name, b"\0", rest)


def build_describe_statement(name: bytes) -> bytes:
    return _message(b"D", b"S", name, b"\0")


def build_close_statement(name: bytes) -> bytes:
    return _message(b"C", b"S", name, b"\0")


def command_tag(body: bytes) -> bytes:
    """CommandComplete body -> its tag without the NUL (b'SELECT 1')."""
    end = body.find(b"\0")
    return body if end < 0 else body[:end]

"""Name handling for extended-query messages (Parse, Bind, Describe, Close).

Bodies stay bytes: a statement is renamed by splitting off its name and
gluing a new one on, without decoding the query text or the parameters.

The splitters check what pgmux itself reads or answers for (the names it
renames, a Parse it may acknowledge from its cache) in PostgreSQL's own
order and words: a string without its NUL is "invalid string in message",
a short count "insufficient data left in message", bytes after the last
field "invalid message format" (all 08P01), and a name that is not valid
UTF-8 "invalid byte sequence for encoding" (22021), as pq_getmsgstring and
pg_verify_mbstr report them. PostgreSQL treats each as an ERROR of that
request (skip to Sync, the connection stays); the translator does the same.
What pgmux forwards untouched (a Bind's parameters, a portal's Execute) is
left to PostgreSQL to judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from struct import Struct

from .errors import ProtocolError

_HEADER = Struct("!cI").pack

CHARACTER_NOT_IN_REPERTOIRE = "22021"
INVALID_STRING = "invalid string in message"
INSUFFICIENT_DATA = "insufficient data left in message"
NO_DATA_LEFT = "no data left in message"
INVALID_FORMAT = "invalid message format"
# The splitters check names in the client's encoding as its server reports it
# (`reported`, ParameterStatus values): only UTF8 is known here, and assumed.
UTF8_CLIENT: Mapping[str, str] = {"client_encoding": "UTF8"}


def _cstring(body: bytes, start: int) -> int:
    """Index of the NUL that ends the string starting at `start`."""
    end = body.find(b"\0", start)
    if end < 0:
        raise ProtocolError(INVALID_STRING)
    return end


def _check_names(names: bytes) -> None:
    """The NUL-separated names PostgreSQL would check in the client encoding, in order."""
    for name in names.split(b"\0"):
        check_utf8(name)


def check_utf8(raw: bytes) -> None:
    """22021 with PostgreSQL's wording (report_invalid_encoding) for invalid UTF-8."""
    try:
        raw.decode()
    except UnicodeDecodeError as exc:
        bad = raw[exc.start :]
        width = _utf8_width(bad[0])
        shown = " ".join(f"0x{byte:02x}" for byte in bad[: min(width, 8)])
        raise ProtocolError(
            f'invalid byte sequence for encoding "UTF8": {shown}', CHARACTER_NOT_IN_REPERTOIRE
        ) from None


def _utf8_width(lead: int) -> int:
    """The length a UTF-8 lead byte announces (PostgreSQL's pg_utf_mblen)."""
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 1


def split_parse(body: bytes, reported: Mapping[str, str] = UTF8_CLIENT) -> tuple[bytes, bytes]:
    """Parse body -> (statement name, everything after it: query, parameter types).

    The whole body is checked: pgmux may answer a Parse from its cache, and
    caches it by these bytes. Inlined: this runs for every named Parse."""
    end = body.find(b"\0")
    if end < 0:
        raise ProtocolError(INVALID_STRING)
    name = body[:end]
    if not name.isascii() and reported.get("client_encoding") == "UTF8":
        check_utf8(name)
    query_end = body.find(b"\0", end + 1)
    if query_end < 0:
        raise ProtocolError(INVALID_STRING)
    size = len(body)
    if query_end + 3 > size:
        raise ProtocolError(INSUFFICIENT_DATA)
    types_end = query_end + 3 + 4 * (body[query_end + 1] << 8 | body[query_end + 2])
    if types_end != size:
        raise ProtocolError(INSUFFICIENT_DATA if types_end > size else INVALID_FORMAT)
    return name, body[end + 1 :]


def parse_query_text(rest: bytes) -> bytes:
    """The query text of a Parse body's tail (as split_parse returns it)."""
    return rest[: _cstring(rest, 0)]


def bind_names(body: bytes, reported: Mapping[str, str] = UTF8_CLIENT) -> tuple[int, int]:
    """Bind body -> where its portal name and its statement name end (their NULs).

    The rest (formats, parameters) goes to PostgreSQL as it is, which judges it
    (after the statement name, as pgmux does: an unknown name is 26000 first)."""
    portal_end = body.find(b"\0")
    if portal_end < 0:
        raise ProtocolError(INVALID_STRING)
    name_end = body.find(b"\0", portal_end + 1)
    if name_end < 0:
        raise ProtocolError(INVALID_STRING)
    if name_end > 1:
        names = body[:name_end]
        if not names.isascii() and reported.get("client_encoding") == "UTF8":
            _check_names(names)
    return portal_end, name_end


def rename_bind(body: bytes, portal_end: int, name_end: int, name: bytes) -> bytes:
    """The Bind message of `body` (as bind_names split it) for statement `name`."""
    length = len(body) - (name_end - portal_end - 1) + len(name) + 4
    return b"".join((_HEADER(b"B", length), body[: portal_end + 1], name, body[name_end:]))


def split_target(body: bytes, reported: Mapping[str, str] = UTF8_CLIENT) -> tuple[int, bytes]:
    """Describe / Close body -> (b'S' or b'P' as int, name); the subtype is the
    caller's to judge, after the name (PostgreSQL's order)."""
    if not body:
        raise ProtocolError(NO_DATA_LEFT)
    end = body.find(b"\0", 1)
    if end < 0:
        raise ProtocolError(INVALID_STRING)
    name = body[1:end]
    if not name.isascii() and reported.get("client_encoding") == "UTF8":
        check_utf8(name)
    if end + 1 != len(body):
        raise ProtocolError(INVALID_FORMAT)
    return body[0], name


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

"""Parsers for the few message bodies the proxy looks into.

Each takes the body (the bytes after the 5-byte header) and returns plain
values. Anything malformed raises ProtocolError; strict about trailing bytes,
because a peer that disagrees with us about framing cannot be trusted further.
"""

from __future__ import annotations

from typing import NamedTuple

from .codec import Cursor, decode
from .errors import ProtocolError

MAX_CANCEL_KEY = 256


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse: {'S': 'ERROR', 'C': '42P01', 'M': ...}."""
    cursor = Cursor(body, "error fields")
    fields: dict[str, str] = {}
    while (code := cursor.byte()) != 0:
        fields[chr(code)] = cursor.text()
    cursor.end()
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    cursor = Cursor(body, "ParameterStatus")
    name, value = cursor.text(), cursor.text()
    cursor.end()
    return name, value


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    cursor = Cursor(body, "BackendKeyData")
    pid = cursor.uint32()
    key = cursor.rest()
    if not 4 <= len(key) <= MAX_CANCEL_KEY:
        raise ProtocolError("invalid BackendKeyData: bad key length")
    return pid, key


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """Authentication request: (code, the bytes after the code)."""
    cursor = Cursor(body, "authentication request")
    return cursor.int32(), cursor.rest()


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    """The list in AuthenticationSASL (after the code): names, then an empty one."""
    cursor = Cursor(data, "SASL mechanism list")
    names: list[str] = []
    while name := cursor.text():
        names.append(name)
    cursor.end()
    return names


def parse_row_description(body: bytes) -> list[tuple[str, int]]:
    """RowDescription: (column name, type oid) per column."""
    cursor = Cursor(body, "RowDescription")
    columns = []
    for _ in range(_count(cursor)):
        name = cursor.text()
        cursor.take(6)  # table oid, attnum
        type_oid = cursor.uint32()
        cursor.take(8)  # typlen, typmod, format
        columns.append((name, type_oid))
    cursor.end()
    return columns


def parse_data_row(body: bytes) -> list[bytes | None]:
    cursor = Cursor(body, "DataRow")
    values: list[bytes | None] = []
    for _ in range(_count(cursor)):
        size = cursor.int32()
        if size < -1:
            raise ProtocolError("invalid DataRow: negative value length")
        values.append(None if size == -1 else cursor.take(size))
    cursor.end()
    return values


def parse_command_complete(body: bytes) -> str:
    return _single_string(body, "CommandComplete")


def parse_query(body: bytes) -> str:
    return _single_string(body, "Query")


def parse_password_message(body: bytes) -> bytes:
    """Cleartext / md5 PasswordMessage: the password bytes without the NUL."""
    if not body.endswith(b"\0") or body.index(b"\0") != len(body) - 1:
        raise ProtocolError("invalid password packet size")
    return body[:-1]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: (mechanism, initial data); a length of -1 means no data."""
    cursor = Cursor(body, "SASLInitialResponse")
    mechanism = cursor.text()
    size = cursor.int32()
    data = b"" if size == -1 else cursor.take(size)
    cursor.end()
    return mechanism, data


def parse_parse(body: bytes) -> tuple[str, str, list[int]]:
    """Parse: (statement name, query text, parameter type oids)."""
    cursor = Cursor(body, "Parse")
    name, sql = cursor.text(), cursor.text()
    oids = [cursor.uint32() for _ in range(_count(cursor))]
    cursor.end()
    return name, sql, oids


class Bind(NamedTuple):
    portal: str
    statement: str
    param_formats: list[int]  # none: all text; one: for every parameter; else one each
    params: list[bytes | None]  # None is NULL
    result_formats: list[int]  # likewise, for the result columns


def parse_bind(body: bytes) -> Bind:
    cursor = Cursor(body, "Bind")
    portal, statement = cursor.text(), cursor.text()
    param_formats = [cursor.int16() for _ in range(_count(cursor))]
    params: list[bytes | None] = []
    for _ in range(_count(cursor)):
        size = cursor.int32()
        if size < -1:
            raise ProtocolError("invalid Bind: negative parameter length")
        params.append(None if size == -1 else cursor.take(size))
    result_formats = [cursor.int16() for _ in range(_count(cursor))]
    cursor.end()
    return Bind(portal, statement, param_formats, params, result_formats)


def parse_target(body: bytes, what: str) -> tuple[str, str]:
    """Describe / Close: (b'S' statement or b'P' portal as 'S' / 'P', name)."""
    cursor = Cursor(body, what)
    kind = chr(cursor.byte())
    if kind not in ("S", "P"):
        raise ProtocolError(f"invalid {what}: unknown target type {kind!r}")
    name = cursor.text()
    cursor.end()
    return kind, name


def parse_execute(body: bytes) -> tuple[str, int]:
    """Execute: (portal name, row limit; 0 means all rows)."""
    cursor = Cursor(body, "Execute")
    portal, max_rows = cursor.text(), cursor.int32()
    cursor.end()
    return portal, max_rows


def _count(cursor: Cursor) -> int:
    # Counts are Int16 on the wire, but PostgreSQL reads them unsigned (a query
    # may have up to 65535 parameters).
    return cursor.uint16()


def _single_string(body: bytes, what: str) -> str:
    if not body.endswith(b"\0") or body.index(b"\0") != len(body) - 1:
        raise ProtocolError(f"invalid {what}: expected one NUL-terminated string")
    return decode(body[:-1], what)

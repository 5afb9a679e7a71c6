"""Message builders (bytes out) for both directions, plus the parsers re-exported
from parsers.py so callers need one import: `from pgmux.protocol import messages`."""

from __future__ import annotations

from collections.abc import Sequence

from .codec import INT16, INT32, UINT16, UINT32, cstr
from .codec import message as _msg
from .parsers import (
    parse_authentication,
    parse_backend_key_data,
    parse_command_complete,
    parse_data_row,
    parse_error_fields,
    parse_parameter_status,
    parse_parse,
    parse_password_message,
    parse_query,
    parse_row_description,
    parse_sasl_initial_response,
    parse_sasl_mechanisms,
)
from .startup import CANCEL_REQUEST_CODE, PROTOCOL_V3, SSL_REQUEST_CODE

__all__ = [
    "AUTH_CLEARTEXT_PASSWORD",
    "AUTH_MD5_PASSWORD",
    "AUTH_OK",
    "AUTH_SASL",
    "AUTH_SASL_CONTINUE",
    "AUTH_SASL_FINAL",
    "authentication_cleartext_password",
    "authentication_md5_password",
    "authentication_ok",
    "authentication_sasl",
    "authentication_sasl_continue",
    "authentication_sasl_final",
    "backend_key_data",
    "bind",
    "bind_complete",
    "cancel_request",
    "close",
    "close_complete",
    "command_complete",
    "data_row",
    "describe",
    "empty_query_response",
    "error_response",
    "execute",
    "flush",
    "negotiate_protocol_version",
    "no_data",
    "notice_response",
    "parameter_description",
    "parameter_status",
    "parse",
    "parse_authentication",
    "parse_backend_key_data",
    "parse_command_complete",
    "parse_complete",
    "parse_data_row",
    "parse_error_fields",
    "parse_parameter_status",
    "parse_parse",
    "parse_password_message",
    "parse_query",
    "parse_row_description",
    "parse_sasl_initial_response",
    "parse_sasl_mechanisms",
    "password_message",
    "query",
    "ready_for_query",
    "row_description",
    "sasl_initial_response",
    "sasl_response",
    "ssl_request",
    "startup_message",
    "sync",
    "terminate",
]

# Authentication request codes (the Int32 after 'R').
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

TEXT_TYPLEN = -1  # varlena: what a text-format column reports without a catalog lookup
_NULL = INT32.pack(-1)

# Messages without a body never change: build them once.
_AUTH_OK = _msg(b"R", INT32.pack(AUTH_OK))
_AUTH_CLEARTEXT = _msg(b"R", INT32.pack(AUTH_CLEARTEXT_PASSWORD))
_EMPTY_QUERY = _msg(b"I")
_PARSE_COMPLETE = _msg(b"1")
_BIND_COMPLETE = _msg(b"2")
_CLOSE_COMPLETE = _msg(b"3")
_NO_DATA = _msg(b"n")
_SYNC = _msg(b"S")
_FLUSH = _msg(b"H")
_TERMINATE = _msg(b"X")
_READY = {s: _msg(b"Z", s.encode()) for s in "ITE"}


# --- backend (server -> client) -------------------------------------------


def authentication_ok() -> bytes:
    return _AUTH_OK


def authentication_cleartext_password() -> bytes:
    return _AUTH_CLEARTEXT


def authentication_md5_password(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("md5 salt must be 4 bytes")
    return _msg(b"R", INT32.pack(AUTH_MD5_PASSWORD) + salt)


def authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    names = b"".join(cstr(m) for m in mechanisms)
    return _msg(b"R", INT32.pack(AUTH_SASL) + names + b"\0")


def authentication_sasl_continue(data: bytes) -> bytes:
    return _msg(b"R", INT32.pack(AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return _msg(b"R", INT32.pack(AUTH_SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    # The pid is an opaque Int32 to clients; accept it signed or unsigned.
    return _msg(b"K", UINT32.pack(pid & 0xFFFFFFFF) + key)


def negotiate_protocol_version(version: int, options: tuple[str, ...]) -> bytes:
    """The newest version the server speaks, and the options it did not understand."""
    names = b"".join(name.encode() + b"\0" for name in options)
    return _msg(b"v", UINT32.pack(version) + UINT32.pack(len(options)) + names)


def ready_for_query(status: str = "I") -> bytes:
    try:
        return _READY[status]
    except KeyError:
        raise ValueError(f"transaction status must be I, T or E, not {status!r}") from None


def _notice_fields(
    severity: str, sqlstate: str, message_text: str, detail: str | None, hint: str | None
) -> bytes:
    parts = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(sqlstate)]
    parts += [b"M", cstr(message_text)]
    if detail is not None:
        parts += [b"D", cstr(detail)]
    if hint is not None:
        parts += [b"H", cstr(hint)]
    parts.append(b"\0")
    return b"".join(parts)


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return _msg(b"E", _notice_fields(severity, sqlstate, message, detail, hint))


def notice_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "NOTICE",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return _msg(b"N", _notice_fields(severity, sqlstate, message, detail, hint))


# Per column after the name: table oid, attnum, type oid, typlen, typmod, format.
def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    parts = [UINT16.pack(len(columns))]
    for name, type_oid in columns:
        parts += [cstr(name), _COLUMN_HEAD, UINT32.pack(type_oid), _COLUMN_TAIL]
    return _msg(b"T", b"".join(parts))


_COLUMN_HEAD = INT32.pack(0) + INT16.pack(0)
_COLUMN_TAIL = INT16.pack(TEXT_TYPLEN) + INT32.pack(-1) + INT16.pack(0)


def data_row(values: Sequence[str | bytes | None]) -> bytes:
    parts = [UINT16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(_NULL)
            continue
        raw = value.encode() if isinstance(value, str) else value
        parts += [INT32.pack(len(raw)), raw]
    return _msg(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return _msg(b"C", cstr(tag))


def empty_query_response() -> bytes:
    return _EMPTY_QUERY


def parse_complete() -> bytes:
    return _PARSE_COMPLETE


def bind_complete() -> bytes:
    return _BIND_COMPLETE


def close_complete() -> bytes:
    return _CLOSE_COMPLETE


def no_data() -> bytes:
    return _NO_DATA


def parameter_description(oids: Sequence[int]) -> bytes:
    return _msg(b"t", UINT16.pack(len(oids)) + b"".join(UINT32.pack(o) for o in oids))


# --- frontend (client -> server) ------------------------------------------


def query(sql: str) -> bytes:
    return _msg(b"Q", cstr(sql))


def sync() -> bytes:
    return _SYNC


def flush() -> bytes:
    return _FLUSH


def terminate() -> bytes:
    return _TERMINATE


def copy_fail(reason: str) -> bytes:
    return _msg(b"f", cstr(reason))


def startup_message(params: dict[str, str], protocol: int = PROTOCOL_V3) -> bytes:
    body = UINT32.pack(protocol) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return INT32.pack(8) + UINT32.pack(SSL_REQUEST_CODE)


def cancel_request(pid: int, key: bytes) -> bytes:
    body = UINT32.pack(CANCEL_REQUEST_CODE) + UINT32.pack(pid & 0xFFFFFFFF) + key
    return INT32.pack(len(body) + 4) + body


def password_message(data: str | bytes) -> bytes:
    """Cleartext or md5 password (str, sent NUL-terminated) or raw SASL bytes."""
    return _msg(b"p", cstr(data) if isinstance(data, str) else data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _msg(b"p", cstr(mechanism) + INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _msg(b"p", data)


def parse(name: str, sql: str, param_oids: Sequence[int] = ()) -> bytes:
    oids = b"".join(UINT32.pack(o) for o in param_oids)
    return _msg(b"P", cstr(name) + cstr(sql) + UINT16.pack(len(param_oids)) + oids)


def bind(portal: str, statement: str, params: Sequence[bytes | None]) -> bytes:
    """Bind with every parameter and result column in text format."""
    parts = [cstr(portal), cstr(statement), INT16.pack(0), UINT16.pack(len(params))]
    for value in params:
        parts += [_NULL] if value is None else [INT32.pack(len(value)), value]
    parts.append(INT16.pack(0))
    return _msg(b"B", b"".join(parts))


def describe(kind: str, name: str) -> bytes:
    return _msg(b"D", _kind(kind) + cstr(name))


def execute(portal: str, max_rows: int = 0) -> bytes:
    return _msg(b"E", cstr(portal) + INT32.pack(max_rows))


def close(kind: str, name: str) -> bytes:
    return _msg(b"C", _kind(kind) + cstr(name))


def _kind(kind: str) -> bytes:
    if kind not in ("S", "P"):
        raise ValueError(f"kind must be 'S' (statement) or 'P' (portal), not {kind!r}")
    return kind.encode()

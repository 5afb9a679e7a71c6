"""What a PostgreSQL server may send pgmux, and when: the bounds of the server side.

A server is trusted less than it used to be (a compromised host, a proxy in
between, a misconfigured port): pgmux checks every message header it reads
from one against a table of the types and lengths that make sense at that
point of the conversation, as libpq's fe-protocol3.c does. A message that
fails the check ends that server connection; the reason is `refusal`'s.

Each table maps a type byte to the largest length word allowed (0: not
allowed at all). Messages pgmux must read whole (ErrorResponse,
ParameterStatus, CommandComplete, ...) get HELD_LIMIT; rows and COPY data
stream through unbuffered and only have to stay within PostgreSQL's own
maximum, STREAMED_LIMIT.
"""

from __future__ import annotations

from . import msgtypes as t
from .errors import ProtocolError
from .parsers import parse_error_fields

# The longest message read whole. PostgreSQL's errors can quote a client's
# value, hence the margin; a server announcing more is broken or hostile.
HELD_LIMIT = 64 << 20
# PostgreSQL never builds a message over MaxAllocSize (1 GiB - 1).
STREAMED_LIMIT = (1 << 30) - 1
READY_FOR_QUERY_LENGTH = 5  # the length word of every ReadyForQuery

# Sent only before the first ReadyForQuery.
LOGIN_ONLY = (t.AUTHENTICATION_REQUEST, t.BACKEND_KEY_DATA, t.NEGOTIATE_PROTOCOL_VERSION)
# What PostgreSQL may send at any time, asked or not (an idle backend gets a
# NOTICE or FATAL on shutdown, a ParameterStatus after a reload, a NOTIFY).
ASYNC = (t.NOTICE_RESPONSE, t.ERROR_RESPONSE, t.PARAMETER_STATUS, t.NOTIFICATION_RESPONSE)
STREAMED = (t.DATA_ROW, t.COPY_DATA, t.FUNCTION_CALL_RESPONSE)
HELD = (
    t.PARSE_COMPLETE,
    t.BIND_COMPLETE,
    t.CLOSE_COMPLETE,
    t.COMMAND_COMPLETE,
    t.COPY_IN_RESPONSE,
    t.COPY_OUT_RESPONSE,
    t.COPY_BOTH_RESPONSE,
    t.COPY_DONE,
    t.EMPTY_QUERY_RESPONSE,
    t.ROW_DESCRIPTION,
    t.NO_DATA,
    t.PORTAL_SUSPENDED,
    t.PARAMETER_DESCRIPTION,
    *ASYNC,
)


def _table(limits: dict[int, int]) -> list[int]:
    table = [0] * 256
    for kind, limit in limits.items():
        table[kind] = limit
    return table


# While a reply is owed (a Query, Sync or FunctionCall unanswered, or a batch open).
ASKED = _table(
    {
        **dict.fromkeys(HELD, HELD_LIMIT),
        **dict.fromkeys(STREAMED, STREAMED_LIMIT),
        t.READY_FOR_QUERY: READY_FOR_QUERY_LENGTH,
    }
)
# While nothing is owed: only what PostgreSQL sends unprompted.
UNASKED = _table(dict.fromkeys(ASYNC, HELD_LIMIT))
# From the startup packet to the first ReadyForQuery.
LOGIN = _table(
    {
        **dict.fromkeys(LOGIN_ONLY, HELD_LIMIT),
        t.NOTICE_RESPONSE: HELD_LIMIT,
        t.ERROR_RESPONSE: HELD_LIMIT,
        t.PARAMETER_STATUS: HELD_LIMIT,
        t.READY_FOR_QUERY: READY_FOR_QUERY_LENGTH,
    }
)

_PHASES = {id(ASKED): "in reply", id(UNASKED): "while nothing was asked", id(LOGIN): "during login"}


def refusal(kind: int, length: int, table: list[int]) -> str:
    """Why a header of type KIND and length word LENGTH fails TABLE, in words."""
    name = repr(chr(kind))
    limit = table[kind]
    if not limit:
        return f"unexpected message type {name} {_PHASES.get(id(table), '')}".rstrip()
    if length < 4 or (kind == t.READY_FOR_QUERY and length != READY_FOR_QUERY_LENGTH):
        return f"invalid length {length} of message type {name}"
    return f"message type {name} of {length} bytes exceeds the limit of {limit}"


def fails(kind: int, length: int, table: list[int]) -> bool:
    """The check the scanners inline: a length over the type's limit, or under 4."""
    return length > table[kind] or length < 4


def check_notice_fields(body: bytes, what: str = "ErrorResponse") -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse, which must be well formed
    and carry a severity, a 5-character SQLSTATE and a message, as PostgreSQL's
    always do (PgBouncer crashed on one without SQLSTATE, CVE-2026-6666)."""
    try:
        fields = parse_error_fields(body)
    except ProtocolError as exc:
        raise ProtocolError(f"malformed {what}: {exc.message}") from None
    missing = [code for code in "SCM" if code not in fields]
    if missing:
        raise ProtocolError(f"malformed {what}: no field {', '.join(missing)}")
    if len(fields["C"]) != 5:
        raise ProtocolError(f"malformed {what}: SQLSTATE {fields['C']!r}")
    return fields

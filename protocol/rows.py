"""Result rows with typed columns: RowDescription, DataRow values, binary numeric.

messages.row_description sends every column as text with an unknown length;
a server that answers queries itself (the admin console) needs more: the
real type length of each column and the format the client asked for in
Bind, text (0) or binary (1), with the values encoded to match. Only the
types such a server uses are known here: text, int4, int8 and numeric.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from .codec import INT16, INT32, UINT16, UINT32, cstr, message

# Type OIDs (pg_type.oid) and their typlen (-1: variable length).
TEXT = 25
INT4 = 23
INT8 = 20
NUMERIC = 1700
TYPLEN = {TEXT: -1, INT4: 4, INT8: 8, NUMERIC: -1}

TEXT_FORMAT = 0
BINARY_FORMAT = 1

_INT64 = struct.Struct("!q")
_NUMERIC_HEADER = struct.Struct("!hhHh")  # ndigits, weight, sign, dscale
_NUMERIC_NEG = 0x4000
_NBASE = 10000  # numeric digits are base 10000, most significant first
_NULL = INT32.pack(-1)


def column_format(formats: Sequence[int], index: int) -> int:
    """Column INDEX's format from Bind's result format codes: none means all
    text, one applies to every column, else one code per column."""
    if not formats:
        return TEXT_FORMAT
    return formats[0] if len(formats) == 1 else formats[index]


def row_description(columns: Sequence[tuple[str, int]], formats: Sequence[int] = ()) -> bytes:
    """RowDescription for (name, type oid) COLUMNS in the formats Bind asked for."""
    parts = [UINT16.pack(len(columns))]
    for index, (name, oid) in enumerate(columns):
        parts += [
            cstr(name),
            INT32.pack(0),  # table oid: not a table column
            INT16.pack(0),  # attribute number
            UINT32.pack(oid),
            INT16.pack(TYPLEN[oid]),
            INT32.pack(-1),  # type modifier
            INT16.pack(column_format(formats, index)),
        ]
    return message(b"T", b"".join(parts))


def data_row(values: Sequence[Any], oids: Sequence[int], formats: Sequence[int] = ()) -> bytes:
    """DataRow of VALUES (None is NULL), each encoded for its column's type and format."""
    parts = [UINT16.pack(len(values))]
    for index, (value, oid) in enumerate(zip(values, oids, strict=True)):
        raw = encode_value(value, oid, column_format(formats, index))
        parts += [_NULL] if raw is None else [INT32.pack(len(raw)), raw]
    return message(b"D", b"".join(parts))


def encode_value(value: Any, oid: int, fmt: int) -> bytes | None:
    """One column value on the wire; binary only for the integer types and
    numeric (of an integer value), text for everything else."""
    if value is None:
        return None
    if fmt == TEXT_FORMAT:
        return str(value).encode()
    if oid == INT4:
        return INT32.pack(int(value))
    if oid == INT8:
        return _INT64.pack(int(value))
    if oid == NUMERIC:
        return numeric_binary(int(value))
    return str(value).encode()


def numeric_binary(number: int) -> bytes:
    """An integer in PostgreSQL's binary numeric format (numeric_send):
    ndigits, weight, sign, dscale, then the base-10000 digits."""
    sign = _NUMERIC_NEG if number < 0 else 0
    number = abs(number)
    digits: list[int] = []
    while number:
        number, digit = divmod(number, _NBASE)
        digits.insert(0, digit)
    weight = len(digits) - 1 if digits else 0
    while digits and digits[-1] == 0:
        digits.pop()  # trailing zero groups are implied by the weight
    header = _NUMERIC_HEADER.pack(len(digits), weight, sign, 0)
    return header + b"".join(INT16.pack(d) for d in digits)

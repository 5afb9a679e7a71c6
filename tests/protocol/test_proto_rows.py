"""Typed result rows (protocol/rows.py) and the Bind / Describe / Close /
Execute parsers, on bytes."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgmux.protocol import messages as m
from pgmux.protocol import rows
from pgmux.protocol.codec import INT16, INT32, UINT16, cstr
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.parsers import Bind, parse_bind, parse_execute, parse_target


def body_of(raw: bytes, kind: str) -> bytes:
    reader = MessageReader()
    reader.feed(raw)
    msg = reader.next_message()
    assert msg is not None and reader.buffered() == 0
    assert chr(msg[0]) == kind
    return msg[1]


def numeric_to_int(raw: bytes) -> int:
    """Read back an integer numeric the way PostgreSQL's numeric_recv does."""
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", raw)
    assert dscale == 0 and sign in (0, 0x4000)
    digits = struct.unpack_from(f"!{ndigits}h", raw, 8)
    assert len(raw) == 8 + 2 * ndigits
    assert all(0 <= d < 10000 for d in digits)
    value = sum(d * 10000 ** (weight - i) for i, d in enumerate(digits))
    return -value if sign else value


# --- binary numeric ----------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (0, struct.pack("!hhHh", 0, 0, 0, 0)),
        (7, struct.pack("!hhHhh", 1, 0, 0, 0, 7)),
        (12345, struct.pack("!hhHhhh", 2, 1, 0, 0, 1, 2345)),
        (-12345, struct.pack("!hhHhhh", 2, 1, 0x4000, 0, 1, 2345)),
        # trailing zero groups are left to the weight
        (10000, struct.pack("!hhHhh", 1, 1, 0, 0, 1)),
        (2 * 10000**2 + 3, struct.pack("!hhHhhhh", 3, 2, 0, 0, 2, 0, 3)),
    ],
)
def test_numeric_binary_of_some_integers(number: int, expected: bytes) -> None:
    assert rows.numeric_binary(number) == expected


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_numeric_binary_reads_back(number: int) -> None:
    assert numeric_to_int(rows.numeric_binary(number)) == number


# --- values and formats ------------------------------------------------------


def test_column_format_follows_binds_rules() -> None:
    assert [rows.column_format([], i) for i in range(3)] == [0, 0, 0]
    assert [rows.column_format([1], i) for i in range(3)] == [1, 1, 1]
    assert [rows.column_format([0, 1, 0], i) for i in range(3)] == [0, 1, 0]


def test_encode_value_text_and_binary() -> None:
    assert rows.encode_value(None, rows.INT4, 1) is None
    assert rows.encode_value(42, rows.INT8, 0) == b"42"
    assert rows.encode_value(-2, rows.INT4, 1) == struct.pack("!i", -2)
    assert rows.encode_value(2**40, rows.INT8, 1) == struct.pack("!q", 2**40)
    assert rows.encode_value(5, rows.NUMERIC, 1) == rows.numeric_binary(5)
    # text is the same bytes in either format
    assert rows.encode_value("pgmux", rows.TEXT, 1) == b"pgmux"


def test_row_description_carries_type_lengths_and_formats() -> None:
    columns = [("name", rows.TEXT), ("n", rows.INT4), ("big", rows.INT8), ("sum", rows.NUMERIC)]
    body = body_of(rows.row_description(columns, [0, 1, 1, 0]), "T")
    assert m.parse_row_description(body) == columns
    pos, fields = 2, []
    for name, _oid in columns:
        pos += len(cstr(name))
        fields.append(struct.unpack_from("!IhIhih", body, pos))
        pos += 18
    assert pos == len(body)
    assert fields == [
        (0, 0, rows.TEXT, -1, -1, 0),
        (0, 0, rows.INT4, 4, -1, 1),
        (0, 0, rows.INT8, 8, -1, 1),
        (0, 0, rows.NUMERIC, -1, -1, 0),
    ]


def test_row_description_without_formats_is_all_text() -> None:
    body = body_of(rows.row_description([("a", rows.INT4), ("b", rows.INT8)]), "T")
    formats = [INT16.unpack_from(body, end - 2)[0] for end in (2 + 2 + 18, len(body))]
    assert formats == [0, 0]


def test_data_row_encodes_each_column_for_its_format() -> None:
    oids = [rows.TEXT, rows.INT4, rows.NUMERIC, rows.INT8]
    body = body_of(rows.data_row(["x", 3, 10001, None], oids, [1]), "D")
    assert m.parse_data_row(body) == [
        b"x",
        struct.pack("!i", 3),
        rows.numeric_binary(10001),
        None,
    ]
    text = body_of(rows.data_row(["x", 3, 10001, None], oids), "D")
    assert m.parse_data_row(text) == [b"x", b"3", b"10001", None]


def test_data_row_needs_a_type_per_value() -> None:
    with pytest.raises(ValueError):
        rows.data_row([1, 2], [rows.INT4])


# --- Bind --------------------------------------------------------------------


def bind_body(
    portal: str = "p",
    statement: str = "s",
    param_formats: tuple[int, ...] = (),
    params: tuple[bytes | None, ...] = (),
    result_formats: tuple[int, ...] = (),
) -> bytes:
    parts = [cstr(portal), cstr(statement), UINT16.pack(len(param_formats))]
    parts += [INT16.pack(f) for f in param_formats]
    parts.append(UINT16.pack(len(params)))
    for value in params:
        parts += [INT32.pack(-1)] if value is None else [INT32.pack(len(value)), value]
    parts.append(UINT16.pack(len(result_formats)))
    parts += [INT16.pack(f) for f in result_formats]
    return b"".join(parts)


def test_parse_bind_reads_every_field() -> None:
    body = bind_body("portal", "stmt", (1, 0), (b"\x00\x01", None), (0, 1, 1))
    assert parse_bind(body) == Bind("portal", "stmt", [1, 0], [b"\x00\x01", None], [0, 1, 1])


def test_parse_bind_of_the_builder() -> None:
    body = body_of(m.bind("", "q1", [b"5", None]), "B")
    assert parse_bind(body) == Bind("", "q1", [], [b"5", None], [])


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"portal-without-nul",
        b"p\0s\0",  # no parameter formats count
        bind_body(result_formats=(1,))[:-1],  # a format code cut in half
        bind_body(params=(b"abc",))[:-4],  # the value shorter than its length
        bind_body(params=(b"abc",)).replace(INT32.pack(3), INT32.pack(-2)),
        bind_body() + b"\0",  # trailing bytes
        b"\xff\0s\0" + bind_body()[4:],  # a portal name that is not UTF-8
    ],
)
def test_parse_bind_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_bind(body)


@given(st.binary(max_size=40))
def test_parse_bind_never_raises_anything_else(body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_bind(body)


# --- Describe, Close, Execute ------------------------------------------------


def test_parse_target_of_describe_and_close() -> None:
    assert parse_target(body_of(m.describe("S", "st"), "D"), "Describe") == ("S", "st")
    assert parse_target(body_of(m.close("P", ""), "C"), "Close") == ("P", "")


@pytest.mark.parametrize("body", [b"", b"S", b"Sname", b"Xname\0", b"Sname\0\0"])
def test_parse_target_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_target(body, "Describe")


def test_parse_execute() -> None:
    assert parse_execute(body_of(m.execute("p", 10), "E")) == ("p", 10)
    for body in (b"p\0", b"p\0\0\0\0\0\0", b"p"):
        with pytest.raises(ProtocolError):
            parse_execute(body)

from __future__ import annotations

import pytest

from pgmux.protocol import messages, sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import HEADER_SIZE, MessageReader, read_header

STREAM = (
    messages.query("select 1")
    + messages.sync()
    + messages.parse("s1", "select $1", [23])
    + messages.terminate()
)


def test_whole_stream_at_once():
    reader = MessageReader()
    reader.feed(STREAM)
    kinds = []
    while (msg := reader.next_message()) is not None:
        kinds.append(chr(msg[0]))
    assert kinds == ["Q", "S", "P", "X"]
    assert reader.buffered() == 0


def test_byte_by_byte(split_feed):
    reader = MessageReader()
    out = split_feed(reader, STREAM, reader.next_message)
    assert out == [
        (ord("Q"), b"select 1\0"),
        (ord("S"), b""),
        (ord("P"), b"s1\0select $1\0\0\x01\0\0\0\x17"),
        (ord("X"), b""),
    ]


def test_buffered_counts_partial_message():
    reader = MessageReader()
    reader.feed(STREAM[:7])
    assert reader.next_message() is None
    assert reader.buffered() == 7
    reader.feed(STREAM[7:])
    assert reader.next_message() == (ord("Q"), b"select 1\0")
    assert reader.buffered() == len(STREAM) - len(messages.query("select 1"))


def test_take_remaining():
    reader = MessageReader()
    reader.feed(STREAM)
    reader.next_message()
    assert reader.take_remaining() == STREAM[len(messages.query("select 1")) :]
    assert reader.buffered() == 0


@pytest.mark.parametrize("length", [-5, 0, 3])
def test_length_below_four(length):
    reader = MessageReader()
    reader.feed(b"Q" + length.to_bytes(4, "big", signed=True))
    with pytest.raises(ProtocolError) as err:
        reader.next_message()
    assert err.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_oversized_length_fails_on_the_header():
    reader = MessageReader(max_size=100)
    reader.feed(b"Q" + (101).to_bytes(4, "big"))  # no body yet
    with pytest.raises(ProtocolError) as err:
        reader.next_message()
    assert err.value.sqlstate == sqlstate.PROGRAM_LIMIT_EXCEEDED
    assert "101" in err.value.message


def test_max_size_is_inclusive():
    reader = MessageReader(max_size=100)
    reader.feed(b"Q" + (100).to_bytes(4, "big") + bytes(96))
    assert reader.next_message() == (ord("Q"), bytes(96))


def test_default_max_is_one_gib():
    reader = MessageReader()
    reader.feed(b"Q" + ((1 << 30) + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError):
        reader.next_message()


def test_read_header_on_a_foreign_buffer():
    buf = bytearray(STREAM)
    assert read_header(buf, 0) == (ord("Q"), len(messages.query("select 1")))
    assert read_header(buf, len(buf) - 4) is None
    assert read_header(memoryview(buf), len(buf) - HEADER_SIZE) == (ord("X"), len(buf))

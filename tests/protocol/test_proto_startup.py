from __future__ import annotations

import pytest

from pgmux.protocol import messages, sqlstate
from pgmux.protocol.codec import INT32
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.startup import (
    CANCEL_REQUEST_CODE,
    MAX_STARTUP_PACKET,
    PROTOCOL_V3,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
)


def read_all(data: bytes, reader: StartupReader | None = None) -> list:
    reader = reader or StartupReader()
    reader.feed(data)
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


def raw_packet(body: bytes) -> bytes:
    return INT32.pack(len(body) + 4) + body


def test_startup_message_round_trip():
    raw = messages.startup_message({"user": "alice", "database": "hubs", "application_name": "x"})
    [event] = read_all(raw)
    assert event == StartupMessage(
        PROTOCOL_V3, {"user": "alice", "database": "hubs", "application_name": "x"}
    )
    assert event.user == "alice" and event.database == "hubs" and event.minor == 0


def test_database_defaults_to_user():
    [event] = read_all(messages.startup_message({"user": "bob"}))
    assert event.params == {"user": "bob", "database": "bob"}
    [event] = read_all(messages.startup_message({"user": "bob", "database": ""}))
    assert event.database == "bob"


def test_startup_byte_by_byte(split_feed):
    raw = messages.startup_message({"user": "alice", "options": "-c statement_timeout=5s"})
    reader = StartupReader()
    events = split_feed(reader, raw, reader.next_event)
    assert events == [
        StartupMessage(
            PROTOCOL_V3,
            {"user": "alice", "options": "-c statement_timeout=5s", "database": "alice"},
        )
    ]
    assert reader.done


def test_ssl_request_then_startup_byte_by_byte(split_feed):
    raw = messages.ssl_request() + messages.startup_message({"user": "u", "database": "d"})
    reader = StartupReader()
    events = split_feed(reader, raw, reader.next_event)
    assert events == [SSLRequest(), StartupMessage(PROTOCOL_V3, {"user": "u", "database": "d"})]


def test_gssenc_then_ssl_then_startup():
    gss = raw_packet(INT32.pack(80877104))
    raw = gss + messages.ssl_request() + messages.startup_message({"user": "u"})
    events = read_all(raw)
    assert [type(e) for e in events] == [GSSENCRequest, SSLRequest, StartupMessage]


def test_ssl_request_leaves_following_bytes_buffered():
    # A client must wait for our 'S'/'N'; bytes sent before it are suspicious
    # (CVE-2021-23222) and the proxy needs to see them.
    reader = StartupReader()
    reader.feed(messages.ssl_request() + b"early")
    assert reader.next_event() == SSLRequest()
    assert reader.take_remaining() == b"early"
    assert reader.take_remaining() == b""


def test_second_ssl_request_is_rejected():
    with pytest.raises(ProtocolError):
        read_all(messages.ssl_request() * 2)


def test_remaining_bytes_after_startup_are_kept():
    query = messages.query("select 1")
    reader = StartupReader()
    reader.feed(messages.startup_message({"user": "u"}) + query)
    assert isinstance(reader.next_event(), StartupMessage)
    assert reader.next_event() is None  # done: the rest is typed messages
    assert reader.take_remaining() == query


def test_cancel_request():
    [event] = read_all(messages.cancel_request(4242, b"\x01\x02\x03\x04"))
    assert event == CancelRequest(4242, b"\x01\x02\x03\x04")


def test_cancel_request_long_key_and_high_pid(split_feed):
    key = bytes(range(32))
    reader = StartupReader()
    events = split_feed(reader, messages.cancel_request(0xFFFFFFF0, key), reader.next_event)
    assert events == [CancelRequest(0xFFFFFFF0, key)]


@pytest.mark.parametrize("key", [b"", b"abc", bytes(257)])
def test_cancel_request_bad_key_length(key):
    with pytest.raises(ProtocolError):
        read_all(raw_packet(INT32.pack(CANCEL_REQUEST_CODE) + INT32.pack(1) + key))


@pytest.mark.parametrize("length", [-1, 0, 4, 7, MAX_STARTUP_PACKET + 1, 1 << 30])
def test_bad_lengths(length):
    reader = StartupReader()
    reader.feed(INT32.pack(length) + INT32.pack(PROTOCOL_V3))
    with pytest.raises(ProtocolError) as err:
        reader.next_event()
    assert err.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_bad_length_detected_before_body_arrives():
    reader = StartupReader()
    reader.feed(INT32.pack(MAX_STARTUP_PACKET + 1))
    with pytest.raises(ProtocolError):
        reader.next_event()


def test_custom_max_length():
    raw = messages.startup_message({"user": "u" * 100})
    with pytest.raises(ProtocolError):
        read_all(raw, StartupReader(max_length=50))


def test_missing_user():
    with pytest.raises(ProtocolError) as err:
        read_all(messages.startup_message({"database": "d"}))
    assert err.value.sqlstate == sqlstate.INVALID_AUTHORIZATION
    assert "no PostgreSQL user name" in err.value.message


def test_empty_user():
    with pytest.raises(ProtocolError) as err:
        read_all(messages.startup_message({"user": ""}))
    assert err.value.sqlstate == sqlstate.INVALID_AUTHORIZATION


def test_protocol_minor_above_zero_is_accepted():
    [event] = read_all(messages.startup_message({"user": "u"}, protocol=(3 << 16) | 2))
    assert event.minor == 2


@pytest.mark.parametrize("major", [2, 4])
def test_unsupported_protocol_major(major):
    with pytest.raises(ProtocolError) as err:
        read_all(messages.startup_message({"user": "u"}, protocol=major << 16))
    assert err.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED


def test_unknown_request_code():
    with pytest.raises(ProtocolError):
        read_all(raw_packet(INT32.pack((1234 << 16) | 9999)))


@pytest.mark.parametrize(
    "params",
    [
        b"user\0u\0",  # no final terminator
        b"user\0u",  # value not NUL-terminated
        b"user\0u\0database\0\0\0\0",  # a complete list, then junk
        b"user\0\0",  # key without value at the end
        b"\0user\0u\0\0",  # terminator first, then trailing bytes
        b"user\0\xff\xfe\0\0",  # not UTF-8
    ],
)
def test_malformed_params(params):
    with pytest.raises(ProtocolError):
        read_all(raw_packet(INT32.pack(PROTOCOL_V3) + params))


def test_ssl_request_with_body_is_rejected():
    with pytest.raises(ProtocolError):
        read_all(raw_packet(INT32.pack(80877103) + b"xxxx"))

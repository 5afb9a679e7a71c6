"""Random bytes into every reader and parser: only ProtocolError may come out.

A client that sends garbage must cost us one ErrorResponse and one closed
socket, never an unexpected exception in the proxy.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgmux.protocol import messages
from pgmux.protocol.auth import ScramServer, make_scram_secret, parse_scram_secret
from pgmux.protocol.codec import INT16, INT32
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    LATEST_MINOR,
    PROTOCOL_V3,
    SSL_REQUEST_CODE,
    StartupMessage,
    StartupReader,
)

# The startup phase, the framing and the auth exchange get 10 000 examples each;
# the rest 2 000 to keep the suite short. PGMUX_FUZZ_DEEP=N raises both.
_DEEP = int(os.environ.get("PGMUX_FUZZ_DEEP", "0"))
FUZZ = settings(
    max_examples=max(2_000, _DEEP),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ_10K = settings(FUZZ, max_examples=max(10_000, _DEEP))
SECRET = parse_scram_secret(make_scram_secret("pw", salt=b"0123456789abcdef"))
MOCK_KEY = b"fuzz"

# Random bytes seldom look like a message; mixing in the pieces messages are
# made of (small ints, NUL-terminated strings, SCRAM attributes) reaches deeper.
small_ints = st.sampled_from([-2, -1, 0, 1, 2, 3, 4, 5, 8, 16, 255, 65535])
pieces = st.one_of(
    st.binary(max_size=12),
    small_ints.map(lambda n: INT32.pack(n)),
    small_ints.map(lambda n: INT16.pack(n) if -32768 <= n < 32768 else b"\xff\xff"),
    st.binary(max_size=8).map(lambda b: b.replace(b"\0", b"") + b"\0"),
    st.sampled_from(
        [b"user\0", b"database\0", b"\0", b"\xff\xfe\0", b"S", b"C", b"M", b"_pq_.x\0"]
    ),
)
wireish = st.one_of(st.binary(max_size=80), st.lists(pieces, max_size=10).map(b"".join))
codes = st.sampled_from(
    [
        PROTOCOL_V3,
        PROTOCOL_V3 | 1,
        PROTOCOL_V3 | 2,
        PROTOCOL_V3 | 9999,  # the "grease" version PostgreSQL 19's libpq sends
        0,
        1 << 16,
        2 << 16,
        4 << 16,
        SSL_REQUEST_CODE,
        GSSENC_REQUEST_CODE,
        CANCEL_REQUEST_CODE,
        (1234 << 16) | 1,
    ]
)
startup_packets = st.builds(
    lambda code, body: INT32.pack(len(body) + 8) + INT32.pack(code) + body, codes, wireish
)
scram_parts = st.sampled_from(
    [
        b"n",
        b"y",
        b"p=x",
        b"a=u",
        b"n=",
        b"n=u",
        b"r=",
        b"r=abc",
        b"m=x",
        b"c=biws",
        b"c=eSws",
        b"p=" + b"A" * 43 + b"=",
        b"s=c2FsdA==",
        b"i=1",
        b"",
        b"=",
        b"r=\x01",
    ]
)
scram_messages = st.one_of(
    st.binary(max_size=60),
    st.lists(st.one_of(scram_parts, st.binary(max_size=6)), max_size=6).map(b",".join),
)
chunkings = st.lists(st.integers(1, 16), min_size=1, max_size=8)


def feed_in_chunks(reader, data: bytes, sizes: list[int], pull) -> None:
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        reader.feed(data[pos : pos + size])
        pos, i = pos + size, i + 1
        while pull() is not None:
            pass


@FUZZ_10K
@given(
    data=st.one_of(wireish, startup_packets, st.lists(startup_packets, max_size=3).map(b"".join)),
    sizes=chunkings,
)
def test_startup_reader(data, sizes):
    reader = StartupReader()
    with contextlib.suppress(ProtocolError):
        feed_in_chunks(reader, data, sizes, reader.next_event)


option_names = st.text(
    st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12
).map(lambda name: "_pq_." + name)


@FUZZ
@given(
    minor=st.integers(0, 0xFFFF),
    options=st.lists(option_names, max_size=4, unique=True),
    gucs=st.dictionaries(st.sampled_from(["application_name", "DateStyle", "x.y"]), st.text("ab")),
)
def test_startup_negotiation(minor, options, gucs):
    params = {"user": "u", **gucs, **dict.fromkeys(options, "1"), "database": "d"}
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    reader = StartupReader()
    reader.feed(INT32.pack(len(body) + 8) + INT32.pack((3 << 16) | minor) + body)
    event = reader.next_event()
    assert isinstance(event, StartupMessage)
    assert event.options == tuple(options)
    assert not any(name.startswith("_pq_.") for name in event.params)
    assert event.negotiated_minor == min(minor, LATEST_MINOR)
    assert event.needs_negotiation == (minor > LATEST_MINOR or bool(options))
    reply = messages.negotiate_protocol_version((3 << 16) | event.negotiated_minor, event.options)
    assert reply[:1] == b"v" and INT32.unpack_from(reply, 1)[0] == len(reply) - 1
    version, count = INT32.unpack_from(reply, 5)[0], INT32.unpack_from(reply, 9)[0]
    assert (version & 0xFFFF, count) == (event.negotiated_minor, len(options))
    assert reply[13:].split(b"\0")[:-1] == [name.encode() for name in options]


@FUZZ_10K
@given(data=wireish, sizes=chunkings)
def test_message_reader(data, sizes):
    reader = MessageReader(max_size=64)
    with contextlib.suppress(ProtocolError):
        feed_in_chunks(reader, data, sizes, reader.next_message)
    assert reader.buffered() >= 0


PARSERS = [
    messages.parse_error_fields,
    messages.parse_parameter_status,
    messages.parse_backend_key_data,
    messages.parse_authentication,
    messages.parse_sasl_mechanisms,
    messages.parse_row_description,
    messages.parse_data_row,
    messages.parse_command_complete,
    messages.parse_query,
    messages.parse_password_message,
    messages.parse_sasl_initial_response,
    messages.parse_parse,
]


@FUZZ
@given(body=wireish)
def test_every_parser(body):
    for parser in PARSERS:
        with contextlib.suppress(ProtocolError):
            parser(body)


@FUZZ
@given(first=scram_messages)
def test_scram_server_client_first(first):
    for secret in (SECRET, None):
        server = ScramServer(secret, username="fuzz", mock_key=MOCK_KEY)
        with contextlib.suppress(ProtocolError):
            server.handle_client_first(first)


@FUZZ
@given(final=scram_messages, use_nonce=st.booleans())
def test_scram_server_client_final(final, use_nonce):
    server = ScramServer(SECRET, username="fuzz", mock_key=MOCK_KEY)
    server_first = server.handle_client_first(b"n,,n=,r=fuzznonce")
    if use_nonce:  # steer towards the proof check by echoing the real nonce
        final = final.replace(b"r=abc", server_first.split(b",")[0])
    with pytest.raises(ProtocolError):
        server.handle_client_final(final)

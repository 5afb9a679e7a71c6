"""protocol.backend (what a server may send when), MessageReader's skipped bodies,
and the bounds of ScramClient against a hostile server, on bytes."""

from __future__ import annotations

import base64

import pytest

from pgmux.protocol import backend, msgtypes
from pgmux.protocol.errors import AuthError, ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.scram_client import MAX_COMPUTED_ITERATIONS, MAX_SERVER_MESSAGE, ScramClient

D, Z, S = msgtypes.DATA_ROW, msgtypes.READY_FOR_QUERY, msgtypes.PARAMETER_STATUS


def test_rows_stream_up_to_postgresqls_maximum_held_messages_to_64_mib():
    assert not backend.fails(D, backend.STREAMED_LIMIT, backend.ASKED)
    assert backend.fails(D, backend.STREAMED_LIMIT + 1, backend.ASKED)
    assert not backend.fails(S, backend.HELD_LIMIT, backend.ASKED)
    assert backend.fails(S, backend.HELD_LIMIT + 1, backend.ASKED)
    assert backend.fails(D, 3, backend.ASKED)
    assert "exceeds the limit of 67108864" in backend.refusal(S, 1 << 30, backend.ASKED)


def test_only_unprompted_messages_pass_while_nothing_is_asked():
    allowed = {kind for kind in range(256) if backend.UNASKED[kind]}
    assert allowed == {ord(c) for c in "NESA"}
    assert backend.refusal(Z, 5, backend.UNASKED).endswith("while nothing was asked")


def test_login_only_messages_are_refused_after_login():
    for kind in backend.LOGIN_ONLY:
        assert backend.LOGIN[kind] and not backend.ASKED[kind] and not backend.UNASKED[kind]
    assert backend.refusal(ord("?"), 8, backend.ASKED) == "unexpected message type '?' in reply"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"SERROR\0Mx\0\0", "no field C"),
        (b"\0", "no field S, C, M"),
        (b"", "truncated"),
        (b"SERROR\0CXX000\0Mx", "missing string terminator"),
        (b"SERROR\0C1\0Mx\0\0", "SQLSTATE '1'"),
        (b"SERROR\0CXX000\0Mx\0\0junk", "trailing bytes"),
    ],
)
def test_malformed_errors_are_refused(body: bytes, problem: str):
    with pytest.raises(ProtocolError, match=problem):
        backend.check_notice_fields(body)


def test_a_whole_error_passes():
    fields = backend.check_notice_fields(b"SERROR\0C22012\0Mdivision by zero\0\0")
    assert fields["C"] == "22012"


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def test_the_reader_skips_discarded_bodies_without_buffering():
    reader = MessageReader(100, discard=frozenset({D}), discard_max=1 << 30)
    row = _message(b"D", b"x" * 1000)  # ten times the limit of a kept message
    stream = row + _message(b"Z", b"I")
    reader.feed(stream[:7])
    assert reader.next_message() == (D, b"")
    assert reader.buffered() == 0 and reader.mid_message
    for i in range(7, len(row), 100):
        reader.feed(stream[i : min(i + 100, len(row))])
        assert reader.buffered() == 0
    reader.feed(stream[len(row) :])
    assert reader.next_message() == (Z, b"I")
    assert not reader.mid_message


def test_the_reader_refuses_a_kept_message_over_its_limit_at_the_header():
    reader = MessageReader(100, "the server message limit", discard=frozenset({D}))
    reader.feed(b"S" + (101).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds the server message limit"):
        reader.next_message()


def _server_first(client: ScramClient, iterations: int = 4096, extra: bytes = b"") -> bytes:
    nonce = client.client_first().split(b"r=", 1)[1]
    salt = base64.b64encode(b"0123456789abcdef")
    return b"r=" + nonce + b"srv" + extra + b",s=" + salt + b",i=" + str(iterations).encode()


def test_scram_refuses_to_compute_more_rounds_than_its_bound():
    client = ScramClient("secret")
    with pytest.raises(AuthError, match="exceeds pgmux's limit of 100000"):
        client.handle_server_first(_server_first(client, MAX_COMPUTED_ITERATIONS + 1))
    assert MAX_COMPUTED_ITERATIONS == 100_000


def test_passthrough_keys_need_no_rounds_so_any_count_matches():
    client = ScramClient(
        client_key=b"k" * 32,
        server_key=b"s" * 32,
        salt=b"0123456789abcdef",
        iterations=1_000_000,
    )
    assert client.handle_server_first(_server_first(client, 1_000_000)).startswith(b"c=biws")


def test_scram_refuses_server_messages_of_kilobytes():
    client = ScramClient("secret")
    with pytest.raises(AuthError, match="server-first-message of"):
        client.handle_server_first(_server_first(client, extra=b"A" * MAX_SERVER_MESSAGE))
    client = ScramClient("secret")
    client.handle_server_first(_server_first(client))
    with pytest.raises(AuthError, match="server-final-message of"):
        client.verify_server_final(b"v=" + b"A" * MAX_SERVER_MESSAGE)
    assert not client.finished

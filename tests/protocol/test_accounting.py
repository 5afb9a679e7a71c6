"""protocol.accounting: the release rule of one link, on bytes.

Rules under test (docs/architecture.md, "Transaction pooling rules"):
Query/Sync/FunctionCall owe one ReadyForQuery; Parse/Bind/Describe/Execute/
Close open a batch that only a Sync closes; a Flush changes nothing; COPY
messages close a batch without owing; Terminate ends the link. The server is
releasable after ReadyForQuery 'I' when nothing is owed, no batch is open and
neither side stopped mid-message. Every stream is also fed split at every
offset, which must not change the outcome.
"""

from __future__ import annotations

import pytest

from pgmux.protocol import messages
from pgmux.protocol import msgtypes as mt
from pgmux.protocol.accounting import (
    CLIENT_TRANSITIONS,
    KEEPS_BATCH,
    NO_BATCH,
    OWES_READY_FOR_QUERY,
    Copy,
    LinkAccounting,
)
from pgmux.protocol.errors import ProtocolError

Z_IDLE = messages.ready_for_query("I")
Z_BLOCK = messages.ready_for_query("T")
Z_FAILED = messages.ready_for_query("E")
SELECT_ONE = (
    messages.row_description([("x", 23)])
    + messages.data_row(["1"])
    + messages.command_complete("SELECT 1")
)
EXTENDED = (
    messages.parse("", "select $1", [23])
    + messages.bind("", "", [b"1"])
    + messages.describe("P", "")
    + messages.execute("")
)
EXTENDED_REPLY = (
    messages.parse_complete()
    + messages.bind_complete()
    + messages.row_description([("x", 23)])
    + messages.data_row(["1"])
    + messages.command_complete("SELECT 1")
)
COPY_DATA = b"d" + (4 + 4).to_bytes(4, "big") + b"1\t2\n"
COPY_DONE = b"c" + (4).to_bytes(4, "big")
COPY_FAIL = b"f" + (4 + 5).to_bytes(4, "big") + b"gone\0"
COPY_IN_RESPONSE = b"G" + (4 + 3).to_bytes(4, "big") + b"\0\0\0"
FUNCTION_CALL = b"F" + (4 + 8).to_bytes(4, "big") + b"\0\0\x04\x00\0\0\0\0"


def message(kind: int, body: bytes = b"") -> bytes:
    return bytes([kind]) + (4 + len(body)).to_bytes(4, "big") + body


def run(*steps: tuple[str, bytes], link: LinkAccounting | None = None) -> LinkAccounting:
    """Feed ('c', bytes) to the client side and ('s', bytes) to the server side, in order."""
    link = link or LinkAccounting()
    for side, data in steps:
        if side == "c":
            link.feed_client(data)
        else:
            link.feed_server(data)
    return link


def state(link: LinkAccounting) -> tuple:
    return (
        link.owed,
        link.in_batch,
        link.copy,
        link.tx_status,
        link.terminated,
        link.ready_for_query,
        link.releasable,
    )


# --- the transition table ------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "owed", "in_batch"),
    [
        (mt.QUERY, 1, False),
        (mt.SYNC, 1, False),
        (mt.FUNCTION_CALL, 1, False),
        (mt.PARSE, 0, True),
        (mt.BIND, 0, True),
        (mt.DESCRIBE, 0, True),
        (mt.EXECUTE, 0, True),
        (mt.CLOSE, 0, True),
        (mt.FLUSH, 0, False),
        (mt.COPY_DATA, 0, False),
        (mt.COPY_DONE, 0, False),
        (mt.COPY_FAIL, 0, False),
        (ord("?"), 0, True),  # unknown to the table: as the data path, it opens a batch
    ],
)
def test_one_client_message_from_a_fresh_link(kind, owed, in_batch):
    link = run(("c", message(kind, b"" if kind == mt.FLUSH else b"x")))
    assert (link.owed, link.in_batch) == (owed, in_batch)


def test_a_flush_with_a_body_is_refused():
    with pytest.raises(ProtocolError, match="invalid message length 5"):
        run(("c", message(mt.FLUSH, b"x")))


@pytest.mark.parametrize("kind", [mt.QUERY, mt.SYNC])
def test_batch_closers_close_an_open_batch(kind):
    link = run(("c", messages.parse("", "select 1") + message(kind)))
    assert not link.in_batch


def test_flush_keeps_an_open_batch_open():
    link = run(("c", messages.parse("", "select 1") + messages.flush()))
    assert link.in_batch and link.owed == 0


@pytest.mark.parametrize("kind", [mt.COPY_DATA, mt.COPY_DONE, mt.COPY_FAIL])
def test_copy_messages_keep_an_open_batch_open(kind):
    """Outside a COPY PostgreSQL ignores them: the batch (maybe skipping to its
    Sync after an error) is still open, and the server not releasable."""
    link = run(("c", messages.parse("", "select 1") + message(kind)))
    assert link.in_batch and link.owed == 0


def test_shared_tables_follow_the_transition_table():
    assert {mt.QUERY, mt.SYNC, mt.FUNCTION_CALL} == OWES_READY_FOR_QUERY
    assert {mt.QUERY, mt.SYNC, mt.FUNCTION_CALL} == NO_BATCH
    assert {mt.FLUSH, mt.COPY_DATA, mt.COPY_DONE, mt.COPY_FAIL} == KEEPS_BATCH
    assert mt.TERMINATE not in CLIENT_TRANSITIONS


# --- the release rule ------------------------------------------------------------


def test_a_fresh_link_is_releasable():
    assert LinkAccounting().releasable


def test_query_then_idle_ready_for_query_releases():
    link = run(("c", messages.query("select 1")))
    assert link.owed == 1 and not link.releasable
    link = run(("s", SELECT_ONE + Z_IDLE), link=link)
    assert link.owed == 0 and link.tx_status == mt.TX_IDLE and link.releasable


@pytest.mark.parametrize("ready", [Z_BLOCK, Z_FAILED])
def test_open_or_failed_transaction_keeps_the_server(ready):
    link = run(("c", messages.query("begin")), ("s", messages.command_complete("BEGIN") + ready))
    assert link.owed == 0 and link.tx_status == ready[5]
    assert not link.releasable


def test_failed_transaction_released_after_rollback():
    link = run(
        ("c", messages.query("begin; select 1/0")),
        ("s", messages.error_response("22012", "division by zero") + Z_FAILED),
        ("c", messages.query("rollback")),
        ("s", messages.command_complete("ROLLBACK") + Z_IDLE),
    )
    assert link.releasable


def test_pipeline_keeps_the_server_until_its_last_ready_for_query():
    link = run(("c", (EXTENDED + messages.sync()) * 3))
    assert link.owed == 3
    for left in (2, 1):
        link.feed_server(EXTENDED_REPLY + Z_IDLE)
        assert link.owed == left and not link.releasable
    link.feed_server(EXTENDED_REPLY + Z_IDLE)
    assert link.releasable


def test_batch_after_the_last_sync_keeps_the_server():
    link = run(("c", EXTENDED + messages.sync() + messages.parse("", "select 2")))
    link.feed_server(EXTENDED_REPLY + Z_IDLE)
    assert link.owed == 0 and link.in_batch and not link.releasable
    link.feed_client(messages.sync())
    link.feed_server(messages.parse_complete() + Z_IDLE)
    assert link.releasable


def test_lone_flush_owes_nothing():
    link = run(("c", messages.flush()))
    assert link.owed == 0 and not link.in_batch and link.releasable


def test_extended_batch_with_flush_answers_but_keeps_the_server():
    link = run(("c", EXTENDED + messages.flush()), ("s", EXTENDED_REPLY))
    assert link.in_batch and not link.releasable


def test_function_call_owes_one():
    link = run(("c", FUNCTION_CALL))
    assert link.owed == 1
    link.feed_server(message(mt.FUNCTION_CALL_RESPONSE, b"\xff\xff\xff\xff") + Z_IDLE)
    assert link.releasable


def test_copy_from_stdin():
    link = run(("c", messages.query("copy t from stdin")), ("s", COPY_IN_RESPONSE))
    assert link.copy is Copy.IN and link.owed == 1
    link.feed_client(COPY_DATA * 3 + COPY_DONE)
    assert not link.in_batch and link.owed == 1
    link.feed_server(messages.command_complete("COPY 3"))
    assert link.copy is Copy.NONE and not link.releasable
    link.feed_server(Z_IDLE)
    assert link.releasable


def test_copy_fail_ends_in_an_error_then_ready():
    link = run(
        ("c", messages.query("copy t from stdin")),
        ("s", COPY_IN_RESPONSE),
        ("c", COPY_DATA + COPY_FAIL),
        ("s", messages.error_response("57014", "COPY from stdin failed")),
    )
    assert link.copy is Copy.NONE and link.owed == 1
    link.feed_server(Z_IDLE)
    assert link.releasable


@pytest.mark.parametrize(("reply", "copy"), [(b"H", Copy.OUT), (b"W", Copy.BOTH)])
def test_copy_out_and_both(reply, copy):
    link = run(("c", messages.query("copy t to stdout")), ("s", reply + b"\0\0\0\x07\0\0\0"))
    assert link.copy is copy


def test_terminate_ends_the_link():
    link = run(("c", messages.terminate() + messages.query("select 1")))
    assert link.terminated and link.owed == 0


def test_unasked_ready_for_query_owes_nothing_back():
    link = run(("s", Z_IDLE))
    assert link.owed == 0 and link.releasable


@pytest.mark.parametrize("length", [0, 3])
def test_client_length_below_four_is_a_protocol_error(length):
    with pytest.raises(ProtocolError):
        LinkAccounting().feed_client(b"Q" + length.to_bytes(4, "big"))


def test_client_message_over_max_packet_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        LinkAccounting(max_packet=100).feed_client(b"Q" + (101).to_bytes(4, "big"))


def test_server_length_below_four_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        LinkAccounting().feed_server(b"Z" + (3).to_bytes(4, "big"))


# --- mid-message ---------------------------------------------------------------


def test_client_half_header_keeps_the_server():
    link = run(("c", messages.query("select 1") + b"Q\0"), ("s", SELECT_ONE + Z_IDLE))
    assert link.owed == 0 and link.client_mid_message and not link.releasable


def test_client_request_counts_at_its_header():
    query = messages.query("select 1")
    link = run(("c", query[:5]))
    assert link.owed == 1 and link.client_mid_message
    link.feed_client(query[5:])
    assert not link.client_mid_message


def test_server_half_message_keeps_the_server():
    link = run(("c", messages.query("select 1")), ("s", SELECT_ONE + Z_IDLE + b"N\0\0"))
    assert link.server_mid_message and not link.releasable


def test_ready_for_query_counts_when_whole():
    link = run(("c", messages.query("select 1")), ("s", SELECT_ONE + Z_IDLE[:5]))
    assert link.owed == 1 and link.ready_for_query == 0


# --- any split -----------------------------------------------------------------

CONVERSATIONS = {
    "simple": [
        ("c", messages.query("select 1")),
        ("s", SELECT_ONE + Z_IDLE),
    ],
    "transaction": [
        ("c", messages.query("begin")),
        ("s", messages.command_complete("BEGIN") + Z_BLOCK),
        ("c", messages.query("select 1")),
        ("s", SELECT_ONE + Z_BLOCK),
        ("c", messages.query("commit")),
        ("s", messages.parameter_status("TimeZone", "UTC") + messages.command_complete("COMMIT")),
        ("s", Z_IDLE),
    ],
    "pipeline": [
        ("c", (EXTENDED + messages.sync()) * 2 + messages.flush()),
        ("s", (EXTENDED_REPLY + Z_IDLE) * 2),
    ],
    "open batch": [
        ("c", EXTENDED + messages.sync() + EXTENDED + messages.flush()),
        ("s", EXTENDED_REPLY + Z_IDLE + EXTENDED_REPLY),
    ],
    "copy": [
        ("c", messages.query("copy t from stdin")),
        ("s", COPY_IN_RESPONSE),
        ("c", COPY_DATA * 2 + COPY_DONE),
        ("s", messages.command_complete("COPY 2") + Z_IDLE),
    ],
    "failed": [
        ("c", messages.query("begin; select 1/0")),
        ("s", messages.error_response("22012", "division by zero") + Z_FAILED),
    ],
}


def split_at(steps, side: str, offset: int):
    """The same conversation with that side's whole stream cut in two at `offset`."""
    stream = b"".join(data for s, data in steps if s == side)
    if not 0 < offset < len(stream):
        return None
    out, pos = [], 0
    for s, data in steps:
        if s != side:
            out.append((s, data))
            continue
        start, end = pos, pos + len(data)
        pos = end
        if start < offset < end:
            out += [(s, data[: offset - start]), (s, data[offset - start :])]
        else:
            out.append((s, data))
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("side", ["c", "s"])
def test_split_at_every_offset(name, side):
    steps = CONVERSATIONS[name]
    expected = state(run(*steps))
    total = sum(len(data) for s, data in steps if s == side)
    for offset in range(1, total):
        assert state(run(*split_at(steps, side, offset))) == expected, offset


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_byte_by_byte(name):
    steps = CONVERSATIONS[name]
    expected = state(run(*steps))
    single = [(s, data[i : i + 1]) for s, data in steps for i in range(len(data))]
    assert state(run(*single)) == expected


def test_expected_outcomes_of_the_conversations():
    outcome = {name: run(*steps) for name, steps in CONVERSATIONS.items()}
    assert {name for name, link in outcome.items() if link.releasable} == {
        "simple",
        "transaction",
        "pipeline",
        "copy",
    }
    assert outcome["open batch"].in_batch
    assert outcome["failed"].tx_status == mt.TX_FAILED

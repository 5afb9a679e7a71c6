"""A server that misbehaves in a session costs its one client a 08006, nothing more.

Each case logs pgmux in properly, then meets the client's first request with
something PostgreSQL never sends: a malformed or oversized message, a
message out of turn, a broken ErrorResponse, NoticeResponse or
ParameterStatus, or a close in the middle of a message. Through both of
pgmux's reply paths (`evil`: the ResponseFilter of transaction mode,
`evil_plain`: the plain scan of session mode) pgmux must close that server
with a logged reason (`server_protocol_error` naming the server, or
`server_lost` when the server hung up), give its client ErrorResponse
08006, never log a traceback, and keep serving the bystander on the real
PostgreSQL.
"""

from __future__ import annotations

import asyncio

import pytest
from evil_common import (
    DATABASES,
    assert_healthy,
    closed_by_pgmux,
    config,
    crashed_error,
    on_request,
    query_until_closed,
    refusals,
)
from evilserver import EvilServer, auth, command_complete, data_row, header, msg, ready
from helpers import APP_PASSWORD, APP_USER, PgmuxFactory, RawClient, bystander, query_message

pytestmark = pytest.mark.timeout(90)

OVER = (64 << 20) + 1  # one byte over the 64 MiB a message read whole may have

# (evil bytes in reply to the request, the reason pgmux must log)
REFUSED = {
    # malformed
    "length-under-4": (header(b"D", 2) + b"xx", "invalid length 2"),
    "unknown-type": (msg(b"?", b"what"), "unexpected message type '?'"),
    "ready-for-query-too-long": (msg(b"Z", b"II"), "invalid length 6"),
    "ready-for-query-too-short": (msg(b"Z"), "invalid length 4"),
    # oversized: held types over 64 MiB, streamed ones over PostgreSQL's 1 GiB
    "error-over-64mib": (header(b"E", OVER), f"'E' of {OVER} bytes exceeds"),
    "parameter-status-over-64mib": (header(b"S", OVER), f"'S' of {OVER} bytes exceeds"),
    "notice-over-64mib": (header(b"N", OVER), f"'N' of {OVER} bytes exceeds"),
    "command-complete-over-64mib": (header(b"C", OVER), f"'C' of {OVER} bytes exceeds"),
    "data-row-over-1gib": (header(b"D", 1 << 30), f"'D' of {1 << 30} bytes exceeds"),
    "length-word-4gib": (b"D\xff\xff\xff\xff", "'D' of 4294967295 bytes exceeds"),
    # out of order: what only a login may carry
    "backend-key-data-after-login": (msg(b"K", b"\0\0\0\1abcd"), "unexpected message type 'K'"),
    "authentication-ok-after-login": (auth(0), "unexpected message type 'R'"),
    "sasl-request-mid-session": (auth(10, b"SCRAM-SHA-256\0\0"), "unexpected message type 'R'"),
    "negotiate-version-mid-session": (msg(b"v", b"\0\3\0\0\0\0\0\0"), "type 'v'"),
    # broken ErrorResponse / NoticeResponse / ParameterStatus
    "error-without-sqlstate": (msg(b"E", b"SERROR\0Mno code\0\0") + ready(), "no field C"),
    "error-without-fields": (msg(b"E", b"\0") + ready(), "no field S, C, M"),
    "error-empty-body": (msg(b"E") + ready(), "malformed ErrorResponse"),
    "error-field-unterminated": (
        msg(b"E", b"SERROR\0CXX000\0Mno end") + ready(),
        "missing string terminator",
    ),
    "error-bad-sqlstate": (msg(b"E", b"SERROR\0CXX\0Mshort\0\0") + ready(), "SQLSTATE 'XX'"),
    "notice-unterminated": (msg(b"N", b"SNOTICE\0C00000\0Mhi"), "malformed NoticeResponse"),
    "notice-without-sqlstate": (msg(b"N", b"SNOTICE\0Mhi\0\0"), "no field C"),
    "parameter-status-no-value": (msg(b"S", b"TimeZone\0"), "invalid ParameterStatus"),
    "parameter-status-trailing": (msg(b"S", b"a\0b\0c\0"), "trailing bytes"),
    "parameter-status-bad-utf8": (msg(b"S", b"a\0\xff\0"), "invalid UTF-8"),
}

# Sent after the proper answer: the request is answered, and now nothing is owed.
UNSOLICITED = {
    "extra-ready-for-query": (ready(), "unexpected message type 'Z' while nothing was asked"),
    "command-complete-unasked": (command_complete("SELECT 1"), "type 'C' while nothing"),
    "parse-complete-unasked": (msg(b"1"), "type '1' while nothing was asked"),
    "bind-complete-unasked": (msg(b"2"), "type '2' while nothing was asked"),
    "data-row-unasked": (data_row(b"x"), "type 'D' while nothing was asked"),
}

# The server hangs up itself, in the middle of a message.
HUNG_UP = {
    "row-announced-past-what-follows": header(b"D", 1000) + b"\0\1\0\0\0\x10abc",
    "complete-truncated-at-close": header(b"C", 100) + b"SEL",
    "half-a-header": b"T\0\0",
    "error-truncated-at-close": header(b"E", 50) + b"SERROR\0",
}


async def _each_database_gets_08006(mux: object) -> list[dict[str, str]]:
    return [crashed_error(await query_until_closed(mux, db)) for db in DATABASES]  # type: ignore[arg-type]


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_bad_reply_closes_the_server_with_a_logged_reason(pgmux: PgmuxFactory, case: str):
    evil_bytes, reason = REFUSED[case]
    async with EvilServer(on_request(evil_bytes)) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            await _each_database_gets_08006(mux)
        assert len(refusals(mux, reason)) == 2, mux.logs()[-3000:]
        assert closed_by_pgmux(evil) == [True, True]
        assert_healthy(mux, evil)


@pytest.mark.parametrize("case", sorted(UNSOLICITED))
async def test_a_reply_nobody_asked_for_closes_the_server(pgmux: PgmuxFactory, case: str):
    """In session mode the server stays linked after its ReadyForQuery, so its
    client gets the answer, then 08006. In transaction mode the server may be
    back in the pool already when the extra message is read (then nobody is
    linked and only the server goes); either way it is closed."""
    evil_bytes, reason = UNSOLICITED[case]
    async with EvilServer(on_request(evil_bytes, answer_first=True)) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            for db in DATABASES:
                replies = await query_until_closed_or_idle(mux, db)
                assert (b"D", b"\0\1\0\0\0\2ok") in replies, replies
                if db == "evil_plain":
                    crashed_error(replies)
        assert len(refusals(mux, reason)) == 2, mux.logs()[-3000:]
        assert closed_by_pgmux(evil) == [True, True]
        assert_healthy(mux, evil)


async def query_until_closed_or_idle(mux: object, db: str) -> list[tuple[bytes, bytes]]:
    """The replies to one query; for a client that keeps its connection, up to
    the ReadyForQuery and whatever follows within a second."""
    client = await RawClient.open(mux)  # type: ignore[arg-type]
    try:
        await client.login(APP_USER, APP_PASSWORD, db)
        await client.send(query_message("select 1"))
        replies = await client.read_until_ready(15)
        while (more := await client.read_message(timeout=1.0)) is not None:
            replies.append(more)
        return replies
    except TimeoutError:
        return replies
    finally:
        await client.close()


@pytest.mark.parametrize("case", sorted(HUNG_UP))
async def test_a_server_closing_mid_message_costs_its_client_08006(pgmux: PgmuxFactory, case: str):
    """A message pgmux held back never reached the client: it gets 08006. One
    already partly forwarded (the plain scan streams all but ReadyForQuery,
    ParameterStatus, ErrorResponse and NoticeResponse) cannot be followed by
    an ErrorResponse that the client would read as the message's rest: that
    client gets the close alone, as when PostgreSQL itself dies."""
    async with EvilServer(on_request(HUNG_UP[case], close=True)) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            for db in DATABASES:
                tail = await _raw_until_closed(mux, db)
                if tail == HUNG_UP[case]:
                    continue  # the partial message, then the close
                kind, length = tail[:1], int.from_bytes(tail[1:5], "big")
                assert kind == b"E" and len(tail) == 1 + length, (db, tail)
                assert b"C08006" in tail, (db, tail)
        lost = refusals(mux, "mid_message=True", event="server_lost")
        assert len(lost) == 2, mux.logs()[-3000:]
        assert_healthy(mux, evil)


async def _raw_until_closed(mux: object, db: str) -> bytes:
    """Every byte pgmux sends after the query, until it closes."""
    client = await RawClient.open(mux)  # type: ignore[arg-type]
    try:
        await client.login(APP_USER, APP_PASSWORD, db)
        await client.send(query_message("select 1"))
        return await asyncio.wait_for(client.reader.read(), 15)
    finally:
        await client.close()

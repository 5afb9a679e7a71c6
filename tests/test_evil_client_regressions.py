"""Regressions found by tests/test_fuzz_evil_client.py, each reduced to its cause.

Every case runs against a pool of one server, so the next client gets exactly
the server the evil client left behind.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    connect_asyncpg,
    error_fields,
    query_message,
    wait_until,
)

from pgmux.protocol import messages

pytestmark = pytest.mark.timeout(60)

CONFIG = {"pool": {"size": 1}, "timeouts": {"query_wait": "5s"}}


async def login(mux: object) -> RawClient:
    raw = await RawClient.open(mux)  # type: ignore[arg-type]
    await raw.login(APP_USER, APP_PASSWORD, APP_DB)
    return raw


async def assert_next_client_served(mux: object) -> None:
    raw = await login(mux)
    try:
        got = await raw.query("SELECT 41 + 1")
        assert (got.rows, got.errors, got.status) == ([["42"]], [], "I"), got
    finally:
        await raw.close()


async def test_half_a_copy_message_keeps_its_server_out_of_the_pool(
    pgmux: PgmuxFactory,
) -> None:
    """A Query and, in the same write, the head of a CopyFail: the translator
    streams COPY messages through unread, so the head is on the server when its
    ReadyForQuery comes back. That server must stay with the client (and be
    closed when it leaves), not go back to the pool with half a message on its
    wire, where the next client's first byte would complete it and PostgreSQL
    would see garbage ("invalid frontend message type")."""
    mux = pgmux(CONFIG)
    raw = await login(mux)
    copy_fail = b"f\0\0\0\x09evil"  # 10 bytes long, 9 sent
    await raw.send(query_message("SELECT 1") + copy_fail)
    replies = []
    while not replies or replies[-1][0] != b"Z":
        reply = await raw.read_message(timeout=10)
        assert reply is not None
        replies.append(reply)
    await asyncio.sleep(0.2)  # the ReadyForQuery has been through pgmux
    await raw.close()
    await assert_next_client_served(mux)
    assert "Traceback" not in mux.logs()


BAD_PARSE = messages.parse("", "SELEC 1")  # a syntax error: PostgreSQL skips to Sync


@pytest.mark.parametrize("error_first", [False, True], ids=["one-write", "error-then-query"])
async def test_query_skipped_after_a_failed_request_owes_no_ready_for_query(
    pgmux: PgmuxFactory, error_first: bool
) -> None:
    """A Query sent after a failed extended request, before its Sync, is
    skipped by PostgreSQL unread: no ReadyForQuery comes for it. Counted as
    owed, it kept the server linked to its client after the Sync's
    ReadyForQuery (and made the cleanup wait for it once the client left);
    the next client waited for the only server."""
    mux = pgmux(CONFIG)
    raw = await login(mux)
    try:
        if error_first:  # the error is in when the Query is translated
            await raw.send(BAD_PARSE + messages.flush())
            first = await raw.read_message(timeout=10)
            assert first is not None and first[0] == b"E", first
            await raw.send(query_message("SELECT 1") + messages.sync())
        else:  # the Query is on its way when the error comes back
            await raw.send(BAD_PARSE + query_message("SELECT 1") + messages.sync())
        replies = await raw.read_until_ready(timeout=10)
        kinds = [kind for kind, _ in replies]
        assert kinds == ([b"Z"] if error_first else [b"E", b"Z"]), replies
        assert replies[-1][1] == b"I"
        # The client stays, idle: its server is free for the next one at once.
        await asyncio.wait_for(assert_next_client_served(mux), 3)
        got = await raw.query("SELECT 2")
        assert got.rows == [["2"]] and got.status == "I", got
    finally:
        await raw.close()
    await asyncio.wait_for(assert_next_client_served(mux), 3)


@pytest.mark.parametrize("leave", ["terminate", "disconnect"])
async def test_copy_message_outside_copy_keeps_the_failed_batch_open(
    pgmux: PgmuxFactory, leave: str
) -> None:
    """A failed Parse, then a stray CopyFail (which PostgreSQL ignores outside a
    COPY), then the client leaves: the server is still skipping to a Sync. The
    CopyFail closed the batch in pgmux's count, so the server went back to the
    pool as clean, and PostgreSQL skipped the next client's Query unread (that
    client hung)."""
    mux = pgmux(CONFIG)
    raw = await login(mux)
    await raw.send(BAD_PARSE + messages.flush())
    first = await raw.read_message(timeout=10)
    assert first is not None and first[0] == b"E", first
    await raw.send(b"f\0\0\0\x09evil\0")  # a whole CopyFail
    await asyncio.sleep(0.2)
    if leave == "terminate":
        await raw.send(messages.terminate())
    await raw.close()
    await asyncio.wait_for(assert_next_client_served(mux), 5)


BAD_LENGTH = b"c\0\0\0\x01"  # a length below 4: the client is closed with 08P01
SELECT = query_message("SELECT 1")


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest.mark.parametrize("case", ["header-half-sent", "counted-not-sent"])
async def test_bad_length_after_a_message_frees_the_server_at_once(
    pgmux: PgmuxFactory, mode: str, case: str
) -> None:
    """A bad length ends the client, and none of its chunk reaches the server.
    What that chunk counted (the Query before the bad message) was still owed,
    and a Query whose header began in the previous chunk was taken as whole: the
    server's cleanup waited for a ReadyForQuery that could not come, cancel_wait
    long, while the next client waited for the only server."""
    mux = pgmux({"pool": {"size": 1, "mode": mode}, "timeouts": {"query_wait": "4s"}})
    raw = await login(mux)
    try:
        if case == "header-half-sent":
            await raw.send(SELECT[:3])
            await asyncio.sleep(0.2)  # on the server already: three bytes of a header
            await raw.send(SELECT[3:] + BAD_LENGTH)
        else:
            await raw.send(SELECT + BAD_LENGTH)
        replies = await raw.read_until_closed(timeout=10)
        codes = [kind for kind, _ in replies]
        assert codes == [b"E"], replies
    finally:
        await raw.close()
    await asyncio.wait_for(assert_next_client_served(mux), 3)


@pytest.mark.parametrize(
    "pool",
    [
        {"mode": "session"},
        {"mode": "transaction", "max_prepared_statements": 0, "session_state": "ignore"},
    ],
    ids=["session", "transaction-plain"],
)
async def test_client_leaving_after_a_skipped_query_frees_the_server_at_once(
    pgmux: PgmuxFactory, pool: dict[str, object]
) -> None:
    """Without the translator (session mode, or no prepared statements) pgmux
    counts every Query as owing a ReadyForQuery, also one PostgreSQL skipped
    after a failed request. The cleanup after the client left waited
    cancel_wait for it, while the next client waited for the only server."""
    mux = pgmux({"pool": {"size": 1, **pool}, "timeouts": {"query_wait": "4s"}})
    raw = await login(mux)
    try:
        await raw.send(BAD_PARSE + query_message("SELECT 1") + messages.sync())
        replies = await raw.read_until_ready(timeout=10)
        assert [kind for kind, _ in replies] == [b"E", b"Z"], replies
    finally:
        await raw.close()
    await asyncio.wait_for(assert_next_client_served(mux), 3)


async def test_flush_with_a_body_ends_its_client_not_the_next_one(pgmux: PgmuxFactory) -> None:
    """A lone Flush needs no reply, so its server went back to the pool at once;
    but with bytes in its body PostgreSQL answers ERROR and skips to the next
    Sync, so the next client's Query on that server was skipped unread (it hung).
    pgmux refuses such a Flush itself, as a bad length."""
    mux = pgmux(CONFIG)
    raw = await login(mux)
    try:
        await raw.send(b"H\0\0\0\x06\xc0\xaf")
        replies = await raw.read_until_closed(timeout=10)
        errors = [error_fields(body) for kind, body in replies if kind == b"E"]
        assert [e["C"] for e in errors] == ["08P01"], replies
    finally:
        await raw.close()
    await asyncio.wait_for(assert_next_client_served(mux), 3)


async def test_client_leaving_after_a_skipped_query_gets_its_server_synced(
    pgmux: PgmuxFactory,
) -> None:
    """An Execute fails, and the Query sent after it is skipped by PostgreSQL,
    which waits for a Sync. The Query had closed the batch in pgmux's count, so
    when the client left the server went back to the pool still skipping, and
    the next client's Query was skipped unread (it hung)."""
    mux = pgmux(CONFIG)
    raw = await login(mux)
    await raw.send(messages.execute("no_such_portal") + messages.flush())
    first = await raw.read_message(timeout=10)
    assert first is not None and first[0] == b"E", first
    await raw.send(query_message("SELECT 1"))  # skipped: no reply at all
    await asyncio.sleep(0.3)
    await raw.close()
    await asyncio.wait_for(assert_next_client_served(mux), 4)


async def waiting_clients(mux: object) -> int:
    console = await connect_asyncpg(mux, dbname="pgmux", user="admin", password="admin-secret")
    try:
        rows = await console.fetch("SHOW POOLS")
        return sum(row["cl_waiting"] for row in rows if row["database"] == APP_DB)
    finally:
        await console.close()


PARSE_A = messages.parse("a", "SELECT $1::int + 1")


async def test_server_cleaned_after_a_client_goes_to_the_next_without_its_replies_owed(
    pgmux: PgmuxFactory,
) -> None:
    """A client Parses a statement name twice (PostgreSQL's 42P05: it now skips
    to a Sync) and leaves before the Sync, while the next client waits for the
    only server. The cleanup synced the server and gave it straight to the
    waiting client with the departed one's reply accounting: still skipping to
    a Sync, so the new client's Query was taken as skipped and its extended
    replies came "while nothing was asked" (the server was closed). Entries
    left owed the same way were undone against the next client's replies and
    dropped statements the server still had from pgmux's record (then
    `prepared statement "pgmux_..." already exists`)."""
    mux = pgmux({**CONFIG, "admin": {"users": ["admin"]}})
    first = await login(mux)
    await first.send(PARSE_A + PARSE_A + messages.flush())
    replies = [await first.read_message(timeout=10) for _ in range(2)]
    assert [r and r[0] for r in replies] == [b"1", b"E"], replies
    second = await login(mux)
    try:
        await second.send(
            query_message("SELECT 'next'")
            + PARSE_A
            + messages.bind("", "a", [b"41"])
            + messages.execute("")
            + messages.sync()
        )
        await wait_until(lambda: waiting_clients(mux), lambda n: n == 1, timeout=10)
        await first.close()
        simple = await second.read_until_ready(timeout=5)
        extended = await second.read_until_ready(timeout=5)
        assert [kind for kind, _ in simple] == [b"T", b"D", b"C", b"Z"], simple
        assert [kind for kind, _ in extended] == [b"1", b"2", b"D", b"C", b"Z"], extended
    finally:
        await second.close()
    await asyncio.wait_for(assert_next_client_served(mux), 3)

"""Hostile clients that stop mid-message, and client bytes pgmux must not pile up.

A client that sends `BEGIN`, then the start of a message (a Query header
announcing 100 MB, a few bytes of its body, or half a header) and then goes
silent holds its server, its transaction and its locks: it counts as idle
since its last byte (idle_transaction, client_idle fire), and a message still
incomplete after timeouts.message ends it with 08P01. Either way its server
is closed at once (half a message is on the wire) and a client waiting for
the pool is served.

And with no server answering at all, a logged-in client streaming Query
messages before its welcome is paused, not buffered: pgmux's RSS stays small.
"""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import pytest
from helpers import (
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    direct,
    error_fields,
    fresh_database,
    message,
    query_message,
    startup_packet,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

# A Query announcing 100 MB plus 8 bytes of its body, then nothing.
BODY_CUT = b"Q" + struct.pack("!I", 100 * 2**20 + 4) + b"SELECT 1"
# Two bytes of a Query header, then nothing.
HEADER_CUT = b"Q\x00"


async def locked_table(pg: TempPostgres) -> str:
    dbname = fresh_database(pg)
    setup = await direct(pg, dbname)
    try:
        await setup.execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0)"
        )
        await setup.execute("GRANT ALL ON t TO app")
    finally:
        await close_quietly(setup)
    return dbname


async def stall_in_transaction(mux, dbname: str, cut: bytes) -> RawClient:
    """Log in, take the row lock inside a transaction, then send `cut` and go silent."""
    raw = await RawClient.open(mux)
    await raw.login(APP_USER, APP_PASSWORD, dbname)
    assert (await raw.query("BEGIN")).status == "T"
    assert (await raw.query("UPDATE t SET v = 99 WHERE id = 1")).status == "T"
    await raw.send(cut)
    return raw


async def first_error(raw: RawClient, timeout: float = 15) -> tuple[dict[str, str], float]:
    """The ErrorResponse pgmux sends before closing, and how long it took to come."""
    start = time.monotonic()
    messages = await raw.read_until_closed(timeout)
    errors = [error_fields(body) for kind, body in messages if kind == b"E"]
    assert errors, f"closed without an ErrorResponse: {messages!r}"
    return errors[0], time.monotonic() - start


async def assert_waiter_served(mux, dbname: str, waiter: asyncio.Task[int]) -> None:
    """The good client queued behind the attacker gets the (only) server, the lock free."""
    assert await asyncio.wait_for(waiter, 10) == 1
    conn = await connect_asyncpg(mux, dbname)
    try:
        # the attacker's update was rolled back with its server
        assert await conn.fetchval("SELECT v FROM t WHERE id = 1") == 1
    finally:
        await close_quietly(conn)


async def update_through(mux, dbname: str) -> int:
    conn = await connect_asyncpg(mux, dbname)
    try:
        await conn.execute("UPDATE t SET v = 1 WHERE id = 1")
        return 1
    finally:
        await close_quietly(conn)


@pytest.mark.parametrize("cut", [BODY_CUT, HEADER_CUT], ids=["body", "header"])
async def test_stalled_mid_message_gets_idle_transaction(
    pg: TempPostgres, pgmux: PgmuxFactory, cut: bytes
) -> None:
    dbname = await locked_table(pg)
    mux = pgmux({"pool": {"size": 1}, "timeouts": {"idle_transaction": "1s", "message": "30s"}})
    raw = await stall_in_transaction(mux, dbname, cut)
    waiter = asyncio.ensure_future(update_through(mux, dbname))
    try:
        error, after = await first_error(raw)
        assert error["C"] == "25P03", error
        assert "idle_transaction" in error["M"]
        assert after < 5, f"idle_transaction fired after {after:.2f}s"
        await assert_waiter_served(mux, dbname, waiter)
    finally:
        waiter.cancel()
        await raw.close()
    assert "idle_transaction_timeout" in mux.logs()


@pytest.mark.parametrize("cut", [BODY_CUT, HEADER_CUT], ids=["body", "header"])
async def test_stalled_mid_message_gets_message_timeout(
    pg: TempPostgres, pgmux: PgmuxFactory, cut: bytes
) -> None:
    dbname = await locked_table(pg)
    mux = pgmux({"pool": {"size": 1}, "timeouts": {"idle_transaction": 0, "message": "1s"}})
    raw = await stall_in_transaction(mux, dbname, cut)
    waiter = asyncio.ensure_future(update_through(mux, dbname))
    try:
        error, after = await first_error(raw)
        assert error["C"] == "08P01", error
        assert "incomplete message" in error["M"] and "timeouts.message" in error["M"]
        assert after < 5, f"timeouts.message fired after {after:.2f}s"
        await assert_waiter_served(mux, dbname, waiter)
    finally:
        waiter.cancel()
        await raw.close()
    assert "message_timeout" in mux.logs()


async def test_stalled_outside_transaction_gets_client_idle(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    """Mid-message with no transaction open: client_idle, not a running request."""
    mux = pgmux({"timeouts": {"client_idle": "1s", "message": "30s"}})
    raw = await RawClient.open(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, "postgres")
        await raw.send(BODY_CUT)
        error, _ = await first_error(raw)
        assert error["C"] == "57P05", error
    finally:
        await raw.close()


async def test_a_slow_whole_message_is_not_idle(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """A message that keeps arriving (a byte every 0.3 s) is activity: client_idle waits."""
    mux = pgmux({"timeouts": {"client_idle": "1s", "message": "30s"}})
    raw = await RawClient.open(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, "postgres")
        data = query_message("SELECT 42")
        for i in range(len(data)):  # ~4 s in all, each gap well under client_idle
            await raw.send(data[i : i + 1])
            await asyncio.sleep(0.3)
        kinds = []
        while (msg := await raw.read_message()) is not None and msg[0] != b"Z":
            kinds.append(msg[0])
        assert msg is not None and b"E" not in kinds, kinds
    finally:
        await raw.close()


async def test_oversized_password_message_is_refused_at_its_header(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    """Before authentication a message announcing 1 GiB is refused at once, not
    buffered: PostgreSQL's own bound on an authentication message (65535 bytes)."""
    mux = pgmux()
    raw = await RawClient.open(mux)
    try:
        await raw.send(startup_packet({"user": APP_USER, "database": "postgres"}))
        msg = await raw.read_message()
        assert msg is not None and msg[0] == b"R", msg
        await raw.send(b"p" + struct.pack("!I", 2**30) + b"SCRAM-SHA-256\0")
        error, _ = await first_error(raw, timeout=5)
        assert error["C"] == "54000", error
        assert "authentication limit (65535)" in error["M"], error
    finally:
        await raw.close()


# --- the welcome buffer ----------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of a process and its children (workers), the largest one."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    sizes = []
    for one in pids:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                sizes.append(int(line.split()[1]))
    return max(sizes)


async def authenticated_without_welcome(mux, dbname: str) -> RawClient:
    """Startup and SCRAM up to AuthenticationOk; the welcome never comes (no server)."""
    raw = await RawClient.open(mux)
    await raw.send(startup_packet({"user": APP_USER, "database": dbname}))
    scram = None
    while True:
        msg = await raw.read_message()
        assert msg is not None and msg[0] == b"R", msg
        if struct.unpack("!I", msg[1][:4])[0] == 0:
            return raw
        scram = await raw._auth_step(msg[1], APP_USER, APP_PASSWORD, scram)


async def test_welcome_buffer_is_bounded(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """PostgreSQL silent (a listener that never answers): 300 x 1 MB Query before the
    welcome pause the client instead of growing pgmux by 300 MB."""
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    mux = pgmux(
        {
            "timeouts": {"server_connect": "60s", "query_wait": "60s"},
            "databases": {"silentdb": {"host": "127.0.0.1", "port": port}},
        }
    )
    before = rss_kib(mux.pid)
    raw = await authenticated_without_welcome(mux, "silentdb")
    chunk = query_message("SELECT '" + "x" * (2**20 - 20) + "'")
    sent = 0
    try:
        for _ in range(300):
            raw.writer.write(chunk)
            try:
                await asyncio.wait_for(raw.writer.drain(), 2)
            except TimeoutError:
                break  # pgmux stopped reading: the bound works
            sent += 1
        await asyncio.sleep(0.5)
        after = rss_kib(mux.pid)
    finally:
        raw.writer.transport.abort()
        silent.close()
        for writer in held:
            writer.close()
    assert sent < 300, "pgmux read 300 MB before any server answered"
    assert after < 80 * 1024, f"RSS {before} KiB -> {after} KiB after {sent} MB sent"


# --- COPY FROM STDIN that goes silent ----------------------------------------


# After one whole CopyData row, or inside one (its header announces 100 bytes).
ONE_ROW = message(b"d", b"2\t5\n")
ROW_CUT = b"d" + struct.pack("!I", 104) + b"2\t5"


async def copy_in_transaction(mux, dbname: str, tail: bytes = ONE_ROW) -> RawClient:
    """Take the row lock, start COPY FROM STDIN and send TAIL."""
    raw = await RawClient.open(mux)
    await raw.login(APP_USER, APP_PASSWORD, dbname)
    assert (await raw.query("BEGIN")).status == "T"
    assert (await raw.query("UPDATE t SET v = 99 WHERE id = 1")).status == "T"
    await raw.send(query_message("COPY t FROM STDIN"))
    reply = await raw.read_message()
    assert reply is not None and reply[0] == b"G", reply  # CopyInResponse
    await raw.send(tail)
    return raw


@pytest.mark.parametrize("tail", [ONE_ROW, ROW_CUT], ids=["after_row", "inside_row"])
async def test_silent_copy_in_gets_idle_transaction(
    pg: TempPostgres, pgmux: PgmuxFactory, tail: bytes
) -> None:
    """PostgreSQL waits for the next CopyData as it waits for the next statement of a
    client idle in a transaction: idle_transaction ends it and frees server and lock."""
    dbname = await locked_table(pg)
    mux = pgmux({"pool": {"size": 1}, "timeouts": {"idle_transaction": "1s", "message": "30s"}})
    raw = await copy_in_transaction(mux, dbname, tail)
    waiter = asyncio.ensure_future(update_through(mux, dbname))
    try:
        error, after = await first_error(raw)
        assert error["C"] == "25P03", error
        assert after < 5, f"idle_transaction fired after {after:.2f}s"
        await assert_waiter_served(mux, dbname, waiter)
    finally:
        waiter.cancel()
        await raw.close()
    assert "idle_transaction_timeout" in mux.logs()


async def test_a_copy_that_keeps_sending_is_not_idle(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """A row every 0.3 s for longer than idle_transaction: the COPY and the commit go through."""
    dbname = await locked_table(pg)
    mux = pgmux({"pool": {"size": 1}, "timeouts": {"idle_transaction": "1s"}})
    raw = await copy_in_transaction(mux, dbname)
    try:
        for row in range(3, 13):
            await asyncio.sleep(0.3)
            await raw.send(message(b"d", f"{row}\t5\n".encode()))
        await raw.send(message(b"c"))  # CopyDone
        replies = await raw.read_until_ready()
        assert [kind for kind, _ in replies] == [b"C", b"Z"], replies
        assert (await raw.query("COMMIT")).status == "I"
    finally:
        await raw.close()
    conn = await connect_asyncpg(mux, dbname)
    try:
        assert await conn.fetchval("SELECT count(*) FROM t") == 12
    finally:
        await close_quietly(conn)

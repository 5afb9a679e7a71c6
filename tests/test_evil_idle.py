"""Bytes from a server nobody asked, a server dying mid-COPY, and replies too big to hold.

* An idle server (in the pool, no client linked) that sends anything but
  what PostgreSQL sends unprompted is closed with a logged reason; the
  client that came in on it is served by the next server. In session mode
  the client keeps its server while idle, so it gets 08006.
* A server closing in the middle of COPY FROM STDIN or COPY TO STDOUT:
  its client gets 08006.
* A single row larger than the 64 MiB a message may have when read whole
  streams through to the client (pgmux does not hold it: its peak memory
  grows by much less than the row), and the slow path skips such a row
  unbuffered when nobody is linked to read it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from evil_common import (
    assert_healthy,
    closed_by_pgmux,
    config,
    crashed_error,
    query_until_closed,
    refusals,
)
from evilserver import (
    EvilConn,
    EvilServer,
    command_complete,
    data_row,
    header,
    healthy,
    msg,
    parameter_status,
    ready,
    row_description,
)
from helpers import APP_PASSWORD, APP_USER, PgmuxFactory, RawClient, bystander, wait_until

pytestmark = pytest.mark.timeout(90)


def idle_then(evil: bytes):
    """Connection 0 logs in, sends EVIL while idle, waits to be closed; the rest are healthy."""

    async def script(conn: EvilConn) -> None:
        if conn.index > 0:
            await healthy(conn)
            return
        if not await conn.login():
            return
        await asyncio.sleep(0.5)  # the welcome is done, the server idle in its pool
        conn.send(evil)
        conn.closed_by_pgmux = await conn.wait_closed_by_peer()  # type: ignore[attr-defined]

    return script


IDLE = {
    "ready-for-query": (ready(), "unexpected message type 'Z' while nothing was asked"),
    "data-row": (data_row(b"x"), "unexpected message type 'D' while nothing was asked"),
    "command-complete": (command_complete("SELECT 1"), "type 'C' while nothing was asked"),
    "row-description": (row_description(), "type 'T' while nothing was asked"),
    "authentication-ok": (msg(b"R", b"\0\0\0\0"), "unexpected message type 'R'"),
    "parameter-status-over-64mib": (header(b"S", (64 << 20) + 1), "exceeds the server message"),
    "unknown-type": (msg(b"!"), "unexpected message type '!'"),
}


@pytest.mark.parametrize("case", sorted(IDLE))
async def test_bytes_to_an_idle_server_close_it(pgmux: PgmuxFactory, case: str):
    evil_bytes, reason = IDLE[case]
    async with EvilServer(idle_then(evil_bytes)) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            client = await RawClient.open(mux)
            try:
                await client.login(APP_USER, APP_PASSWORD, "evil")
                await wait_until(
                    lambda: asyncio.sleep(0, refusals(mux, reason)),
                    bool,
                    timeout=10,
                    what="the idle server's refusal in the log",
                )
                result = await client.query("select 1", timeout=15)
                assert result.rows == [["ok"]], result  # from the next, healthy server
            finally:
                await client.close()
        assert closed_by_pgmux(evil)[0]
        assert_healthy(mux, evil)


async def test_bytes_to_a_session_clients_idle_server_cost_it_08006(pgmux: PgmuxFactory):
    async with EvilServer(idle_then(ready())) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            client = await RawClient.open(mux)
            try:
                await client.login(APP_USER, APP_PASSWORD, "evil_plain")
                crashed_error(await client.read_until_closed(10))
            finally:
                await client.close()
        assert refusals(mux, "unexpected message type 'Z' while nothing was asked")
        assert_healthy(mux, evil)


# --- COPY ----------------------------------------------------------------------------


async def copy_in_then_close(conn: EvilConn) -> None:
    if not await conn.login() or await conn.read_request() is None:
        return
    conn.send(msg(b"G", b"\0\0\0"))
    await conn.flush()
    await conn.read_message()  # the client's first CopyData
    await conn.close()


async def copy_out_then_close(conn: EvilConn) -> None:
    if not await conn.login() or await conn.read_request() is None:
        return
    conn.send(msg(b"H", b"\0\0\0") + msg(b"d", b"row 1\n") + msg(b"d", b"row 2\n"))
    await conn.close()


@pytest.mark.parametrize("dbname", ["evil", "evil_plain"])
async def test_a_server_closing_mid_copy_in_costs_its_client_08006(
    pgmux: PgmuxFactory, dbname: str
):
    async with EvilServer(copy_in_then_close) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            client = await RawClient.open(mux)
            try:
                await client.login(APP_USER, APP_PASSWORD, dbname)
                await client.send(msg(b"Q", b"copy t from stdin\0"))
                kind, _ = await client.read_message() or (b"", b"")
                assert kind == b"G"
                await client.send(msg(b"d", b"1\n") * 3)
                crashed_error(await client.read_until_closed(10))
            finally:
                await client.close()
        assert refusals(mux, "server closed the connection", event="server_lost")
        assert_healthy(mux, evil)


@pytest.mark.parametrize("dbname", ["evil", "evil_plain"])
async def test_a_server_closing_mid_copy_out_costs_its_client_08006(
    pgmux: PgmuxFactory, dbname: str
):
    async with EvilServer(copy_out_then_close) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            replies = await query_until_closed(mux, dbname, "copy t to stdout")
            assert [kind for kind, _ in replies[:3]] == [b"H", b"d", b"d"], replies
            crashed_error(replies)
        assert_healthy(mux, evil)


# --- rows larger than a held message -------------------------------------------------

BIG = 100 << 20  # a 100 MiB value: over the 64 MiB bound of a message read whole


async def big_row(conn: EvilConn) -> None:
    """Answer every query with one row of BIG bytes, sent in 1 MiB pieces."""
    if not await conn.login():
        return
    while (request := await conn.read_request()) is not None:
        conn.send(row_description() + header(b"D", 4 + 2 + 4 + BIG) + (1).to_bytes(2, "big"))
        conn.send(BIG.to_bytes(4, "big"))
        piece = b"x" * (1 << 20)
        for _ in range(BIG >> 20):
            conn.send(piece)
            await conn.flush()
        conn.send(command_complete("SELECT 1") + ready())
        await conn.flush()
        del request


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("dbname", ["evil", "evil_plain"])
async def test_a_row_over_64mib_streams_through(pgmux: PgmuxFactory, dbname: str):
    async with EvilServer(big_row) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            client = await RawClient.open(mux)
            try:
                await client.login(APP_USER, APP_PASSWORD, dbname)
                before = _peak_rss(mux.pid)
                result = await client.query("select big", timeout=60)
            finally:
                await client.close()
            assert result.tags == ["SELECT 1"], result.tags
            assert len(result.rows) == 1 and len(result.rows[0][0] or "") == BIG
            # Held whole, the row alone would take BIG. (What the client's socket
            # has not taken yet waits in its write buffer: that is the rest.)
            grown = _peak_rss(mux.pid) - before
            assert grown < BIG, f"pgmux's peak memory grew by {grown >> 20} MiB"
        assert_healthy(mux, evil)


async def test_an_idle_server_rows_are_skipped_unbuffered_then_refused(pgmux: PgmuxFactory):
    """A row header to an idle server is refused at once, before its body:
    the slow path never buffers toward the announced size."""
    async with EvilServer(idle_then(header(b"D", (512 << 20)) + b"\0\1")) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            await _welcomed_then_query(mux, "type 'D' while nothing was asked")
        assert closed_by_pgmux(evil)[0]
        assert_healthy(mux, evil)


async def _welcomed_then_query(mux: object, reason: str) -> None:
    """A client logs in, waits for REASON in the log (or a second), then queries."""
    client = await RawClient.open(mux)  # type: ignore[arg-type]
    try:
        await client.login(APP_USER, APP_PASSWORD, "evil")
        if reason:
            await wait_until(
                lambda: asyncio.sleep(0, refusals(mux, reason)),  # type: ignore[arg-type]
                bool,
                timeout=10,
                what="the refusal in the log",
            )
        else:
            await asyncio.sleep(1.0)
        result = await client.query("select 1", timeout=15)
        assert result.rows == [["ok"]], result
    finally:
        await client.close()


async def status_while_idle_then_serve(conn: EvilConn) -> None:
    if not await conn.login():
        return
    await asyncio.sleep(0.5)
    conn.send(parameter_status("TimeZone", "Europe/Paris"))
    await conn.serve()


async def test_parameter_status_while_idle_is_taken(pgmux: PgmuxFactory):
    """What PostgreSQL does send unprompted (a ParameterStatus after a reload)
    keeps the idle server: it is not a misbehaviour."""
    async with EvilServer(status_while_idle_then_serve) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            await _welcomed_then_query(mux, "")
        assert len(evil.conns) == 1, "pgmux dropped a server that did nothing wrong"
        assert not refusals(mux, "while nothing was asked")
        assert_healthy(mux, evil)

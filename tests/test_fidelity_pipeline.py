"""Acceptance: a pipelining client gets its replies when PostgreSQL would send them.

PostgreSQL sends the replies of an extended-protocol batch when the client
asks (Flush, Sync), not one by one. pgmux answers some requests itself (a
Parse of a statement the server already has, a Close of a client's name);
those replies wait for the client's Flush or Sync too. libpq's pipeline
mode shows the difference in its trace (psycopg's executemany with
returning=True tests it), so the trace through pgmux must be the direct one.
"""

from __future__ import annotations

import asyncio
import struct
import tempfile
from typing import Any

import psycopg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    message,
)
from psycopg import pq

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

MODES = ["transaction", "session"]
QUIET = 0.5  # seconds without a reply that show none is coming


def start(pgmux: PgmuxFactory, mode: str) -> Any:
    # One server: the second client finds the statements the first prepared.
    return pgmux({"pool": {"mode": mode, "size": 1}})


def parse(name: str, text: str) -> bytes:
    return message(b"P", name.encode() + b"\0" + text.encode() + b"\0" + struct.pack("!H", 0))


def close_statement(name: str) -> bytes:
    return message(b"C", b"S" + name.encode() + b"\0")


FLUSH = message(b"H")
SYNC = message(b"S")


async def nothing_arrives(client: RawClient) -> None:
    with pytest.raises(TimeoutError):
        got = await client.read_message(QUIET)
        print("unexpected reply:", got)


async def replies_at_flush(where: Any, request: bytes, reply: bytes) -> None:
    """REQUEST gets no reply until the client's Flush, then REPLY; Sync ends the batch."""
    client = await RawClient.open(where)
    try:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        await client.send(parse("s1", "SELECT 1") + SYNC)
        assert [kind for kind, _ in await client.read_until_ready()] == [b"1", b"Z"]
        await client.send(request)
        await nothing_arrives(client)
        await client.send(FLUSH)
        assert await client.read_message() == (reply, b"")
        await client.send(SYNC)
        assert [kind for kind, _ in await client.read_until_ready()] == [b"Z"]
    finally:
        await client.close()


@pytest.mark.parametrize("mode", MODES)
async def test_a_parse_of_a_prepared_statement_is_answered_at_the_flush(
    pgmux: PgmuxFactory, pg: TempPostgres, mode: str
) -> None:
    mux = start(pgmux, mode)
    for where in (pg, mux, mux):  # the second client through pgmux finds SELECT 1 prepared
        await replies_at_flush(where, parse("s2", "SELECT 1"), b"1")


@pytest.mark.parametrize("mode", MODES)
async def test_a_close_is_answered_at_the_flush(
    pgmux: PgmuxFactory, pg: TempPostgres, mode: str
) -> None:
    mux = start(pgmux, mode)
    for where in (pg, mux):
        await replies_at_flush(where, close_statement("s1"), b"3")


# -- libpq's trace of a pipeline -------------------------------------------------------

INSERT = "INSERT INTO pipeline_trace (id) VALUES (%s) RETURNING id"


def pipeline_trace(where: Any) -> list[str]:
    """libpq's trace of psycopg's executemany(returning=True), twice in a pipeline
    (the blocking driver, as the issue's case: its timing shows the difference)."""
    with psycopg.connect(
        host=where.host,
        port=where.port,
        user=APP_USER,
        password=APP_PASSWORD,
        dbname=APP_DB,
        autocommit=True,
        prepare_threshold=0,
        connect_timeout=15,
    ) as conn:
        conn.execute("CREATE TEMP TABLE pipeline_trace (id int)")
        with tempfile.TemporaryFile(mode="w+") as trace:
            conn.pgconn.trace(trace.fileno())
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            with conn.pipeline():
                cur = conn.cursor()
                cur.executemany(INSERT, [(10,), (20,)], returning=True)
                cur.executemany(INSERT, [(10,), (20,)], returning=True)
            conn.pgconn.untrace()
            trace.seek(0)
            return trace.read().splitlines()


def without_flushes(trace: list[str]) -> list[str]:
    """Every message but libpq's Flush, which it sends when it must wait for a
    reply that has not come yet: a matter of time, which a pooler adds."""
    return [line for line in trace if line != "F\t4\tFlush"]


@pytest.mark.parametrize("mode", MODES)
async def test_pipeline_trace_matches_a_direct_connection(
    pgmux: PgmuxFactory, pg: TempPostgres, mode: str
) -> None:
    want = without_flushes(await asyncio.to_thread(pipeline_trace, pg))
    assert any("\tSync" in line for line in want)
    mux = start(pgmux, mode)
    for _ in range(4):  # from the second on, pgmux answers the Parse itself
        assert without_flushes(await asyncio.to_thread(pipeline_trace, mux)) == want

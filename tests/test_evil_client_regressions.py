"""Regressions found by tests/test_fuzz_evil_client.py, each reduced to its cause.

Every case runs against a pool of one server, so the next client gets exactly
the server the evil client left behind.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import APP_DB, APP_PASSWORD, APP_USER, PgmuxFactory, RawClient, query_message

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

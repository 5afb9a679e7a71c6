"""Malformed extended-protocol bodies, in process: the error in place, the server in step.

A Parse, Bind, Describe or Close whose body PostgreSQL would refuse gets
PostgreSQL's ERROR from the translator in the request's place (a failing
Parse goes to the server, which then skips to Sync as it would have): the
requests before it in the same chunk run, those after it are skipped, the
ReadyForQuery count stays right, so the server goes back to the pool at its
ReadyForQuery, split anywhere. And should the translator itself fail on a
chunk (a bug), that client ends with an SQLSTATE and its server is closed
at once instead of waited for.
"""

from __future__ import annotations

import pytest
from harness import DEFAULT_CONFIG, Harness, idle_servers, owed

from pgmux.protocol import messages
from pgmux.proxy.datapath.translator import Translator


def replies(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        out.append((chr(data[pos]), data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def sqlstates(data: bytes) -> list[str]:
    codes = []
    for kind, body in replies(data):
        if kind == "E":
            fields = dict((part[:1], part[1:]) for part in body.split(b"\0") if part)
            codes.append(fields[b"C"].decode())
    return codes


def frame(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


UNTERMINATED = {
    "parse": frame(b"P", b"stmt"),
    "bind": frame(b"B", b"\0stmt"),
    "describe": frame(b"D", b"Sstmt"),
    "close": frame(b"C", b"Sstmt"),
}
GOOD_PARSE = messages.parse("good", "select 1")


@pytest.mark.parametrize("split", [0, 3, 9, 17])
@pytest.mark.parametrize("case", sorted(UNTERMINATED))
async def test_malformed_request_fails_in_place_and_releases(case: str, split: int) -> None:
    harness = Harness()
    await harness.open_servers(1)
    client = harness.client()
    chunk = GOOD_PARSE + UNTERMINATED[case] + messages.describe("S", "good") + messages.sync()
    cut = len(GOOD_PARSE) + split  # inside the malformed message, or at its start
    client.send(chunk[:cut])
    client.send(chunk[cut:])
    server = client.server
    assert server is not None
    await harness.settle()
    got = client.take()
    kinds = [kind for kind, _ in replies(got)]
    # ParseComplete of the good Parse, the error, nothing for the skipped Describe.
    assert kinds == ["1", "E", "Z"], replies(got)
    assert sqlstates(got) == ["08P01"]
    assert client.server is None and idle_servers(harness.pool()) == [server]
    assert owed(client.conn) == 0
    # The statement before the error is there, and the connection goes on.
    client.send(messages.bind("", "good", []) + messages.execute("") + messages.sync())
    await harness.settle()
    assert [kind for kind, _ in replies(client.take())] == ["2", "D", "C", "Z"]


async def test_malformed_request_after_an_error_is_skipped_like_postgres() -> None:
    """PostgreSQL skips to Sync unread after an error: one error, the first one."""
    harness = Harness()
    await harness.open_servers(1)
    client = harness.client()
    client.send(messages.bind("", "nope", []) + UNTERMINATED["describe"] + messages.sync())
    await harness.settle()
    assert sqlstates(client.take()) == ["26000"]
    assert client.server is None and len(idle_servers(harness.pool())) == 1


async def test_invalid_utf8_name_is_22021() -> None:
    harness = Harness()
    await harness.open_servers(1)
    client = harness.client()
    client.send(frame(b"P", b"st\xffmt\0select 1\0\0\0") + messages.sync())
    await harness.settle()
    got = client.take()
    assert sqlstates(got) == ["22021"]
    assert b'invalid byte sequence for encoding "UTF8": 0xff' in got


@pytest.mark.parametrize("begin", [False, True], ids=["idle", "in-transaction"])
async def test_translator_failure_closes_the_server_at_once(monkeypatch, begin: bool) -> None:
    harness = Harness()
    await harness.open_servers(1)
    pool = harness.pool()
    client = harness.client()
    if begin:
        client.send(messages.query("begin"))
        await harness.settle()
        client.take()
    server = client.server if begin else None

    def broken(self: Translator, data: bytes, server: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Translator, "translate", broken)
    client.send(messages.describe("S", "x") + messages.sync())
    got = client.take()
    assert sqlstates(got) == ["XX000"] and client.transport.closed
    assert not pool.servers, "the server is closed, not waited for"
    if server is not None:
        assert harness.backend(server).terminated or server.transport.is_closing()


async def test_translator_failure_opens_a_server_for_those_waiting(monkeypatch) -> None:
    harness = Harness({**DEFAULT_CONFIG, "pool": {"size": 1}})
    await harness.open_servers(1)
    holder, waiter = harness.client(), harness.client()
    holder.send(messages.query("begin"))
    await harness.settle()
    waiter.send(messages.query("select 1"))
    assert waiter.server is None, "queued behind the holder"
    original = Translator.translate

    def broken(self: Translator, data: bytes, server: object) -> bytes:
        if self is holder.conn.translator:
            raise RuntimeError("a bug")
        return original(self, data, server)  # type: ignore[arg-type]

    monkeypatch.setattr(Translator, "translate", broken)
    holder.send(messages.describe("S", "x") + messages.sync())
    await harness.settle()
    assert sqlstates(holder.take())[-1:] == ["XX000"]
    assert waiter.take().endswith(messages.ready_for_query("I")), "served by a new server"

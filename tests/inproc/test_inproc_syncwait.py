"""Requests that arrive while a Sync before them is unanswered (syncwait.py).

The translator only notes where the requests before a Sync lie and reads
their names when more arrives before that Sync's ReadyForQuery: a request
going by a name registered there waits (Translator.held) until the answer;
one going by other names goes on at once; once the Sync is answered, nothing
waits. These tests send the second chunk before the backend's replies are
delivered, which the wire-level equivalence tests cannot time.
"""

from __future__ import annotations

from harness import FakeClient, Harness

from pgmux.protocol import messages

S = messages.sync()


def run(statement: str) -> bytes:
    return messages.bind("", statement, ()) + messages.execute("", 0) + S


async def _client() -> tuple[Harness, FakeClient]:
    harness = Harness()
    await harness.open_servers(1)
    return harness, harness.client()


def held(client: FakeClient) -> bool:
    assert client.conn.translator is not None
    return bool(client.conn.translator.held)


async def test_a_request_by_a_name_parsed_before_an_unanswered_sync_waits() -> None:
    harness, client = await _client()
    client.send(messages.parse("s1", "SELECT 1") + run("s1"))
    client.send(run("s1"))  # before the first Sync's ReadyForQuery
    assert held(client)
    await harness.settle()
    assert not held(client)
    assert client.take().count(messages.ready_for_query("I")) == 2


async def test_requests_of_a_sync_in_earlier_chunks_count_too() -> None:
    harness, client = await _client()
    client.send(messages.parse("s1", "SELECT 1"))
    client.send(messages.bind("", "s1", ()))
    client.send(messages.execute("", 0) + S)
    client.send(run("s1"))
    assert held(client)
    await harness.settle()
    assert client.take().count(messages.ready_for_query("I")) == 2


async def test_the_same_text_under_another_name_waits() -> None:
    harness, client = await _client()
    client.send(messages.parse("s1", "SELECT 1") + run("s1"))
    client.send(messages.parse("s2", "SELECT 1") + run("s2"))
    assert held(client)
    await harness.settle()
    assert client.take().count(messages.ready_for_query("I")) == 2


async def test_a_request_by_other_names_goes_on() -> None:
    harness, client = await _client()
    client.send(messages.parse("s1", "SELECT 1") + run("s1"))
    client.send(messages.parse("s2", "SELECT 2") + run("s2"))
    assert not held(client)
    await harness.settle()
    assert client.take().count(messages.ready_for_query("I")) == 2


async def test_nothing_waits_once_the_sync_is_answered() -> None:
    harness, client = await _client()
    client.send(messages.parse("s1", "SELECT 1") + run("s1"))
    await harness.settle()
    client.send(run("s1"))
    assert not held(client)
    await harness.settle()
    assert client.take().count(messages.ready_for_query("I")) == 2


async def test_a_name_closed_after_its_use_makes_every_named_request_wait() -> None:
    # The Bind used s1's old text; the Close and the new Parse hide it by the
    # time the names are read, so what went by it cannot be told any more.
    harness, client = await _client()
    client.send(messages.parse("s1", "SELECT 1") + S)
    await harness.settle()
    client.take()
    again = messages.close("S", "s1") + messages.parse("s1", "SELECT 2")
    used = messages.bind("", "s1", ()) + messages.execute("", 0)
    client.send(used + again + S)  # one Sync: the names are read after all three
    client.send(messages.parse("s9", "SELECT 3") + run("s9"))
    assert held(client)
    await harness.settle()
    assert client.take().count(messages.ready_for_query("I")) == 2


async def test_a_pipeline_in_one_chunk_is_read_by_name_after_its_first_sync() -> None:
    harness, client = await _client()
    client.send(messages.parse("s1", "SELECT 1") + run("s1") + run("s1"))
    assert held(client)
    await harness.settle()
    assert client.take().count(messages.ready_for_query("I")) == 2

"""The release rule, in process: when a server goes back to the pool.

Real ClientConnection / Pool / ServerConnection / Translator / ResponseFilter
over fake transports (tests/inproc/harness.py); no PostgreSQL. A server is
released after ReadyForQuery 'I' once the client is owed nothing and has no
batch open; 'T' and 'E' keep it; a pipeline keeps it until its last
ReadyForQuery; a lone Flush owes nothing. Each rule is checked with the
transaction-mode translator on (the default) and off (plain forwarding,
max_prepared_statements 0 and session_state ignore), since the two use
different reply scanners, and with the replies split at every offset.
"""

from __future__ import annotations

import copy

import pytest
from harness import DEFAULT_CONFIG, Harness, idle_servers, in_batch, owed

from pgmux.protocol import messages

PLAIN = copy.deepcopy(DEFAULT_CONFIG)
PLAIN["pool"].update(max_prepared_statements=0, session_state="ignore")
SCANNERS = {"filter": DEFAULT_CONFIG, "plain": PLAIN}

EXTENDED = (
    messages.parse("", "select 1")
    + messages.bind("", "", [])
    + messages.describe("P", "")
    + messages.execute("")
)
Z_IDLE = messages.ready_for_query("I")


@pytest.fixture(params=sorted(SCANNERS))
def harness(request) -> Harness:
    return Harness(SCANNERS[request.param])


async def test_simple_query_releases_after_idle_ready_for_query(harness):
    await harness.open_servers(1)
    pool = harness.pool()
    client = harness.client()
    client.send(messages.query("select 1"))
    server = client.server
    assert server is not None and not idle_servers(pool) and owed(client.conn) == 1
    await harness.settle()
    assert client.server is None and idle_servers(pool) == [server]
    assert client.take().endswith(Z_IDLE)
    assert harness.backend(server).queries() == ["select 1"]


@pytest.mark.parametrize("split", range(1, 60))
async def test_release_with_replies_split_anywhere(harness, split):
    await harness.open_servers(1)
    client = harness.client()
    client.send(messages.query("select 1"))
    server = client.server
    await harness.settle(splits=[split])
    assert client.server is None and idle_servers(harness.pool()) == [server]


async def test_transaction_block_keeps_the_server_until_commit(harness):
    await harness.open_servers(1)
    client = harness.client()
    client.send(messages.query("begin"))
    server = client.server
    await harness.settle()
    assert client.server is server and client.take().endswith(messages.ready_for_query("T"))
    client.send(messages.query("select 1"))
    await harness.settle()
    assert client.server is server
    client.send(messages.query("commit"))
    await harness.settle()
    assert client.server is None and idle_servers(harness.pool()) == [server]


async def test_failed_transaction_keeps_the_server_until_rollback(harness):
    await harness.open_servers(1)
    client = harness.client()
    client.send(messages.query("begin"))
    server = client.server
    client.send(messages.query("select 1/0"))
    await harness.settle()
    assert client.server is server and client.take().endswith(messages.ready_for_query("E"))
    client.send(messages.query("rollback"))
    await harness.settle()
    assert client.server is None and idle_servers(harness.pool()) == [server]


async def test_pipeline_keeps_the_server_until_its_last_ready_for_query(harness):
    await harness.open_servers(1)
    client = harness.client()
    client.send((EXTENDED + messages.sync()) * 3)
    server = client.server
    backend = harness.backend(server)
    assert owed(client.conn) == 3
    replies = backend.take()
    cuts = [i + len(Z_IDLE) for i in range(len(replies)) if replies.startswith(Z_IDLE, i)]
    assert len(cuts) == 3
    start = 0
    for n, cut in enumerate(cuts, 1):
        server.data_received(replies[start:cut])
        start = cut
        if n < 3:
            assert client.server is server, f"released after {n} of 3 ReadyForQuery"
    assert client.server is None and idle_servers(harness.pool()) == [server]
    assert client.take().count(Z_IDLE) == 3


async def test_batch_after_the_last_sync_keeps_the_server(harness):
    await harness.open_servers(1)
    client = harness.client()
    client.send(EXTENDED + messages.sync() + messages.parse("", "select 2") + messages.flush())
    server = client.server
    await harness.settle()
    assert in_batch(client.conn) and client.server is server
    client.send(messages.bind("", "", []) + messages.execute("") + messages.sync())
    await harness.settle()
    assert client.server is None and idle_servers(harness.pool()) == [server]


async def test_lone_flush_does_not_keep_the_server(harness):
    await harness.open_servers(1)
    client = harness.client()
    client.send(messages.flush())
    await harness.settle()
    assert client.server is None and len(idle_servers(harness.pool())) == 1
    assert owed(client.conn) == 0 and not in_batch(client.conn)


async def test_flush_inside_a_batch_keeps_the_server(harness):
    await harness.open_servers(1)
    client = harness.client()
    client.send(EXTENDED + messages.flush())
    server = client.server
    await harness.settle()
    assert client.server is server and in_batch(client.conn)
    assert client.take().startswith(messages.parse_complete())


async def test_copy_from_stdin_releases_after_its_ready_for_query(harness):
    await harness.open_servers(1)
    client = harness.client()
    client.send(messages.query("copy t from stdin"))
    server = client.server
    await harness.settle()
    assert client.server is server
    row = b"d" + (4 + 4).to_bytes(4, "big") + b"1\t2\n"
    client.send(row * 2 + b"c\0\0\0\x04")
    await harness.settle()
    assert client.take().endswith(messages.command_complete("COPY 2") + Z_IDLE)
    assert client.server is None and idle_servers(harness.pool()) == [server]


async def test_pool_grows_when_no_server_is_idle(harness):
    client = harness.client()
    client.send(messages.query("select 1"))
    assert client.server is None and harness.pool().connecting == 1
    await harness.settle()
    assert client.take().endswith(Z_IDLE)
    assert len(idle_servers(harness.pool())) == 1


@pytest.mark.parametrize(
    "scanner",
    ["filter", "plain"],
)
async def test_half_a_header_from_the_client_never_reaches_another_client_s_stream(scanner):
    config = copy.deepcopy(SCANNERS[scanner])
    config["pool"]["size"] = 1
    harness = Harness(config)
    await harness.open_servers(1)
    first, second = harness.client(), harness.client()
    rest = messages.query("select 2")
    first.send(messages.query("select 1") + rest[:3])  # a TCP split inside the next header
    server = first.server
    second.send(messages.query("select 3"))
    await harness.settle()
    first.send(rest[3:])
    await harness.settle()
    backend = harness.backend(server)
    assert sorted(backend.queries()) == ["select 1", "select 2", "select 3"]
    assert first.take().count(Z_IDLE) == 2 and second.take().endswith(Z_IDLE)

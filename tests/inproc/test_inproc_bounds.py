"""What the transaction-mode translator holds of a client's message cut across chunks.

It must see a Parse/Bind/Describe/Close/Query whole to rewrite it, so it holds
one (limits.max_packet_size at most, the client's own check) and joins its
chunks once, when the last arrives: not a copy of the growing message per
chunk. Messages it never rewrites (CopyData, CopyFail, FunctionCall) stream
through as they arrive and are never held.
"""

from __future__ import annotations

import struct

from harness import Harness, idle_servers

from pgmux.protocol import messages

CHUNK = 64 * 1024


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


async def test_a_long_query_is_held_without_a_copy_per_chunk():
    harness = Harness()
    await harness.open_servers(1)
    client = harness.client()
    sql = "select '" + "x" * (4 * 2**20) + "'"
    pieces = chunks(messages.query(sql))
    client.send(pieces[0])
    translator = client.conn.translator
    assert translator is not None
    for piece in pieces[1:-1]:
        client.send(piece)
        # the first chunk stays as it came; the rest wait to be joined once
        assert len(translator._partial) == CHUNK, len(translator._partial)
    client.send(pieces[-1])
    assert translator._partial == b""
    await harness.settle()
    assert harness.backend(client.server or idle_servers(harness.pool())[0]).queries() == [sql]
    assert client.take().endswith(messages.ready_for_query("I"))


async def test_a_function_call_streams_through_unheld():
    harness = Harness()
    await harness.open_servers(1)
    server = idle_servers(harness.pool())[0]
    seen: list[int] = []
    server.transport.sink = lambda data: seen.append(len(data))
    client = harness.client()
    body = struct.pack("!IH", 1234, 0) + struct.pack("!H", 1) + struct.pack("!I", 2**20)
    call = b"F" + struct.pack("!I", 4 + len(body) + 2**20 + 2) + body
    client.send(call)
    assert sum(seen) == len(call), "the FunctionCall's start was held back"
    forwarded = len(call)
    for piece in chunks(b"a" * 2**20):
        client.send(piece)
        forwarded += len(piece)
        assert sum(seen) == forwarded, "a FunctionCall argument was held back"
    translator = client.conn.translator
    assert translator is not None and translator._partial == b""


async def test_a_server_announcing_a_huge_held_reply_is_closed():
    """An ErrorResponse header announcing 100 MB (held replies are read whole):
    the server is closed at once, its client gets 08006, nothing is buffered."""
    harness = Harness()
    await harness.open_servers(1)
    client = harness.client()
    client.send(messages.query("select 1"))
    server = client.server
    assert server is not None
    server.data_received(b"E" + struct.pack("!I", 100 * 2**20) + b"SERROR\0")
    assert server.transport.is_closing(), "the server was kept"
    assert server.responses.hold == b""
    server.connection_lost(None)  # what the closed transport reports
    await harness.settle()
    reply = client.take()
    assert b"08006" in reply, reply

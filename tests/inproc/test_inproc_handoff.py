"""Hand-off and abandon, in process (tests/inproc/harness.py; no PostgreSQL).

A server released while a client waits goes straight to that client (first
come, first served), which then gets its queued request answered. A client
that disconnects leaves a clean server: idle at once when nothing was open,
rolled back first when a transaction was (pool.rollback_abandoned, the
default), closed when rollback_abandoned is off or a message was half sent.
"""

from __future__ import annotations

import copy

from harness import DEFAULT_CONFIG, Harness, idle_servers, waiting_clients

from pgmux.protocol import messages

Z_IDLE = messages.ready_for_query("I")
ONE_SERVER = copy.deepcopy(DEFAULT_CONFIG)
ONE_SERVER["pool"]["size"] = 1


async def test_released_server_goes_to_the_waiting_client():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    first, second = harness.client(), harness.client()
    first.send(messages.query("begin"))
    server = first.server
    await harness.settle()
    second.send(messages.query("select 1"))
    assert second.server is None and waiting_clients(harness.pool()) == [second.conn]
    first.send(messages.query("commit"))
    await harness.settle()
    assert first.server is None and second.server is None  # answered and released in turn
    assert first.take().endswith(Z_IDLE) and second.take().endswith(Z_IDLE)
    assert harness.backend(server).queries() == ["begin", "commit", "select 1"]
    assert idle_servers(harness.pool()) == [server]


async def test_waiting_clients_are_served_first_come_first_served():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    holder = harness.client()
    holder.send(messages.query("begin"))
    server = holder.server
    await harness.settle()
    waiters = [harness.client() for _ in range(3)]
    for n, waiter in enumerate(waiters):
        waiter.send(messages.query(f"select {n}"))
    holder.send(messages.query("commit"))
    await harness.settle()
    assert harness.backend(server).queries()[2:] == ["select 0", "select 1", "select 2"]
    assert all(waiter.take().endswith(Z_IDLE) for waiter in waiters)


async def test_hand_off_with_a_pipeline_waits_for_its_last_ready_for_query():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    first, second = harness.client(), harness.client()
    first.send(messages.query("select 1") + messages.query("select 2"))
    second.send(messages.query("select 3"))
    server = first.server
    replies = harness.backend(server).take()
    harness.replying.clear()
    one = replies.index(Z_IDLE) + len(Z_IDLE)
    server.data_received(replies[:one])
    assert first.server is server and second.server is None
    server.data_received(replies[one:])
    assert second.server is server
    await harness.settle()
    assert second.take().endswith(Z_IDLE)


async def test_abandon_when_idle_returns_the_server_at_once():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    client = harness.client()
    client.send(messages.flush() + messages.query("select 1"))
    server = client.server
    await harness.settle()
    client.gone()
    assert idle_servers(harness.pool()) == [server]


async def test_abandon_mid_transaction_rolls_back_before_reuse():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    leaver, next_one = harness.client(), harness.client()
    leaver.send(messages.query("begin"))
    server = leaver.server
    await harness.settle()
    next_one.send(messages.query("select 1"))
    leaver.gone()
    await harness.settle()
    backend = harness.backend(server)
    assert backend.queries() == ["begin", "ROLLBACK", "select 1"]
    assert backend.status == ord("I")
    assert next_one.take().endswith(Z_IDLE) and idle_servers(harness.pool()) == [server]


async def test_abandon_in_failed_transaction_rolls_back():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    leaver = harness.client()
    leaver.send(messages.query("begin") + messages.query("select 1/0"))
    server = leaver.server
    await harness.settle()
    leaver.gone()
    await harness.settle()
    assert harness.backend(server).queries()[-1] == "ROLLBACK"
    assert idle_servers(harness.pool()) == [server]


async def test_abandon_mid_transaction_closes_without_rollback_abandoned():
    config = copy.deepcopy(ONE_SERVER)
    config["pool"]["rollback_abandoned"] = False
    harness = Harness(config)
    await harness.open_servers(1)
    leaver = harness.client()
    leaver.send(messages.query("begin"))
    server = leaver.server
    await harness.settle()
    leaver.gone()
    await harness.settle()
    assert server not in harness.pool().servers and server.transport.closed
    assert harness.backend(server).kinds().endswith("X")  # Terminate, not ROLLBACK
    assert "ROLLBACK" not in harness.backend(server).queries()


async def test_abandon_mid_message_closes_the_server():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    leaver = harness.client()
    query = messages.query("select 1")
    leaver.send(query[:7])
    server = leaver.server
    leaver.gone()
    await harness.settle()
    assert server not in harness.pool().servers and server.transport.closed


async def test_abandon_with_a_reply_still_owed_waits_for_it():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    leaver = harness.client()
    leaver.send(messages.query("select 1"))
    server = leaver.server
    leaver.gone()  # before the reply
    await harness.settle()
    assert harness.cancels == [server]  # stop what it runs for nobody
    assert idle_servers(harness.pool()) == [server]
    assert "ROLLBACK" not in harness.backend(server).queries()  # it was idle after the reply


async def test_a_waiting_client_that_piles_up_is_paused_until_it_has_a_server():
    harness = Harness(ONE_SERVER)
    await harness.open_servers(1)
    holder, piler = harness.client(), harness.client()
    holder.send(messages.query("begin"))
    await harness.settle()
    big = messages.query("select 1 -- " + "x" * 300_000)
    for _ in range(4):  # 1.2 MB waiting for a server: past the 1 MiB pending limit
        piler.send(big)
    assert piler.transport.paused and piler.transport.pauses == 1
    holder.send(messages.query("commit"))
    await harness.settle()
    assert not piler.transport.paused and piler.transport.resumes == 1
    assert piler.take().count(Z_IDLE) == 4


async def test_abandon_counts_a_reply_read_before_the_cleanup_starts():
    config = copy.deepcopy(ONE_SERVER)
    config["timeouts"] = {"cancel_wait": "1s"}  # the wait that would hang ends soon
    harness = Harness(config)
    await harness.open_servers(1)
    leaver = harness.client()
    leaver.send(messages.query("select 1"))
    server = leaver.server
    leaver.gone()
    harness.deliver()  # the reply arrives before the cleanup task has run
    await harness.settle()
    assert idle_servers(harness.pool()) == [server]

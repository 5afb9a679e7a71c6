"""A server's state, its list and its link agree after any sequence of pool operations.

Random sequences (Hypothesis) of what clients and the console do to a pool:
a client takes a server (BEGIN) or runs a query, commits, leaves mid-transaction
or while queued; the console PAUSEs and RESUMEs, RECONNECTs, KILLs; a cancel
is in flight when a server comes back. After every step, once the fake
backends have answered, every server is in exactly the list of its state, a
server is linked exactly when it is ACTIVE (and its client points back at it),
queued clients are WAITING or WELCOME, the shared counters count every server,
and SHOW POOLS / SHOW SERVERS say what the lists hold.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time

from harness import DEFAULT_CONFIG, FakeClient, Harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgmux.protocol import messages
from pgmux.proxy.console.show import pool_counts, show_servers
from pgmux.proxy.core.states import SERVER_SHOWN, ClientState, ServerState
from pgmux.proxy.datapath.pool import Pool
from pgmux.proxy.datapath.server import ServerConnection

EXAMPLES = int(os.environ.get("PGMUX_FUZZ_DEEP", "0")) or 150
CONFIG = copy.deepcopy(DEFAULT_CONFIG)
CONFIG["pool"]["size"] = 3

OPERATIONS = st.sampled_from(
    ["connect", "begin", "query", "commit", "abandon", "pause", "resume", "reconnect", "kill"]
)


class Scenario:
    def __init__(self) -> None:
        self.harness = Harness(CONFIG, record=False)
        self.clients: list[FakeClient] = []
        self.in_tx: set[int] = set()  # indexes of clients that sent BEGIN
        self.paused = False
        registry = self.harness.registry
        registry.cancels.cancel_server = self._cancel_in_flight  # type: ignore[method-assign]

    def _cancel_in_flight(self, server: ServerConnection) -> None:
        """A CancelRequest that takes a moment to reach PostgreSQL."""
        server.cancels_in_flight += 1
        loop = asyncio.get_running_loop()

        def arrived() -> None:
            server.cancels_in_flight -= 1
            server.pool.cancel_finished(server)

        loop.call_later(0.002, arrived)

    @property
    def pool(self) -> Pool:
        return self.harness.pool()

    def live(self) -> list[int]:
        return [n for n, c in enumerate(self.clients) if c.conn.state is not ClientState.CLOSED]

    async def run(self, operation: str, pick: int) -> None:
        live = self.live()
        chosen = live[pick % len(live)] if live else None
        client = self.clients[chosen] if chosen is not None else None
        registry = self.harness.registry
        if operation == "connect" and len(live) < 6:
            self.clients.append(self.harness.client())
        elif operation == "begin" and client is not None and chosen not in self.in_tx:
            client.send(messages.query("begin"))
            self.in_tx.add(chosen)
        elif operation == "query" and client is not None:
            client.send(messages.query("select 1"))
        elif operation == "commit" and client is not None and chosen in self.in_tx:
            client.send(messages.query("commit"))
            self.in_tx.discard(chosen)
        elif operation == "abandon" and client is not None:
            client.gone()
            self.in_tx.discard(chosen)
        elif operation == "pause" and not self.paused:
            registry.pause("appdb")
            self.paused = True
        elif operation == "resume" and self.paused:
            registry.resume("appdb")
            self.paused = False
        elif operation == "reconnect":
            registry.reconnect("appdb")
        elif operation == "kill":
            registry.kill("appdb")
            registry.resume("appdb")
            self.paused = False
            self.in_tx.clear()
        for _ in range(3):  # replies, cleanup statements, cancels arriving
            await self.harness.settle()
            await asyncio.sleep(0.003)
            self.pool.grow()


def check(pool: Pool) -> None:
    lists: dict[ServerState, set[ServerConnection]] = {
        ServerState.LOGIN: pool.login,
        ServerState.ACTIVE: pool.active,
        ServerState.CLEANING: pool.cleaning,
        ServerState.CANCEL_WAIT: pool.being_canceled,
        ServerState.IDLE: set(pool.idle),
    }
    assert len(pool.idle) == len(set(pool.idle)), "a server twice on the idle stack"
    assert set().union(*lists.values()) == pool.servers
    for server in pool.servers:
        holders = [state for state, members in lists.items() if server in members]
        assert holders == [server.state], f"{server.id} is {server.state} but in {holders}"
        if server.state is ServerState.ACTIVE:
            client = server.client
            assert client is not None and client.server is server
            assert client.state in (ClientState.ACTIVE, ClientState.LINKING)
        else:
            assert server.client is None, f"{server.state} server {server.id} has a client"
    for client in pool.waiting:
        assert client.state in (ClientState.WAITING, ClientState.WELCOME)
    for client in pool.clients:
        if client.state in (ClientState.ACTIVE, ClientState.LINKING):
            assert client.server is not None and client.server in pool.active
        elif client.state is ClientState.WAITING:
            assert client in pool.waiting
    slots = pool.slots
    assert slots.server_count == len(pool.servers)
    assert slots.db_server_count[pool.dbname] == len(pool.servers)
    counts = pool_counts(pool, time.monotonic())
    assert counts["sv_active"] == len(pool.active)
    assert counts["sv_idle"] == len(pool.idle)
    assert counts["sv_tested"] == len(pool.cleaning)
    assert counts["sv_being_canceled"] == len(pool.being_canceled)
    assert counts["sv_login"] == len(pool.login)
    assert counts["cl_waiting"] == len(pool.waiting)
    shown = show_servers(pool.registry, time.monotonic())
    state_column = [c for c, _ in shown.columns].index("state")
    states = sorted(row[state_column] for row in shown.rows)
    assert states == sorted(SERVER_SHOWN[s.state] for s in pool.servers)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(OPERATIONS, st.integers(0, 5)), min_size=1, max_size=40))
def test_states_lists_and_links_agree_after_any_sequence(steps: list[tuple[str, int]]) -> None:
    async def scenario() -> None:
        run = Scenario()
        await run.harness.open_servers(2)
        check(run.pool)
        for operation, pick in steps:
            await run.run(operation, pick)
            check(run.pool)

    asyncio.run(scenario())

"""Acceptance: the console's lists and counters agree with each other and with
PostgreSQL after a random sequence of pool operations.

Every server state change goes through the pool's transition methods, so
SHOW SERVERS (the stored state of each server), SHOW POOLS (the length of each
state's list) and pg_stat_activity (the backends that really exist) must tell
the same story at every quiet moment, whatever happened before: clients that
take a server and give it back, clients that vanish mid-transaction, KILL_CLIENT,
RECONNECT, PAUSE and RESUME, a backend terminated under pgmux's feet.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import random
from collections import Counter
from typing import Any

import asyncpg
import pytest
from helpers import close_quietly, connect_asyncpg, direct, server_connections, wait_until
from test_arch_layers import all_modules

pytestmark = pytest.mark.timeout(300)

ADMIN = ("admin", "admin-secret")
STEPS = 60
# SHOW POOLS column for each SHOW SERVERS state
POOL_COLUMN = {
    "active": "sv_active",
    "idle": "sv_idle",
    "tested": "sv_tested",
    "new": "sv_login",
    "being_canceled": "sv_being_canceled",
}
CLIENT_COLUMN = {"active": "cl_active", "idle": "cl_active", "waiting": "cl_waiting"}


class Scenario:
    def __init__(self, mux: Any, pg: Any, seed: int) -> None:
        self.mux = mux
        self.pg = pg
        self.rng = random.Random(seed)
        self.idle: list[asyncpg.Connection] = []  # connected, between transactions
        self.in_tx: list[tuple[asyncpg.Connection, Any]] = []  # holding a server
        self.console: asyncpg.Connection | None = None
        self.log: list[str] = []

    async def start(self) -> None:
        self.console = await connect_asyncpg(
            self.mux, dbname="pgmux", user=ADMIN[0], password=ADMIN[1]
        )
        await self.connect()  # the pool exists from the first step on

    async def close(self) -> None:
        await close_quietly(self.console, *self.idle, *(c for c, _ in self.in_tx))

    async def show(self, what: str) -> list[asyncpg.Record]:
        assert self.console is not None
        return await self.console.fetch(f"SHOW {what}")

    # --- operations ---------------------------------------------------------

    async def connect(self) -> None:
        if len(self.idle) + len(self.in_tx) < 8:
            self.idle.append(await connect_asyncpg(self.mux))

    async def begin(self) -> None:
        if self.idle and len(self.in_tx) < 3:  # pool size 4: nobody waits forever
            conn = self.idle.pop(self.rng.randrange(len(self.idle)))
            tx = conn.transaction()
            await tx.start()
            await conn.fetchval("SELECT txid_current()")
            self.in_tx.append((conn, tx))

    async def commit(self) -> None:
        if self.in_tx:
            conn, tx = self.in_tx.pop(self.rng.randrange(len(self.in_tx)))
            await tx.commit()
            self.idle.append(conn)

    async def query(self) -> None:
        if self.idle:
            conn = self.rng.choice(self.idle)
            assert await conn.fetchval("SELECT 41 + 1") == 42

    async def abandon(self) -> None:
        if self.in_tx:
            conn, _ = self.in_tx.pop(self.rng.randrange(len(self.in_tx)))
            conn.terminate()  # gone mid-transaction: the pool rolls its server back

    async def kill_client(self) -> None:
        pool = [c for c in self.idle] + [c for c, _ in self.in_tx]
        if not pool:
            return
        clients = [r for r in await self.show("CLIENTS") if r["database"] == "appdb"]
        if clients:
            target = self.rng.choice(clients)["id"]
            assert self.console is not None
            await self.console.execute(f"KILL_CLIENT {target}")
            await asyncio.sleep(0.05)
            await self._forget_closed()

    async def reconnect(self) -> None:
        assert self.console is not None
        await self.console.execute("RECONNECT appdb")

    async def pause_resume(self) -> None:
        assert self.console is not None
        if self.in_tx:
            return  # PAUSE waits for linked servers; keep the scenario moving
        await self.console.execute("PAUSE appdb")
        await self.console.execute("RESUME appdb")

    async def terminate_backend(self) -> None:
        monitor = await direct(self.pg)
        try:
            await monitor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'appdb' AND state = 'idle' AND pid <> pg_backend_pid() "
                "LIMIT 1"
            )
        finally:
            await monitor.close()
        await asyncio.sleep(0.05)

    async def _forget_closed(self) -> None:
        self.idle = [c for c in self.idle if not c.is_closed()]
        self.in_tx = [(c, t) for c, t in self.in_tx if not c.is_closed()]

    async def step(self) -> None:
        operations = [
            (self.connect, 3),
            (self.begin, 4),
            (self.commit, 4),
            (self.query, 3),
            (self.abandon, 2),
            (self.kill_client, 1),
            (self.reconnect, 1),
            (self.pause_resume, 1),
            (self.terminate_backend, 1),
        ]
        operation = self.rng.choices(
            [op for op, _ in operations], weights=[w for _, w in operations]
        )[0]
        self.log.append(operation.__name__)
        # A client hit by KILL_CLIENT or by a terminated backend errors: expected.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
            await asyncio.wait_for(operation(), 20)
        await self._forget_closed()

    # --- the check ------------------------------------------------------------

    async def agrees(self) -> str | None:
        """None when the console and PostgreSQL agree, else what differs."""
        servers = [r for r in await self.show("SERVERS") if r["database"] == "appdb"]
        pools = [r for r in await self.show("POOLS") if r["database"] == "appdb"]
        clients = [r for r in await self.show("CLIENTS") if r["database"] == "appdb"]
        pool = pools[0] if pools else None
        if pool is None:
            return "no appdb pool"
        by_state = Counter(r["state"] for r in servers)
        for state, count in by_state.items():
            column = POOL_COLUMN.get(state)
            if column is None:
                return f"unknown server state {state!r}"
            if pool[column] != count:
                return f"{column}={pool[column]} but {count} servers are {state}"
        for state, column in POOL_COLUMN.items():
            if pool[column] and not by_state.get(state):
                return f"{column}={pool[column]} but no server is {state}"
        by_client = Counter(CLIENT_COLUMN[r["state"]] for r in clients)
        for column in ("cl_active", "cl_waiting"):
            if pool[column] != by_client.get(column, 0):
                return f"{column}={pool[column]} but SHOW CLIENTS says {by_client}"
        linked = {r["ptr"] for r in servers if r["state"] == "active"}
        client_links = {r["link"] for r in clients if r["link"]}
        if linked != client_links:
            return f"linked servers {linked} but clients link to {client_links}"
        monitor = await direct(self.pg)
        try:
            backends = await server_connections(monitor, "appdb")
        finally:
            await monitor.close()
        logged_in = len(servers) - by_state.get("new", 0)
        if backends != logged_in:
            return f"PostgreSQL has {backends} backends, SHOW SERVERS {logged_in}"
        return None


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_lists_counters_and_show_servers_agree(pg: Any, pgmux: Any, seed: int) -> None:
    mux = pgmux(
        {
            "admin": {"users": ["admin"]},
            "pool": {"size": 4, "max_server_connections": 4},
            "timeouts": {"query_wait": "15s"},
        },
        users={"app": "app-secret", "admin": ADMIN[1]},
    )
    scenario = Scenario(mux, pg, seed)
    await scenario.start()
    try:
        for _ in range(STEPS):
            await scenario.step()
            # Quiet moment: cleanup, cancels and closes settle within a second.
            await wait_until(
                scenario.agrees,
                lambda difference: difference is None,
                timeout=10,
                what=f"console and PostgreSQL agree after {scenario.log[-8:]}",
            )
    finally:
        await scenario.close()


# --- the one place: a static check of who writes a server's state and link --------

# (module, class, function) allowed to write `.state` / `.client` of a server, and
# `.state` of a client
SERVER_WRITERS = {
    ("pgmux.proxy.datapath.pool", "Pool", "_set_server_state"),
    ("pgmux.proxy.datapath.pool", "Pool", "_link"),
    ("pgmux.proxy.datapath.server", "ServerConnection", "__init__"),
}
CLIENT_WRITERS = {
    ("pgmux.proxy.datapath.client", "ClientConnection", "_set_state"),
    ("pgmux.proxy.datapath.client", "ClientConnection", "__init__"),
}


def _attribute_writes(path: Any) -> list[tuple[str, str, str, str, int]]:
    """(class, function, owner, attribute, line) of every `x.state =` / `x.client =`."""
    tree = ast.parse(path.read_text())
    found = []
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        for func in cls.body:
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                    targets = [node.target]
                else:
                    continue
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr in ("state", "client"):
                        owner = ast.unparse(target.value)
                        found.append((cls.name, func.name, owner, target.attr, node.lineno))
    return found


TRACKED = ("Pool", "ServerConnection", "ClientConnection")


def test_only_the_transitions_write_states_and_links() -> None:
    wrong = []
    for module, path in all_modules().items():
        if not module.startswith("pgmux.proxy"):
            continue
        for cls, func, owner, attr, line in _attribute_writes(path):
            if owner == "self" and cls not in TRACKED:
                continue  # another object's own `state` / `client` (a login, a console)
            client_side = cls == "ClientConnection" and owner == "self" and attr == "state"
            allowed = CLIENT_WRITERS if client_side else SERVER_WRITERS
            if (module, cls, func) not in allowed:
                wrong.append(f"{path.name}:{line} {cls}.{func} writes {owner}.{attr}")
    assert not wrong, "\n".join(wrong)


async def test_a_client_leaving_the_queue_is_forgotten(pgmux: Any) -> None:
    """A queued client that disconnects leaves the queue: the server it waited
    for goes to the next client, and SHOW POOLS counts nobody waiting."""
    mux = pgmux(
        {"admin": {"users": ["admin"]}, "pool": {"size": 1, "max_server_connections": 1}},
        users={"app": "app-secret", "admin": ADMIN[1]},
    )
    holder = await connect_asyncpg(mux)
    leaver = await connect_asyncpg(mux)
    console = await connect_asyncpg(mux, dbname="pgmux", user=ADMIN[0], password=ADMIN[1])
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.fetchval("SELECT 1")
        pending = asyncio.create_task(leaver.fetchval("SELECT 2"))

        async def waiting() -> int:
            rows = await console.fetch("SHOW POOLS")
            return sum(r["cl_waiting"] for r in rows if r["database"] == "appdb")

        await wait_until(waiting, lambda n: n == 1, timeout=10, what="the leaver queued")
        leaver.terminate()
        await asyncio.gather(pending, return_exceptions=True)
        await wait_until(waiting, lambda n: n == 0, timeout=10, what="the queue empty")
        await tx.commit()
        late = await connect_asyncpg(mux)
        assert await late.fetchval("SELECT 3") == 3
        await late.close()
        assert "Traceback" not in mux.logs()
    finally:
        await close_quietly(holder, console)

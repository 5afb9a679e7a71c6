"""Acceptance: a crowd arriving at a cold pool is served.

Every client of a pool waits for its welcome until the pool's first server has
logged in and told the parameters the welcome carries. When that first server
arrives, pgmux welcomes the whole queue in one loop: no chain of calls per
waiting client that a few hundred clients would push past the interpreter's
recursion limit (which stranded the clients already taken off the queue).

A gate between pgmux and PostgreSQL holds every server connection until all
600 clients are queued, so the pool is provably cold when they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from helpers import RawClient, close_quietly, connect_asyncpg, query_message, wait_until

from pgmux.tempgres import free_port

pytestmark = pytest.mark.timeout(240)

CLIENTS = 600
FLUSH = b"H\x00\x00\x00\x04"
ADMIN = ("admin", "admin-secret")


class Gate:
    """A TCP relay to PostgreSQL that holds every connection until opened."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.opened = asyncio.Event()
        self.held = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Gate:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held += 1
        await self.opened.wait()
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()


async def waiting_clients(mux: Any) -> int:
    console = await connect_asyncpg(mux, dbname="pgmux", user=ADMIN[0], password=ADMIN[1])
    try:
        rows = await console.fetch("SHOW POOLS")
        return sum(row["cl_waiting"] for row in rows if row["database"] == "appdb")
    finally:
        await console.close()


async def one_client(mux: Any, started: asyncio.Event) -> int:
    started.set()
    conn = await connect_asyncpg(mux, timeout=120)
    try:
        return await conn.fetchval("SELECT 1 + 1")
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_600_clients_arriving_at_a_cold_pool_are_all_served(
    pg: Any, pgmux: Any, mode: str
) -> None:
    async with Gate(pg.host, pg.port) as gate:
        size = 4 if mode == "transaction" else 40
        mux = pgmux(
            {
                "listen": {"max_client_conn": CLIENTS + 50},
                "admin": {"users": ["admin"]},
                "pool": {"mode": mode, "size": size, "max_server_connections": size},
                "timeouts": {"query_wait": "120s", "client_login": "120s"},
                "databases": {"*": {"host": "127.0.0.1", "port": gate.port}},
            },
            users={"app": "app-secret", "admin": ADMIN[1]},
        )
        started = [asyncio.Event() for _ in range(CLIENTS)]
        tasks = [asyncio.create_task(one_client(mux, event)) for event in started]
        try:
            await wait_until(
                lambda: waiting_clients(mux),
                lambda n: n == CLIENTS,
                timeout=120,
                what=f"{CLIENTS} clients queued at the cold pool",
            )
            assert gate.held >= 1  # pgmux is trying to log in its first server
            gate.opened.set()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 150)
        finally:
            gate.opened.set()
            for task in tasks:
                task.cancel()
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
        assert results == [2] * CLIENTS
        # pgmux is still healthy afterwards: a fresh client is served at once.
        late = await connect_asyncpg(mux)
        try:
            assert await late.fetchval("SELECT 3") == 3
        finally:
            await close_quietly(late)
        assert "RecursionError" not in mux.logs()


def test_gate_holds_until_opened() -> None:
    """The gate itself: a connection through it gets no byte before it opens."""

    async def scenario() -> None:
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = echo.sockets[0].getsockname()[1]
        async with Gate("127.0.0.1", port) as gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", gate.port)
            writer.write(b"ping")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(4), 0.3)
            gate.opened.set()
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            writer.close()
        echo.close()

    asyncio.run(scenario())


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
    writer.close()


async def test_600_waiting_lone_flushes_are_handed_the_server_in_turn(pgmux: Any) -> None:
    """600 clients queued with nothing but a Flush: each gets the only server,
    owes nothing, and gives it back at once, all from one loop in the pool."""
    mux = pgmux(
        {
            "listen": {"max_client_conn": CLIENTS + 50},
            "pool": {"size": 1, "max_server_connections": 1},
            "timeouts": {"query_wait": "120s"},
        }
    )
    holder = await connect_asyncpg(mux)
    raw: list[RawClient] = []
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.fetchval("SELECT 1")  # the pool's only server is taken
        for _ in range(CLIENTS):
            client = await RawClient.open(mux)
            await client.login("app", "app-secret", "appdb")
            raw.append(client)
        for client in raw:
            await client.send(FLUSH)
        await asyncio.sleep(0.5)  # every Flush is queued behind the holder
        await tx.commit()  # the server goes round all 600 waiters
        for client in raw[::60]:  # and every one of them can still run a query
            await client.send(query_message("SELECT 7"))
            kinds = []
            while (msg := await client.read_message(30)) is not None:
                kinds.append(msg[0])
                if msg[0] == b"Z":
                    break
            assert kinds[-1:] == [b"Z"] and b"E" not in kinds, kinds
        assert await holder.fetchval("SELECT 8") == 8
        assert "RecursionError" not in mux.logs()
    finally:
        for client in raw:
            client.writer.close()
        await close_quietly(holder)

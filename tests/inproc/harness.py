"""The in-process harness: pgmux's real data path over fake transports.

The real `ClientConnection`, `Pool`, `ServerConnection`, `Translator` and
`ResponseFilter` run as in the daemon, but their transports are
`FakeTransport` objects that record writes and pause/resume, and every server
talks to a scripted `FakeBackend` (tests/inproc/fakebackend.py) instead of
PostgreSQL. No sockets, no PostgreSQL, no subprocess: a test decides when
each reply arrives and how it is split.

Everything that knows how these objects are built or where they keep their
state is in the "adapters" section below, so that a change in how clients
log in or servers are linked is answered there, not in every test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from fakebackend import SERVER_PARAMS, FakeBackend

from pgmux.protocol import messages
from pgmux.proxy.base.log import configure_logging
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import parse_config
from pgmux.proxy.datapath.client import ClientConnection
from pgmux.proxy.datapath.server import ServerConnection
from pgmux.proxy.registry import Registry

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool

configure_logging("console", "error")  # the data path logs logins and pool changes

DEFAULT_CONFIG: dict[str, Any] = {
    "auth": {"type": "trust"},
    # A path nothing listens on: should anything try a real connection, it fails at once.
    "databases": {"appdb": {"host": "/nonexistent/pgmux-inproc", "port": 5432}},
    "pool": {"size": 2},
}

_ports = itertools.count(40000)


class FakeTransport:
    """An asyncio transport that keeps what is written and whether reading is paused."""

    def __init__(
        self,
        peer: tuple[str, int],
        local: tuple[str, int],
        sink: Callable[[bytes], None] | None = None,
    ) -> None:
        self.written = bytearray()
        self.sink = sink  # called with each write (a backend reads the server's writes)
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.closed = False
        self._extra = {"peername": peer, "sockname": local}

    def write(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        else:
            self.written += data

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False
        self.resumes += 1

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


# --- adapters: how the data path's objects are built and inspected -------------


def make_registry(config: dict[str, Any] | None = None) -> Registry:
    """A registry as the daemon builds it, from a config dict (DEFAULT_CONFIG if None)."""
    return Registry(parse_config(config or DEFAULT_CONFIG, base_dir="/"), {})


def pool_of(registry: Registry, dbname: str = "appdb", user: str = "app") -> Pool:
    """The pool a client of (dbname, user) logs in to; it knows its server parameters
    already, so a login gets its welcome without waiting for a server."""
    pool = registry.pool_for(dbname, registry.config.database(dbname), user)  # type: ignore[arg-type]
    if pool.server_params is None:
        pool.server_params = dict(SERVER_PARAMS)
    return pool


def ready_client(
    registry: Registry, transport: FakeTransport, dbname: str, user: str
) -> ClientConnection:
    """A client that has logged in (trust) and got its welcome: ready for queries."""
    pool_of(registry, dbname, user)
    client = _new_client(registry)
    client.connection_made(transport)  # type: ignore[arg-type]
    client.data_received(messages.startup_message({"user": user, "database": dbname}))
    assert client.pool is not None and client.server is None, "login did not finish"
    return client


def _no_console(client: ClientConnection, leftover: bytes) -> None:
    raise AssertionError("the harness opens no console")


# bench/inproc.py also drives trees from before the login split and the pool's
# state transitions (85c67ae): the adapters below know both shapes.


def _new_client(registry: Registry) -> ClientConnection:
    try:
        from pgmux.proxy.login import new_client
    except ModuleNotFoundError:  # the client logged itself in
        return ClientConnection(registry)
    return new_client(registry, _no_console)


def open_server(pool: Pool, transport: FakeTransport) -> ServerConnection:
    """What Pool._open_server does, over `transport`: the login runs as the backend answers,
    and the logged-in server goes through Pool.release like a real one."""
    server = ServerConnection(pool, pool.credentials)
    if not hasattr(pool, "finish_login"):
        return _open_server_before_the_transitions(pool, server, transport)
    pool.add_server(server)
    server.connection_made(transport)  # type: ignore[arg-type]
    spawn(pool.finish_login(server))
    return server


def _open_server_before_the_transitions(
    pool: Any, server: ServerConnection, transport: FakeTransport
) -> ServerConnection:
    pool.servers.add(server)
    pool.connecting += 1
    pool.registry.server_slot_taken(pool)
    server.connection_made(transport)  # type: ignore[arg-type]

    async def logged_in() -> None:
        await server.wait_login(pool.timeouts.server_connect)
        pool.connecting -= 1
        pool.stats.servers_opened += 1
        pool.release(server)

    spawn(logged_in())
    return server


def grow_with(pool: Pool, factory: Callable[[Pool], ServerConnection]) -> None:
    """Make the pool open its servers with `factory(pool)` instead of a socket."""
    pool._open_server = lambda: factory(pool)  # type: ignore[method-assign]


def route_cancels(registry: Registry, sink: Callable[[ServerConnection], None]) -> None:
    """Send the registry's CancelRequests for a server to `sink(server)`, not to a socket."""
    owner = getattr(registry, "cancels", registry)
    owner.cancel_server = sink


def owed(client: ClientConnection) -> int:
    """ReadyForQuery the client's server still owes it."""
    return client.expect_rfq


def in_batch(client: ClientConnection) -> bool:
    return client.in_batch


def linked_server(client: ClientConnection) -> ServerConnection | None:
    return client.server


def idle_servers(pool: Pool) -> list[ServerConnection]:
    return list(pool.idle)


def waiting_clients(pool: Pool) -> list[ClientConnection]:
    return list(pool.waiting)


def client_gone(client: ClientConnection) -> None:
    """The application closed its socket."""
    client.transport.closed = True  # type: ignore[union-attr]
    client.connection_lost(None)


# --- the harness -----------------------------------------------------------------


class FakeClient:
    """An application's connection: what it sends in, what pgmux wrote back."""

    def __init__(self, conn: ClientConnection, transport: FakeTransport) -> None:
        self.conn = conn
        self.transport = transport

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)

    def take(self) -> bytes:
        return self.transport.take()

    def gone(self) -> None:
        client_gone(self.conn)

    @property
    def server(self) -> ServerConnection | None:
        return linked_server(self.conn)


class Harness:
    """One registry, its clients, and a FakeBackend behind every server it opens."""

    def __init__(self, config: dict[str, Any] | None = None, *, record: bool = True) -> None:
        self.registry = make_registry(config)
        self.record = record  # backends keep the messages they read (tests look at them)
        self.cancels: list[ServerConnection] = []  # servers pgmux asked to cancel
        route_cancels(self.registry, self.cancels.append)
        self.backends: dict[ServerConnection, FakeBackend] = {}
        self.replying: list[FakeBackend] = []  # backends with replies queued
        self._server_of: dict[int, ServerConnection] = {}  # id(backend) -> server

    def pool(self, dbname: str = "appdb", user: str = "app") -> Pool:
        pool = pool_of(self.registry, dbname, user)
        grow_with(pool, self._open_server)
        return pool

    def client(self, dbname: str = "appdb", user: str = "app") -> FakeClient:
        self.pool(dbname, user)
        transport = FakeTransport(("10.0.0.1", next(_ports)), ("127.0.0.1", 6432))
        client = FakeClient(ready_client(self.registry, transport, dbname, user), transport)
        client.take()  # the welcome
        return client

    def _open_server(self, pool: Pool) -> ServerConnection:
        backend = FakeBackend(
            pid=len(self.backends) + 100, on_reply=self.replying.append, record=self.record
        )
        transport = FakeTransport(("127.0.0.1", 5432), ("127.0.0.1", next(_ports)))
        transport.sink = backend.received
        server = open_server(pool, transport)
        self.backends[server] = backend
        self._server_of[id(backend)] = server
        return server

    def backend(self, server: ServerConnection | None) -> FakeBackend:
        assert server is not None
        return self.backends[server]

    def deliver(self, splits: Iterable[int] = ()) -> bool:
        """Hand every queued reply to its server, cut at `splits` (offsets into each
        backend's queued bytes); False when nothing was queued."""
        delivered = False
        while self.replying:
            backend = self.replying.pop(0)
            data = backend.take()
            if not data:
                continue
            delivered = True
            server = self._server_of[id(backend)]
            start = 0
            for cut in sorted(c for c in splits if 0 < c < len(data)):
                server.data_received(data[start:cut])
                start = cut
            server.data_received(data[start:])
        return delivered

    async def settle(self, splits: Iterable[int] = ()) -> None:
        """Deliver replies and run the tasks they start, until nothing moves."""
        splits = tuple(splits)
        for _ in range(100):
            # Tasks first: asyncio runs the steps a callback scheduled before it polls
            # the sockets again (a reply cannot overtake the task that waits for it).
            for _ in range(5):
                await asyncio.sleep(0)
            if not self.deliver(splits) and not self.replying:
                return
        raise AssertionError("the harness never settled")

    async def open_servers(self, count: int, dbname: str = "appdb", user: str = "app") -> None:
        """Log in `count` servers now, so that they wait idle in the pool."""
        pool = self.pool(dbname, user)
        for _ in range(count):
            self._open_server(pool)
        await self.settle()

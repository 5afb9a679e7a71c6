"""CancelKeys (proxy/core/cancel.py) without PostgreSQL.

A plain asyncio server stands in for PostgreSQL's postmaster: it records the
CancelRequest it gets and closes, as PostgreSQL does.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pgmux.protocol import messages
from pgmux.proxy.core.cancel import CancelKeys


class FakePeers:
    """Worker 3 of several: pids end in 3; pids ending in 5 belong elsewhere."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[int, bytes]] = []

    def issue_pid(self, random_bits: int) -> int:
        return (random_bits << 8 | 3) & 0x7FFFFFFF

    def forward_cancel(self, pid: int, key: bytes) -> bool:
        if pid & 0xFF == 5:
            self.forwarded.append((pid, key))
            return True
        return False


class FakePool:
    def __init__(self) -> None:
        self.timeouts = SimpleNamespace(cancel_wait=2.0)
        self.finished: list[object] = []

    def cancel_finished(self, server: SimpleNamespace) -> None:
        """The pool's hook: it releases a server it held back for the cancel."""
        assert not server.cancels_in_flight
        self.finished.append(server)


def fake_client(
    keys: CancelKeys, server: object = None, expect_rfq: int = 1, protocol_minor: int = 0
) -> SimpleNamespace:
    client = SimpleNamespace(
        server=server, expect_rfq=expect_rfq, log_fields=dict, protocol_minor=protocol_minor
    )
    client.cancel_pid, client.cancel_key = keys.issue(client)  # type: ignore[arg-type]
    return client


class FakeServer(SimpleNamespace):
    """A server whose reading the cancel pauses until PostgreSQL has taken it."""

    reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def fake_server(port: int, backend_pid: int = 4242) -> FakeServer:
    return FakeServer(
        id=7,
        backend_pid=backend_pid,
        backend_key=b"\x01\x02\x03\x04",
        cancels_in_flight=0,
        credentials=SimpleNamespace(host="127.0.0.1", port=port),
        pool=FakePool(),
        client=None,
    )


class Postmaster:
    """Accepts connections, keeps what each sent, closes them."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.done = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Postmaster:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received.append(await reader.readexactly(16))
        writer.close()
        self.done.set()


async def until(condition, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_issued_pids_are_unique_and_name_the_worker() -> None:
    keys = CancelKeys()
    keys.peers = FakePeers()
    clients = [fake_client(keys) for _ in range(200)]
    assert len({c.cancel_pid for c in clients}) == 200
    assert all(c.cancel_pid & 0xFF == 3 and 0 < c.cancel_pid < 2**31 for c in clients)
    assert all(len(c.cancel_key) == 4 for c in clients)


def test_owner_needs_the_right_key() -> None:
    keys = CancelKeys()
    client = fake_client(keys)
    assert keys.owner(client.cancel_pid, client.cancel_key) is client
    forged = bytes(b ^ 0xFF for b in client.cancel_key)
    assert keys.owner(client.cancel_pid, forged) is None
    assert keys.owner(client.cancel_pid + 1, client.cancel_key) is None


def test_forget_drops_only_the_clients_own_key() -> None:
    keys = CancelKeys()
    client = fake_client(keys)
    stranger = SimpleNamespace(cancel_pid=client.cancel_pid)
    keys.forget(stranger)  # type: ignore[arg-type]
    assert keys.owner(client.cancel_pid, client.cancel_key) is client
    keys.forget(client)  # type: ignore[arg-type]
    assert not keys.keys


def test_another_workers_pid_is_forwarded_there() -> None:
    keys = CancelKeys()
    peers = FakePeers()
    keys.peers = peers
    keys.cancel(0x105, b"abcd")
    assert peers.forwarded == [(0x105, b"abcd")]


async def test_a_cancel_reaches_postgresql_with_the_servers_key() -> None:
    async with Postmaster() as postmaster:
        keys = CancelKeys()
        server = fake_server(postmaster.port)
        client = fake_client(keys, server)
        keys.cancel(client.cancel_pid, client.cancel_key)
        assert server.cancels_in_flight == 1
        assert not server.reading  # the backend waits until the cancel reached it
        await until(lambda: not server.cancels_in_flight)
    assert postmaster.received == [messages.cancel_request(4242, b"\x01\x02\x03\x04")]
    assert server.pool.finished == [server]
    assert server.reading


async def test_a_server_whose_client_is_behind_stays_paused_after_the_cancel() -> None:
    async with Postmaster() as postmaster:
        keys = CancelKeys()
        server = fake_server(postmaster.port)
        server.client = fake_client(keys, server)
        server.client.writing_paused = True  # ClientConnection.pause_writing
        keys.cancel(server.client.cancel_pid, server.client.cancel_key)
        await until(lambda: not server.cancels_in_flight)
    assert not server.reading  # resume_writing lets it read once the client caught up


async def test_no_cancel_without_a_request_on_the_server_or_with_a_wrong_key() -> None:
    async with Postmaster() as postmaster:
        keys = CancelKeys()
        server = fake_server(postmaster.port)
        idle = fake_client(keys, server, expect_rfq=0)
        keys.cancel(idle.cancel_pid, idle.cancel_key)
        unlinked = fake_client(keys, None)
        keys.cancel(unlinked.cancel_pid, unlinked.cancel_key)
        busy = fake_client(keys, server)
        forged = bytes(b ^ 0xFF for b in busy.cancel_key)
        keys.cancel(busy.cancel_pid, forged)
        assert server.cancels_in_flight == 0
        not_logged_in = fake_server(postmaster.port, backend_pid=0)
        keys.cancel_server(not_logged_in)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
    assert not postmaster.received


async def test_an_unreachable_postgresql_still_releases_the_server() -> None:
    async with Postmaster() as postmaster:
        port = postmaster.port
    keys = CancelKeys()
    server = fake_server(port)  # nothing listens there any more
    keys.cancel_server(server)  # type: ignore[arg-type]
    await until(lambda: not server.cancels_in_flight)
    assert server.pool.finished == [server]

"""The floor: the least a transaction pooler in Python on uvloop can do per transaction.

A measuring instrument for `bench/run.py --floor`, not a pooler: it answers
every login with AuthenticationOk (no password, no checks), keeps POOL_SIZE
server connections, hands a server to a client at its first message and takes
it back when a chunk from the server ends with ReadyForQuery(I). No parsing
beyond that, no limits, no statistics, no errors, no prepared-statement
rewriting (so `-M prepared` does not work through it), nothing a user could run.
What pgmux spends beyond this floor is the price of its features; what the
floor itself spends next to PgBouncer is the price of the runtime.

    python bench/floor.py --listen-port P --pg-port Q --user U --password W \
        --dbname D --pool 12 --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import sys
from collections import deque
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgmux.protocol import messages
from pgmux.protocol.scram_client import ScramClient

_HEADER = struct.Struct("!cI")
_SSL_REQUEST = 80877103
_READY_IDLE = b"Z\x00\x00\x00\x05I"


# --- logging servers in (blocking, before the loop runs: not measured) ----------


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exactly(sock, 5)
    kind, length = _HEADER.unpack(header)
    return kind, _recv_exactly(sock, length - 4)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("PostgreSQL closed the connection during login")
        data += chunk
    return data


def login_server(args: argparse.Namespace) -> tuple[socket.socket, list[bytes]]:
    """A logged-in server socket and the ParameterStatus messages it sent."""
    sock = socket.create_connection(("127.0.0.1", args.pg_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(messages.startup_message({"user": args.user, "database": args.dbname}))
    scram = ScramClient(args.password, username="")
    params: list[bytes] = []
    while True:
        kind, body = _read_message(sock)
        if kind == b"R":
            code = struct.unpack_from("!I", body)[0]
            if code == 10:  # SASL
                first = scram.client_first()
                sock.sendall(messages.sasl_initial_response("SCRAM-SHA-256", first))
            elif code == 11:
                sock.sendall(messages.sasl_response(scram.handle_server_first(body[4:])))
            elif code == 12:
                scram.verify_server_final(body[4:])
        elif kind == b"S":
            params.append(_HEADER.pack(kind, len(body) + 4) + body)
        elif kind == b"E":
            raise ConnectionError(f"login failed: {body!r}")
        elif kind == b"Z":
            sock.setblocking(False)
            return sock, params


# --- the data path ------------------------------------------------------------------


class Pool:
    def __init__(self, welcome: bytes) -> None:
        self.welcome = welcome  # AuthenticationOk, parameters, BackendKeyData, RFQ(I)
        self.idle: list[Server] = []
        self.waiting: deque[Client] = deque()

    def acquire(self, client: Client) -> None:
        if self.idle:
            self.idle.pop().link(client)
        else:
            self.waiting.append(client)

    def release(self, server: Server) -> None:
        if self.waiting:
            server.link(self.waiting.popleft())
        else:
            self.idle.append(server)


class _Side(asyncio.Protocol):
    """What a server and a client connection of the floor both have."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


class Server(_Side):
    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.client: Client | None = None

    def link(self, client: Client) -> None:
        self.client = client
        client.server = self
        pending = client.pending
        client.pending = []
        self.transport.write(b"".join(pending))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return  # the reply of a client that left (pgbench stopping mid-transaction)
        client.transport.write(data)  # type: ignore[union-attr]
        if data.endswith(_READY_IDLE):
            client.server = None
            self.client = None
            if client.pending:  # it sent the next request before this reply ended
                self.pool.acquire(client)
            self.pool.release(self)


class Client(_Side):
    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.server: Server | None = None
        self.pending: list[bytes] = []
        self.logged_in = False

    def data_received(self, data: bytes) -> None:
        if not self.logged_in:
            self._login(data)
            return
        server = self.server
        if server is not None:
            server.transport.write(data)  # type: ignore[union-attr]
            return
        if data[0] == 0x58:  # Terminate
            self.transport.close()  # type: ignore[union-attr]
            return
        waiting = bool(self.pending)
        self.pending.append(data)
        if not waiting:
            self.pool.acquire(self)

    def _login(self, data: bytes) -> None:
        # SSLRequest or StartupMessage, each arriving whole (pgbench on loopback)
        if struct.unpack_from("!I", data, 4)[0] == _SSL_REQUEST:
            self.transport.write(b"N")  # type: ignore[union-attr]
            return
        self.logged_in = True
        self.transport.write(self.pool.welcome)  # type: ignore[union-attr]


async def serve(
    args: argparse.Namespace, servers: list[socket.socket], params: list[bytes]
) -> None:
    loop = asyncio.get_running_loop()
    welcome = (
        messages.authentication_ok()
        + b"".join(params)
        + messages.backend_key_data(os.getpid(), b"\0\0\0\1")
        + messages.ready_for_query("I")
    )
    pool = Pool(welcome)
    for sock in servers:
        _, server = await loop.create_connection(lambda: Server(pool), sock=sock)
        pool.idle.append(server)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", args.listen_port))
    listener.listen(1024)
    await loop.create_server(lambda: Client(pool), sock=listener)
    await asyncio.Event().wait()


def run_worker(args: argparse.Namespace, pool_size: int) -> None:
    logins = [login_server(args) for _ in range(pool_size)]
    servers = [sock for sock, _ in logins]
    uvloop.run(serve(args, servers, logins[0][1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen-port", type=int, required=True)
    p.add_argument("--pg-port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--dbname", required=True)
    p.add_argument("--pool", type=int, default=12)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    # N processes on one port (SO_REUSEPORT), the pool split between them
    children = []
    for worker in range(1, args.workers):
        pid = os.fork()
        if pid == 0:
            run_worker(args, _share(args.pool, args.workers, worker))
            os._exit(0)
        children.append(pid)
    run_worker(args, _share(args.pool, args.workers, 0))


def _share(total: int, workers: int, worker: int) -> int:
    return total // workers + (1 if worker < total % workers else 0)


if __name__ == "__main__":
    main()

"""A deliberately evil PostgreSQL backend for fault tests (never a stand-in for PostgreSQL).

`EvilServer` listens on 127.0.0.1 at a free port and runs a script for every
connection pgmux opens to it. `EvilConn` speaks enough of the protocol for
the script to log pgmux in (trust, md5 or SCRAM-SHA-256, computed here with
hashlib, independently of pgmux's own code), to answer a few statements like
a healthy server (`serve`), and to misbehave: write any bytes, at any point,
then close. SSLRequest gets 'N'.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from pgmux.tempgres import free_port

USER = "evil"
PASSWORD = "evil-secret"
DBNAME = "evil"

Script = Callable[["EvilConn"], Awaitable[None]]
SCRAM_ITERATIONS = 4096

PARAMS = {
    "server_version": "17.2",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "application_name": "",
}


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def header(kind: bytes, length: int) -> bytes:
    """A header announcing LENGTH (the length word, which counts itself)."""
    return kind + struct.pack("!I", length)


def auth(code: int, data: bytes = b"") -> bytes:
    return msg(b"R", struct.pack("!I", code) + data)


def error(code: str = "XX000", text: str = "evil", severity: str = "ERROR") -> bytes:
    body = f"S{severity}\0V{severity}\0C{code}\0M{text}\0\0".encode()
    return msg(b"E", body)


def notice(text: str = "evil notice") -> bytes:
    return msg(b"N", f"SNOTICE\0VNOTICE\0C00000\0M{text}\0\0".encode())


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def parameter_status(name: str, value: str) -> bytes:
    return msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def row_description(name: str = "x", oid: int = 25) -> bytes:
    field = name.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, oid, -1, -1, 0)
    return msg(b"T", struct.pack("!h", 1) + field)


def data_row(value: bytes) -> bytes:
    return msg(b"D", struct.pack("!hi", 1, len(value)) + value)


def command_complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


class Scram:
    """The server side of one SCRAM-SHA-256 exchange; the evil parts are parameters."""

    def __init__(self, password: str = PASSWORD) -> None:
        self.salt = os.urandom(16)
        self.iterations = SCRAM_ITERATIONS
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, self.iterations)
        self.server_key = _hmac(salted, b"Server Key")
        self.client_first_bare = b""
        self.server_first = b""
        self.client_nonce = b""

    def first(self, client_first: bytes) -> bytes:
        self.client_first_bare = client_first[3:]  # after "n,,"
        attrs = dict(part.split(b"=", 1) for part in self.client_first_bare.split(b","))
        self.client_nonce = attrs[b"r"]
        nonce = self.client_nonce + base64.b64encode(os.urandom(18))
        salt = base64.b64encode(self.salt)
        self.server_first = b"r=" + nonce + b",s=" + salt + b",i=" + str(self.iterations).encode()
        return self.server_first

    def final(self, client_final: bytes) -> bytes:
        without_proof = client_final.rsplit(b",p=", 1)[0]
        auth_message = self.client_first_bare + b"," + self.server_first + b"," + without_proof
        return b"v=" + base64.b64encode(_hmac(self.server_key, auth_message))


class EvilConn:
    """One connection from pgmux, as the script sees it."""

    def __init__(self, server: EvilServer, index: int, reader: Any, writer: Any) -> None:
        self.server = server
        self.index = index  # 0 for the first connection pgmux opened
        self.reader: asyncio.StreamReader = reader
        self.writer: asyncio.StreamWriter = writer
        self.startup: dict[str, str] = {}
        self.requests: list[bytes] = []  # type bytes of every request message read

    # --- bytes ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def flush(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def close(self) -> None:
        """Send what is buffered, then close the socket."""
        await self.flush()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)

    async def read_message(self) -> tuple[bytes, bytes] | None:
        try:
            head = await self.reader.readexactly(5)
            (length,) = struct.unpack("!I", head[1:])
            body = await self.reader.readexactly(length - 4)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.requests.append(head[:1])
        return head[:1], body

    async def read_request(self) -> list[tuple[bytes, bytes]] | None:
        """Messages up to a Query, Sync or FunctionCall (None at EOF)."""
        got = []
        while True:
            message = await self.read_message()
            if message is None:
                return None
            if message[0] == b"X":
                return None
            got.append(message)
            if message[0] in (b"Q", b"S", b"F"):
                return got

    async def wait_closed_by_peer(self, timeout: float = 10) -> bool:
        """True when pgmux closes this connection within TIMEOUT."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    # --- login -----------------------------------------------------------------

    async def read_startup(self) -> bool:
        while True:
            try:
                (length,) = struct.unpack("!I", await self.reader.readexactly(4))
                body = await self.reader.readexactly(length - 4)
            except (asyncio.IncompleteReadError, ConnectionError):
                return False
            if body[:4] == struct.pack("!I", 80877103):  # SSLRequest
                self.send(b"N")
                continue
            parts = body[4:].split(b"\0")
            self.startup = {
                parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 2, 2)
            }
            return True

    async def authenticate(
        self,
        method: str = "",
        server_first: Callable[[Scram, bytes], bytes] | None = None,
        server_final: Callable[[Scram, bytes], bytes] | None = None,
    ) -> bool:
        """Up to and including AuthenticationOk (False if pgmux went away or failed)."""
        method = method or self.server.auth
        if not await self.read_startup():
            return False
        if method == "md5":
            salt = os.urandom(4)
            self.send(auth(5, salt))
            reply = await self.read_message()
            if reply is None:
                return False
            inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest()
            expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
            if reply[1].rstrip(b"\0").decode() != expected:
                self.send(error("28P01", "password authentication failed", "FATAL"))
                return False
        elif method == "scram" and not await self._scram(server_first, server_final):
            return False
        self.send(auth(0))
        return True

    async def _scram(
        self,
        server_first: Callable[[Scram, bytes], bytes] | None,
        server_final: Callable[[Scram, bytes], bytes] | None,
    ) -> bool:
        scram = Scram()
        self.send(auth(10, b"SCRAM-SHA-256\0\0"))
        initial = await self.read_message()
        if initial is None:
            return False
        _mechanism, rest = initial[1].split(b"\0", 1)
        client_first = rest[4:]
        proper_first = scram.first(client_first)
        first = server_first(scram, proper_first) if server_first else proper_first
        scram.server_first = first
        self.send(auth(11, first))
        final = await self.read_message()
        if final is None:
            return False
        proper_final = scram.final(final[1])
        last = server_final(scram, proper_final) if server_final else proper_final
        if last:  # b"": straight on to AuthenticationOk, proving nothing
            self.send(auth(12, last))
        return True

    def welcome(self, status: bytes = b"I") -> None:
        """ParameterStatus for every parameter, BackendKeyData, ReadyForQuery."""
        for name, value in PARAMS.items():
            self.send(parameter_status(name, value))
        self.send(msg(b"K", struct.pack("!I", 7000 + self.index) + os.urandom(4)))
        self.send(ready(status))

    async def login(self, method: str = "") -> bool:
        if not await self.authenticate(method):
            return False
        self.welcome()
        await self.flush()
        return True

    # --- a healthy server --------------------------------------------------------

    def answer(self, request: list[tuple[bytes, bytes]]) -> None:
        """What PostgreSQL would say: one text row for a query, completions for
        the extended protocol, ReadyForQuery at the end."""
        for kind, body in request:
            if kind == b"Q":
                sql = body.rstrip(b"\0").strip().lower()
                if not sql:
                    self.send(msg(b"I"))
                elif sql.startswith((b"select", b"show")):
                    self.send(row_description() + data_row(b"ok") + command_complete("SELECT 1"))
                else:
                    self.send(command_complete(sql.split()[0].upper().decode()))
                self.send(ready())
            elif kind == b"P":
                self.send(msg(b"1"))
            elif kind == b"B":
                self.send(msg(b"2"))
            elif kind == b"D":
                self.send(msg(b"t", b"\0\0") if body[:1] == b"S" else b"")
                self.send(row_description())
            elif kind == b"E":
                self.send(data_row(b"ok") + command_complete("SELECT 1"))
            elif kind == b"C":
                self.send(msg(b"3"))
            elif kind == b"S":
                self.send(ready())

    async def serve(self) -> None:
        """Answer requests as a healthy server until pgmux goes away."""
        while (request := await self.read_request()) is not None:
            self.answer(request)
            await self.flush()
        await self.close()


async def healthy(conn: EvilConn) -> None:
    if await conn.login():
        await conn.serve()


class EvilServer:
    """A listening fake backend; SCRIPT runs for every connection."""

    def __init__(self, script: Script = healthy, auth: str = "trust") -> None:
        self.script = script
        self.auth = auth
        self.port = free_port()
        self.conns: list[EvilConn] = []
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> EvilServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            conn.writer.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = EvilConn(self, len(self.conns), reader, writer)
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken script must fail its test, not vanish
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            writer.close()

    def database(self, **overrides: Any) -> dict[str, Any]:
        """A `databases:` entry of pgmux's config pointing at this server."""
        entry: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "dbname": DBNAME,
            "user": USER,
            "password": PASSWORD,
        }
        entry.update(overrides)
        return entry

"""Small helpers shared by the pgmux acceptance tests (tests/test_core_*.py).

Everything here talks to a real PostgreSQL, either through pgmux (`connect_*`)
or directly (`direct`), or speaks the wire protocol by hand (`RawClient`) for
the tests that must send what no driver would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import psycopg
import pytest
from scramp import ScramClient

APP_DB = "appdb"
APP_USER = "app"
APP_PASSWORD = "app-secret"

T = TypeVar("T")


class Endpoint(Protocol):
    """What the helpers need of a PgmuxProcess (host and TCP port)."""

    host: str
    port: int


class Mux(Endpoint, Protocol):
    """A running pgmux as the `pgmux` fixture returns it (conftest.PgmuxProcess)."""

    pid: int

    def logs(self) -> str: ...


# The `pgmux` fixture: pgmux(config=None, users=None, env=None) -> Mux.
PgmuxFactory = Callable[..., Any]


def conftest_attr(config: pytest.Config, name: str) -> Any:
    """An attribute of tests/conftest.py, e.g. REMOVE.

    `from conftest import ...` is not safe: pytest imports every conftest.py of a
    directory without __init__.py under the module name "conftest", so which one
    that name means depends on collection order. The plugin manager knows.
    """
    path = Path(__file__).with_name("conftest.py").resolve()
    for plugin in config.pluginmanager.get_plugins():
        file = getattr(plugin, "__file__", None)
        if file and Path(file).resolve() == path:
            return getattr(plugin, name)
    raise LookupError(f"{path} is not loaded")


class Cluster(Protocol):
    """What the helpers need of the `pg` fixture (pgmux.tempgres.TempPostgres)."""

    host: str
    port: int
    superuser: str
    password: str

    def sql(self, query: str, dbname: str = ...) -> str: ...


_counter = itertools.count()


def unique(prefix: str) -> str:
    """A name no other test in this session uses (for schemas, tables, databases)."""
    return f"{prefix}_{os.getpid()}_{next(_counter)}"


# -- drivers --------------------------------------------------------------------


async def connect_asyncpg(
    mux: Endpoint,
    dbname: str = APP_DB,
    user: str = APP_USER,
    password: str = APP_PASSWORD,
    **kwargs: Any,
) -> asyncpg.Connection:
    """asyncpg through pgmux; unnamed statements unless statement_cache_size is given."""
    kwargs.setdefault("timeout", 15)
    kwargs.setdefault("statement_cache_size", 0)
    return await asyncpg.connect(
        host=mux.host,
        port=mux.port,
        user=user,
        password=password,
        database=dbname,
        **kwargs,
    )


async def connect_psycopg(
    mux: Endpoint,
    dbname: str = APP_DB,
    user: str = APP_USER,
    password: str = APP_PASSWORD,
    **kwargs: Any,
) -> psycopg.AsyncConnection[Any]:
    """psycopg 3 through pgmux: autocommit, server-side prepared only if prepare_threshold given."""
    kwargs.setdefault("autocommit", True)
    kwargs.setdefault("prepare_threshold", None)
    kwargs.setdefault("connect_timeout", 15)
    return await psycopg.AsyncConnection.connect(
        host=mux.host,
        port=mux.port,
        user=user,
        password=password,
        dbname=dbname,
        **kwargs,
    )


async def direct(pg: Cluster, dbname: str = "postgres") -> asyncpg.Connection:
    """A superuser connection straight to PostgreSQL, bypassing pgmux."""
    return await asyncpg.connect(
        host=pg.host,
        port=pg.port,
        user=pg.superuser,
        password=pg.password,
        database=dbname,
        timeout=15,
    )


async def close_quietly(*conns: Any) -> None:
    for conn in conns:
        if conn is None:
            continue
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)


# -- pg_stat_activity -------------------------------------------------------------

BACKENDS_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = ANY($1::text[])
"""


async def server_connections(conn: asyncpg.Connection, *datnames: str) -> int:
    """Client backends (i.e. pgmux's server connections) in the given databases."""
    return int(await conn.fetchval(BACKENDS_SQL, list(datnames)))


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    predicate: Callable[[T], bool],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll PROBE until PREDICATE holds on its result; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if predicate(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached in {timeout}s; last value: {value!r}")
        await asyncio.sleep(interval)


# -- a bystander ------------------------------------------------------------------


@dataclass
class Bystander:
    """A client that keeps running queries; used to show that others are unaffected."""

    conn: asyncpg.Connection
    ok: int = 0
    errors: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                got = await asyncio.wait_for(self.conn.fetchval("SELECT $1::int * 2", i), 10)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            if got != i * 2:
                self.errors.append(f"SELECT {i}*2 returned {got!r}")
                return
            self.ok += 1
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def bystander(mux: Endpoint) -> AsyncIterator[Bystander]:
    """Run a Bystander for the duration of the block; assert it never failed."""
    conn = await connect_asyncpg(mux)
    by = Bystander(conn)
    stop = asyncio.Event()
    task = asyncio.create_task(by.run(stop))
    try:
        yield by
        await asyncio.sleep(0.2)  # let it run a few queries after the last disturbance
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await close_quietly(conn)
    assert not by.errors, f"the bystander client was affected: {by.errors}"
    assert by.ok > 0, "the bystander client never completed a query"
    # ...and it still works afterwards.
    conn = await connect_asyncpg(mux)
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await close_quietly(conn)


# -- the wire protocol by hand ----------------------------------------------------

PROTOCOL_V3 = 196608


def startup_packet(params: dict[str, str], protocol: int = PROTOCOL_V3) -> bytes:
    body = struct.pack("!I", protocol)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body -> {'S': 'ERROR', 'C': '28P01', 'M': ...}."""
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


class ServerError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C')} {fields.get('M')}")
        self.fields = fields
        self.sqlstate = fields.get("C", "")
        self.message = fields.get("M", "")


@dataclass
class QueryResult:
    rows: list[list[str | None]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    status: str = ""  # transaction status from ReadyForQuery


class RawClient:
    """A PostgreSQL client written by hand on asyncio streams, for hostile tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.negotiation: bytes | None = None  # a NegotiateProtocolVersion body, if any
        self.backend_key: tuple[int, bytes] | None = None  # BackendKeyData (pid, key)

    @classmethod
    async def open(cls, mux: Endpoint) -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(mux.host, mux.port), 10)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_message(self, timeout: float = 10) -> tuple[bytes, bytes] | None:
        """The next (type, body); None when the peer closed the connection."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(5), timeout)
            (length,) = struct.unpack("!I", header[1:])
            body = await asyncio.wait_for(self.reader.readexactly(length - 4), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return header[:1], body

    async def read_until_closed(self, timeout: float = 10) -> list[tuple[bytes, bytes]]:
        """Every message until EOF; TimeoutError if the peer keeps the connection open."""
        messages = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"connection still open after {timeout}s: got {messages!r}")
            msg = await self.read_message(remaining)
            if msg is None:
                return messages
            messages.append(msg)

    async def login(
        self,
        user: str,
        password: str,
        database: str,
        *,
        protocol: int = PROTOCOL_V3,
        extra: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """Startup + authentication (cleartext, md5 or SCRAM-SHA-256) up to ReadyForQuery.

        Returns the ParameterStatus values; raises ServerError on ErrorResponse.
        """
        startup = {"user": user, "database": database, **(extra or {})}
        await self.send(startup_packet(startup, protocol))
        params: dict[str, str] = {}
        scram: ScramClient | None = None
        while True:
            msg = await self.read_message()
            if msg is None:
                raise ConnectionError("closed during login")
            kind, body = msg
            if kind == b"E":
                raise ServerError(error_fields(body))
            if kind == b"S":
                name, value, _ = body.split(b"\0", 2)
                params[name.decode()] = value.decode()
            elif kind == b"Z":
                return params
            elif kind == b"v":
                self.negotiation = body
            elif kind == b"K":
                self.backend_key = (struct.unpack("!I", body[:4])[0], body[4:])
            elif kind == b"R":
                scram = await self._auth_step(body, user, password, scram)

    async def _auth_step(
        self, body: bytes, user: str, password: str, scram: ScramClient | None
    ) -> ScramClient | None:
        (code,) = struct.unpack("!I", body[:4])
        data = body[4:]
        if code == 3:  # cleartext
            await self.send(message(b"p", password.encode() + b"\0"))
        elif code == 5:  # md5
            inner = hashlib.md5((password + user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + data).hexdigest()
            await self.send(message(b"p", b"md5" + outer.encode() + b"\0"))
        elif code == 10:  # SASL
            mechanisms = [m.decode() for m in data.split(b"\0") if m]
            scram = ScramClient(mechanisms, user, password)
            first = scram.get_client_first().encode()
            mech = scram.mechanism_name.encode()
            await self.send(message(b"p", mech + b"\0" + struct.pack("!i", len(first)) + first))
        elif code == 11:  # SASLContinue
            assert scram is not None
            scram.set_server_first(data.decode())
            await self.send(message(b"p", scram.get_client_final().encode()))
        elif code == 12:  # SASLFinal
            assert scram is not None
            scram.set_server_final(data.decode())
        elif code != 0:
            raise AssertionError(f"unsupported authentication request {code}")
        return scram

    async def query(self, sql: str, timeout: float = 10) -> QueryResult:
        """Simple Query: collect rows, command tags and errors up to ReadyForQuery."""
        await self.send(query_message(sql))
        result = QueryResult()
        while True:
            msg = await self.read_message(timeout)
            if msg is None:
                raise ConnectionError(f"closed while running {sql!r}: {result!r}")
            kind, body = msg
            if kind == b"D":
                result.rows.append(_data_row(body))
            elif kind == b"C":
                result.tags.append(body.rstrip(b"\0").decode())
            elif kind == b"E":
                result.errors.append(error_fields(body))
            elif kind == b"Z":
                result.status = body.decode()
                return result

    async def read_until_ready(self, timeout: float = 10) -> list[tuple[bytes, bytes]]:
        """Every message up to and including the next ReadyForQuery."""
        replies = []
        while True:
            msg = await self.read_message(timeout)
            if msg is None:
                raise ConnectionError(f"closed before ReadyForQuery: {replies!r}")
            replies.append(msg)
            if msg[0] == b"Z":
                return replies

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def _data_row(body: bytes) -> list[str | None]:
    (count,) = struct.unpack("!H", body[:2])
    values: list[str | None] = []
    pos = 2
    for _ in range(count):
        (length,) = struct.unpack("!i", body[pos : pos + 4])
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode())
            pos += length
    return values


def assert_error_or_closed(messages: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """What a hostile client may get: nothing but a close, or ErrorResponse(s) then close.

    Returns the fields of the first ErrorResponse, if any.
    """
    kinds = [kind for kind, _ in messages]
    # 'N' (notices) are harmless; anything else (auth requests, rows) means the
    # garbage was taken for a valid conversation.
    assert set(kinds) <= {b"E", b"N"}, f"expected only ErrorResponse before the close: {messages!r}"
    for kind, body in messages:
        if kind == b"E":
            return error_fields(body)
    return None


def fresh_database(pg: Any) -> str:
    """A new empty database owned by `app`, so pg_stat_activity counts see only this test."""
    name = unique("db")
    pg.create_database(name, owner=APP_USER)
    return name

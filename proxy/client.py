"""A connection from an application to pgmux (PgBouncer's client.c).

Login: startup packet, authentication, then the welcome (ParameterStatus,
BackendKeyData, ReadyForQuery). After that the hot path: scan message
headers to count the requests that will each end in a ReadyForQuery (Query,
Sync, FunctionCall), then forward the whole chunk to the linked server with
one write. Without a linked server, bytes wait here while the pool finds one.
"""

from __future__ import annotations

import asyncio
import enum
import time
from struct import Struct
from typing import TYPE_CHECKING

from pgmux.protocol import messages, sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
)

from . import varcache
from .auth import ClientAuth
from .log import get_logger
from .tasks import spawn
from .server import ServerConnection, ServerError, ServerLost

if TYPE_CHECKING:
    from .pool import Pool
    from .registry import Registry

log = get_logger("pgmux.client")

_LENGTH = Struct("!I").unpack_from
_QUERY = ord("Q")
_SYNC = ord("S")
_FUNCTION_CALL = ord("F")
_TERMINATE = ord("X")
_COPY_DATA = ord("d")
_COPY_DONE = ord("c")
_COPY_FAIL = ord("f")
_PASSWORD = ord("p")

# Messages after which the server owes nothing until a Sync arrives.
_NO_BATCH = frozenset((_QUERY, _SYNC, _FUNCTION_CALL, _COPY_DATA, _COPY_DONE, _COPY_FAIL))

# Pause reading a client that piles up this much while it waits for a server.
_PENDING_LIMIT = 1 << 20


class Phase(enum.Enum):
    STARTUP = "startup"
    AUTH = "auth"
    WELCOME = "welcome"  # authenticated, waiting for a server's parameters
    READY = "ready"
    CLOSED = "closed"


class ClientConnection(asyncio.Protocol):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.config = registry.config
        self.transport: asyncio.Transport | None = None
        self.phase = Phase.STARTUP
        self.peer = ""
        self.connected_at = time.monotonic()
        self.user = ""
        self.dbname = ""
        self.application_name = ""
        self.pool: Pool | None = None
        self.server: ServerConnection | None = None
        self.cancel_pid = 0
        self.cancel_key = b""
        # what the client wants its session to look like
        self.params: dict[str, str] = {}  # reported parameters
        self.gucs: dict[str, str] = {}  # other startup GUCs
        self._startup_gucs: dict[str, str] = {}
        # request accounting, read by the server's hot path
        self.expect_rfq = 0
        self.in_batch = False
        self.release_on_idle = True
        self.wait_started = 0.0
        self._waiting = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._skip = 0
        self._header = b""
        self._max_packet = self.config.limits.max_packet_size
        self._startup = StartupReader()
        self._reader: MessageReader | None = None
        self._auth: ClientAuth | None = None
        self._linking = False

    # --- connection ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.registry.add_client(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._closed("client closed the connection" if exc is None else str(exc))

    def _closed(self, reason: str) -> None:
        was_ready = self.phase is Phase.READY
        self.phase = Phase.CLOSED
        self.registry.remove_client(self)
        pool = self.pool
        if pool is not None:
            pool.clients.discard(self)
            if self._waiting:
                pool.cancel_wait(self)
                self._waiting = False
            server = self.server
            if server is not None:
                self.server = None
                pool.abandon(server, self)
        if was_ready:
            log.info("logout", reason=reason, duration=round(time.monotonic() - self.connected_at, 3),
                     **self.log_fields())

    def log_fields(self) -> dict[str, str]:
        return {
            "client": self.peer,
            "db": self.dbname,
            "user": self.user,
            "application_name": self.application_name,
        }

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def fail(self, code: str, message: str, severity: str = "FATAL") -> None:
        """Send an ErrorResponse and close this client (nobody else notices)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(messages.error_response(code, message, severity=severity))
            self.transport.close()
        if self.phase is not Phase.CLOSED:
            self._closed(message)

    # --- hot path ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.phase is not Phase.READY:
            self._login_received(data)
            return
        try:
            terminate_at = self._scan(data)
        except ProtocolError as exc:
            self.fail(exc.sqlstate, exc.message)
            return
        if terminate_at >= 0:
            data = data[:terminate_at]
        server = self.server
        if server is not None and not self._linking:
            if data:
                server.transport.write(data)  # type: ignore[union-attr]
        elif data:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > _PENDING_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            if server is None and not self._waiting:
                self._request_server()
        if terminate_at >= 0:
            self._terminate()

    def _scan(self, data: bytes) -> int:
        """Walk the message headers of a chunk; return where a Terminate starts, or -1."""
        n = len(data)
        pos = self._skip
        if self._header:
            pos = self._complete_header(data)
            if pos < 0:
                return -1
        while pos + 5 <= n:
            kind = data[pos]
            length = _LENGTH(data, pos + 1)[0]
            if length < 4 or length > self._max_packet:
                raise _bad_length(length, self._max_packet)
            if kind in _NO_BATCH:
                if kind != _COPY_DATA and kind != _COPY_DONE and kind != _COPY_FAIL:
                    self.expect_rfq += 1
                self.in_batch = False
            elif kind == _TERMINATE:
                self._skip = 0
                return pos
            else:
                self.in_batch = True
            pos += 1 + length
        if pos < n:
            self._header = data[pos:]
            self._skip = 0
        else:
            self._skip = pos - n
        return -1

    def _complete_header(self, data: bytes) -> int:
        """A header split across chunks (rare): finish it, return the next message's offset."""
        have = self._header
        need = 5 - len(have)
        if len(data) < need:
            self._header = have + data
            return -1
        header = have + data[:need]
        self._header = b""
        kind = header[0]
        length = _LENGTH(header, 1)[0]
        if length < 4 or length > self._max_packet:
            raise _bad_length(length, self._max_packet)
        if kind == _TERMINATE:
            return 0
        if kind in _NO_BATCH:
            if kind != _COPY_DATA and kind != _COPY_DONE and kind != _COPY_FAIL:
                self.expect_rfq += 1
            self.in_batch = False
        else:
            self.in_batch = True
        return 1 + length - len(have)

    @property
    def mid_message(self) -> bool:
        return bool(self._skip or self._header)

    def _terminate(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._closed("client sent Terminate")

    # --- getting and giving back a server --------------------------------

    def _request_server(self) -> None:
        assert self.pool is not None
        self._waiting = True
        self.pool.acquire(self)

    def server_assigned(self, server: ServerConnection) -> None:
        """The pool links a server to this client (now or after a wait)."""
        self._waiting = False
        self._linking = False
        self.server = server
        if self.phase is Phase.WELCOME:
            self._welcome_server(server)
            return
        statement = varcache.sync_statement(self.params, self.gucs, server.params, server.applied)
        if statement is None:
            self._flush_pending(server)
        else:
            self._linking = True
            spawn(self._sync_then_flush(server, statement))

    async def _sync_then_flush(self, server: ServerConnection, statement: str) -> None:
        try:
            await server.query(statement, self.pool.timeouts.server_connect if self.pool else None)
        except ServerError as exc:
            self._linking = False
            log.warning("parameter_sync_failed", error=str(exc), **self.log_fields())
            self.server = None
            if self.pool is not None:
                self.pool.release(server)
            self.fail(exc.sqlstate, str(exc))
            return
        except ServerLost:
            self._linking = False
            return  # server_lost already told the client
        server.applied = dict(self.gucs)
        # The server now holds the client's values in PostgreSQL's own spelling.
        for name in self.params:
            if name in server.params:
                self.params[name] = server.params[name]
        self._linking = False
        if self.server is server and self.phase is Phase.READY:
            server.resume_hot_path()
            self._flush_pending(server)

    def _flush_pending(self, server: ServerConnection) -> None:
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending.clear()
            self._pending_size = 0
            server.transport.write(data)  # type: ignore[union-attr]
            if self.transport is not None:
                self.transport.resume_reading()
        elif self.expect_rfq <= 0 and not self.in_batch:
            # Nothing to run (a wait for the welcome, or an empty request).
            self.transaction_done(server)

    def transaction_done(self, server: ServerConnection) -> None:
        """The server said ReadyForQuery(I) and owes this client nothing more."""
        if not self.release_on_idle:
            return
        self.server = None
        self.expect_rfq = 0
        pool = self.pool
        assert pool is not None
        pool.stats.total_xact_count += 1
        pool.stats.total_xact_time += time.monotonic() - server.linked_at
        pool.release(server)
        if self._pending and not self._waiting:
            self._request_server()

    def stats_query_done(self) -> None:
        pool = self.pool
        if pool is not None:
            pool.stats.total_query_count += 1

    def server_parameter(self, name: str, value: str) -> None:
        """The server reported a parameter change made by this client (SET ...)."""
        if name not in varcache.READ_ONLY_REPORTED:
            self.params[name] = value
            if name == "application_name":
                self.application_name = value

    def server_lost(self, server: ServerConnection) -> None:
        if self.server is server:
            self.server = None
            self.fail(sqlstate.CONNECTION_FAILURE, "server conn crashed?")

    def wait_failed(self, code: str, message: str) -> None:
        """The pool gives up finding a server for this client (query_wait_timeout...)."""
        self._waiting = False
        log.info("wait_failed", error=message, **self.log_fields())
        self.fail(code, message)

    # --- login ------------------------------------------------------------

    def _login_received(self, data: bytes) -> None:
        try:
            if self.phase is Phase.STARTUP:
                self._startup_received(data)
            elif self.phase is Phase.AUTH:
                self._auth_received(data)
            elif self.phase is Phase.WELCOME:
                self._early_data(data)
        except ProtocolError as exc:
            log.info("login_failed", error=exc.message, sqlstate=exc.sqlstate,
                     **self.log_fields())
            self.fail(exc.sqlstate, exc.message)

    def _early_data(self, data: bytes) -> None:
        # A client that pipelines its first query before the welcome: keep it.
        self._pending.append(data)

    def _startup_received(self, data: bytes) -> None:
        self._startup.feed(data)
        while self.phase is Phase.STARTUP:
            event = self._startup.next_event()
            if event is None:
                return
            if isinstance(event, SSLRequest | GSSENCRequest):
                self.send(b"N")  # TLS arrives with the tls module; plain for now
            elif isinstance(event, CancelRequest):
                self.registry.cancel(event.pid, event.key)
                self.transport.close()  # type: ignore[union-attr]
                self._closed("cancel request")
                return
            elif isinstance(event, StartupMessage):
                self._startup_message(event)
                rest = self._startup.take_remaining()
                if rest and self.phase is Phase.AUTH:
                    self._auth_received(rest)

    def _startup_message(self, startup: StartupMessage) -> None:
        params = startup.params
        self.user = params.get("user", "")
        self.dbname = params.get("database") or self.user
        self.application_name = params.get("application_name", "")
        if len(self.registry.clients) > self.config.listen.max_client_conn:
            raise ProtocolError(
                "no more connections allowed (max_client_conn)", sqlstate.TOO_MANY_CONNECTIONS
            )
        database = self.config.database(self.dbname)
        if database is None:
            raise ProtocolError(f"no such database: {self.dbname}", sqlstate.INVALID_CATALOG_NAME)
        try:
            ignore = frozenset(p.lower() for p in self.config.ignore_startup_parameters)
            self._startup_gucs = varcache.startup_gucs(params, ignore)
        except varcache.StartupParameterError as exc:
            raise ProtocolError(str(exc), sqlstate.PROTOCOL_VIOLATION) from None
        self._database = database
        self._auth = ClientAuth(
            self.config.auth.type, self.user, self.registry.users.get(self.user), self.registry
        )
        self.phase = Phase.AUTH
        self._reader = MessageReader(max_size=self.config.limits.max_packet_size)
        first = self._auth.start()
        if first is None:
            self._authenticated()
        else:
            self.send(first)

    def _auth_received(self, data: bytes) -> None:
        assert self._reader is not None and self._auth is not None
        self._reader.feed(data)
        while self.phase is Phase.AUTH:
            message = self._reader.next_message()
            if message is None:
                return
            kind, body = message
            if kind != _PASSWORD:
                raise ProtocolError(
                    f"expected password response, got message type {chr(kind)!r}",
                    sqlstate.PROTOCOL_VIOLATION,
                )
            reply, finished = self._auth.handle(body)
            if reply is not None:
                self.send(reply)
            if finished:
                self._authenticated()

    def _authenticated(self) -> None:
        self.send(messages.authentication_ok())
        self.registry.logging_in.discard(self)
        pool = self.registry.pool_for(self.dbname, self._database, self.user)
        self.pool = pool
        pool.clients.add(self)
        self.release_on_idle = pool.mode == "transaction"
        leftover = self._reader.take_remaining() if self._reader else b""  # type: ignore[attr-defined]
        if leftover:
            self._pending.append(leftover)
        if pool.server_params is None or not self.release_on_idle:
            # Need a server's parameters first (or a server for the session).
            self.phase = Phase.WELCOME
            self._request_server()
        else:
            self._welcome(pool.server_params)

    def _welcome_server(self, server: ServerConnection) -> None:
        pool = self.pool
        assert pool is not None
        if pool.server_params is None:
            pool.server_params = dict(server.params)
        params = pool.server_params
        if self.release_on_idle:
            self.server = None
            pool.release(server)
            self._welcome(params)
            return
        # Session mode keeps the server: hold the client's bytes until the
        # session parameters are in line, then forward them.
        self._linking = True
        self._welcome(params)
        self.server_assigned(server)

    def _welcome(self, server_params: dict[str, str]) -> None:
        self.params, self.gucs = varcache.split_by_reported(self._startup_gucs, server_params)
        self.application_name = self.params.get("application_name", self.application_name)
        self.cancel_pid, self.cancel_key = self.registry.issue_cancel_key(self)
        out = [messages.parameter_status(k, v) for k, v in server_params.items()
               if k not in self.params]
        out += [messages.parameter_status(k, v) for k, v in self.params.items()]
        out.append(messages.backend_key_data(self.cancel_pid, self.cancel_key))
        out.append(messages.ready_for_query("I"))
        self.send(b"".join(out))
        self.phase = Phase.READY
        log.info("login", **self.log_fields())
        if self._pending:
            pending = b"".join(self._pending)
            self._pending.clear()
            self.data_received(pending)


def _bad_length(length: int, limit: int) -> ProtocolError:
    if length > limit:
        return ProtocolError(
            f"message of {length} bytes exceeds max_packet_size ({limit})",
            sqlstate.PROGRAM_LIMIT_EXCEEDED,
        )
    return ProtocolError(f"invalid message length {length}", sqlstate.PROTOCOL_VIOLATION)

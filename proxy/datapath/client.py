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
from pgmux.protocol.errors import AuthError, ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
)
from pgmux.proxy.base import ids
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.stats import GLOBAL
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import ADMIN_DATABASES
from pgmux.proxy.config.hba import Connection
from pgmux.proxy.config.tls import ClientTls, peer_common_name
from pgmux.proxy.console.session import open_console
from pgmux.proxy.datapath import session_state, varcache
from pgmux.proxy.datapath.auth import ClientAuth
from pgmux.proxy.datapath.server import ServerConnection, ServerError, ServerLost
from pgmux.proxy.datapath.translator import Translator

if TYPE_CHECKING:
    import ssl

    from pgmux.proxy.config import DatabaseConfig
    from pgmux.proxy.console.session import AdminSession
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.registry import Registry

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
_IDLE = ord("I")
_FLUSH = ord("H")

# Messages after which the server owes nothing until a Sync arrives.
_NO_BATCH = frozenset((_QUERY, _SYNC, _FUNCTION_CALL, _COPY_DATA, _COPY_DONE, _COPY_FAIL))

# Pause reading a client that piles up this much while it waits for a server.
_PENDING_LIMIT = 1 << 20


class Phase(enum.Enum):
    STARTUP = "startup"
    AUTH = "auth"
    WELCOME = "welcome"  # authenticated, waiting for a server's parameters
    READY = "ready"
    ADMIN = "admin"  # a console session (proxy/admin.py) owns the connection
    CLOSED = "closed"


# Globals for the hot path: an Enum member or a module attribute costs a lookup more.
_READY = Phase.READY
_WELCOME = Phase.WELCOME
_monotonic = time.monotonic


class ClientConnection(asyncio.Protocol):
    # Slots, the data path's first: with hundreds of clients each one is cold in
    # the CPU cache when its turn comes, and these share a few cache lines.
    __slots__ = (  # noqa: RUF023  (in order of use, not sorted)
        "phase",
        "expect_rfq",
        "in_batch",
        "_skip",
        "_header",
        "_max_packet",
        "last_active",
        "pool",
        "query_started",
        "xact_started",
        "server",
        "_linking",
        "translator",
        "_pending",
        "_pending_size",
        "_reading_paused",
        "transport",
        "_waiting",
        "wait_started",
        "query_mark",
        "release_on_idle",
        "pinned",
        "statement_mode",
        "params",
        "gucs",
        # the rest: login, console, timeouts
        "registry",
        "config",
        "peer",
        "connected_at",
        "user",
        "dbname",
        "application_name",
        "cancel_pid",
        "cancel_key",
        "_startup_gucs",
        "idle_mark",
        "query_cancelled",
        "cancel_sent_at",
        "id",
        "console",
        "_database",
        "_startup",
        "_reader",
        "_auth",
        "tls",
        "_tls_early",
        "_counted",
    )

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
        self.statement_mode = False
        self.translator: Translator | None = None  # transaction mode's rewriting
        self.pinned: set[str] = set()  # session state that keeps the server (session_state.py)
        self.wait_started = 0.0
        # for the janitor's timeouts: when the client last sent something, when
        # its latest request was sent, and which request a query_timeout cancelled
        self.last_active = self.connected_at
        self.query_started = 0.0
        self.idle_mark = 0.0
        self.query_cancelled = 0.0
        self.cancel_sent_at = 0.0
        self.id = ids.next_client_id()  # SHOW CLIENTS id, KILL_CLIENT's argument
        self.xact_started = 0.0  # first request of the transaction in progress
        self.query_mark = 0.0  # the last ReadyForQuery, or when the server was linked
        self.console: AdminSession | None = None
        self._database: DatabaseConfig | None = None
        self._waiting = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._reading_paused = False  # by the _PENDING_LIMIT backpressure
        self._skip = 0
        self._header = b""
        self._max_packet = self.config.limits.max_packet_size
        self._startup = StartupReader()
        self._reader: MessageReader | None = None
        self._auth: ClientAuth | None = None
        self._linking = False
        # TLS: the side's settings in use, and what arrives during the handshake
        self.tls: ClientTls | None = None
        self._tls_early: list[bytes] | None = None
        self._counted = False  # in max_db/max_user_client_connections

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
        was_ready = self.phase is Phase.READY or self.phase is Phase.ADMIN
        self.phase = Phase.CLOSED
        self.registry.remove_client(self)
        if self._counted:
            self._release_client_slot()
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
            duration = round(time.monotonic() - self.connected_at, 3)
            log.info("logout", reason=reason, duration=duration, **self.log_fields())

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
        if self.phase is not _READY:
            self._login_received(data)
            return
        requests = self.expect_rfq
        n = len(data)
        if (
            data[0] == _QUERY
            and n > 5
            and not self._skip
            and not self._header
            and n == 1 + _LENGTH(data, 1)[0]
            and n <= self._max_packet
        ):
            # The usual chunk, one whole Query: what _scan would find, without the call.
            self.expect_rfq = requests + 1
            self.in_batch = False
            terminate_at = -1
        else:
            try:
                terminate_at = self._scan(data)
            except ProtocolError as exc:
                self.fail(exc.sqlstate, exc.message)
                return
        self.last_active = now = _monotonic()
        self.pool.stats.total_received += n  # type: ignore[union-attr]
        if self.expect_rfq != requests:
            self.query_started = now
            if not self.xact_started:
                self.xact_started = now
        if terminate_at >= 0:
            data = data[:terminate_at]
        server = self.server
        if server is not None and not self._linking:
            if data:
                translator = self.translator
                if translator is not None:
                    data = translator.translate(data, server)
                server.transport.write(data)  # type: ignore[union-attr]
        elif data:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > _PENDING_LIMIT and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True
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
            elif kind != _FLUSH:  # Flush asks for output; it opens no batch
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
        elif kind != _FLUSH:
            self.in_batch = True
        return 1 + length - len(have)

    @property
    def running(self) -> bool:
        """A request of this client is queued, being linked or on a server."""
        return (
            self.expect_rfq > 0
            or self.in_batch
            or self._waiting
            or self._linking
            or bool(self._pending)
        )

    @property
    def database(self) -> DatabaseConfig | None:
        """The configuration entry of the database it asked for (once known)."""
        return self._database

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
        self.query_mark = server.linked_at
        if self.phase is _WELCOME:
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
        pending = self._pending
        if pending:
            data = b"".join(pending) if len(pending) > 1 else pending[0]
            pending.clear()
            self._pending_size = 0
            translator = self.translator
            if translator is not None:
                data = translator.translate(data, server)
            server.transport.write(data)  # type: ignore[union-attr]
            if self._reading_paused:
                self._reading_paused = False
                if self.transport is not None:
                    self.transport.resume_reading()
        if self.expect_rfq <= 0 and not self.in_batch and not self.mid_message:
            # Nothing the server will answer: a wait for the welcome, an empty
            # request, or a lone Flush (psycopg sends one after a pipeline).
            # No ReadyForQuery would ever give this server back.
            self.transaction_done(server)

    def transaction_done(self, server: ServerConnection, now: float = 0.0) -> None:
        """The server said ReadyForQuery(I) and owes this client nothing more.

        `now` is when that ReadyForQuery was read (0: read the clock here).
        """
        pool = self.pool
        assert pool is not None
        started = self.xact_started
        if started:  # a transaction ran (not just an empty request)
            linked = server.linked_at
            pool.stats.add_xact((now or _monotonic()) - (started if started > linked else linked))
            self.xact_started = 0.0
        if not self.release_on_idle or self.pinned:
            return  # session mode, or session state pins the server to this client
        self.server = None
        self.expect_rfq = 0
        pool.release(server, now)  # resets session state first if the server has any
        if self._pending and not self._waiting:
            self._request_server()

    def _make_translator(self, pool: Pool) -> Translator | None:
        """Transaction mode rewrites extended-protocol traffic and tracks session state."""
        settings = pool.settings
        if pool.mode == "session":
            return None
        if settings.max_prepared_statements == 0 and settings.session_state == "ignore":
            return None  # plain forwarding, as PgBouncer without prepared statements
        return Translator(
            self.registry.statement_cache,
            settings.max_prepared_statements,
            settings.session_state,
            pool.stats,
        )

    def command_done(self, tag: bytes, text: bytes, server: ServerConnection) -> None:
        """A CommandComplete for this client (transaction mode): watch for session state."""
        session_state.observe(self, server, tag, text)

    def stats_query_done(self, now: float) -> None:
        # Called at each ReadyForQuery, read at `now`: a query ran from its
        # request (or the previous ReadyForQuery, or the link) until then.
        pool = self.pool
        if pool is not None:
            started = self.query_started
            mark = self.query_mark
            pool.stats.add_query(now - (started if started > mark else mark))
            self.query_mark = now
        if self.statement_mode and self.server is not None and self.server.tx_status != _IDLE:
            asyncio.get_running_loop().call_soon(self._transaction_in_statement_mode)

    def _transaction_in_statement_mode(self) -> None:
        # PgBouncer's statement mode forbids transaction blocks; the server is
        # rolled back and reused like any abandoned one.
        self.fail(
            sqlstate.ACTIVE_SQL_TRANSACTION,
            "transaction blocks are not allowed in statement pooling mode (pool.mode = statement)",
        )

    def server_parameter(self, name: str, value: str) -> None:
        """The server reported a parameter change made by this client (SET ...)."""
        if name not in varcache.READ_ONLY_REPORTED:
            self.params[name] = value
            if name == "application_name":
                self.application_name = value

    def server_lost(self, server: ServerConnection) -> None:
        if self.server is server:
            self.server = None
            if self.pool is not None:
                self.pool.stats.add_error("server_lost")
            self.fail(sqlstate.CONNECTION_FAILURE, "server conn crashed?")

    def wait_failed(self, code: str, message: str) -> None:
        """The pool gives up finding a server for this client (query_wait_timeout...)."""
        self._waiting = False
        log.info("wait_failed", error=message, **self.log_fields())
        self.fail(code, message)

    # --- login ------------------------------------------------------------

    def _login_received(self, data: bytes) -> None:
        if self._tls_early is not None:
            self._tls_early.append(data)  # decrypted before start_tls returned
            return
        try:
            if self.phase is Phase.STARTUP:
                self._startup_received(data)
            elif self.phase is Phase.AUTH:
                self._auth_received(data)
            elif self.phase is Phase.WELCOME:
                self._early_data(data)
            elif self.phase is Phase.ADMIN and self.console is not None:
                self.console.data_received(data)
        except ProtocolError as exc:
            self._login_failed(exc)

    def _login_failed(self, exc: ProtocolError) -> None:
        log.info("login_failed", error=exc.message, sqlstate=exc.sqlstate, **self.log_fields())
        GLOBAL.login_failed(exc.sqlstate)
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
            if isinstance(event, SSLRequest):
                if self._ssl_request():
                    return  # the handshake runs; the StartupMessage comes encrypted
            elif isinstance(event, GSSENCRequest):
                self.send(b"N")  # no GSSAPI encryption; the client goes on without
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
        if self.registry.client_total() > self.config.listen.max_client_conn:
            raise ProtocolError(
                "no more connections allowed (max_client_conn)", sqlstate.TOO_MANY_CONNECTIONS
            )
        console = self.dbname in ADMIN_DATABASES
        database = None if console else self.config.database(self.dbname)
        if database is None and not console:
            raise ProtocolError(f"no such database: {self.dbname}", sqlstate.INVALID_CATALOG_NAME)
        try:
            ignore = frozenset(p.lower() for p in self.config.ignore_startup_parameters)
            self._startup_gucs = varcache.startup_gucs(params, ignore)
        except varcache.StartupParameterError as exc:
            raise ProtocolError(str(exc), sqlstate.PROTOCOL_VIOLATION) from None
        self._database = database
        method = self._auth_method()
        self.phase = Phase.AUTH
        self._reader = MessageReader(max_size=self.config.limits.max_packet_size)
        secret = self.registry.users.get(self.user)
        if secret is None and database is not None and self.registry.auth_query.enabled:
            if self.transport is not None:
                self.transport.pause_reading()  # nothing to read until we ask
            spawn(self._auth_query(method, database))
            return
        self._start_auth(method, secret, from_auth_query=False)

    def _start_auth(self, method: str, secret: str | None, *, from_auth_query: bool) -> None:
        self._auth = ClientAuth(
            method,
            self.user,
            secret,
            self.registry,
            channel_binding=self.tls.end_point if self.tls is not None else None,
            from_auth_query=from_auth_query,
        )
        first = self._auth.start()
        if first is None:
            self._authenticated()
        else:
            self.send(first)

    async def _auth_query(self, method: str, database: DatabaseConfig) -> None:
        """Ask PostgreSQL for the user's secret (auth.query), then authenticate."""
        secret = await self.registry.auth_query.secret(self.dbname, database, self.user)
        if self.phase is not Phase.AUTH:
            return  # gone meanwhile (client_login timeout, disconnect)
        try:
            self._start_auth(method, secret, from_auth_query=secret is not None)
            if self.phase is Phase.AUTH:
                self._auth_received(b"")
        except ProtocolError as exc:
            self._login_failed(exc)
            return
        if self.transport is not None and self.phase is not Phase.CLOSED:
            self.transport.resume_reading()

    # --- TLS, hba and client limits ----------------------------------------

    def _ssl_request(self) -> bool:
        """Answer an SSLRequest; True when a TLS handshake starts."""
        tls = self.registry.tls.client
        if tls.context is None or self.peer == "unix":
            self.send(b"N")
            return False
        if self._startup.take_remaining():
            # Bytes sent before the handshake could be anyone's (CVE-2021-23222).
            raise ProtocolError("received unencrypted data after SSL request")
        transport = self.transport
        assert transport is not None
        transport.write(b"S")
        transport.pause_reading()
        self._tls_early = []
        spawn(self._start_tls(transport, tls))
        return True

    async def _start_tls(self, transport: asyncio.Transport, tls: ClientTls) -> None:
        loop = asyncio.get_running_loop()
        assert tls.context is not None
        try:
            wrapped = await loop.start_tls(transport, self, tls.context, server_side=True)
        except (OSError, ConnectionError, ValueError) as exc:  # ssl.SSLError is an OSError
            if self.phase is not Phase.CLOSED:
                log.info("login_failed", error=f"TLS handshake failed: {exc}", **self.log_fields())
                GLOBAL.login_failed(sqlstate.PROTOCOL_VIOLATION)
                transport.abort()
                self._closed("TLS handshake failed")
            return
        if self.phase is Phase.CLOSED or wrapped is None:
            if wrapped is not None:
                wrapped.abort()
            return
        self.transport = wrapped  # type: ignore[assignment]
        self.tls = tls
        early, self._tls_early = self._tls_early or [], None
        if early:
            self._login_received(b"".join(early))

    def _ssl_object(self) -> ssl.SSLObject | None:
        if self.tls is None or self.transport is None:
            return None
        return self.transport.get_extra_info("ssl_object")

    def _auth_method(self) -> str:
        """The method this login runs, after the TLS requirement and the hba
        rules had their say (ProtocolError when they refuse the connection)."""
        local = self.peer == "unix"
        tls = self.registry.tls.client
        if tls.required and not local and self.tls is None:
            raise ProtocolError("SSL required", sqlstate.INVALID_AUTHORIZATION)
        verify_name = self.tls is not None and self.tls.mode == "verify-full"
        if verify_name and peer_common_name(self._ssl_object()) != self.user:
            raise ProtocolError(
                f'certificate authentication failed for user "{self.user}"',
                sqlstate.INVALID_AUTHORIZATION,
            )
        hba = self.registry.hba
        if hba is None:
            return self.config.auth.type
        conn = self._hba_connection(local)
        rule = hba.match(conn)
        if rule is None:
            message = f"no pg_hba.conf entry for {conn.describe()}"
            raise ProtocolError(message, sqlstate.INVALID_AUTHORIZATION)
        if rule.method == "reject":
            message = f"pg_hba.conf rejects connection for {conn.describe()}"
            raise ProtocolError(message, sqlstate.INVALID_AUTHORIZATION)
        return rule.method

    def _hba_connection(self, local: bool) -> Connection:
        address = server_address = None
        if not local and self.transport is not None:
            peer = self.transport.get_extra_info("peername")
            sock = self.transport.get_extra_info("sockname")
            address = peer[0] if isinstance(peer, tuple) else None
            server_address = sock[0] if isinstance(sock, tuple) else None
        return Connection(
            database=self.dbname,
            user=self.user,
            local=local,
            ssl=self.tls is not None,
            address=address,
            server_address=server_address,
        )

    def _take_client_slot(self) -> None:
        """max_db_client_connections / max_user_client_connections (PgBouncer
        1.24), counted over authenticated clients only: a flood of
        connections that never log in cannot use them up."""
        database = self._database
        if database is None:
            return
        db_limit = database.pool.max_db_client_connections
        user_config = self.config.users.get(self.user)
        user_limit = (
            user_config.max_user_client_connections if user_config is not None else 0
        ) or database.pool.max_user_client_connections
        reached = self.registry.take_client_slot(self.dbname, db_limit, self.user, user_limit)
        if reached:
            raise ProtocolError(
                f"no more connections allowed ({reached})", sqlstate.TOO_MANY_CONNECTIONS
            )
        self._counted = True

    def _release_client_slot(self) -> None:
        self._counted = False
        self.registry.release_client_slot(self.dbname, self.user)

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
            try:
                reply, finished = self._auth.handle(body)
            except AuthError:
                if self._auth.from_auth_query and self._database is not None:
                    # Maybe the password changed: ask again next time.
                    self.registry.auth_query.forget(self.dbname, self._database, self.user)
                raise
            if reply is not None:
                self.send(reply)
            if finished:
                self._authenticated()

    def _authenticated(self) -> None:
        if self.dbname not in ADMIN_DATABASES:
            self._take_client_slot()
        self.send(messages.authentication_ok())
        self.registry.login_done(self)
        if self.dbname in ADMIN_DATABASES:
            open_console(self, self._reader.take_remaining() if self._reader else b"")
            return
        if self.registry.is_disabled(self.dbname):
            raise ProtocolError(
                f'database "{self.dbname}" is disabled', sqlstate.CANNOT_CONNECT_NOW
            )
        pool = self.registry.pool_for(self.dbname, self._database, self.user)
        self.pool = pool
        pool.clients.add(self)
        self.release_on_idle = pool.mode != "session"
        self.statement_mode = pool.mode == "statement"
        self.translator = self._make_translator(pool)
        leftover = self._reader.take_remaining() if self._reader else b""  # type: ignore[attr-defined]
        if leftover:
            self._pending.append(leftover)
        if pool.server_params is None:
            # The welcome needs a server's parameters first.
            self.phase = Phase.WELCOME
            self._request_server()
        else:
            self._welcome(pool.server_params)

    def become_console(self, session: AdminSession) -> None:
        """The admin console logged this client in: its session reads the
        client's messages from now on (data_received hands them over)."""
        self.console = session
        self.phase = Phase.ADMIN

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

    def params_arrived(self, server_params: dict[str, str]) -> bool:
        """Another worker told our pool its server parameters: a client that
        waits only for its welcome (transaction pooling) needs no server now."""
        if self.phase is not Phase.WELCOME or not self.release_on_idle:
            return False
        self.wait_started = 0.0
        self._waiting = False
        self._welcome(server_params)
        return True

    def _welcome(self, server_params: dict[str, str]) -> None:
        params, self.gucs = varcache.split_by_reported(self._startup_gucs, server_params)
        self.params = varcache.interned(params)
        self.application_name = self.params.get("application_name", self.application_name)
        self.cancel_pid, self.cancel_key = self.registry.issue_cancel_key(self)
        out = [
            messages.parameter_status(k, v)
            for k, v in server_params.items()
            if k not in self.params
        ]
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

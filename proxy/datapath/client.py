"""A connection from an application to pgmux (PgBouncer's client.c), once logged in.

The login (startup packet, TLS, hba, authentication) is a separate object,
``pgmux.proxy.login.ClientLogin``, that feeds on this connection's bytes until
the client is authenticated and then lets go of it. What stays here is the
hot path: scan message headers to count the requests that will each end in a
ReadyForQuery (Query, Sync, FunctionCall), then forward the whole chunk to the
linked server with one write. Without a linked server, bytes wait here while
the pool finds one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from struct import Struct
from typing import TYPE_CHECKING

from pgmux.protocol import messages, sqlstate
from pgmux.protocol.accounting import KEEPS_BATCH, NO_BATCH
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import bad_length as _bad_length
from pgmux.protocol.msgtypes import COPY_DATA as _COPY_DATA
from pgmux.protocol.msgtypes import FLUSH as _FLUSH
from pgmux.protocol.msgtypes import QUERY as _QUERY
from pgmux.protocol.msgtypes import TERMINATE as _TERMINATE
from pgmux.protocol.msgtypes import TX_IDLE as _IDLE
from pgmux.proxy.base import ids
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.core.states import CLIENT_ACTIVE as _ACTIVE
from pgmux.proxy.core.states import CLIENT_CLOSED as _CLOSED
from pgmux.proxy.core.states import CLIENT_IDLE as _IDLE_STATE
from pgmux.proxy.core.states import CLIENT_LINKING as _LINKING
from pgmux.proxy.core.states import CLIENT_WAITING as _WAITING
from pgmux.proxy.core.states import CLIENT_WELCOME as _WELCOME
from pgmux.proxy.core.states import ClientState
from pgmux.proxy.datapath import endings, listening, paramsync, session_state, varcache, welcome
from pgmux.proxy.datapath.logfields import client_log_fields
from pgmux.proxy.datapath.server import ServerConnection
from pgmux.proxy.datapath.translator import Translator
from pgmux.proxy.datapath.unnamed import untranslatable

if TYPE_CHECKING:
    from pgmux.proxy.config import DatabaseConfig
    from pgmux.proxy.config.tls import ClientTls
    from pgmux.proxy.console.session import AdminSession
    from pgmux.proxy.datapath.listening import Listening
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.client")

_LENGTH = Struct("!I").unpack_from

# Pause reading a client that piles up this much while it waits for a server.
_PENDING_LIMIT = 1 << 20

_monotonic = time.monotonic  # a module global reads faster than the attribute

# The states in which the client has asked for a server and not yet got it.
_QUEUED = (ClientState.WAITING, ClientState.WELCOME)
_LINKED_OR_IDLE = (ClientState.ACTIVE, ClientState.IDLE)


def _ignore(data: bytes) -> None:  # where a closed connection's late bytes go
    pass


class ClientConnection(asyncio.Protocol):
    # Slots, the data path's first: with hundreds of clients each one is cold in
    # the CPU cache when its turn comes, and these share a few cache lines.
    __slots__ = (  # noqa: RUF023  (in order of use, not sorted)
        "_feed",
        "expect_rfq",
        "in_batch",
        "query_in_batch",
        "_skip",
        "_header",
        "_max_packet",
        "partial_since",
        "_partial_request",
        "copy_rfq",
        "last_active",
        "pool",
        "query_started",
        "xact_started",
        "state",
        "server",
        "translator",
        "_pending",
        "_pending_size",
        "_reading_paused",
        "writing_paused",
        "transport",
        "wait_started",
        "query_mark",
        "release_on_idle",
        "pinned",
        "statement_mode",
        "params",
        "gucs",
        # the rest: identity, login results, console, timeouts
        "registry",
        "config",
        "peer",
        "connected_at",
        "user",
        "dbname",
        "application_name",
        "cancel_pid",
        "cancel_key",
        "protocol_minor",
        "startup_gucs",
        "idle_mark",
        "query_cancelled",
        "cancel_sent_at",
        "id",
        "console",
        "database",
        "tls",
        "counted",
        "listener",
    )

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.config = registry.config
        # Bytes go here instead of the hot path while it is set: the login
        # (pgmux.proxy.login), the welcome wait, a console session.
        self._feed: Callable[[bytes], None] | None = _ignore
        self.state = ClientState.LOGIN
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.peer = ""
        self.connected_at = time.monotonic()
        self.user = ""
        self.dbname = ""
        self.application_name = ""
        self.pool: Pool = None  # type: ignore[assignment]  # set when it joins its pool
        self.server: ServerConnection | None = None
        self.cancel_pid = 0
        self.cancel_key = b""
        self.protocol_minor = 0  # 3.x spoken with this client: 2 gets a long cancel key
        # what the client wants its session to look like
        self.params: dict[str, str] = {}  # reported parameters
        self.gucs: dict[str, str] = {}  # other startup GUCs
        self.startup_gucs: dict[str, str] = {}  # from the startup packet: the defaults
        # request accounting, read by the server's hot path
        self.expect_rfq = 0
        self.in_batch = False
        self.query_in_batch = False  # PostgreSQL skips it if the batch failed: no RFQ
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
        self.database: DatabaseConfig | None = None  # the entry it asked for (once known)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._reading_paused = False  # by the _PENDING_LIMIT backpressure
        self.writing_paused = False  # its transport's buffer is full: its server waits
        self._skip = 0
        self._header = b""
        self._max_packet = self.config.limits.max_packet_size
        self.partial_since = 0.0  # when the message it is in the middle of began (0: none)
        self._partial_request = False
        self.copy_rfq = -1  # expect_rfq when its last header was a CopyData (-1: not)
        self.tls: ClientTls | None = None  # the TLS settings in use, once negotiated
        self.counted = False  # in max_db/max_user_client_connections
        self.listener: Listening | None = None  # its channels (pool.listen_mode: relay)

    def _set_state(self, state: ClientState) -> None:
        """The one place the client's state changes (PgBouncer's change_client_state)."""
        self.state = state

    # --- connection ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.registry.add_client(self)

    def feed_to(self, feed: Callable[[bytes], None] | None) -> None:
        """Send the bytes that arrive to `feed` (None: the hot path)."""
        self._feed = feed

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is _CLOSED:
            return
        self.closed("client closed the connection" if exc is None else str(exc))

    def closed(self, reason: str) -> None:
        """The connection is gone (or going): leave the pool, give back the server."""
        state = self.state
        was_ready = state is not ClientState.LOGIN and state is not _WELCOME
        self._set_state(_CLOSED)
        self._feed = _ignore
        self.registry.remove_client(self)
        if self.counted:
            self.counted = False
            self.registry.client_slots.release(self.dbname, self.user)
        pool = self.pool
        if self.listener is not None:
            listening.left(self)
        if pool is not None:
            pool.clients.discard(self)
            if state in _QUEUED:
                pool.cancel_wait(self)
            server = self.server
            if server is not None:
                self.server = None
                pool.abandon(server, self)
        if was_ready:
            duration = round(time.monotonic() - self.connected_at, 3)
            log.info("logout", reason=reason, duration=duration, **self.log_fields())

    def log_fields(self) -> dict[str, str]:
        return client_log_fields(self)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def pause_writing(self) -> None:
        """A client reading slower than its server sends holds the server, as a backend waits."""
        self.writing_paused = True
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.server is not None and not self.server.cancels_in_flight:
            self.server.resume_reading()  # a cancel on its way reads on (core/cancel.py)
        if self.listener is not None:
            listening.flush(self)

    def fail(self, code: str, message: str, severity: str = "FATAL") -> None:
        """Send an ErrorResponse and close this client (nobody else notices)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(messages.error_response(code, message, severity=severity))
            self.transport.close()
        if self.state is not _CLOSED:
            self.closed(message)

    def become_console(self, session: AdminSession) -> None:
        """An admin console session takes over this connection's bytes."""
        self.console = session
        self._set_state(ClientState.CONSOLE)
        self._feed = session.data_received

    # --- hot path ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        feed = self._feed
        if feed is not None:
            feed(data)
            return
        requests = self.expect_rfq
        n = len(data)
        if (
            data[0] == _QUERY
            and n > 5
            and not self._skip
            and not self._header
            and not self.in_batch
            and n == 1 + _LENGTH(data, 1)[0]
            and n <= self._max_packet
        ):
            # The usual chunk, one whole Query: what _scan would find, without the call.
            self.expect_rfq = requests + 1
            self.in_batch = False
            terminate_at = -1
        else:
            in_batch, cut = self.in_batch, self._skip or self._header
            try:
                terminate_at = self._scan(data)
            except ProtocolError as exc:
                # None of this chunk goes on: what it counted never reaches the server,
                # and a message it was to finish stays half sent there.
                self.expect_rfq, self.in_batch, self._skip = requests, in_batch, 1 if cut else 0
                self.fail(exc.sqlstate, exc.message)
                return
        self.last_active = now = _monotonic()
        self.pool.stats.total_received += n
        if self.expect_rfq != requests:
            self.query_started = now
            if not self.xact_started:
                self.xact_started = now
        if terminate_at >= 0:
            data = data[:terminate_at]
        state = self.state
        if state is _ACTIVE:
            if data:
                server = self.server
                assert server is not None  # ACTIVE: linked
                translator = self.translator
                if translator is not None:
                    try:
                        data = translator.translate(data, server)
                    except Exception as exc:  # a bug must cost this client only
                        untranslatable(self, server, exc)
                        return
                server.transport.write(data)
        elif data:
            self._hold(data)
            if state is _IDLE_STATE:
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
        kind = -1
        while pos + 5 <= n:
            kind = data[pos]
            length = _LENGTH(data, pos + 1)[0]
            # (a Flush with a body: PostgreSQL's error would leave a server skipping to Sync)
            if length < 4 or length > self._max_packet or (kind == _FLUSH and length != 4):
                raise _bad_length(length, self._max_packet)
            if kind in NO_BATCH:
                self.expect_rfq += 1
                if kind == _QUERY and self.in_batch:
                    self.query_in_batch = True
                self.in_batch = False
            elif kind == _TERMINATE:
                self._skip = 0
                return pos
            elif kind not in KEEPS_BATCH:  # Flush asks for output, COPY messages stream
                self.in_batch = True
            pos += 1 + length
        if kind >= 0:  # COPY FROM STDIN: PostgreSQL waits for its next CopyData
            self.copy_rfq = self.expect_rfq if kind == _COPY_DATA else -1
        if pos < n:  # a header cut short: a message begins here (counted once whole)
            self._header = data[pos:]
            self._skip = 0
            self.partial_since, self._partial_request = _monotonic(), False
        else:
            self._skip = pos - n
            if pos == n:
                self.partial_since = 0.0
            elif kind >= 0:  # the message cut short began in this chunk
                self.partial_since, self._partial_request = _monotonic(), kind in NO_BATCH
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
        if length < 4 or length > self._max_packet or (kind == _FLUSH and length != 4):
            raise _bad_length(length, self._max_packet)
        if kind == _TERMINATE:
            return 0
        if kind in NO_BATCH:
            self.expect_rfq += 1
            if kind == _QUERY and self.in_batch:
                self.query_in_batch = True
            self.in_batch = False
        elif kind not in KEEPS_BATCH:
            self.in_batch = True
        self._partial_request = kind in NO_BATCH  # partial_since: its header's first bytes
        self.copy_rfq = self.expect_rfq if kind == _COPY_DATA else -1
        return 1 + length - len(have)

    @property
    def running(self) -> bool:
        """A request of this client is queued, being linked or on a server."""
        return (
            self.expect_rfq > 0
            or self.in_batch
            or self.state is _WAITING
            or self.state is _WELCOME
            or self.state is _LINKING
            or bool(self._pending)
        )

    @property
    def mid_message(self) -> bool:
        return bool(self._skip or self._header)

    @property
    def stalled(self) -> bool:
        """Mid-message, its server owing nothing: idle (since its last byte) for the janitor."""
        owed = self.expect_rfq - self._partial_request > 0 or self._pending
        return self.partial_since > 0.0 and not owed and self.state in _LINKED_OR_IDLE

    def _terminate(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed("client sent Terminate")

    # --- getting and giving back a server --------------------------------

    def _request_server(self) -> None:
        self._set_state(_WAITING)
        self.pool.acquire(self)

    def server_assigned(self, server: ServerConnection) -> bool:
        """The pool links a server to this client (now or after a wait).

        False when the client turns out to have nothing for it (a lone Flush,
        an empty request): the pool takes it back and tries its next client,
        in a loop of its own rather than by calling back into here.
        """
        self.server = server
        self.query_mark = server.linked_at
        if self.state is _WELCOME:
            # Session mode: the client keeps this server; its welcome comes first.
            self.welcome(self.pool.server_params or server.params)
        statement = varcache.sync_statement(self.params, self.gucs, server.params, server.applied)
        if statement is None:
            self._set_state(_ACTIVE)
            return self._flush_pending(server)
        self._set_state(_LINKING)
        spawn(paramsync.sync_then_flush(self, server, statement))
        return True

    def _flush_pending(self, server: ServerConnection) -> bool:
        """Write what waited for the server; False when the server is not needed."""
        if self.writing_paused:
            server.pause_reading()  # still behind with the last server's replies
        pending = self._pending
        if pending:
            data = b"".join(pending) if len(pending) > 1 else pending[0]
            pending.clear()
            self._pending_size = 0
            translator = self.translator
            if translator is not None:
                try:
                    data = translator.translate(data, server)
                except Exception as exc:  # a bug must cost this client only
                    untranslatable(self, server, exc)
                    return True  # the server is closed: the pool has nothing to take back
            server.transport.write(data)
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
        if self.expect_rfq <= 0 and not self.in_batch and not self.mid_message:
            # Nothing the server will answer: an empty request, or a lone Flush
            # (psycopg sends one after a pipeline). No ReadyForQuery would ever
            # give this server back.
            return not self.transaction_done(server, 0.0, give_back=False)
        return True

    def transaction_done(
        self, server: ServerConnection, now: float = 0.0, give_back: bool = True
    ) -> bool:
        """The server said ReadyForQuery(I) and owes this client nothing more.

        `now` is when that ReadyForQuery was read (0: read the clock here).
        True when the client lets go of the server: then the pool gets it
        back here, unless `give_back` is False (the pool is handing it out
        and takes it back itself).
        """
        if self.listener is not None:  # notifications wait for this moment
            listening.flush(self)
        started = self.xact_started
        if started:  # a transaction ran (not just an empty request)
            linked = server.linked_at
            elapsed = (now or _monotonic()) - (started if started > linked else linked)
            self.pool.stats.add_xact(elapsed)
            self.xact_started = 0.0
        if not self.release_on_idle or self.pinned:
            return False  # session mode, or session state pins the server to this client
        self.server = None
        self.expect_rfq = 0
        self.query_in_batch = False
        self._set_state(_IDLE_STATE)
        if give_back:
            self.pool.release(server, now)  # resets session state first if it has any
            if self.registry.shutting_down:  # draining: let go at the boundary (scaling.md)
                self.fail("57P01", "terminating connection due to administrator command")
            elif self._pending and self.state is _IDLE_STATE:
                self._request_server()
        return True

    def command_done(self, tag: bytes, text: bytes, server: ServerConnection) -> None:
        """A CommandComplete for this client (transaction mode): watch for session state."""
        session_state.observe(self, server, tag, text)

    def stats_query_done(self, now: float) -> None:
        # Called at each ReadyForQuery, read at `now`: a query ran from its
        # request (or the previous ReadyForQuery, or the link) until then.
        started = self.query_started
        mark = self.query_mark
        self.pool.stats.add_query(now - (started if started > mark else mark))
        self.query_mark = now
        if self.statement_mode and self.server is not None and self.server.tx_status != _IDLE:
            # PgBouncer's statement mode forbids transaction blocks; the server is
            # rolled back and reused like any abandoned one.
            loop = asyncio.get_running_loop()
            refusal = endings.ending(self.registry.config, endings.STATEMENT_MODE)
            loop.call_soon(self.fail, *refusal)

    def server_parameter(self, name: str, value: str) -> None:
        """The server reported a parameter change made by this client (SET ...)."""
        if name not in varcache.READ_ONLY_REPORTED:
            self.params[name] = value
            if name == "application_name":
                self.application_name = value

    def server_lost(self, server: ServerConnection) -> None:
        if self.server is server:
            self.server = None
            self.pool.stats.add_error("server_lost")
            self.fail(sqlstate.CONNECTION_FAILURE, "server conn crashed?")

    def wait_failed(self, code: str, message: str) -> None:
        """The pool gave up finding a server for this client (query_wait_timeout...)."""
        self._set_state(_IDLE_STATE)
        log.info("wait_failed", error=message, **self.log_fields())
        self.closed(message)  # logged before the error leaves: its reader finds the line
        self.fail(code, message)

    # --- joining the pool and the welcome -----------------------------------

    def join(self, pool: Pool, leftover: bytes, translator: Translator | None) -> None:
        """Authenticated: become one of the pool's clients, welcomed now or once
        the pool knows a server's parameters."""
        self.pool = pool
        pool.clients.add(self)
        self.release_on_idle = pool.mode != "session"
        self.statement_mode = pool.mode == "statement"
        self.translator = translator
        if leftover:
            self._pending.append(leftover)
        if pool.server_params is None:
            # The welcome needs a server's parameters first.
            self._feed = self._hold  # it may pipeline its first query before the welcome
            self._set_state(_WELCOME)
            pool.acquire(self)
        else:
            self.welcome(pool.server_params)

    def _hold(self, data: bytes) -> None:
        """Keep what a client without a server sends, within a bound (TCP back-pressure)."""
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > _PENDING_LIMIT:
            self.transport.pause_reading()
            self._reading_paused = True

    def welcome(self, server_params: dict[str, str]) -> None:
        """ParameterStatus for every server parameter, BackendKeyData, ReadyForQuery."""
        welcome.send_welcome(self, server_params)

    def welcomed(self) -> None:
        """Idle after the welcome: what it pipelined meanwhile runs now."""
        self._set_state(_IDLE_STATE)
        if self._pending:
            pending = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
            self.data_received(pending)

"""A connection from pgmux to PostgreSQL (PgBouncer's server.c).

Two paths read from the socket:

* the hot path, while a client is linked: scan 5-byte headers, look into the
  body only of ReadyForQuery, ParameterStatus and CopyInResponse, and forward
  the whole chunk to the client with one write;
* the slow path, for everything else (login, the pooler's own queries such as
  ROLLBACK or the parameter sync, unsolicited messages while idle): full
  message framing with protocol.framing.MessageReader.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import OrderedDict
from struct import Struct
from typing import TYPE_CHECKING

from pgmux.protocol import messages, sqlstate
from pgmux.protocol.backend import ASKED as _ASKED
from pgmux.protocol.backend import (
    HELD_LIMIT,
    STREAMED,
    STREAMED_LIMIT,
    check_notice_fields,
    refusal,
)
from pgmux.protocol.backend import LOGIN as _LOGIN
from pgmux.protocol.backend import UNASKED as _UNASKED
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.msgtypes import AUTHENTICATION_REQUEST as _AUTHENTICATION
from pgmux.protocol.msgtypes import BACKEND_KEY_DATA as _BACKEND_KEY_DATA
from pgmux.protocol.msgtypes import COMMAND_COMPLETE as _COMMAND_COMPLETE
from pgmux.protocol.msgtypes import COPY_BOTH_RESPONSE as _COPY_BOTH_RESPONSE
from pgmux.protocol.msgtypes import COPY_IN_RESPONSE as _COPY_IN_RESPONSE
from pgmux.protocol.msgtypes import ERROR_RESPONSE as _ERROR_RESPONSE
from pgmux.protocol.msgtypes import NOTICE_RESPONSE as _NOTICE_RESPONSE
from pgmux.protocol.msgtypes import PARAMETER_STATUS as _PARAMETER_STATUS
from pgmux.protocol.msgtypes import READY_FOR_QUERY as _READY_FOR_QUERY
from pgmux.protocol.msgtypes import TX_IDLE as _IDLE
from pgmux.proxy.base import ids
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.core.peers import ServerSnapshot
from pgmux.proxy.core.states import ServerState
from pgmux.proxy.datapath import pending, session_state, startup_values, varcache
from pgmux.proxy.datapath.replies import ResponseFilter
from pgmux.proxy.datapath.server_login import (
    ServerAuth,
    ServerCredentials,
    ServerError,
    ServerLost,
)

if TYPE_CHECKING:
    import ssl

    from pgmux.proxy.config.tls import ServerTls
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.statements import Statement
    from pgmux.proxy.datapath.translator import Translator

log = get_logger("pgmux.server")

_LENGTH = Struct("!I").unpack_from


_SKIPPED = frozenset(STREAMED)  # the slow path never looks into rows or COPY data

# What the plain scan does with each type (0: it only passes through).
_RFQ, _STATUS, _NOTICE, _COPY, _TAG = 1, 2, 3, 4, 5
_PLAIN_ACTIONS = bytearray(256)
_PLAIN_ACTIONS[_READY_FOR_QUERY] = _RFQ
_PLAIN_ACTIONS[_PARAMETER_STATUS] = _STATUS
_PLAIN_ACTIONS[_ERROR_RESPONSE] = _NOTICE
_PLAIN_ACTIONS[_NOTICE_RESPONSE] = _NOTICE
_PLAIN_ACTIONS[_COPY_IN_RESPONSE] = _COPY
_PLAIN_ACTIONS[_COPY_BOTH_RESPONSE] = _COPY
_PLAIN_ACTIONS[_COMMAND_COMPLETE] = _TAG
_NOTICE_NAMES = {_ERROR_RESPONSE: "ErrorResponse", _NOTICE_RESPONSE: "NoticeResponse"}

_RESET_TAGS = (b"RESET\0", b"DISCARD ALL\0")
_RESET_SIZES = (1 + 4 + 6, 1 + 4 + 12)  # their messages' sizes: most tags stop at that check
_COPY_FAIL_MESSAGE = b"f" + (4 + 17).to_bytes(4, "big") + b"client went away\0"


class ServerConnection(asyncio.Protocol):
    """One PostgreSQL backend, owned by a pool, lent to one client at a time."""

    def __init__(self, pool: Pool, credentials: ServerCredentials) -> None:
        self.pool = pool
        self.id = ids.next_server_id()
        self.credentials = credentials
        # Set by the pool's transitions only (Pool._set_server_state, Pool._link).
        self.state = ServerState.LOGIN
        # set by connection_made; the data path only meets connected servers
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: ClientConnection | None = None
        self.params: dict[str, str] = {}  # ParameterStatus values it reported
        self.applied: dict[str, str] = {}  # unreported GUCs pgmux set on it
        self.backend_pid = 0
        self.backend_key = b""
        self.connected_at = time.monotonic()
        self.last_used = self.connected_at
        self.linked_at = 0.0
        self.tx_status = _IDLE
        self.copy_in = False
        self.close_when_released = False
        self.cancels_in_flight = 0  # CancelRequests sent to PostgreSQL for this backend
        self.local_address = ""
        # transaction pooling: prepared statements, replies owed, session state
        self.prepared: OrderedDict[bytes, Statement] = OrderedDict()  # an LRU
        self.parsed_in_xact: set[bytes] = set()  # Parsed since its transaction began
        self.stale: set[bytes] = set()  # prepared, but a rollback undid what they refer to
        self.responses = ResponseFilter()
        self.unnamed_owner: Translator | None = None  # whose unnamed statement it holds
        self.unnamed_gen = 0
        self.dirty: set[str] = set()  # session state to reset on release
        self.pending = pending.PendingChanges()  # ... once its transaction commits
        # hot-path scan state: bytes of a message still to pass, bytes held back
        self._skip = 0
        self._hold = b""
        # slow path
        self._slow = True
        # Whole messages up to HELD_LIMIT; rows and COPY data skipped unbuffered.
        self._reader = MessageReader(
            HELD_LIMIT, "the server message limit", _SKIPPED, STREAMED_LIMIT
        )
        self._login: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._logged_in = False  # PostgreSQL said ReadyForQuery to the startup
        self._auth = ServerAuth(credentials, pool.registry.auth)
        self._tls_wanted: ServerTls | None = None  # SSLRequest sent, answer pending
        self._rfq_wanted = 0
        self._rfq_waiter: asyncio.Future[None] | None = None
        self._query_error: ServerError | None = None
        self.moved = False  # handed over to another worker: this object is done
        self._closing = False  # pgmux closed it (else a loss is logged)

    # --- moving between workers (listen.workers > 1) ---------------------------

    @classmethod
    def adopted(
        cls, pool: Pool, credentials: ServerCredentials, snapshot: ServerSnapshot
    ) -> ServerConnection:
        """A logged-in server another worker handed over (export_state there)."""
        server = cls(pool, credentials)
        server._logged_in = True
        server.backend_pid = snapshot.backend_pid
        server.backend_key = snapshot.backend_key
        server.params = varcache.interned(snapshot.params)
        server.applied = snapshot.applied
        server.connected_at = snapshot.connected_at  # CLOCK_MONOTONIC: one clock for all
        server.last_used = snapshot.last_used
        cache = pool.registry.statement_cache
        for rest in snapshot.prepared:  # oldest first, as the LRU had them
            statement = cache.get(rest)
            server.prepared[statement.name] = statement
        server._login.set_result(None)
        return server

    def export_state(self) -> ServerSnapshot:
        """What another worker needs to carry on with this idle, clean server."""
        return ServerSnapshot(
            backend_pid=self.backend_pid,
            backend_key=self.backend_key,
            params=self.params,
            applied=self.applied,
            connected_at=self.connected_at,
            last_used=self.last_used,
            prepared=tuple(statement.rest for statement in self.prepared.values()),
        )

    # --- connection ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sockname = transport.get_extra_info("sockname")
        self.local_address = str(sockname[1]) if isinstance(sockname, tuple) else "unix"
        if self._login.done():
            return  # adopted from another worker: logged in long ago
        tls = self.pool.registry.auth.tls.server
        if tls.context is not None and isinstance(sockname, tuple):  # no TLS on unix sockets
            self._tls_wanted = tls
            self.transport.write(messages.ssl_request())
            return
        self._send_startup()

    def _send_startup(self) -> None:
        assert self.transport is not None
        creds = self.credentials
        params = {"user": creds.user, "database": creds.dbname}
        if creds.application_name:
            params["application_name"] = creds.application_name
        self.transport.write(messages.startup_message(params))

    # --- TLS to PostgreSQL (tls.server.mode) ------------------------------

    def _tls_answer(self, data: bytes) -> None:
        """PostgreSQL's one-byte answer to our SSLRequest."""
        tls, self._tls_wanted = self._tls_wanted, None
        assert tls is not None
        if data == b"S":
            spawn(self._start_tls(tls.context))
        elif data == b"N" and not tls.required:
            self._send_startup()  # prefer/allow: plain is fine
        elif data == b"N":
            self._login_failed(f"server does not support SSL, but tls.server.mode is {tls.mode}")
        else:
            # Bytes after 'S' were not encrypted: someone in between wrote them.
            self._login_failed("received invalid response to SSL negotiation")

    async def _start_tls(self, context: ssl.SSLContext | None) -> None:
        assert context is not None and self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport, self, context, server_hostname=self.credentials.host
            )
        except (OSError, ConnectionError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._login_failed(f"TLS handshake with the server failed: {exc}")
            return
        if transport is None or self.state is ServerState.CLOSED or self._login.done():
            if transport is not None:
                transport.abort()
            return
        self.transport = transport
        self._send_startup()

    def _login_failed(self, message: str) -> None:
        if not self._login.done():
            fields = {"S": "FATAL", "C": sqlstate.CONNECTION_FAILURE, "M": message}
            self._login.set_exception(ServerError(fields, tls=True))
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.moved:
            return  # the other worker has the backend now
        lost = ServerLost(str(exc) if exc else "server closed the connection")
        if self._logged_in and not self._closing:  # (a failed login is the pool's to log)
            mid = bool(self._hold or self._skip or self.responses.mid_message)
            mid = mid or self._reader.mid_message
            log.warning("server_lost", error=str(lost), mid_message=mid, **self._log_fields())
        if not self._login.done():
            self._login.set_exception(lost)
        self._wake_rfq_waiter(lost)
        self.pool.server_lost(self)

    async def wait_login(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._login), timeout or None)
        except TimeoutError:
            self.close("server_connect timeout")
            raise ServerLost("server_connect timeout") from None

    def close(self, reason: str = "") -> None:
        if self.transport is not None and not self.transport.is_closing():
            if reason:
                log.debug("server_close", reason=reason, **self._log_fields())
            if self._logged_in:
                self.transport.write(messages.terminate())
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self._closing = True
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # --- hot path ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            if self._tls_wanted is not None:
                self._tls_answer(data)
                return
            client = self.client
            if self._slow or client is None:
                self._slow_received(data)
                return
            self.pool.stats.total_sent += len(data)  # all of it reaches the client
            responses = self.responses
            # startup_values: a reset under way, or a message it left half read
            filtered = responses.restore is not None or responses.hold or responses.skip_bytes
            if client.translator is not None or filtered:
                responses.received(data, self, client)
                return
            if self._hold:
                data = self._hold + data
                self._hold = b""
            n = len(data)
            pos = self._skip
            ready = False
            now = 0.0  # when the first ReadyForQuery of this chunk was read
            # What this server may send: anything while a reply is owed, else only
            # what PostgreSQL sends unprompted (protocol.backend).
            limits = _ASKED if client.expect_rfq > 0 or client.in_batch else _UNASKED
            while pos + 5 <= n:
                kind = data[pos]
                length = _LENGTH(data, pos + 1)[0]
                if length > limits[kind] or length < 4:
                    self._refuse_reply(client, data[:pos], refusal(kind, length, limits))
                    return
                end = pos + 1 + length
                action = _PLAIN_ACTIONS[kind]
                if action:  # not a message that only passes through
                    if end > n and action != _COPY:
                        break  # read it whole: hold it
                    if action == _RFQ:
                        if length != 5 or client.expect_rfq <= 0:
                            reason = refusal(kind, length, limits if length != 5 else _UNASKED)
                            self._refuse_reply(client, data[:pos], reason)
                            return
                        client.expect_rfq -= 1
                        status = data[pos + 5]
                        self.tx_status = status
                        # (the release rule; protocol.accounting.LinkAccounting.releasable)
                        ready = (
                            status == _IDLE
                            and client.expect_rfq <= 0
                            and not client.in_batch
                            and not client.mid_message  # half a header already went to the server
                        )
                        if not now:
                            now = time.monotonic()
                        client.stats_query_done(now)
                        limits = _ASKED if client.expect_rfq > 0 or client.in_batch else _UNASKED
                    elif action == _COPY:
                        self.copy_in = True
                    elif action == _TAG:
                        if end - pos in _RESET_SIZES and data[pos + 5 : end] in _RESET_TAGS:
                            self._watch_reset(client, data, end)
                            return
                    else:
                        try:
                            if action == _STATUS:
                                self.parameter_status(data[pos + 5 : end], client)
                            else:
                                check_notice_fields(data[pos + 5 : end], _NOTICE_NAMES[kind])
                        except ProtocolError as exc:
                            self._refuse_reply(client, data[:pos], exc.message)
                            return
                pos = end
            if pos < n:
                # An incomplete header, or a message read whole: hold it.
                self._skip = 0
                self._hold = data[pos:]
                client.send(data[:pos])
                return
            self._skip = pos - n
            client.send(data)
            if ready and not self._skip:
                client.transaction_done(self, now)
        except Exception as exc:  # a bug must cost this server only, never the loop
            self.refuse(f"internal error on a server reply: {exc!r}")

    def _watch_reset(self, client: ClientConnection, data: bytes, end: int) -> None:
        """RESET or DISCARD ALL completed: the replies that follow go through the
        ResponseFilter, which sets the client's startup values again (startup_values)."""
        client.send(data[:end])
        self._skip = 0
        self._hold = b""
        startup_values.arm(client, self)
        self.responses.received(data[end:], self, client)

    def _refuse_reply(self, client: ClientConnection, good: bytes, reason: str) -> None:
        """The whole messages before the bad one still reach the client (its
        error then follows at a message boundary); the server is dropped."""
        if good:
            client.send(good)
        self._skip = 0
        self._hold = b""
        self.refuse(reason)

    def refuse(self, reason: str) -> None:
        """The server broke the protocol: log why and drop it. connection_lost
        follows, so a linked client gets 08006 and a login fails with REASON."""
        log.warning("server_protocol_error", error=reason, **self._log_fields())
        if not self._login.done():
            self._login.set_exception(ProtocolError(reason))
        self.abort()

    def parameter_status(self, body: bytes, client: ClientConnection | None) -> None:
        """Remember a ParameterStatus (ProtocolError when it is malformed)."""
        name, value = messages.parse_parameter_status(body)
        name, value = sys.intern(name), sys.intern(value)  # see varcache.interned
        self.params[name] = value
        if client is not None:
            client.server_parameter(name, value)
            if name == "session_authorization" and client.translator is not None:
                session_state.identity_reported(client, self, value)

    # --- link / unlink (the pool's transitions call these) ------------------

    def link(self, now: float) -> None:
        """A client gets this server: its bytes flow on the hot path."""
        self.linked_at = now
        self._slow = False
        # A server cleaned after a departed client comes here never unlinked: what
        # that client was owed (entries, a skip to Sync) is not the new one's.
        self.copy_in = False
        self.responses.reset()

    def hand_on(self, now: float) -> None:
        """unlink() then link() in one step, for a server that goes straight
        from one client to the next without being idle."""
        self.last_used = self.linked_at = now
        self._slow = False  # it may come from a statement of pgmux's own (a reset)
        self.copy_in = False
        self.responses.reset()

    def resume_hot_path(self) -> None:
        """After a statement of pgmux's own, the client's traffic flows again."""
        self._slow = False

    def unlink(self, now: float) -> None:
        """The server leaves its client: replies go to the slow path."""
        self.last_used = now
        self._slow = True
        self.copy_in = False
        self.responses.reset()

    @property
    def forwarded_partial(self) -> bool:
        """Part of a message went to the client, the rest is still to come."""
        return bool(self._skip or self.responses.skip_bytes)

    @property
    def clean_for_release(self) -> bool:
        """At a message boundary, outside a transaction, with nothing held."""
        return (
            self.tx_status == _IDLE
            and not self._skip
            and not self._hold
            and not self.copy_in
            and not self.responses.mid_message
        )

    def client_send(self, data: bytes) -> None:
        """A reply pgmux makes up for the linked client."""
        if self.client is not None:
            self.client.send(data)

    # --- the pooler's own queries ----------------------------------------

    async def query(self, sql: str, timeout: float | None = None) -> None:
        """Run a statement of pgmux's own; its replies never reach a client.

        Raises ServerError if PostgreSQL answers with an error, ServerLost if
        the connection breaks or the timeout passes (then the server is closed).
        """
        self._slow = True
        self._query_error = None
        self.unnamed_owner = None  # a simple Query destroys the unnamed statement
        await self.wait_ready_for_query(1, messages.query(sql), timeout)
        if self._query_error is not None:
            raise self._query_error

    async def wait_ready_for_query(
        self, count: int, payload: bytes = b"", timeout: float | None = None
    ) -> None:
        """Send payload, then discard replies until `count` ReadyForQuery arrived."""
        await self.await_ready_for_query(self.expect_ready_for_query(count, payload), timeout)

    def expect_ready_for_query(self, count: int, payload: bytes = b"") -> asyncio.Future[None]:
        """From now on, discard replies and count `count` ReadyForQuery (after
        sending payload); the future is done when they have all arrived. Being
        synchronous, it counts a reply read in the same loop iteration too."""
        if self.transport is None or self.transport.is_closing():
            raise ServerLost("server connection is closed")
        self._slow = True
        loop = asyncio.get_running_loop()
        self._rfq_wanted = count
        self._rfq_waiter = waiter = loop.create_future()
        if payload:
            self.transport.write(payload)
        if count <= 0:
            self._wake_rfq_waiter(None)
        return waiter

    async def await_ready_for_query(
        self, waiter: asyncio.Future[None], timeout: float | None = None
    ) -> None:
        """Wait for what expect_ready_for_query counts; ServerLost after `timeout`."""
        try:
            await asyncio.wait_for(waiter, timeout or None)
        except TimeoutError:
            self.close("timeout waiting for the server")
            raise ServerLost("timeout waiting for the server") from None
        finally:
            self._rfq_waiter = None

    def _wake_rfq_waiter(self, exc: Exception | None) -> None:
        waiter = self._rfq_waiter
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)

    # --- slow path --------------------------------------------------------

    def _slow_received(self, data: bytes) -> None:
        if self._hold or self._skip or self.responses.mid_message:
            # Left over from the hot path (a client went away mid-message):
            # the stream position is unknown, so this server cannot be trusted.
            self.close("unsynchronised stream")
            return
        self._reader.feed(data)
        try:
            while (message := self._reader.next_message()) is not None:
                self._slow_message(message[0], message[1])
        except ProtocolError as exc:
            self.refuse(exc.message)
        except ServerError as exc:
            if not self._login.done():
                self._login.set_exception(exc)
            self.close()

    def _slow_message(self, kind: int, body: bytes) -> None:
        if not self._logged_in:
            self._check_slow(kind, body, _LOGIN)
            self._login_message(kind, body)
            return
        # Asked: pgmux's own statement, or the cleanup of a departed client's.
        self._check_slow(kind, body, _ASKED if self._rfq_wanted > 0 else _UNASKED)
        if kind == _READY_FOR_QUERY:
            self.tx_status = body[0]
            self._rfq_wanted -= 1
            if self._rfq_wanted <= 0:
                self._wake_rfq_waiter(None)
        elif kind == _PARAMETER_STATUS:
            self.parameter_status(body, self.client)
        elif kind == _ERROR_RESPONSE:
            self._slow_error(check_notice_fields(body))
        elif kind == _NOTICE_RESPONSE:
            check_notice_fields(body, "NoticeResponse")
        elif kind == _COPY_IN_RESPONSE:
            # Only a departed client's COPY gets here, while it is cleaned up.
            self.transport.write(_COPY_FAIL_MESSAGE)

    @staticmethod
    def _check_slow(kind: int, body: bytes, table: list[int]) -> None:
        """The type must fit the phase; the reader bounded the length already
        (rows and COPY data it skips, unread, come with an empty body)."""
        if not table[kind] or (kind == _READY_FOR_QUERY and len(body) != 1):
            raise ProtocolError(refusal(kind, len(body) + 4, table))

    def _slow_error(self, fields: dict[str, str]) -> None:
        error = ServerError(fields)
        if error.severity in ("FATAL", "PANIC"):
            log.warning(
                "server_fatal", sqlstate=error.sqlstate, error=str(error), **self._log_fields()
            )
            self.close()
            return
        if self._rfq_waiter is not None:
            self._query_error = error
        else:
            log.info("server_error_while_idle", sqlstate=error.sqlstate, **self._log_fields())

    # --- login ------------------------------------------------------------

    def _login_message(self, kind: int, body: bytes) -> None:
        if kind == _AUTHENTICATION:
            reply = self._auth.answer(body)
            if reply:
                self.transport.write(reply)
        elif kind == _PARAMETER_STATUS:
            self.parameter_status(body, None)
        elif kind == _BACKEND_KEY_DATA:
            self.backend_pid, self.backend_key = messages.parse_backend_key_data(body)
        elif kind == _READY_FOR_QUERY:
            self._logged_in = True
            self.tx_status = body[0]
            if not self._login.done():
                self._login.set_result(None)
        elif kind == _ERROR_RESPONSE:
            raise ServerError(check_notice_fields(body))
        elif kind == _NOTICE_RESPONSE:
            check_notice_fields(body, "NoticeResponse")
        # NegotiateProtocolVersion needs no answer.

    def _log_fields(self) -> dict[str, object]:
        return {"db": self.pool.dbname, "user": self.pool.user, "server_id": self.id}

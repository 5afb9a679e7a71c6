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
import enum
import itertools
import time
from dataclasses import dataclass
from struct import Struct
from typing import TYPE_CHECKING

from pgmux.protocol import messages, sqlstate
from pgmux.protocol.auth import ScramClient, md5_response
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import MessageReader

from .log import get_logger

if TYPE_CHECKING:
    from .client import ClientConnection
    from .pool import Pool

log = get_logger("pgmux.server")

_HEADER = Struct("!cI")
_LENGTH = Struct("!I").unpack_from

_READY_FOR_QUERY = ord("Z")
_PARAMETER_STATUS = ord("S")
_COPY_IN_RESPONSE = ord("G")
_COPY_BOTH_RESPONSE = ord("W")
_ERROR_RESPONSE = ord("E")
_IDLE = ord("I")

_server_ids = itertools.count(1)

_COPY_FAIL_MESSAGE = b"f" + (4 + 17).to_bytes(4, "big") + b"client went away\0"


class ServerState(enum.Enum):
    LOGIN = "login"
    IDLE = "idle"
    ACTIVE = "active"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ServerCredentials:
    """Who pgmux logs in to PostgreSQL as. The password never reaches a log."""

    host: str
    port: int
    dbname: str
    user: str
    password: str | None
    application_name: str

    def __repr__(self) -> str:
        return f"ServerCredentials({self.user}@{self.host}:{self.port}/{self.dbname})"


class ServerError(Exception):
    """PostgreSQL answered with an ErrorResponse (fields by their one-letter code)."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields
        self.sqlstate = fields.get("C", sqlstate.INTERNAL_ERROR)
        self.severity = fields.get("S", "ERROR")
        super().__init__(fields.get("M", "server error"))


class ServerLost(Exception):
    """The server connection closed or broke."""


class ServerConnection(asyncio.Protocol):
    """One PostgreSQL backend, owned by a pool, lent to one client at a time."""

    def __init__(self, pool: Pool, credentials: ServerCredentials) -> None:
        self.pool = pool
        self.id = next(_server_ids)
        self.credentials = credentials
        self.state = ServerState.LOGIN
        self.transport: asyncio.Transport | None = None
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
        self.local_address = ""
        # hot-path scan state: bytes of a message still to pass, bytes held back
        self._skip = 0
        self._hold = b""
        # slow path
        self._slow = True
        self._reader = MessageReader()
        self._login: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._scram: ScramClient | None = None
        self._rfq_wanted = 0
        self._rfq_waiter: asyncio.Future[None] | None = None
        self._query_error: ServerError | None = None

    # --- connection ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sockname = transport.get_extra_info("sockname")
        self.local_address = str(sockname[1]) if isinstance(sockname, tuple) else "unix"
        creds = self.credentials
        params = {"user": creds.user, "database": creds.dbname}
        if creds.application_name:
            params["application_name"] = creds.application_name
        transport.write(messages.startup_message(params))

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self.state
        self.state = ServerState.CLOSED
        lost = ServerLost(str(exc) if exc else "server closed the connection")
        if not self._login.done():
            self._login.set_exception(lost)
        self._wake_rfq_waiter(lost)
        client = self.client
        self.client = None
        if client is not None:
            client.server_lost(self)
        self.pool.server_closed(self, previous)

    async def wait_login(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._login), timeout or None)
        except TimeoutError:
            self.close("server_connect timeout")
            raise ServerLost("server_connect timeout") from None

    def close(self, reason: str = "") -> None:
        if self.transport is not None and not self.transport.is_closing():
            if reason:
                log.debug("server_close", server_id=self.id, reason=reason, **self._log_fields())
            if self.state is not ServerState.LOGIN:
                self.transport.write(messages.terminate())
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # --- hot path ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self._slow or client is None:
            self._slow_received(data)
            return
        if self._hold:
            data = self._hold + data
            self._hold = b""
        n = len(data)
        pos = self._skip
        ready = False
        while pos + 5 <= n:
            kind = data[pos]
            end = pos + 1 + _LENGTH(data, pos + 1)[0]
            if kind == _READY_FOR_QUERY:
                if end > n:
                    break
                client.expect_rfq -= 1
                status = data[pos + 5]
                self.tx_status = status
                ready = status == _IDLE and client.expect_rfq <= 0 and not client.in_batch
                client.stats_query_done()
            elif kind == _PARAMETER_STATUS:
                if end > n:
                    break
                self._parameter_status(data[pos + 5 : end], client)
            elif kind == _COPY_IN_RESPONSE or kind == _COPY_BOTH_RESPONSE:
                self.copy_in = True
            pos = end
        if pos < n:
            # An incomplete header, ReadyForQuery or ParameterStatus: hold it.
            self._skip = 0
            self._hold = data[pos:]
            client.send(data[:pos])
            return
        self._skip = pos - n
        client.send(data)
        if ready and not self._skip:
            client.transaction_done(self)

    def _parameter_status(self, body: bytes, client: ClientConnection | None) -> None:
        try:
            name, value = messages.parse_parameter_status(body)
        except ProtocolError:
            return
        self.params[name] = value
        if client is not None:
            client.server_parameter(name, value)

    # --- link / unlink (called by the pool) -------------------------------

    def link(self, client: ClientConnection) -> None:
        self.client = client
        self.state = ServerState.ACTIVE
        self.linked_at = time.monotonic()
        self._slow = False

    def resume_hot_path(self) -> None:
        """After a statement of pgmux's own, the client's traffic flows again."""
        self._slow = False

    def unlink(self) -> None:
        self.client = None
        self.state = ServerState.IDLE
        self.last_used = time.monotonic()
        self._slow = True
        self.copy_in = False

    @property
    def clean_for_release(self) -> bool:
        """At a message boundary, outside a transaction, with nothing held."""
        return (
            self.tx_status == _IDLE and not self._skip and not self._hold and not self.copy_in
        )

    # --- the pooler's own queries ----------------------------------------

    async def query(self, sql: str, timeout: float | None = None) -> None:
        """Run a statement of pgmux's own; its replies never reach a client.

        Raises ServerError if PostgreSQL answers with an error, ServerLost if
        the connection breaks or the timeout passes (then the server is closed).
        """
        self._slow = True
        self._query_error = None
        await self.wait_ready_for_query(1, messages.query(sql), timeout)
        if self._query_error is not None:
            raise self._query_error

    async def wait_ready_for_query(
        self, count: int, payload: bytes = b"", timeout: float | None = None
    ) -> None:
        """Send payload, then discard replies until `count` ReadyForQuery arrived."""
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
        if self._hold or self._skip:
            # Left over from the hot path (a client went away mid-message):
            # the stream position is unknown, so this server cannot be trusted.
            self.close("unsynchronised stream")
            return
        self._reader.feed(data)
        try:
            while (message := self._reader.next_message()) is not None:
                self._slow_message(message[0], message[1])
        except ProtocolError as exc:
            log.warning("server_protocol_error", error=exc.message, **self._log_fields())
            self.abort()
        except ServerError as exc:
            if not self._login.done():
                self._login.set_exception(exc)
            self.close()

    def _slow_message(self, kind: int, body: bytes) -> None:
        if self.state is ServerState.LOGIN:
            self._login_message(kind, body)
        elif kind == _READY_FOR_QUERY:
            self.tx_status = body[0] if body else _IDLE
            self._rfq_wanted -= 1
            if self._rfq_wanted <= 0:
                self._wake_rfq_waiter(None)
        elif kind == _PARAMETER_STATUS:
            self._parameter_status(body, self.client)
        elif kind == _ERROR_RESPONSE:
            self._slow_error(messages.parse_error_fields(body))
        elif kind == _COPY_IN_RESPONSE:
            # Only a departed client's COPY gets here, while it is cleaned up.
            self.transport.write(_COPY_FAIL_MESSAGE)  # type: ignore[union-attr]

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
        if kind == ord("R"):
            self._authentication(body)
        elif kind == _PARAMETER_STATUS:
            self._parameter_status(body, None)
        elif kind == ord("K"):
            self.backend_pid, self.backend_key = messages.parse_backend_key_data(body)
        elif kind == _READY_FOR_QUERY:
            self.state = ServerState.IDLE
            self.tx_status = body[0] if body else _IDLE
            if not self._login.done():
                self._login.set_result(None)
        elif kind == _ERROR_RESPONSE:
            raise ServerError(messages.parse_error_fields(body))
        # NoticeResponse and NegotiateProtocolVersion need no answer.

    def _authentication(self, body: bytes) -> None:
        code, rest = messages.parse_authentication(body)
        creds = self.credentials
        if code == messages.AUTH_OK:
            return
        if creds.password is None:
            raise ServerError(
                {
                    "S": "FATAL",
                    "C": sqlstate.INVALID_PASSWORD,
                    "M": f'no password known for server login as user "{creds.user}"',
                }
            )
        assert self.transport is not None
        if code == messages.AUTH_CLEARTEXT_PASSWORD:
            self.transport.write(messages.password_message(creds.password))
        elif code == messages.AUTH_MD5_PASSWORD:
            response = md5_response(creds.user, creds.password, rest[:4])
            self.transport.write(messages.password_message(response))
        elif code == messages.AUTH_SASL:
            if "SCRAM-SHA-256" not in messages.parse_sasl_mechanisms(rest):
                raise ProtocolError("server offers no supported SASL mechanism")
            self._scram = ScramClient(creds.password)
            first = self._scram.client_first()
            self.transport.write(messages.sasl_initial_response("SCRAM-SHA-256", first))
        elif code == messages.AUTH_SASL_CONTINUE and self._scram is not None:
            self.transport.write(messages.sasl_response(self._scram.handle_server_first(rest)))
        elif code == messages.AUTH_SASL_FINAL and self._scram is not None:
            self._scram.verify_server_final(rest)
        else:
            raise ProtocolError(f"unsupported server authentication request {code}")

    def _log_fields(self) -> dict[str, object]:
        return {"db": self.pool.dbname, "user": self.pool.user, "server_id": self.id}

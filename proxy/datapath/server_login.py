"""pgmux logging in to PostgreSQL: who it logs in as, the socket, the password.

The client half of PostgreSQL's authentication, for the servers of a pool:
connecting (TCP or the unix socket), and answering AuthenticationRequests
with the configured password, md5, or SCRAM-SHA-256 (with a password, or
passing through the keys a client's own SCRAM login proved). PgBouncer keeps
this in server.c; the server connection (server.py) hands its login
messages here and writes the replies.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgmux.protocol import messages, sqlstate
from pgmux.protocol.auth import ScramClient, is_md5_hash, md5_response
from pgmux.protocol.errors import AuthError, ProtocolError

if TYPE_CHECKING:
    from pgmux.proxy.core.authstate import AuthState, LearnedSecret


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
    """PostgreSQL answered with an ErrorResponse (fields by their one-letter code);
    OWN: pgmux itself refused the login on the server's behalf; TLS: the TLS
    negotiation failed (PostgreSQL never answered the login: clients wait on)."""

    def __init__(self, fields: dict[str, str], *, own: bool = False, tls: bool = False) -> None:
        self.fields = fields
        self.own = own
        self.tls = tls
        self.sqlstate = fields.get("C", sqlstate.INTERNAL_ERROR)
        self.severity = fields.get("S", "ERROR")
        super().__init__(fields.get("M", "server error"))


class ServerLost(Exception):
    """The server connection closed or broke."""


async def connect(protocol: asyncio.Protocol, creds: ServerCredentials, timeout: float) -> None:
    """Open the socket to the server of CREDS for PROTOCOL (TimeoutError, OSError)."""
    loop = asyncio.get_running_loop()
    if creds.host.startswith("/"):
        path = f"{creds.host}/.s.PGSQL.{creds.port}"
        connecting = loop.create_unix_connection(lambda: protocol, path)
    else:
        connecting = loop.create_connection(lambda: protocol, creds.host, creds.port)
    await asyncio.wait_for(connecting, timeout or None)


def describe(exc: BaseException) -> str:
    """A failed login, in words for the log and the waiting clients."""
    if isinstance(exc, ServerError):
        return f"{exc.sqlstate} {exc}"
    if isinstance(exc, TimeoutError):
        return "server_connect timeout"
    if isinstance(exc, ProtocolError):
        return exc.message
    return str(exc) or type(exc).__name__


class ServerAuth:
    """The answers to one server login's AuthenticationRequests."""

    def __init__(self, credentials: ServerCredentials, auth: AuthState) -> None:
        self.credentials = credentials
        self.auth = auth
        self._scram: ScramClient | None = None

    def answer(self, body: bytes) -> bytes:
        """The reply to one AuthenticationRequest (nothing for AuthenticationOk
        and SASLFinal); ServerError or ProtocolError when the login cannot go on."""
        code, rest = messages.parse_authentication(body)
        if code == messages.AUTH_OK:
            if self._scram is not None and not self._scram.finished:
                # The server never proved it knows the secret: not a login.
                raise ProtocolError("AuthenticationOk before the SCRAM exchange was complete")
            return b""
        creds = self.credentials
        password, learned = self._login_secret()
        if code == messages.AUTH_CLEARTEXT_PASSWORD:
            if password is None or is_md5_hash(password):
                raise self._no_password("password")
            return messages.password_message(password)
        elif code == messages.AUTH_MD5_PASSWORD:
            if password is None:
                raise self._no_password("md5")
            if len(rest) != 4:
                raise ProtocolError("invalid AuthenticationMD5Password: the salt is not 4 bytes")
            response = md5_response(creds.user, password, rest[:4])
            return messages.password_message(response)
        elif code == messages.AUTH_SASL:
            if "SCRAM-SHA-256" not in messages.parse_sasl_mechanisms(rest):
                raise ProtocolError("server offers no supported SASL mechanism")
            self._scram = self._scram_client(password, learned)
            first = self._scram.client_first()
            return messages.sasl_initial_response("SCRAM-SHA-256", first)
        elif code in (messages.AUTH_SASL_CONTINUE, messages.AUTH_SASL_FINAL) and self._scram:
            try:
                if code == messages.AUTH_SASL_CONTINUE:
                    return messages.sasl_response(self._scram.handle_server_first(rest))
                self._scram.verify_server_final(rest)
                return b""
            except AuthError as exc:
                raise ServerError(
                    {"S": "FATAL", "C": sqlstate.INVALID_PASSWORD, "M": exc.message}, own=True
                ) from None
        raise ProtocolError(f"unsupported server authentication request {code}")

    def _login_secret(self) -> tuple[str | None, LearnedSecret | None]:
        """The configured password, else what a client's login taught us."""
        creds = self.credentials
        if creds.password is not None:
            return creds.password, None
        learned = self.auth.learned.get(creds.user)
        if learned is not None and learned.password is not None:
            return learned.password, learned
        return None, learned

    def _scram_client(self, password: str | None, learned: LearnedSecret | None) -> ScramClient:
        if password is not None and not is_md5_hash(password):
            return ScramClient(password)
        if learned is not None and learned.client_key is not None and learned.scram is not None:
            # SCRAM passthrough: the key a client proved, for the secret it proved it against.
            secret = learned.scram
            return ScramClient(
                client_key=learned.client_key,
                server_key=secret.server_key,
                salt=secret.salt,
                iterations=secret.iterations,
            )
        raise self._no_password("scram-sha-256")

    def _no_password(self, method: str) -> ServerError:
        user = self.credentials.user
        # "wrong password type" is PgBouncer's phrase, which log parsers look for
        message = f'wrong password type: no password known for server login as user "{user}"'
        message += f" ({method})"
        if method == "scram-sha-256" and self.auth.users.get(user, "").startswith("SCRAM-SHA-256$"):
            message += "; a client must log in with SCRAM first (passthrough)"
        return ServerError({"S": "FATAL", "C": sqlstate.INVALID_PASSWORD, "M": message}, own=True)

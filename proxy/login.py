"""From accept to the pool: a client's login (the login half of PgBouncer's client.c).

A ``ClientLogin`` feeds on a new connection's bytes: the startup packet
(SSLRequest, GSSENCRequest, CancelRequest, StartupMessage), the TLS
handshake, the hba rules and the client-connection limits, the password
exchange (with auth_query when the users file does not know the user), and at
last the hand-off: to the admin console, or into the client's pool. Then it
lets go of the connection, and the ready ``ClientConnection`` carries on
without any of this state.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgmux.protocol import messages, sqlstate
from pgmux.protocol.errors import AuthError, LegacyProtocolError, ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.msgtypes import PASSWORD_MESSAGE as _PASSWORD
from pgmux.protocol.startup import (
    MAX_AUTH_MESSAGE,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
)
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.stats import GLOBAL
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import ADMIN_DATABASES
from pgmux.proxy.config.hba import Connection
from pgmux.proxy.config.tls import ALPN_PROTOCOL, ClientTls, peer_common_name, peer_names
from pgmux.proxy.core.control import pgbouncer_shutdown
from pgmux.proxy.core.states import ClientState
from pgmux.proxy.datapath import varcache
from pgmux.proxy.datapath.auth import ClientAuth
from pgmux.proxy.datapath.authdb import lookup_for
from pgmux.proxy.datapath.authquery import Lookup
from pgmux.proxy.datapath.client import ClientConnection
from pgmux.proxy.datapath.logfields import replication_kind, tls_description
from pgmux.proxy.datapath.translator import Translator

if TYPE_CHECKING:
    import ssl

    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.client")

_TLS_HANDSHAKE = b"\x16"  # the first byte of a TLS record carrying a ClientHello
_REPLAY_STEPS = 8  # loop steps start_tls may take to swap the transport's protocol


async def _replay_hello(transport: asyncio.Transport, plain: object, hello: bytes) -> None:
    """Give the TLS layer the ClientHello that the plain protocol already read.

    start_tls swaps the transport's protocol, and one loop step later calls the
    new protocol's connection_made; the bytes go in after that, before the
    client can send more (it waits for the ServerHello). Both asyncio's and
    uvloop's TLS protocols take bytes through get_buffer/buffer_updated.
    """
    for _ in range(_REPLAY_STEPS):
        await asyncio.sleep(0)
        if transport.get_protocol() is not plain:
            break
    await asyncio.sleep(0)  # the TLS protocol's connection_made
    tls_protocol: Any = transport.get_protocol()
    if tls_protocol is plain or not hasattr(tls_protocol, "buffer_updated"):
        transport.abort()  # start_tls failed early; its error reaches _start_tls
        return
    view = memoryview(hello)
    while view:
        buffer = memoryview(tls_protocol.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        tls_protocol.buffer_updated(size)
        view = view[size:]


def _alpn(transport: asyncio.BaseTransport) -> str | None:
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object.selected_alpn_protocol() if ssl_object is not None else None


# What the daemon gives the login to open a console session with:
# (client, bytes already read, whether it is the daemon's own OS user).
OpenConsole = Callable[[ClientConnection, bytes, bool], None]

# The console users the daemon's own OS user may be without a password
# (PgBouncer's admin_pre_login: "pgbouncer"; pgmux's own name too).
OWN_USER_NAMES = frozenset({"pgbouncer", "pgmux"})
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
NO_SUCH_USER = "no such user"  # PgBouncer's words when auth_query finds nobody
_AUTH_LIMIT = "the authentication limit"  # MAX_AUTH_MESSAGE, named in its error


def new_client(registry: Registry, open_console: OpenConsole) -> ClientConnection:
    """A connection just accepted, with its login attached (the listener's factory)."""
    client = ClientConnection(registry)
    login = ClientLogin(client, registry, open_console)
    client.feed_to(login.feed)
    return client


class ClientLogin:
    """The login of one client; dropped once the client is in its pool or console."""

    def __init__(
        self, client: ClientConnection, registry: Registry, open_console: OpenConsole
    ) -> None:
        self.client = client
        self.registry = registry
        self.config = registry.config
        self._open_console = open_console
        self._authenticating = False
        self._startup = StartupReader()
        self._reader: MessageReader | None = None
        self._auth: ClientAuth | None = None
        self._tls_early: list[bytes] | None = None  # decrypted before start_tls returned
        self._own_user = False  # the daemon's OS user on the unix socket, to the console
        self._unknown_database = False  # told after the password (auth.pgbouncer_rules)
        self._lookup: Lookup | None = None  # the auth_query this login ran

    @property
    def _gone(self) -> bool:
        """The client left the login: closed, in its pool, or a console."""
        return self.client.state is not ClientState.LOGIN

    def feed(self, data: bytes) -> None:
        if self._tls_early is not None:
            self._tls_early.append(data)
            return
        try:
            if self._authenticating:
                self._auth_received(data)
            else:
                self._startup_received(data)
        except ProtocolError as exc:
            self._failed(exc)

    def _failed(self, exc: ProtocolError) -> None:
        log.info(
            "login_failed",
            error=exc.message,
            sqlstate=exc.sqlstate,
            age=round(time.monotonic() - self.client.connected_at, 3),
            **self.client.log_fields(),
        )
        GLOBAL.login_failed(exc.sqlstate)
        if isinstance(exc, LegacyProtocolError) and self.client.transport is not None:
            self.client.transport.write(exc.reply())
            self.client.transport.close()  # fail() below then sends nothing more
        self.client.fail(exc.sqlstate, exc.message)

    # --- the startup packet -------------------------------------------------

    def _startup_received(self, data: bytes) -> None:
        if data[:1] == _TLS_HANDSHAKE and self._startup.untouched:
            self._direct_tls(data)
            return
        self._startup.feed(data)
        while not self._authenticating and not self._gone:
            event = self._startup.next_event()
            if event is None:
                return
            if isinstance(event, SSLRequest):
                if self._ssl_request():
                    return  # the handshake runs; the StartupMessage comes encrypted
            elif isinstance(event, GSSENCRequest):
                self.client.send(b"N")  # no GSSAPI encryption; the client goes on without
            elif isinstance(event, CancelRequest):
                self.registry.cancels.cancel(event.pid, event.key)
                self.client.transport.close()
                self.client.closed("cancel request")
                return
            elif isinstance(event, StartupMessage):
                self._startup_message(event)
                rest = self._startup.take_remaining()
                if rest and self._authenticating and not self._gone:
                    self._auth_received(rest)

    def _startup_message(self, startup: StartupMessage) -> None:
        client = self.client
        params = startup.params
        client.protocol_minor = startup.negotiated_minor
        if startup.needs_negotiation:  # before anything else, as PostgreSQL does
            version = (3 << 16) | startup.negotiated_minor
            client.send(messages.negotiate_protocol_version(version, startup.options))
        client.user = params.get("user", "")
        client.dbname = params.get("database") or client.user
        client.application_name = params.get("application_name", "")
        if self.registry.client_slots.total() > self.config.listen.max_client_conn:
            raise ProtocolError(
                "no more connections allowed (max_client_conn)", sqlstate.TOO_MANY_CONNECTIONS
            )
        console = client.dbname in ADMIN_DATABASES
        database = None if console else self.config.database(client.dbname)
        if database is None and not console:
            if not self.config.auth.pgbouncer_rules:
                raise self._no_such_database()
            # PgBouncer asks for the password first: which databases exist is
            # told only to a client that could log in.
            self._unknown_database = True
        try:
            ignore = frozenset(p.lower() for p in self.config.ignore_startup_parameters)
            client.startup_gucs = varcache.startup_gucs(params, ignore)
        except varcache.StartupParameterError as exc:
            raise ProtocolError(str(exc), sqlstate.PROTOCOL_VIOLATION) from None
        client.database = database
        log.info(
            "login_attempt",
            tls=tls_description(self._ssl_object()),
            replication=replication_kind(params.get("replication")),
            **client.log_fields(),
        )
        if console and self._is_own_user():
            # No hba rule and no password: the OS already vouched for this peer.
            self._own_user = True
            self._authenticated()
            return
        method = self._auth_method()
        self._authenticating = True
        packet = self.config.limits.max_packet_size  # or PostgreSQL's bound, the smaller
        self._reader = (
            MessageReader(packet)
            if packet <= MAX_AUTH_MESSAGE
            else MessageReader(MAX_AUTH_MESSAGE, _AUTH_LIMIT)
        )
        secret = self.registry.auth.users.get(client.user)
        lookup = None
        if secret is None and not self._unknown_database:  # PgBouncer: no query for a fake db
            lookup = lookup_for(
                self.config, self.registry.flags, client.dbname, database, client.log_fields()
            )
        if lookup is not None:
            client.transport.pause_reading()  # nothing to read until we ask
            spawn(self._auth_query(method, lookup))
            return
        self._start_auth(method, secret, from_auth_query=False, known=secret is not None)

    # --- TLS and hba ----------------------------------------------------------

    def _ssl_request(self) -> bool:
        """Answer an SSLRequest; True when a TLS handshake starts."""
        tls = self.registry.auth.tls.client
        if tls.context is None or self.client.peer == "unix":
            self.client.send(b"N")
            return False
        if self._startup.take_remaining():
            # Bytes sent before the handshake could be anyone's (CVE-2021-23222).
            raise ProtocolError("received unencrypted data after SSL request")
        transport = self.client.transport
        transport.write(b"S")
        transport.pause_reading()
        self._tls_early = []
        spawn(self._start_tls(transport, tls))
        return True

    def _direct_tls(self, hello: bytes) -> None:
        """A TLS ClientHello instead of a startup packet (sslnegotiation=direct)."""
        tls = self.registry.auth.tls.client
        transport = self.client.transport
        if tls.context is None or self.client.peer == "unix":
            # It speaks TLS, so a PostgreSQL error would be noise to it: close, as PostgreSQL.
            self._refuse_tls(transport, "direct SSL connection attempted but SSL is not enabled")
            return
        self._startup.direct_tls()
        transport.pause_reading()
        self._tls_early = []
        spawn(self._start_tls(transport, tls, hello))

    def _refuse_tls(self, transport: asyncio.Transport, reason: str) -> None:
        log.info("login_failed", error=reason, **self.client.log_fields())
        GLOBAL.login_failed(sqlstate.PROTOCOL_VIOLATION)
        transport.abort()
        self.client.closed(reason)

    async def _start_tls(
        self, transport: asyncio.Transport, tls: ClientTls, hello: bytes = b""
    ) -> None:
        client = self.client
        loop = asyncio.get_running_loop()
        assert tls.context is not None
        handshake = asyncio.ensure_future(
            loop.start_tls(transport, client, tls.context, server_side=True)
        )
        if hello:
            await _replay_hello(transport, client, hello)
        try:
            wrapped = await handshake
        except (OSError, ConnectionError, ValueError) as exc:  # ssl.SSLError is an OSError
            if not self._gone:
                log.info(
                    "login_failed",
                    error=f"TLS handshake failed: {exc}",
                    age=round(time.monotonic() - client.connected_at, 3),
                    **client.log_fields(),
                )
                GLOBAL.login_failed(sqlstate.PROTOCOL_VIOLATION)
                transport.abort()
                client.closed("TLS handshake failed")
            return
        if self._gone or wrapped is None:
            if wrapped is not None:
                wrapped.abort()
            return
        if hello and _alpn(wrapped) != ALPN_PROTOCOL:
            reason = "received direct SSL connection request without ALPN protocol negotiation"
            self._refuse_tls(wrapped, reason + " extension")
            return
        client.transport = wrapped
        client.tls = tls
        early, self._tls_early = self._tls_early or [], None
        if early:
            self.feed(b"".join(early))

    def _is_own_user(self) -> bool:
        """A unix-socket peer running as the daemon's own uid, logging in as
        pgbouncer/pgmux (never over TCP, where the peer is unknown)."""
        client = self.client
        if client.peer != "unix" or client.user not in OWN_USER_NAMES:
            return False
        return peer_uid(client.transport) == os.getuid()

    def _ssl_object(self) -> ssl.SSLObject | None:
        if self.client.tls is None:
            return None
        return self.client.transport.get_extra_info("ssl_object")

    def _auth_method(self) -> str:
        """The method this login runs, after the TLS requirement and the hba
        rules had their say (ProtocolError when they refuse the connection)."""
        client = self.client
        local = client.peer == "unix"
        tls = self.registry.auth.tls.client
        if tls.required and not local and client.tls is None:
            raise ProtocolError("SSL required", sqlstate.INVALID_AUTHORIZATION)
        verify_name = client.tls is not None and client.tls.mode == "verify-full"
        if verify_name and peer_common_name(self._ssl_object()) != client.user:
            raise ProtocolError(
                f'certificate authentication failed for user "{client.user}"',
                sqlstate.INVALID_AUTHORIZATION,
            )
        hba = self.registry.auth.hba
        if hba is None:
            if self.config.auth.type == "cert":
                self._check_certificate()
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

    def _check_certificate(self) -> None:
        """auth_type cert (PgBouncer's login_via_cert): a verified client
        certificate that names the user (its CN or a DNS subjectAltName)."""
        client = self.client
        if client.tls is None:
            raise ProtocolError("TLS connection required", sqlstate.INVALID_AUTHORIZATION)
        names = peer_names(self._ssl_object())
        if not names:
            raise ProtocolError("TLS client certificate required", sqlstate.INVALID_AUTHORIZATION)
        if client.user not in names:
            raise ProtocolError(
                f'certificate authentication failed for user "{client.user}"',
                sqlstate.INVALID_AUTHORIZATION,
            )

    def _hba_connection(self, local: bool) -> Connection:
        client = self.client
        address = server_address = None
        if not local:
            peer = client.transport.get_extra_info("peername")
            sock = client.transport.get_extra_info("sockname")
            address = peer[0] if isinstance(peer, tuple) else None
            server_address = sock[0] if isinstance(sock, tuple) else None
        return Connection(
            database=client.dbname,
            user=client.user,
            local=local,
            ssl=client.tls is not None,
            address=address,
            server_address=server_address,
        )

    # --- authentication -------------------------------------------------------

    def _no_such_database(self) -> ProtocolError:
        message = f"no such database: {self.client.dbname}"
        return ProtocolError(message, sqlstate.INVALID_CATALOG_NAME)

    def _start_auth(
        self, method: str, secret: str | None, *, from_auth_query: bool, known: bool
    ) -> None:
        """KNOWN: the users file or auth_query has the user (its SECRET may be None:
        auth_query's NULL password, which trust lets in and no password matches)."""
        client = self.client
        if method in ("trust", "cert") and not known and self._trust_needs_user():
            raise ProtocolError(f'"{method}" authentication failed', sqlstate.INVALID_AUTHORIZATION)
        self._auth = ClientAuth(
            method,
            client.user,
            secret,
            self.registry.auth,
            channel_binding=client.tls.end_point if client.tls is not None else None,
            from_auth_query=from_auth_query,
        )
        first = self._auth.start()
        if first is None:
            self._authenticated()
        else:
            client.send(first)

    def _trust_needs_user(self) -> bool:
        """PgBouncer's trust still wants the user known: in the users file, from
        auth_query, or the auth_user itself."""
        auth, database = self.config.auth, self.client.database
        auth_user = (database.auth_user if database is not None else None) or auth.query_user
        return auth.pgbouncer_rules and self.client.user != auth_user

    async def _auth_query(self, method: str, lookup: Lookup) -> None:
        """Ask PostgreSQL for the user's secret (auth.query), then authenticate."""
        client = self.client
        self._lookup = lookup
        try:
            found = await self.registry.auth_query.secret(lookup, client.user)
        except ProtocolError as exc:
            if not self._gone:
                self._failed(exc)
            return
        if self._gone:
            return  # gone meanwhile (client_login timeout, disconnect)
        secret = found.secret if found is not None else None
        try:
            if found is None and self._told_no_such_user(lookup):
                raise ProtocolError(NO_SUCH_USER, sqlstate.INVALID_AUTHORIZATION)
            known = found is not None
            self._start_auth(method, secret, from_auth_query=secret is not None, known=known)
            if not self._gone:
                self._auth_received(b"")
        except ProtocolError as exc:
            self._failed(exc)
            return
        if client.transport is not None and not client.transport.is_closing():
            client.transport.resume_reading()

    def _told_no_such_user(self, lookup: Lookup) -> bool:
        """PgBouncer tells a client that auth_query found nobody for "no such
        user" before any password (the TODO in its handle_auth_query_response);
        the auth_user itself is never looked up, so it is not told that."""
        return self.config.auth.pgbouncer_rules and self.client.user != lookup.user

    def _auth_received(self, data: bytes) -> None:
        assert self._reader is not None and self._auth is not None
        self._reader.feed(data)
        while not self._gone:
            try:
                message = self._reader.next_message()
            except ProtocolError as exc:
                raise self._oversized(exc) from None
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
                self._forget_answer()
                raise
            if reply is not None:
                self.client.send(reply)
            if finished:
                self._authenticated()

    def _oversized(self, exc: ProtocolError) -> ProtocolError:
        """Under PgBouncer's rules a password message over the authentication
        limit is a failed password: PgBouncer keeps no password that long
        (MAX_PASSWORD, 65531 bytes), so it could never match. pgmux still
        refuses it at its header, never buffering it."""
        assert self._reader is not None and self._auth is not None
        over_limit = exc.sqlstate == sqlstate.PROGRAM_LIMIT_EXCEEDED
        if not (over_limit and self._reader.limit_name == _AUTH_LIMIT):
            return exc
        if not self.config.auth.pgbouncer_rules:
            return exc
        self._forget_answer()
        return self._auth.failure()

    def _forget_answer(self) -> None:
        """A login with auth_query's answer failed: maybe the password changed
        (or an expired one was renewed), so ask again next time."""
        if self._lookup is not None:
            self.registry.auth_query.forget(self._lookup, self.client.user)

    def _take_client_slot(self) -> None:
        """max_db_client_connections / max_user_client_connections (PgBouncer
        1.24), counted over authenticated clients only: a flood of
        connections that never log in cannot use them up."""
        client = self.client
        # The console has the global limits, as PgBouncer's admin database.
        pool = client.database.pool if client.database is not None else self.config.pool
        db_limit = pool.max_db_client_connections
        user_config = self.config.users.get(client.user)
        user_limit = (
            user_config.max_user_client_connections if user_config is not None else 0
        ) or pool.max_user_client_connections
        if client.database is None and (self._own_user or client.user in self.config.admin.users):
            db_limit = user_limit = 0  # counted, never refused: an admin can always get in
        reached = self.registry.client_slots.take(client.dbname, db_limit, client.user, user_limit)
        if reached:
            raise ProtocolError(
                f"no more connections allowed ({reached})", sqlstate.TOO_MANY_CONNECTIONS
            )
        client.counted = True

    # --- the hand-off -----------------------------------------------------------

    def _authenticated(self) -> None:
        client = self.client
        if self._unknown_database:
            raise self._no_such_database()
        console = client.dbname in ADMIN_DATABASES
        self._take_client_slot()
        client.send(messages.authentication_ok())
        GLOBAL.logins += 1  # the stats line's "client logins/s"
        self.registry.login_done(client)
        # Bytes after the startup packet: the first messages after the login.
        reader = self._reader if self._reader is not None else self._startup
        leftover = reader.take_remaining()
        if console:
            self._open_console(client, leftover, self._own_user)
            return
        if pgbouncer_shutdown(self.registry.control):  # the console only (objects.c)
            raise ProtocolError("pooler is shutting down", sqlstate.CANNOT_CONNECT_NOW)
        if self.registry.flags.is_disabled(client.dbname):
            raise ProtocolError(
                f'database "{client.dbname}" is disabled', sqlstate.CANNOT_CONNECT_NOW
            )
        assert client.database is not None
        if client.dbname not in self.config.databases and not self.registry.pools_of(client.dbname):
            # the "*" entry stands for this database from now on (PgBouncer's words)
            log.info("auto_database_registered", **client.log_fields())
        pool = self.registry.pool_for(client.dbname, client.database, client.user)
        pool.stats.total_client_login_count += 1
        client.feed_to(None)  # from here on the client's bytes are its own
        client.join(pool, leftover, self._translator(pool))

    def _translator(self, pool: Pool) -> Translator | None:
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
            settings.listen_mode,
        )


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The uid of a unix-socket peer (SO_PEERCRED), None when unknown."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return int(_UCRED.unpack(raw)[1])

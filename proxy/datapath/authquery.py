"""auth_query: secrets of users the users file does not list, asked of PostgreSQL.

PgBouncer's auth_query. `auth.query` (e.g. `SELECT usename, passwd FROM
pg_shadow WHERE usename = $1`) runs as `auth.query_user` in the database the
client asked for, through asyncpg; the second column of the first row is the
user's secret (plain, md5 hash or SCRAM secret). A row whose secret is NULL
(PgBouncer's default query gives one for an expired password) is a user that
exists but whose password never matches; no row at all is no such user.
Answers are cached for
`auth.query_cache_ttl` so a burst of logins costs one query, and concurrent
logins of one user share a single lookup.

Which user, query and database a lookup uses (PgBouncer's per-database
auth_user / auth_query / auth_dbname over the global ones) is a ``Lookup``,
chosen by authdb.py.

A lookup that fails (PostgreSQL down, wrong query, bad query_user password)
is logged and treated as "no such user": the client gets the ordinary
password failure (28P01), never a crash and never the reason. Under
PgBouncer's rules (`auth.pgbouncer_rules`) the client hears what PgBouncer
says instead: PostgreSQL's refusal of the auth_user's login in its own words,
"bouncer config error" for a query PostgreSQL rejects; PostgreSQL refusing
the auth_user's login is also logged as the server login that failed. The
query user itself is never looked up, so it cannot log in through its own query.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, NamedTuple

import asyncpg

from pgmux.protocol import sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.config.userlist import secret_kind

if TYPE_CHECKING:
    from pgmux.proxy.core.authstate import AuthState

log = get_logger("pgmux.authquery")

MAX_CONNECTIONS = 8  # asyncpg connections kept, one per upstream database
MAX_CACHED = 10_000  # cached answers; the oldest go first


class Lookup(NamedTuple):
    """Where and as whom one auth_query runs."""

    host: str
    port: int
    dbname: str  # the upstream database
    user: str  # the auth_user
    query: str

    @property
    def server(self) -> tuple[str, int, str, str]:
        return self.host, self.port, self.dbname, self.user


class Found(NamedTuple):
    """auth_query found the user: its secret, None when the query gave NULL
    (no password matches it, but the user exists: trust lets it in)."""

    secret: str | None


class _ConnectRefused(Exception):
    """PostgreSQL refused the auth_user's login (its ErrorResponse as cause)."""


class AuthQuery:
    """Cached, concurrency-safe auth_query lookups for one daemon."""

    def __init__(self, state: AuthState) -> None:
        self.state = state  # config (auth.*, timeouts), the users file, TLS to PostgreSQL
        self._cache: OrderedDict[tuple[Lookup, str], tuple[float, Found | None]] = OrderedDict()
        self._inflight: dict[tuple[Lookup, str], asyncio.Future[Found | None]] = {}
        self._conns: OrderedDict[tuple[str, int, str, str], asyncpg.Connection] = OrderedDict()
        self._locks: dict[tuple[str, int, str, str], asyncio.Lock] = {}

    async def secret(self, target: Lookup, user: str) -> Found | None:
        """What the query found for USER; None when it found no row, when USER
        is the query user, or when the lookup failed (a ProtocolError for the
        client under PgBouncer's rules)."""
        if user == target.user:
            return None
        key = (target, user)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._lookup_and_remember(key, target, user))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _lookup_and_remember(
        self, key: tuple[Lookup, str], target: Lookup, user: str
    ) -> Found | None:
        try:
            result = await self._lookup(target, user)
        except Exception as exc:  # any failure is "no such user" for the client
            cause = exc.__cause__ if isinstance(exc, _ConnectRefused) else exc
            if isinstance(exc, _ConnectRefused):
                _log_refused_login(target, cause)
            log.warning("auth_query_failed", db=target.dbname, user=user, error=_describe(cause))
            if self.state.config.auth.pgbouncer_rules:
                _raise_as_pgbouncer(exc)
            return None
        self._remember(key, result)
        return result

    def forget(self, target: Lookup, user: str) -> None:
        """Drop a cached answer (a login failed with it: the password may have changed)."""
        self._cache.pop((target, user), None)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.terminate()
        self._conns.clear()

    # --- internals ------------------------------------------------------------

    def _remember(self, key: tuple[Lookup, str], secret: Found | None) -> None:
        ttl = self.state.config.auth.query_cache_ttl
        if not ttl:
            return
        self._cache[key] = (time.monotonic() + ttl, secret)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)

    async def _lookup(self, target: Lookup, user: str) -> Found | None:
        lock = self._locks.setdefault(target.server, asyncio.Lock())
        timeout = self.state.config.timeouts.server_connect or None
        async with lock:  # one asyncpg connection runs one query at a time
            try:
                conn = await self._connection(target, timeout)
            except asyncpg.PostgresError as exc:
                raise _ConnectRefused() from exc
            try:
                row = await conn.fetchrow(target.query, user, timeout=timeout)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError):
                self._drop(target.server)
                raise
        if row is None or len(row) < 2:
            return None
        return Found(None if row[1] is None else str(row[1]))

    async def _connection(self, target: Lookup, timeout: float | None) -> asyncpg.Connection:
        server = target.server
        conn = self._conns.get(server)
        if conn is not None and not conn.is_closed():
            self._conns.move_to_end(server)
            return conn
        conn = await asyncpg.connect(
            host=target.host,
            port=target.port,
            database=target.dbname,
            user=target.user,
            password=self._password(target.user),
            ssl=self._ssl(),
            timeout=timeout or 60,
            statement_cache_size=0,
            server_settings={"application_name": "pgmux auth_query"},
        )
        self._conns[server] = conn
        while len(self._conns) > MAX_CONNECTIONS:
            _, oldest = self._conns.popitem(last=False)
            oldest.terminate()
        return conn

    def _drop(self, server: tuple[str, int, str, str]) -> None:
        conn = self._conns.pop(server, None)
        if conn is not None:
            conn.terminate()

    def _password(self, query_user: str) -> str | None:
        auth = self.state.config.auth
        if auth.query_password is not None and query_user == auth.query_user:
            return auth.query_password
        secret = self.state.users.get(query_user)
        # asyncpg needs the plain password; a hash in the users file cannot log in.
        if secret is None or secret_kind(secret) != "plain":
            return None
        return secret

    def _ssl(self) -> Any:
        tls = self.state.tls.server
        if tls.context is None:
            return False
        if tls.required:
            return tls.context
        return "prefer"


def _log_refused_login(target: Lookup, cause: BaseException | None) -> None:
    """PostgreSQL refused the auth_user's login: the same event as a pool's
    refused server login (PgBouncer runs auth_query on a pool's server)."""
    if not isinstance(cause, asyncpg.PostgresError):
        return
    severity = getattr(cause, "severity", None) or "FATAL"
    log.warning(
        "server_connect_failed",
        db=target.dbname,
        user=target.user,
        error=_describe(cause),
        severity=severity,
        purpose="auth_query",
    )


def _raise_as_pgbouncer(exc: Exception) -> None:
    """PgBouncer's answer to a failed auth_query: a refused login in
    PostgreSQL's words, a rejected query as a configuration error."""
    cause = exc.__cause__ if isinstance(exc, _ConnectRefused) else None
    if isinstance(cause, asyncpg.PostgresError):
        code = cause.sqlstate or sqlstate.INVALID_AUTHORIZATION
        raise ProtocolError(str(cause), code) from None
    if isinstance(exc, asyncpg.PostgresError):
        raise ProtocolError("bouncer config error", sqlstate.CONFIG_FILE_ERROR) from None


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc.sqlstate} {exc}"  # PostgreSQL's message never holds the password
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"

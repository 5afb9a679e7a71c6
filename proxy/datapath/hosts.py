"""Which PostgreSQL a new server connection goes to, when a database has several.

A database lists its hosts (`host: [a, b]`, PgBouncer's `host=a,b`); each new
server login tries them in turn, as libpq does: a host that cannot be reached,
refuses the login, or is not what `target_session_attrs` asks for is skipped
for the next one. The check runs once per server, right after its login, with
one cheap statement that fails when the server does not match (so no result
row needs reading). `load_balance_hosts` chooses the order of each attempt.

Failover follows from this: when the primary dies its servers are lost, the
next logins skip it (and a standby, until it is promoted), and the waiting
clients keep waiting under the usual back-off (connect_failure.py). When a
login finds the primary on another host than before, the servers still open
to the old one are retired: idle ones close now, linked ones when released.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.core.states import SERVER_IDLE
from pgmux.proxy.datapath import probe, server_checks, server_login
from pgmux.proxy.datapath.hostbook import BOOK, targets
from pgmux.proxy.datapath.server import ServerConnection, ServerError, ServerLost

if TYPE_CHECKING:
    from pgmux.proxy.config import DatabaseConfig
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.server import ServerCredentials

log = get_logger("pgmux.pool")

# target_session_attrs -> a statement that fails (division by zero) unless the
# server is what was asked for. None: any server will do.
_CHECKS: dict[str, str | None] = {
    "any": None,
    "read-write": "SELECT 1 / (current_setting('transaction_read_only') = 'off')::int",
    "read-only": "SELECT 1 / (current_setting('transaction_read_only') = 'on')::int",
    "primary": "SELECT 1 / (NOT pg_is_in_recovery())::int",
    "standby": "SELECT 1 / pg_is_in_recovery()::int",
}
# Attributes whose servers must be the one primary: a new one retires the old.
_PRIMARY_ONLY = ("read-write", "primary")


class WrongServer(Exception):
    """The server logged in but is not what target_session_attrs asks for."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One host to try, and what the server there must be."""

    credentials: ServerCredentials
    attrs: str


class HostPlan:
    """Per pool: the order of the hosts for each new login, and the host the
    last primary-only login reached (to notice a failover)."""

    def __init__(self) -> None:
        self._turn = itertools.count()
        self.primary: tuple[str, int] | None = None

    def attempts(self, database: DatabaseConfig, base: ServerCredentials) -> list[Attempt]:
        hosts = targets(database)
        mode = database.load_balance_hosts
        if mode == "random":
            random.shuffle(hosts)
        elif mode == "round-robin" and len(hosts) > 1:
            start = next(self._turn) % len(hosts)
            hosts = hosts[start:] + hosts[:start]
        now = time.monotonic()  # hosts marked down go last (hostbook.py)
        hosts.sort(key=lambda where: BOOK.skipped(where, now))
        hosts = in_rotation(database, hosts)
        attrs = database.target_session_attrs
        passes = ["standby", "any"] if attrs == "prefer-standby" else [attrs]
        return [
            Attempt(dataclasses.replace(base, host=host, port=port), want)
            for want in passes
            for host, port in hosts
        ]


def in_rotation(database: DatabaseConfig, hosts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """HOSTS without the standbys lagging over max_replica_lag, unless that
    leaves none (a lagging standby serves better than no server)."""
    limit = database.max_replica_lag
    if not limit:
        return hosts
    current = [where for where in hosts if not BOOK.lagging(where, limit)]
    return current or hosts


async def login(pool: Pool, server: ServerConnection, attempts: list[Attempt]) -> None:
    """Log SERVER in at the first of ATTEMPTS that works (SERVER is for the
    first), trying the others in turn; then hand it to the pool (or report
    the last host's failure)."""
    timeout = pool.timeouts.server_connect
    if len(attempts) > 1:
        probe.ensure_running(pool.registry)
    for number, attempt in enumerate(attempts):
        if number:
            server = _replace(pool, server, attempt.credentials)
        try:
            await server_login.connect(server, attempt.credentials, timeout)
            await server.wait_login(timeout)
            await _check(server, attempt.attrs, timeout)
            await server_checks.run_connect_query(pool, server)
        except (OSError, TimeoutError, ServerLost, ServerError, ProtocolError, WrongServer) as exc:
            _note_failure(pool, server, attempt, exc)
            if number == len(attempts) - 1 or server not in pool.servers:
                pool.login_failed(server, exc)
                return
            _skip(pool, attempt, exc)
            continue
        _found(pool, attempt)
        if len(attempts) > 1:
            BOOK.succeeded(_where(attempt), _role(server))
        await pool.finish_login(server)
        return


def _replace(pool: Pool, server: ServerConnection, creds: ServerCredentials) -> ServerConnection:
    """A fresh connection for the next host, in the slot of the one that failed."""
    pool.forget(server)
    server.abort()
    fresh = ServerConnection(pool, creds)
    pool.add_server(fresh)
    return fresh


async def _check(server: ServerConnection, attrs: str, timeout: float) -> None:
    sql = _CHECKS[attrs]
    if sql is None:
        return
    try:
        await server.query(sql, timeout or None)
    except ServerError as exc:
        raise WrongServer(f"server is not {attrs} ({exc.sqlstate} {exc})") from None


def _where(attempt: Attempt) -> tuple[str, int]:
    return attempt.credentials.host, attempt.credentials.port


def _role(server: ServerConnection) -> str:
    """What the server said of itself at login (in_hot_standby: PostgreSQL 14+)."""
    hot = server.params.get("in_hot_standby")
    return {"on": "standby", "off": "primary"}.get(hot or "", "unknown")


def _note_failure(
    pool: Pool, server: ServerConnection, attempt: Attempt, exc: BaseException
) -> None:
    """Tell the host book: a wrong role is a host that is up; the rest count."""
    if len(targets(pool.database)) < 2:
        return
    error = server_login.describe(exc)
    if isinstance(exc, WrongServer):
        BOOK.mismatched(_where(attempt), _role(server), error)
        return
    health = pool.registry.config.health
    BOOK.failed(_where(attempt), error, health.failures, health.interval)


def _skip(pool: Pool, attempt: Attempt, exc: BaseException) -> None:
    creds = attempt.credentials
    log.info(
        "server_host_skipped",
        db=pool.dbname,
        user=pool.user,
        host=creds.host,
        port=creds.port,
        target_session_attrs=attempt.attrs,
        error=server_login.describe(exc),
    )


def _found(pool: Pool, attempt: Attempt) -> None:
    """A login reached ATTEMPT's host: if it is a new primary, retire the old one's servers."""
    if attempt.attrs not in _PRIMARY_ONLY or len(targets(pool.database)) < 2:
        return
    creds = attempt.credentials
    where = (creds.host, creds.port)
    previous, pool.hosts.primary = pool.hosts.primary, where
    if previous is None or previous == where:
        return
    log.warning(
        "server_primary_moved",
        db=pool.dbname,
        user=pool.user,
        old=f"{previous[0]}:{previous[1]}",
        new=f"{where[0]}:{where[1]}",
    )
    retire(pool, previous)


def drop_unlisted(pool: Pool, previous: DatabaseConfig) -> None:
    """A reload changed the host list: servers to the hosts no longer listed
    drain (idle ones close now, the others when released); new logins use
    the new list (attempts() reads it each time)."""
    listed = set(targets(pool.database))
    gone = [where for where in targets(previous) if where not in listed]
    if pool.hosts.primary in gone:
        pool.hosts.primary = None
    for where in gone:
        log.info(
            "server_host_unlisted", db=pool.dbname, user=pool.user, host=where[0], port=where[1]
        )
        retire(pool, where, "host unlisted")


def retire(pool: Pool, where: tuple[str, int], reason: str = "primary moved") -> None:
    """Servers of POOL to WHERE close: idle ones now, the others once released."""
    for server in list(pool.servers):
        if (server.credentials.host, server.credentials.port) != where:
            continue
        if server.state is SERVER_IDLE:
            pool.close_server(server, reason)
        else:
            server.close_when_released = True

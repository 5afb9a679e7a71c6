"""A server login that failed: count it, log it, and choose when to try again.

PostgreSQL refusing the login (or breaking the protocol, or a TLS
negotiation that fails) waits the full `server_login_retry`, and the waiting
clients hear PostgreSQL's error at once (not a TLS failure's: they wait on);
PostgreSQL down or starting up retries soon (core/backoff.py) while clients
wait. Logins failing together in one round are logged once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pgmux.protocol import sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.datapath import server_login
from pgmux.proxy.datapath.server import ServerError

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool

log = get_logger("pgmux.pool")


def waiting_error(exc: ServerError) -> str:
    """What the waiting clients hear: PostgreSQL's own words, as a direct
    connection (and PgBouncer) would give them; pgmux's refusals say so."""
    return f"server login failed: {exc}" if exc.own else str(exc)


def record(pool: Pool, exc: BaseException, where: dict[str, object] | None = None) -> None:
    """POOL's login failed with EXC (WHERE: the server's log fields, if any)."""
    reason = server_login.describe(exc)
    streak = pool.last_connect_error is not None  # reset by a login that succeeds
    pool.last_connect_error = reason
    pool.stats.connect_errors += 1
    pool.stats.add_error("server_connect")
    if isinstance(exc, TimeoutError) or reason == "server_connect timeout":
        pool.stats.add_timeout("server_connect")
    now, limit = time.monotonic(), pool.timeouts.server_login_retry
    fields = {"db": pool.dbname, "user": pool.user, "error": reason, **(where or {})}
    if isinstance(exc, ServerError):
        fields["severity"] = exc.severity
    refused = isinstance(exc, ServerError) and exc.sqlstate != sqlstate.CANNOT_CONNECT_NOW
    if refused or isinstance(exc, ProtocolError):  # no quick retry (see core/backoff.py)
        log.warning("server_connect_failed", **fields, retry_in=limit)
        pool.retry_at = now + limit
        pool.backoff.refused(pool.retry_at)
        # PostgreSQL said no: waiters hear why now. A failed TLS negotiation
        # (a certificate that does not verify) is not PostgreSQL's answer:
        # as in PgBouncer, clients wait while the login is retried.
        if isinstance(exc, ServerError) and not exc.tls:
            pool.fail_waiting(exc.sqlstate, waiting_error(exc))
        elif pool.waiting:
            pool.schedule_retry(limit)
    elif pool.backoff.failed(now, limit, streak):  # down, or starting up: soon again
        pool.retry_at = pool.backoff.next_at
        retry_in = (pool.backoff.waiting_at if pool.waiting else pool.retry_at) - now
        log.warning("server_connect_failed", **fields, retry_in=round(retry_in, 3))
        if pool.waiting:
            pool.schedule_retry(retry_in)
    else:  # failed together with a login of this round: logged once
        log.debug("server_connect_failed", **fields)

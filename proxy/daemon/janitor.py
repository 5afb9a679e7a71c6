"""Periodic work in one place (PgBouncer's janitor.c): every timeout and the
pool sizing that does not happen on the data path.

Each tick looks only at what can expire: the head of each wait queue (FIFO, so
the head waited longest), idle servers, and clients still logging in.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING

from pgmux.protocol import messages, sqlstate
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.core.states import READY, ClientState
from pgmux.proxy.datapath import fast_close
from pgmux.proxy.datapath.endings import IDLE_TRANSACTION, TRANSACTION, ending
from pgmux.proxy.datapath.replies import query_clock

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.janitor")

TICK_SECONDS = 0.25

# PgBouncer's words (janitor.c), for query_wait_notify
_QUEUED_NOTICE = messages.notice_response(
    sqlstate.SUCCESSFUL_COMPLETION,
    "No server connection available in postgres backend, client being queued",
)


def _waits_for_copy_data(client: ClientConnection) -> bool:
    """In COPY FROM STDIN with all it sent delivered: PostgreSQL waits for its next
    CopyData, as it waits for the next statement of a client idle in a transaction."""
    server = client.server
    return (
        client.copy_rfq == client.expect_rfq
        and client.state is ClientState.ACTIVE
        and server is not None
        and not server.transport.get_write_buffer_size()
    )


class Janitor:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._task: asyncio.Task[None] | None = None
        self.timeouts: Counter[str] = Counter()  # every timeout that fired, by name
        # pools whose database a reload removed: their clients finish, then close
        self.draining: set[Pool] = set()
        self._unused_since: dict[Pool, float] = {}  # pools with no client and no server
        self._notified: dict[ClientConnection, float] = {}  # queued clients told, by wait start

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                self.tick(time.monotonic())
            except Exception:  # the janitor must outlive any single bad object
                log.exception("janitor_error")
            await asyncio.sleep(TICK_SECONDS)

    def tick(self, now: float) -> None:
        for pool in list(self.registry.pools.values()):
            pool.expire_waiting(now)
            if pool.waiting and pool.timeouts.query_wait_notify:
                self._notify_waiting(pool, now)
            pool.expire_servers(now)
            if pool.settings.server_fast_close and pool.mode == "session":
                fast_close.close_marked_sessions(pool)
            if pool.waiting:
                pool.grow()  # reserve_size may apply now, or a slot was freed
            pool.ensure_min_size()
            self._expire_clients(pool, now)
            if pool.timeouts.pool_idle:
                self._expire_pool(pool, now)
        for pool in list(self.draining):
            self._drain(pool, now)
        self._expire_logins(now)
        if self._notified:  # forget the clients whose wait is over
            self._notified = {
                client: started
                for client, started in self._notified.items()
                if client.wait_started == started and client.state in READY
            }

    def _notify_waiting(self, pool: Pool, now: float) -> None:
        """query_wait_notify: a NOTICE, once per wait, to each logged-in client
        queued for a server longer than that (PgBouncer's per_loop_activate)."""
        limit = pool.timeouts.query_wait_notify
        for client in pool.waiting:  # FIFO: the first ones waited longest
            started = client.wait_started
            if now - started <= limit:
                break
            if client.state in READY and self._notified.get(client) != started:
                self._notified[client] = started
                client.send(_QUEUED_NOTICE)

    def drain(self, pool: Pool) -> None:
        """A reload removed this pool's database: let its clients finish, then close."""
        pool.close()
        self.draining.add(pool)

    def _drain(self, pool: Pool, now: float) -> None:
        message = f'database "{pool.dbname}" was removed from the configuration'
        pool.fail_waiting(sqlstate.ADMIN_SHUTDOWN, message)  # no server will open for them
        for client in list(pool.clients):
            server = client.server  # session mode: linked, but maybe between transactions
            if not client.running and (server is None or server.clean_for_release):
                client.fail(sqlstate.ADMIN_SHUTDOWN, message)
        self._expire_clients(pool, now)
        if not pool.clients and not pool.servers:
            self.draining.discard(pool)
            log.info("pool_removed", db=pool.dbname, user=pool.user)

    def _expire_pool(self, pool: Pool, now: float) -> None:
        """pool_idle: forget a pool nobody used for that long (PgBouncer's
        cleanup_inactive_pools); the next client creates it again."""
        kept = pool.settings.min_size and pool.database.user  # min_size keeps it busy
        if pool.clients or pool.servers or kept or pool.shared_rows is not None:
            self._unused_since.pop(pool, None)
            return
        since = self._unused_since.setdefault(pool, now)
        if now - since < pool.timeouts.pool_idle:
            return
        del self._unused_since[pool]
        if self.registry.pools.get((pool.dbname, pool.user)) is pool:
            del self.registry.pools[(pool.dbname, pool.user)]
        pool.close()
        log.info("pool_idle_removed", db=pool.dbname, user=pool.user, age=round(now - since))

    # --- client timeouts ----------------------------------------------------

    def _expire_clients(self, pool: Pool, now: float) -> None:
        """client_idle, idle_transaction, query and message, with this pool's values."""
        limits = pool.timeouts
        if not (
            limits.client_idle or limits.idle_transaction or limits.query or limits.transaction
        ):
            if limits.message:  # the default: only clients mid-message can expire
                for client in [c for c in pool.clients if c.partial_since]:
                    if client.state in READY:
                        self._check_message(pool, client, now)
            return
        for client in list(pool.clients):
            if client.state not in READY:
                continue
            if client.partial_since and self._check_message(pool, client, now):
                continue
            if limits.transaction and self._check_transaction(pool, client, now):
                continue
            if client.running and not client.stalled:  # stalled: idle since its last byte
                if limits.query and client.expect_rfq > 0:
                    self._check_query(pool, client, now)
                # A COPY waiting for its data runs (query) and idles (since its last byte).
                if client.state not in READY or not _waits_for_copy_data(client):
                    client.idle_mark = now  # idle time counts from the end of its request
                    continue
            idle = now - max(client.idle_mark, client.last_active)
            server = client.server
            if server is not None and not server.clean_for_release:
                if limits.idle_transaction and idle >= limits.idle_transaction:
                    # FATAL, as PostgreSQL's idle_in_transaction_session_timeout;
                    # the pool rolls the server back and reuses it.
                    self._fire(pool, client, "idle_transaction", idle)
                    client.fail(*ending(self.registry.config, IDLE_TRANSACTION))
            elif limits.client_idle and idle >= limits.client_idle:
                self._fire(pool, client, "client_idle", idle)
                client.fail(
                    sqlstate.IDLE_SESSION_TIMEOUT,
                    "terminating connection due to client_idle_timeout",
                )

    def _check_message(self, pool: Pool, client: ClientConnection, now: float) -> bool:
        """End a client whose message has been arriving for longer than timeouts.message."""
        limit = pool.timeouts.message
        if not limit or now - client.partial_since < limit:
            return False
        self._fire(pool, client, "message", now - client.partial_since)
        client.fail(
            sqlstate.PROTOCOL_VIOLATION,
            "terminating connection: incomplete message for longer than timeouts.message",
        )
        return True

    def _check_transaction(self, pool: Pool, client: ClientConnection, now: float) -> bool:
        """End a client whose transaction (running or idle) is older than timeouts.transaction."""
        started = client.xact_started
        if not started or client.server is None or now - started < pool.timeouts.transaction:
            return False
        # FATAL, as PostgreSQL 17's transaction_timeout; the pool rolls the server back.
        self._fire(pool, client, "transaction", now - started)
        client.fail(*ending(self.registry.config, TRANSACTION))
        return True

    def _check_query(self, pool: Pool, client: ClientConnection, now: float) -> None:
        server = client.server
        if server is None:
            return  # still waiting for a server: query_wait covers that
        limits = pool.timeouts
        started = query_clock(client, server)
        if now - started < limits.query:
            return
        if client.query_cancelled != started:
            # PostgreSQL stops the statement and answers 57014 itself, so the
            # client and the server stay in step and the server stays usable.
            self._fire(pool, client, "query", now - started)
            client.query_cancelled = started
            client.cancel_sent_at = now
            self.registry.cancels.cancel_server(server)
        elif limits.cancel_wait and now - client.cancel_sent_at >= limits.cancel_wait:
            # The statement ignored the cancel: end the client; the pool
            # cancels again and closes the server if it does not come back.
            self._fire(pool, client, "cancel_wait", now - client.cancel_sent_at)
            client.fail(sqlstate.QUERY_CANCELED, "canceling statement due to query timeout")

    def _fire(self, pool: Pool | None, client: ClientConnection, name: str, after: float) -> None:
        self.timeouts[name] += 1
        if pool is not None:
            pool.stats.add_timeout(name)
        log.info(f"{name}_timeout", after=round(after, 3), **client.log_fields())

    def _expire_logins(self, now: float) -> None:
        default = self.registry.config.timeouts.client_login
        for client in list(self.registry.logging_in):
            database = client.database
            limit = database.timeouts.client_login if database is not None else default
            if limit and now - client.connected_at >= limit:
                pool = self.registry.pools.get((client.dbname, client.user))
                self._fire(pool, client, "client_login", now - client.connected_at)
                client.fail(sqlstate.PROTOCOL_VIOLATION, "client_login_timeout")

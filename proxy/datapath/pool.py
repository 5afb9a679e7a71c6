"""A pool of server connections for one (database, user) pair.

Clients queue FIFO for a server; idle servers are reused most-recently-used
first, so the ones at the bottom of the stack age out with server_idle. Every
change of a server's or client's place in the pool goes through the methods
here: a server's state, the list that holds it and its link to a client
change together in `_set_server_state` and `_link` (PgBouncer's
change_server_state), so the lists the console shows cannot drift from reality.
Chains of hand-offs run as loops here, never as calls back and forth between
pool and client, so a thousand waiting clients cost no stack depth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING

from pgmux.protocol import sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.stats import PoolStats
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.core.backoff import LoginBackoff
from pgmux.proxy.core.states import CLIENT_WELCOME as _WELCOME
from pgmux.proxy.core.states import SERVER_ACTIVE as _ACTIVE
from pgmux.proxy.core.states import SERVER_CANCEL_WAIT as _CANCEL_WAIT
from pgmux.proxy.core.states import SERVER_CLEANING as _CLEANING
from pgmux.proxy.core.states import SERVER_CLOSED as _CLOSED
from pgmux.proxy.core.states import SERVER_IDLE as _IDLE
from pgmux.proxy.core.states import ServerState
from pgmux.proxy.datapath import cleanup, connect_failure, handover, hosts, server_checks
from pgmux.proxy.datapath.logfields import server_log_fields
from pgmux.proxy.datapath.server import (
    ServerConnection,
    ServerCredentials,
    ServerError,
    ServerLost,
)

if TYPE_CHECKING:
    from pgmux.proxy.config import DatabaseConfig, PoolSettings, Timeouts
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.registry import Registry


log = get_logger("pgmux.pool")


def _leave_backpressure(server: ServerConnection, client: ClientConnection | None) -> None:
    """A server leaving a client that reads too slowly (ClientConnection.pause_writing)
    reads again: the backpressure stays with that client. With a cancel on its
    way, core/cancel.py lets it read once the cancel has arrived."""
    previous = server.client
    if (
        previous is not None
        and previous is not client
        and previous.writing_paused
        and not server.cancels_in_flight
    ):
        server.resume_reading()


class Pool:
    def __init__(
        self,
        registry: Registry,
        database: DatabaseConfig,
        dbname: str,
        user: str,
        credentials: ServerCredentials,
        settings: PoolSettings,
    ) -> None:
        self.registry = registry
        # the parts of the registry the pool works with
        self.slots = registry.slots  # server limits shared across pools (core/limits.py)
        self.flags = registry.flags  # PAUSE / SUSPEND / DISABLE (core/flags.py)
        self.cancels = registry.cancels  # CancelRequests to PostgreSQL (core/cancel.py)
        self.database = database
        self.dbname = dbname  # the name clients ask for
        self.user = user  # the user pgmux logs in to PostgreSQL as
        self.credentials = credentials
        self.settings = settings
        self.timeouts: Timeouts = database.timeouts
        # every server, and one list per state (ServerState): each server is in
        # `servers` and in the list of its state, and only _set_server_state and
        # _link move it
        self.servers: set[ServerConnection] = set()
        self.login: set[ServerConnection] = set()
        self.idle: list[ServerConnection] = []  # a stack: the last released is reused first
        self.active: set[ServerConnection] = set()  # linked to a client
        self.cleaning: set[ServerConnection] = set()  # pgmux's own statements after a client
        self.being_canceled: set[ServerConnection] = set()  # a cancel for it is on its way
        # the sets above by ServerState (an int); IDLE is the stack, CLOSED none
        self._by_state = (self.login, self.active, self.cleaning, self.being_canceled)
        self.waiting: deque[ClientConnection] = deque()
        self.clients: set[ClientConnection] = set()
        self.server_params: dict[str, str] | None = None
        self.last_connect_error: str | None = None
        self.retry_at = 0.0  # no server login before this (waiting clients: see backoff)
        self.backoff = LoginBackoff()
        self._retry_handle: asyncio.Handle | None = None
        self._retry_due = 0.0  # loop time of the planned retry
        self.stats = PoolStats()
        self.hosts = hosts.HostPlan()  # the order of the database's hosts (hosts.py)
        self.closed = False
        # with several workers: this pool's rows in the shared ledger
        self.shared_rows: tuple[int, int, int, int] | None = None
        if registry.ledger is not None:
            self.shared_rows = self.slots.shared_rows(dbname, user)
            self.server_params = registry.known_params.get((dbname, user))

    def __repr__(self) -> str:
        return f"<Pool {self.dbname}/{self.user}>"

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def connecting(self) -> int:
        """Servers logging in (sv_login)."""
        return len(self.login)

    @property
    def busy(self) -> bool:
        """A server is logging in, linked, or being cleaned or cancelled."""
        return bool(self.login or self.active or self.cleaning or self.being_canceled)

    # --- the state of a server: only these two methods change it -------------

    def _set_server_state(
        self, server: ServerConnection, state: ServerState, client: ClientConnection | None = None
    ) -> None:
        """Move a server to `state`: out of its old list, into the new one, and
        linked to `client` (None for every state but ACTIVE, which _link sets)."""
        old = server.state
        _leave_backpressure(server, client)
        if old is not state:
            if old is _IDLE:
                idle = self.idle
                if idle and idle[-1] is server:
                    idle.pop()
                else:
                    idle.remove(server)
            elif old is not _CLOSED:
                self._by_state[old].discard(server)
            if state is _IDLE:
                self.idle.append(server)
            elif state is _CLOSED:
                self.servers.discard(server)
            else:
                self._by_state[state].add(server)
            server.state = state
        server.client = client

    def _link(self, server: ServerConnection, client: ClientConnection, now: float = 0.0) -> bool:
        """Link a server to a client (state ACTIVE); False when the client had
        nothing for it after all, and the server is free again."""
        now = now or time.monotonic()
        if self.settings.server_check_query and server_checks.held(self, server, client, now):
            return True  # linked once server_check_query has answered (server_checks.py)
        if server.state is _ACTIVE:
            server.hand_on(now)  # straight from its last client: still active
            _leave_backpressure(server, client)
            server.client = client
        else:
            server.link(now)
            self._set_server_state(server, _ACTIVE, client)
        stats = self.stats
        stats.server_assignments += 1
        if client.wait_started:
            waited = now - client.wait_started
            stats.add_wait(waited)
            client.wait_started = 0.0
            threshold = self.slots.config.logging.wait_threshold  # an attribute, not a property
            if threshold and waited >= threshold:
                log.warning(
                    "wait_exceeded",
                    waited=round(waited, 3),
                    threshold=threshold,
                    server_id=server.id,
                    **client.log_fields(),
                )
        return client.server_assigned(server)

    # --- clients ----------------------------------------------------------

    def acquire(self, client: ClientConnection) -> None:
        """Give the client a server now, or queue it (FIFO) until one is free."""
        if self.idle and not self.waiting and not self.flags.is_paused(self.dbname):
            server = self.idle[-1]
            if not self._link(server, client):
                self.release(server)
            return
        client.wait_started = time.monotonic()
        self.waiting.append(client)
        if self.shared_rows is not None:
            self.waiting_changed()
        if len(self.servers) < self.settings.size or self.settings.reserve_size:
            self.grow()  # else every server is ours and busy: nothing to open

    def cancel_wait(self, client: ClientConnection) -> None:
        with contextlib.suppress(ValueError):
            self.waiting.remove(client)
            self.waiting_changed()

    def fail_waiting(self, code: str, message: str) -> None:
        """Every queued client gets this error (no server will come for them)."""
        while self.waiting:
            self.waiting.popleft().wait_failed(code, message)
        self.waiting_changed()

    def waiting_changed(self) -> None:
        """Tell the other workers how many of ours wait, and since when.
        (The two hot-path callers check shared_rows themselves, saving a call.)"""
        ledger = self.slots.ledger
        if ledger is None or self.shared_rows is None:
            return
        waiting = self.waiting
        ledger.set_waiting(
            self.shared_rows[0], len(waiting), waiting[0].wait_started if waiting else 0.0
        )
        if not waiting and self in self.slots.starving:
            self.slots.stop_starving(self)  # the next waiter asks the others afresh

    def server_total(self) -> int:
        """Servers of this pool in all workers."""
        if self.shared_rows is None:
            return len(self.servers)
        assert self.slots.ledger is not None
        return self.slots.ledger.total(self.shared_rows[0])

    # --- servers coming back ---------------------------------------------

    def release(self, server: ServerConnection, now: float = 0.0) -> None:
        """A clean server comes back from a client (or from login or cleanup);
        `now`, when given, is the time its ReadyForQuery was read (one clock read
        for all)."""
        if server.state is _CLOSED:
            return
        if server.cancels_in_flight:
            # A cancel is still on its way to this backend; handed on now, it
            # could stop the next client's query. cancel_finished releases it.
            self._set_server_state(server, _CANCEL_WAIT)
            return
        if server.dirty:
            # Session state left behind (session_state: reset, or a pinned client
            # that disconnected): clean it before anyone else gets the server.
            self._set_server_state(server, _CLEANING)
            spawn(cleanup.reset_then_release(self, server))
            return
        now = now or time.monotonic()
        if self._should_close(server, now):
            server.unlink(now)
            self.close_server(server, "lifetime or reconnect")
            if self.waiting:
                self.grow()  # a replacement, with the current settings
            return
        if self.flags.is_paused(self.dbname):
            server.unlink(now)
            self.close_server(server, "paused")  # PAUSE disconnects servers once released
            return
        waiting = self.waiting
        while True:
            # Another worker's clients may deserve it more, each time it comes free.
            if self.shared_rows is not None and handover.hand_over_to_taker(self, server):
                return
            if not waiting:
                break
            # The usual case under load: straight to the next client, never idle.
            client = waiting.popleft()
            if self.shared_rows is not None:
                self.waiting_changed()
            if self._link(server, client, now):
                return
            if server.state is _CLOSED:
                return
        server.unlink(now)
        if self.slots.has_starving_pools(self) and self.server_total() > self.settings.min_size:
            # Another pool waits for a slot under a shared limit: lend it ours.
            self.close_server(server, "slot handed to another pool")
            return
        self._set_server_state(server, _IDLE)

    def cancel_finished(self, server: ServerConnection) -> None:
        """The last cancel in flight for a server reached PostgreSQL."""
        if not server.cancels_in_flight and server.state is _CANCEL_WAIT:
            self.release(server)

    def _should_close(self, server: ServerConnection, now: float) -> bool:
        if server.close_when_released or self.closed:
            return True
        lifetime = self.timeouts.server_lifetime
        # A server fresh from its login is not past its lifetime until it has
        # served a client: a lifetime shorter than a login must not close every
        # new server before its first use (PgBouncer's server_lifetime = 0).
        used = server.linked_at > 0.0
        return bool(lifetime) and used and now - server.connected_at >= lifetime

    def close_server(self, server: ServerConnection, reason: str) -> None:
        known = server in self.servers
        client = server.client
        self.forget(server)
        server.close(reason)
        if client is not None and client.server is server:
            client.server_lost(server)
        if known:
            log.info(
                "pool_shrink",
                db=self.dbname,
                user=self.user,
                server_id=server.id,
                reason=reason,
                servers=len(self.servers),
                **server_log_fields(server),
            )

    def server_lost(self, server: ServerConnection) -> None:
        """connection_lost of a server (expected or not): its client hears of it."""
        client = server.client
        self.forget(server)
        if client is not None:
            if server.forwarded_partial:
                # The client holds part of a message: an ErrorResponse would be
                # read as the rest of it. It gets the close alone, as from PostgreSQL.
                client.transport.close()
            client.server_lost(server)

    def forget(self, server: ServerConnection, shared: bool = True) -> None:
        """The server leaves the pool (closed, or moved to another worker: not SHARED)."""
        known = server in self.servers
        self._set_server_state(server, _CLOSED)
        if known:
            self.slots.freed(self, shared)

    def add_server(self, server: ServerConnection) -> None:
        """A new server (logging in, or adopted from another worker) joins the pool."""
        self.servers.add(server)
        self.login.add(server)
        self.slots.taken(self)

    def learn_params(self, server: ServerConnection) -> None:
        """The pool's first logged-in server tells the parameters every welcome needs."""
        if self.server_params is not None:
            return
        self.server_params = dict(server.params)
        self.registry.params_learned(self)
        self._welcome_waiters(self.server_params)

    def _welcome_waiters(self, params: dict[str, str]) -> None:
        """Clients queued only for their welcome (every mode but session) get it
        now, without a server: one loop, however many they are."""
        welcomed = [c for c in self.waiting if c.state is _WELCOME and c.release_on_idle]
        if not welcomed:
            return
        keep = [c for c in self.waiting if c.state is not _WELCOME or not c.release_on_idle]
        self.waiting.clear()
        self.waiting.extend(keep)
        self.waiting_changed()
        for client in welcomed:
            client.wait_started = 0.0
            client.welcome(params)

    # --- servers moving between workers (listen.workers > 1) ----------------
    # (the moves themselves: datapath/handover.py)

    def params_heard(self, params: dict[str, str]) -> None:
        """Another worker learned this pool's server parameters: clients
        waiting only for their welcome get it without a server."""
        if self.server_params is not None:
            return
        self.server_params = params
        self._welcome_waiters(params)

    # --- a client leaving while linked ------------------------------------

    def abandon(self, server: ServerConnection, client: ClientConnection) -> None:
        """The client disconnected while `server` was linked to it.

        A server is never returned dirty: a clean one goes back at once; one
        mid-transaction is rolled back (pool.rollback_abandoned) or closed; one
        with half a message from the client on the wire is always closed.
        """
        expect = max(client.expect_rfq - server.responses.skipped_queries, 0)
        # A Query skipped after a failed request closed no batch: it still needs a Sync.
        in_batch = client.in_batch or server.responses.skipping
        clean = not expect and not in_batch and server.clean_for_release and not server.dirty
        if client.mid_message or server.state is ServerState.CLOSED:
            self.close_server(server, "client left mid-message")
        elif expect and client.query_in_batch and client.translator is None:
            # Its count may include a Query PostgreSQL skipped (the translator knows).
            self.close_server(server, "client left with a Query inside a batch")
        elif clean and self.mode != "session":
            self.release(server)
        elif clean or self.settings.rollback_abandoned:
            self._set_server_state(server, _CLEANING)
            cleanup.clean_abandoned(self, server, expect, in_batch)
        else:
            self.close_server(server, "client left mid-transaction")

    # --- growing ----------------------------------------------------------

    def size_limit(self) -> int:
        """pool_size, plus reserve_size once a client has waited reserve_timeout."""
        limit = self.settings.size
        if self.settings.reserve_size and self.waiting:
            waited = time.monotonic() - self.waiting[0].wait_started
            if waited >= self.settings.reserve_timeout:
                limit += self.settings.reserve_size
        return limit

    def grow(self) -> None:
        """Open servers for waiting clients, within every limit."""
        wanted = len(self.waiting) - self.connecting
        while wanted > 0 and self._may_connect():
            if len(self.servers) >= self.settings.size and self.waiting:
                # PgBouncer's warning, on the client that waited longest
                log.warning("reserve_pool_taken", **self.waiting[0].log_fields())
            self._open_server()
            wanted -= 1

    def ensure_min_size(self) -> None:
        while self.server_total() < self.settings.min_size and self._may_connect(quiet=True):
            self._open_server()

    def _may_connect(self, quiet: bool = False) -> bool:
        if self.closed or self.registry.shutting_down or self.flags.is_paused(self.dbname):
            return False
        now = time.monotonic()
        # QUIET (min_size) keeps the whole back-off; waiting clients retry sooner.
        retry_at = self.retry_at if quiet else min(self.retry_at, self.backoff.waiting_at)
        if now < retry_at:
            if not quiet:  # a retry serves only waiting clients (grow)
                self.schedule_retry(retry_at - now)
            return False
        if self.shared_rows is None and len(self.servers) >= self.size_limit():
            return False  # with several workers the ledger checks the size
        return self.slots.may_open(self, register_starving=not quiet)

    def schedule_retry(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if (handle := self._retry_handle) is not None:
            if self._retry_due <= due:
                return  # an earlier retry is already planned
            handle.cancel()
        # uvloop returns a plain Handle (no when()) for a delay <= 0
        self._retry_due = due
        self._retry_handle = loop.call_later(delay, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        self.grow()

    def _open_server(self) -> None:
        attempts = self.hosts.attempts(self.database, self.credentials)
        server = ServerConnection(self, attempts[0].credentials)
        self.add_server(server)
        spawn(hosts.login(self, server, attempts))  # each host in turn (hosts.py)

    async def finish_login(self, server: ServerConnection) -> None:
        """The server is connected: wait for PostgreSQL's welcome, then release
        it into the pool (the first one also tells the pool's parameters)."""
        try:
            await server.wait_login(self.timeouts.server_connect)
        except (ServerLost, ServerError, ProtocolError) as exc:
            self.login_failed(server, exc)
            return
        if server not in self.servers:  # closed while logging in (reload, shutdown)
            server.close()
            return
        self.learn_params(server)
        if self.last_connect_error:
            log.info("server_connect_recovered", db=self.dbname, user=self.user)
        self.last_connect_error = None
        self.stats.servers_opened += 1
        log.info(
            "pool_grow",
            db=self.dbname,
            user=self.user,
            server_id=server.id,
            backend_pid=server.backend_pid,
            servers=len(self.servers),
            **server_log_fields(server),
        )
        self.release(server)

    def login_failed(self, server: ServerConnection, exc: BaseException) -> None:
        where = server_log_fields(server)  # before abort() closes the socket
        self.forget(server)
        server.abort()
        self._connect_failed(exc, where)

    def _connect_failed(self, exc: BaseException, where: dict[str, object] | None = None) -> None:
        connect_failure.record(self, exc, where)

    # --- janitor ----------------------------------------------------------

    def expire_waiting(self, now: float) -> None:
        # query_timeout bounds a query's whole time, its wait included (PgBouncer)
        limit, name = min(
            (value, name)
            for value, name in (
                (self.timeouts.query_wait, "query_wait_timeout"),
                (self.timeouts.query, "query_timeout"),
                (float("inf"), ""),
            )
            if value
        )
        while self.waiting and now - self.waiting[0].wait_started >= limit:
            client = self.waiting.popleft()
            self.waiting_changed()
            self.stats.wait_timeouts += 1
            if self.last_connect_error:
                client.wait_failed(
                    sqlstate.CONNECTION_FAILURE,
                    f"{name}: pgmux cannot connect to server ({self.last_connect_error})",
                )
            else:
                client.wait_failed(sqlstate.PROTOCOL_VIOLATION, name)

    def expire_servers(self, now: float) -> None:
        """Close idle servers past server_idle (down to min_size) or server_lifetime."""
        idle_limit = self.timeouts.server_idle
        lifetime = self.timeouts.server_lifetime
        for server in list(self.idle):  # oldest-used first
            too_old = lifetime and now - server.connected_at >= lifetime
            too_idle = (
                idle_limit
                and now - server.last_used >= idle_limit
                and self.server_total() > self.settings.min_size
            )
            if too_old or too_idle:
                self.close_server(server, "server_lifetime" if too_old else "server_idle")

    def reconfigure(
        self, database: DatabaseConfig, credentials: ServerCredentials, settings: PoolSettings
    ) -> None:
        """A reload changed this pool's database entry; its clients stay connected.

        New timeouts apply at once. When the server login or the pool settings
        changed, servers are replaced: idle ones close now, linked ones when
        their client releases them, and new ones open with the new values.
        """
        replace = credentials != self.credentials or settings != self.settings
        previous, self.database = self.database, database
        self.timeouts = database.timeouts
        hosts.drop_unlisted(self, previous)  # a host left the list: its servers drain
        if not replace:
            return
        if credentials != self.credentials:
            self.server_params = None  # maybe another server: ask it again
            self.registry.known_params.pop((self.dbname, self.user), None)
        self.credentials = credentials
        self.settings = settings
        self.retry_at = 0.0
        self.last_connect_error = None
        self.replace_servers("reload")
        log.info(
            "pool_reconfigured",
            db=self.dbname,
            user=self.user,
            size=settings.size,
            mode=settings.mode,
        )
        self.grow()

    def replace_servers(self, reason: str) -> None:
        """Idle servers close now, the others when their client releases them
        (RECONNECT, a reload that changed the login)."""
        for server in list(self.servers):
            if server.state is _IDLE:
                self.close_server(server, reason)
            else:
                server.close_when_released = True

    def close(self) -> None:
        """The database went away (reload) or pgmux stops: close what is idle;
        the rest closes as it comes back."""
        self.closed = True
        self.replace_servers("pool closed")

    # --- runtime settings (console SET) ---

    def apply_settings(
        self, database: DatabaseConfig, settings: PoolSettings, timeouts: Timeouts
    ) -> None:
        """A console SET changed a value this pool inherits. Unlike reconfigure,
        no server is replaced: the new values apply from now on, and a pool
        whose size changed opens servers for its queue at once."""
        sized = settings != self.settings
        self.database = database
        self.settings = settings
        self.timeouts = timeouts
        if sized and self.waiting:
            self.grow()

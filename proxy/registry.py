"""Every pool and client of the daemon, and the limits they share.

PgBouncer's objects.c: pools by (database, user), the client list, cancel
keys, and the server limits that span pools (max_db_connections,
max_user_connections and pgmux's global pool.max_server_connections). When a
shared limit is reached, an idle server of another pool is closed to make
room, so a busy database borrows what idle ones are not using.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import os
import secrets
from collections import Counter
from typing import TYPE_CHECKING

from pgmux.protocol import messages, sqlstate
from pgmux.proxy.base.ledger import Ledger, scope_key
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import Config, DatabaseConfig, PoolSettings
from pgmux.proxy.config.hba import Hba
from pgmux.proxy.config.tls import TlsContexts
from pgmux.proxy.datapath.auth import LearnedSecret
from pgmux.proxy.datapath.authquery import AuthQuery
from pgmux.proxy.datapath.pool import Pool
from pgmux.proxy.datapath.server import ServerCredentials
from pgmux.proxy.datapath.translator import StatementCache

if TYPE_CHECKING:
    from pgmux.proxy.daemon.lifecycle import Daemon
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.workers import WorkerInfo

log = get_logger("pgmux.registry")


class Registry:
    def __init__(self, config: Config, users: dict[str, str]) -> None:
        self.config = config
        self.users = users  # name -> secret from the users file; never logged
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: set[ClientConnection] = set()
        # clients still logging in, oldest first (a dict keeps the order)
        self.logging_in: dict[ClientConnection, None] = {}
        self.cancel_keys: dict[int, ClientConnection] = {}
        self.server_count = 0
        self.db_server_count: Counter[str] = Counter()
        self.user_server_count: Counter[str] = Counter()
        self.starving: dict[Pool, None] = {}  # pools waiting for a shared slot, in order
        self.shutting_down = False
        self.mock_key = os.urandom(32)  # salts the fake SCRAM exchange of unknown users
        self.scram_cache: dict[tuple[str, str], object] = {}
        self.statement_cache = StatementCache()  # prepared statements, shared by all pools
        # what clients' logins taught us for logging in to PostgreSQL as them
        # (SCRAM passthrough keys, auth_query secrets); never logged
        self.learned: dict[str, LearnedSecret] = {}
        self.tls = TlsContexts()  # set by the daemon from tls.*, again on reload
        self.hba: Hba | None = None  # auth.hba_file, likewise
        self.auth_query = AuthQuery(self)
        # authenticated clients per database and per user (max_*_client_connections)
        self.db_client_count: Counter[str] = Counter()
        self.user_client_count: Counter[str] = Counter()
        self.worker: WorkerInfo | None = None  # set when running as one of listen.workers
        # with several workers: the limits they share (proxy/ledger.py)
        self.ledger: Ledger | None = None
        # server parameters other workers' pools learned, for our pools' welcomes
        self.known_params: dict[tuple[str, str], dict[str, str]] = {}
        self.daemon: Daemon | None = None  # the console's RELOAD and SHUTDOWN reach it here
        # PAUSE / SUSPEND / DISABLE state, as the console and SIGUSR1/SIGUSR2 set it
        self.paused = False
        self.suspended = False
        self.paused_databases: set[str] = set()
        self.disabled_databases: set[str] = set()

    # --- pools ------------------------------------------------------------

    def pool_for(self, dbname: str, database: DatabaseConfig, client_user: str) -> Pool:
        server_user = database.user or client_user
        key = (dbname, server_user)
        pool = self.pools.get(key)
        if pool is None:
            pool = self._new_pool(dbname, database, server_user)
            self.pools[key] = pool
        return pool

    def _new_pool(self, dbname: str, database: DatabaseConfig, server_user: str) -> Pool:
        settings, credentials = self.pool_setup(dbname, database, server_user)
        log.info(
            "pool_created", db=dbname, user=server_user, size=settings.size, mode=settings.mode
        )
        return Pool(self, database, dbname, server_user, credentials, settings)

    def pool_setup(
        self, dbname: str, database: DatabaseConfig, server_user: str
    ) -> tuple[PoolSettings, ServerCredentials]:
        """A pool's effective settings (user overrides applied) and server login."""
        settings = database.pool
        user_config = self.config.users.get(server_user)
        if user_config is not None:
            if user_config.pool_mode:
                settings = dataclasses.replace(settings, mode=user_config.pool_mode)
            if user_config.pool_size:
                settings = dataclasses.replace(settings, size=user_config.pool_size)
        credentials = ServerCredentials(
            host=database.host,
            port=database.port,
            dbname=database.dbname or dbname,
            user=server_user,
            password=self._server_password(database, server_user),
            application_name=database.application_name or "",
        )
        return settings, credentials

    def _server_password(self, database: DatabaseConfig, server_user: str) -> str | None:
        if database.user and database.password is not None:
            return database.password
        secret = self.users.get(server_user)
        if secret is None or secret.startswith("SCRAM-SHA-256$"):
            return None  # a SCRAM secret cannot log in to PostgreSQL by itself
        return secret

    def create_configured_pools(self) -> None:
        """Pools whose user is fixed in the config exist from the start (for min_size)."""
        for name, database in self.config.databases.items():
            if name != "*" and database.user:
                self.pool_for(name, database, database.user)

    # --- shared server limits --------------------------------------------

    def _limits(self, pool: Pool) -> list[tuple[str, int, int]]:
        """(scope, current, limit) of every limit above the pool's own size."""
        limits = []
        if self.config.max_server_connections:
            limits.append(("global", self.server_count, self.config.max_server_connections))
        if pool.settings.max_db_connections:
            limits.append(
                ("db", self.db_server_count[pool.dbname], pool.settings.max_db_connections)
            )
        max_user = self._max_user_connections(pool)
        if max_user:
            limits.append(("user", self.user_server_count[pool.user], max_user))
        return limits

    def _max_user_connections(self, pool: Pool) -> int:
        user_config = self.config.users.get(pool.user)
        if user_config is not None and user_config.max_user_connections:
            return user_config.max_user_connections
        return pool.settings.max_user_connections

    def may_open_server(self, pool: Pool, register_starving: bool = True) -> bool:
        if self.ledger is not None:
            return self._may_open_shared(pool, register_starving)
        blocked = [scope for scope, current, limit in self._limits(pool) if current >= limit]
        if not blocked:
            self.stop_starving(pool)
            return True
        if register_starving:
            # Make room by closing one idle server elsewhere under the same limit;
            # its slot is free at once, so the caller may open now.
            victim = self._idle_victim(pool.dbname, pool.user, blocked)
            if victim is not None:
                victim.pool.close_server(victim, "slot lent to a busier pool")
                if not any(c >= lim for _, c, lim in self._limits(pool)):
                    self.stop_starving(pool)
                    return True
            self._starve(pool)
        return False

    def _idle_victim(self, dbname: str, user: str, scopes: list[str]):  # -> ServerConnection | None
        best = None
        for other in self.pools.values():
            if (other.dbname, other.user) == (dbname, user) or not other.idle:
                continue
            if other.server_total() <= other.settings.min_size:
                continue
            if "db" in scopes and other.dbname != dbname:
                continue
            if "user" in scopes and other.user != user:
                continue
            candidate = other.idle[0]  # least recently used of that pool
            if best is None or candidate.last_used < best.last_used:
                best = candidate
        return best

    def has_starving_pools(self, pool: Pool) -> bool:
        return bool(self.starving) and any(other is not pool for other in self.starving)

    def _starve(self, pool: Pool) -> None:
        if pool not in self.starving:
            self.starving[pool] = None
            self._publish_starving()

    def stop_starving(self, pool: Pool) -> None:
        if pool in self.starving:
            del self.starving[pool]
            self._publish_starving()

    def _publish_starving(self) -> None:
        """With several workers: whether ours starve, so a freed slot reaches us."""
        if self.ledger is not None:
            self.ledger.set_waiting(self._starving_row, len(self.starving), 0.0)

    def server_slot_taken(self, pool: Pool) -> None:
        """A server joins the pool (the ledger, if any, counted it already)."""
        self.server_count += 1
        self.db_server_count[pool.dbname] += 1
        self.user_server_count[pool.user] += 1

    def server_slot_freed(self, pool: Pool, shared: bool = True) -> None:
        """A server left the pool; SHARED=False when it moved to another worker."""
        self.server_count -= 1
        self.db_server_count[pool.dbname] -= 1
        self.user_server_count[pool.user] -= 1
        if self.ledger is not None and shared:
            self.ledger.give(pool.shared_rows)
            self._tell_starving_workers()
        self._feed_starving()

    def _feed_starving(self) -> None:
        for pool in list(self.starving):
            del self.starving[pool]
            if pool.waiting:
                pool.grow()
        self._publish_starving()

    # --- limits shared by several workers (listen.workers > 1) -----------------

    _SHARED_SCOPES = ("pool", "global", "db", "user")

    @functools.cached_property
    def _starving_row(self) -> int:
        assert self.ledger is not None
        return self.ledger.row(scope_key("starving"))

    @functools.cached_property
    def _clients_row(self) -> int:
        assert self.ledger is not None
        return self.ledger.row(scope_key("clients"))

    def shared_rows(self, dbname: str, user: str) -> tuple[int, int, int, int]:
        """The ledger rows a server of pool (dbname, user) counts in, as _SHARED_SCOPES."""
        assert self.ledger is not None
        row = self.ledger.row
        return (
            row(scope_key("pool", dbname, user)),
            row(scope_key("servers")),
            row(scope_key("db", dbname)),
            row(scope_key("user", user)),
        )

    def _may_open_shared(self, pool: Pool, register_starving: bool) -> bool:
        """Take a slot in the ledger: every limit is checked across all workers."""
        assert self.ledger is not None and self.worker is not None
        rows = pool.shared_rows
        if pool in self.starving and self.ledger.total(rows[0]) >= pool.size_limit():
            return False  # still full, and the other workers know: no lock taken
        limits = (
            (rows[0], pool.size_limit()),
            (rows[1], self.config.max_server_connections),
            (rows[2], pool.settings.max_db_connections),
            (rows[3], self._max_user_connections(pool)),
        )
        blocked = self.ledger.take(limits)
        if blocked is None:
            self.stop_starving(pool)
            return True
        if not register_starving:
            return False
        scope = self._SHARED_SCOPES[blocked]
        if scope != "pool":
            victim = self._idle_victim(pool.dbname, pool.user, [scope])
            if victim is not None:
                victim.pool.close_server(victim, "slot lent to a busier pool")
                if self.ledger.take(limits) is None:
                    self.stop_starving(pool)
                    return True
        if pool not in self.starving:
            # Once per episode: the other workers hand over an idle server of
            # this pool, or close one of another pool under the shared limit.
            self.worker.broadcast(("room", pool.dbname, pool.user, scope))
        self._starve(pool)
        return False

    def _tell_starving_workers(self) -> None:
        """A shared slot came free: workers with starving pools try again."""
        assert self.ledger is not None and self.worker is not None
        row = self._starving_row
        for index in range(self.ledger.workers):
            if index != self.ledger.index and self.ledger.waiting_of(row, index):
                self.worker.send(index, ("freed",))

    def params_learned(self, pool: Pool) -> None:
        """Our pool met its first server: the other workers' pools welcome
        their clients with its parameters instead of waiting for a server."""
        if self.worker is not None and pool.server_params is not None:
            self.worker.broadcast(("params", pool.dbname, pool.user, pool.server_params))

    def params_heard(self, dbname: str, user: str, params: dict[str, str]) -> None:
        self.known_params[(dbname, user)] = params
        pool = self.pools.get((dbname, user))
        if pool is not None:
            pool.params_heard(params)

    def shared_slot_freed(self) -> None:
        """Another worker gave a slot back: our starving pools try again."""
        self._feed_starving()

    def room_wanted(self, dbname: str, user: str, scope: str) -> None:
        """Another worker's pool starves: give it an idle server of ours, or room."""
        if scope == "pool":
            pool = self.pools.get((dbname, user))
            if pool is not None:
                pool.offer_idle()
            return
        victim = self._idle_victim(dbname, user, [scope])
        if victim is not None:
            victim.pool.close_server(victim, "slot lent to another worker")

    def adopt_server(self, dbname: str, user: str, state: dict, fd: int) -> None:
        """A server another worker handed over, for our waiting clients."""
        pool = self.pools.get((dbname, user))
        if pool is None:
            database = self.config.database(dbname)
            if database is not None:
                pool = self._new_pool(dbname, database, user)
                self.pools[(dbname, user)] = pool
        if pool is None or pool.closed or self.shutting_down:
            assert self.ledger is not None
            with contextlib.suppress(OSError):
                os.write(fd, messages.terminate())
            os.close(fd)
            self.ledger.give(self.shared_rows(dbname, user))
            return
        spawn(pool.adopt(state, fd))

    # --- PAUSE, RESUME, SUSPEND, KILL, RECONNECT, ENABLE / DISABLE ---------

    def is_paused(self, dbname: str) -> bool:
        return self.paused or self.suspended or dbname in self.paused_databases

    def is_disabled(self, dbname: str) -> bool:
        return dbname in self.disabled_databases

    def pools_of(self, dbname: str | None = None) -> list[Pool]:
        return [p for p in self.pools.values() if dbname is None or p.dbname == dbname]

    def pause(self, dbname: str | None = None) -> None:
        """New transactions wait; servers close as their clients release them."""
        if dbname is None:
            self.paused = True
        else:
            self.paused_databases.add(dbname)
        for pool in self.pools_of(dbname):
            for server in list(pool.idle):
                pool.close_server(server, "paused")

    def pause_done(self, dbname: str | None = None) -> bool:
        """True once no server of the paused scope is linked or logging in."""
        return not any(pool.busy for pool in self.pools_of(dbname))

    def resume(self, dbname: str | None = None) -> None:
        """Lift PAUSE / SUSPEND (all, or one database's PAUSE): waiting clients run."""
        if dbname is None:
            self.paused = False
            if self.suspended:
                self.suspended = False
                for client in self.clients:
                    if client.console is None and client.transport is not None:
                        client.transport.resume_reading()
        else:
            self.paused_databases.discard(dbname)
        for pool in self.pools_of(dbname):
            if pool.waiting:
                pool.grow()

    def suspend(self) -> None:
        """Stop reading from every client (the console excepted) until RESUME."""
        self.suspended = True
        for client in self.clients:
            if client.console is None and client.transport is not None:
                client.transport.pause_reading()

    def kill(self, dbname: str | None = None) -> None:
        """PAUSE the database(s), then drop their clients and servers at once."""
        if dbname is None:
            self.paused = True
        else:
            self.paused_databases.add(dbname)
        for pool in self.pools_of(dbname):
            for client in list(pool.clients):
                client.fail("57P01", "terminating connection due to administrator command (KILL)")
            for server in list(pool.servers):
                pool.close_server(server, "KILL")

    def reconnect(self, dbname: str | None = None) -> None:
        """Replace servers: idle ones close now, the others when released."""
        for pool in self.pools_of(dbname):
            pool.replace_servers("RECONNECT")

    def closing_servers(self, dbname: str | None = None) -> int:
        """Servers still waiting to close after RECONNECT or a reload (WAIT_CLOSE)."""
        return sum(
            1 for pool in self.pools_of(dbname) for s in pool.servers if s.close_when_released
        )

    def disable(self, dbname: str) -> None:
        self.disabled_databases.add(dbname)

    def enable(self, dbname: str) -> None:
        self.disabled_databases.discard(dbname)

    # --- clients ----------------------------------------------------------

    def client_count(self) -> int:
        return len(self.clients)

    def client_total(self) -> int:
        """Client connections of all workers (listen.max_client_conn counts these)."""
        if self.ledger is None:
            return len(self.clients)
        return self.ledger.total(self._clients_row)

    def add_client(self, client: ClientConnection) -> None:
        self.clients.add(client)
        if self.ledger is not None:
            self.ledger.adjust(self._clients_row, 1)
        self.logging_in[client] = None
        self._make_room_for_login(client)

    def take_client_slot(self, dbname: str, db_limit: int, user: str, user_limit: int) -> str:
        """Count an authenticated client against max_db/user_client_connections;
        the name of the limit reached, or "" when counted."""
        if self.ledger is not None:
            rows = self._client_rows(dbname, user)
            blocked = self.ledger.take(((rows[0], db_limit), (rows[1], user_limit)))
            if blocked is not None:
                return ("max_db_client_connections", "max_user_client_connections")[blocked]
        elif db_limit and self.db_client_count[dbname] >= db_limit:
            return "max_db_client_connections"
        elif user_limit and self.user_client_count[user] >= user_limit:
            return "max_user_client_connections"
        self.db_client_count[dbname] += 1
        self.user_client_count[user] += 1
        return ""

    def release_client_slot(self, dbname: str, user: str) -> None:
        if self.ledger is not None:
            self.ledger.give(self._client_rows(dbname, user))
        for counter, name in ((self.db_client_count, dbname), (self.user_client_count, user)):
            counter[name] -= 1
            if counter[name] <= 0:
                del counter[name]

    def _client_rows(self, dbname: str, user: str) -> tuple[int, int]:
        assert self.ledger is not None
        row = self.ledger.row
        return row(scope_key("db clients", dbname)), row(scope_key("user clients", user))

    def _make_room_for_login(self, newcomer: ClientConnection) -> None:
        """Over limits.max_logins_in_progress (or listen.max_client_conn), the
        oldest unfinished login goes: a flood of connections that never log in
        only pushes out its own kind, while a real login takes milliseconds."""
        cap = self.config.limits.max_logins_in_progress
        over_logins = cap and len(self.logging_in) > cap
        if not over_logins and self.client_total() <= self.config.listen.max_client_conn:
            return
        oldest = next(iter(self.logging_in))
        if oldest is newcomer:
            return  # nobody to push out: the startup check refuses the newcomer
        reason = "too many logins in progress" if over_logins else "no more connections allowed"
        log.info("login_evicted", reason=reason, **oldest.log_fields())
        oldest.fail(sqlstate.TOO_MANY_CONNECTIONS, f"{reason} (login took too long)")

    def login_done(self, client: ClientConnection) -> None:
        self.logging_in.pop(client, None)

    def remove_client(self, client: ClientConnection) -> None:
        if client in self.clients and self.ledger is not None:
            self.ledger.adjust(self._clients_row, -1)
        self.clients.discard(client)
        self.logging_in.pop(client, None)
        if self.cancel_keys.get(client.cancel_pid) is client:
            del self.cancel_keys[client.cancel_pid]

    def issue_cancel_key(self, client: ClientConnection) -> tuple[int, bytes]:
        while True:
            pid = secrets.randbits(31) or 1
            if self.worker is not None:
                pid = self.worker.issue_pid(pid)  # the low byte names this worker
            if pid and pid not in self.cancel_keys:
                break
        self.cancel_keys[pid] = client
        return pid, secrets.token_bytes(4)

    def cancel(self, pid: int, key: bytes) -> None:
        """A CancelRequest: forward it to the server running that client's query."""
        if self.worker is not None and self.worker.forward_cancel(pid, key):
            return  # another worker's client: that worker cancels
        client = self.cancel_keys.get(pid)
        if client is None or not hmac.compare_digest(client.cancel_key, key):
            return  # unknown or forged key: silently nothing, as PostgreSQL does
        # Only while the client is linked and has a request on its server: the
        # key names the client, so a server it gave back is never cancelled.
        server = client.server
        if server is not None and client.expect_rfq > 0:
            log.info("cancel_forwarded", server_id=server.id, **client.log_fields())
            self.cancel_server(server)

    def cancel_server(self, server) -> None:  # server: ServerConnection
        """Ask PostgreSQL to cancel what this backend runs (a new connection, its key).

        Until PostgreSQL has taken the request, the pool holds the server back
        (Pool.release), so the cancel cannot land on the next client's query.
        """
        if server.backend_pid:
            server.cancels_in_flight += 1
            spawn(self._forward_cancel(server))

    async def _forward_cancel(self, server) -> None:  # server: ServerConnection
        try:
            timeout = server.pool.timeouts.cancel_wait or 10.0
            await _send_cancel(server.credentials, server.backend_pid, server.backend_key, timeout)
        finally:
            server.cancels_in_flight -= 1
            server.pool.cancel_finished(server)


async def _send_cancel(creds: ServerCredentials, pid: int, key: bytes, timeout: float) -> None:
    try:
        if creds.host.startswith("/"):
            path = f"{creds.host}/.s.PGSQL.{creds.port}"
            connect = asyncio.open_unix_connection(path)
        else:
            connect = asyncio.open_connection(creds.host, creds.port)
        reader, writer = await asyncio.wait_for(connect, timeout)
        try:
            writer.write(messages.cancel_request(pid, key))
            await writer.drain()
            await asyncio.wait_for(reader.read(1), timeout)  # PostgreSQL closes when done
        finally:
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel_forward_failed", error=str(exc) or type(exc).__name__)

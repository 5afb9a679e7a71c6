"""Every pool and client of the daemon, and the parts they share.

PgBouncer's objects.c: pools by (database, user) and the client list. The
registry is the directory; what the pools and clients share lives in parts
of floor 3 that it composes and keeps current on RELOAD:

* ServerSlots and ClientSlots (core/limits.py): the limits that span pools,
* CancelKeys (core/cancel.py): cancel keys and forwarded CancelRequests,
* Flags (core/flags.py): PAUSE, SUSPEND, DISABLE,
* AuthState (core/authstate.py): secrets, hba rules and TLS contexts.

PAUSE, KILL and RECONNECT act on the pools here; the messages other workers
send about pools (listen.workers > 1) arrive here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING

from pgmux.protocol import messages, sqlstate
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.stats import PoolStats
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import USER_TIMEOUTS, Config, DatabaseConfig, PoolSettings
from pgmux.proxy.config.tls import TlsSetupError, check_cert_auth, load_tls
from pgmux.proxy.core.authstate import AuthState
from pgmux.proxy.core.cancel import CancelKeys
from pgmux.proxy.core.flags import Flags
from pgmux.proxy.core.limits import ClientSlots, ServerSlots
from pgmux.proxy.core.peers import ParamsLearned
from pgmux.proxy.datapath import handover
from pgmux.proxy.datapath.authquery import AuthQuery
from pgmux.proxy.datapath.pool import Pool
from pgmux.proxy.datapath.relay import Relay
from pgmux.proxy.datapath.server import ServerCredentials
from pgmux.proxy.datapath.statements import StatementCache

if TYPE_CHECKING:
    from collections import Counter
    from collections.abc import Iterable

    from pgmux.proxy.base.ledger import Ledger
    from pgmux.proxy.config import Timeouts
    from pgmux.proxy.config.hba import Hba
    from pgmux.proxy.config.tls import TlsContexts
    from pgmux.proxy.core.control import Control
    from pgmux.proxy.core.peers import Peers, ServerSnapshot
    from pgmux.proxy.datapath.client import ClientConnection

log = get_logger("pgmux.registry")

# Why servers close when the tls.server settings change (PgBouncer: obsolete connection).
TLS_CHANGED = "tls.server changed"


class Registry:
    """The pools by (database, user) and the clients, with the parts they share."""

    def __init__(self, config: Config, users: dict[str, str]) -> None:
        self._config = config
        self.pools: dict[tuple[str, str], Pool] = {}
        self.relays: dict[Pool, Relay] = {}  # LISTEN/NOTIFY, once a pool's client listens
        self.clients: set[ClientConnection] = set()
        # clients still logging in, oldest first (a dict keeps the order)
        self.logging_in: dict[ClientConnection, None] = {}
        self.slots = ServerSlots(config, self.pools)
        self.client_slots = ClientSlots()
        self.cancels = CancelKeys()
        # PAUSE / SUSPEND / DISABLE state, as the console and SIGUSR1/SIGUSR2 set it
        self.flags = Flags()
        self.auth = AuthState(config, users)
        self.auth_query = AuthQuery(self.auth)
        self.shutting_down = False
        self.statement_cache = StatementCache()  # prepared statements, shared by all pools
        self.console_stats = PoolStats()  # console logins and commands (SHOW STATS' console row)
        # server parameters other workers' pools learned, for our pools' welcomes
        self.known_params: dict[tuple[str, str], dict[str, str]] = {}
        self.control: Control | None = None  # the console's RELOAD and SHUTDOWN reach it here
        self._worker: Peers | None = None

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reload or a console SET: every part reads the new configuration."""
        self._config = config
        self.slots.config = config
        self.auth.config = config

    @property
    def ledger(self) -> Ledger | None:
        """With several workers: the limits they share (proxy/base/ledger.py)."""
        return self.slots.ledger

    @ledger.setter
    def ledger(self, ledger: Ledger | None) -> None:
        self.slots.ledger = ledger
        self.client_slots.ledger = ledger

    @property
    def worker(self) -> Peers | None:
        """Set when running as one of listen.workers: how to reach the others."""
        return self._worker

    @worker.setter
    def worker(self, worker: Peers | None) -> None:
        self._worker = worker
        self.slots.peers = worker
        self.cancels.peers = worker

    # --- pools ------------------------------------------------------------

    def pool_for(self, dbname: str, database: DatabaseConfig, client_user: str) -> Pool:
        server_user = database.user or client_user
        key = (dbname, server_user)
        pool = self.pools.get(key)
        if pool is None:
            pool = self._new_pool(dbname, database, server_user)
            self.pools[key] = pool
        return pool

    def relay_for(self, pool: Pool) -> Relay:
        """The pool's notification relay (relay.py), made on first need."""
        relay = self.relays.get(pool)
        if relay is None:
            relay = self.relays[pool] = Relay(pool)
        return relay

    def _new_pool(self, dbname: str, database: DatabaseConfig, server_user: str) -> Pool:
        settings, credentials = self.pool_setup(dbname, database, server_user)
        log.info(
            "pool_created", db=dbname, user=server_user, size=settings.size, mode=settings.mode
        )
        pool = Pool(self, database, dbname, server_user, credentials, settings)
        pool.timeouts = self.pool_timeouts(database, server_user)
        return pool

    def pool_timeouts(self, database: DatabaseConfig, server_user: str) -> Timeouts:
        """The database's timeouts, with the ones the user's entry sets over them."""
        user_config = self.config.users.get(server_user)
        if user_config is None:
            return database.timeouts
        own = {n: v for n in USER_TIMEOUTS if (v := getattr(user_config, n)) is not None}
        return dataclasses.replace(database.timeouts, **own) if own else database.timeouts

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
            if user_config.reserve_pool_size is not None:
                settings = dataclasses.replace(settings, reserve_size=user_config.reserve_pool_size)
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
        secret = self.auth.users.get(server_user)
        if secret is None or secret.startswith("SCRAM-SHA-256$"):
            return None  # a SCRAM secret cannot log in to PostgreSQL by itself
        return secret

    def create_configured_pools(self) -> None:
        """Pools whose user is fixed in the config exist from the start (for min_size)."""
        for name, database in self.config.databases.items():
            if name != "*" and database.user:
                self.pool_for(name, database, database.user)

    def pools_of(self, dbname: str | None = None) -> list[Pool]:
        return [p for p in self.pools.values() if dbname is None or p.dbname == dbname]

    # --- what other workers say about pools (listen.workers > 1) ----------------

    def params_learned(self, pool: Pool) -> None:
        """Our pool met its first server: the other workers' pools welcome
        their clients with its parameters instead of waiting for a server."""
        if self.worker is not None and pool.server_params is not None:
            self.worker.broadcast(ParamsLearned(pool.dbname, pool.user, pool.server_params))

    def params_heard(self, dbname: str, user: str, params: dict[str, str]) -> None:
        self.known_params[(dbname, user)] = params
        pool = self.pools.get((dbname, user))
        if pool is not None:
            pool.params_heard(params)

    def shared_slot_freed(self) -> None:
        """Another worker gave a slot back: our starving pools try again."""
        self.slots.feed_starving()

    def room_wanted(self, dbname: str, user: str, scope: str) -> None:
        """Another worker's pool starves: give it an idle server of ours, or room."""
        if scope == "pool":
            pool = self.pools.get((dbname, user))
            if pool is not None:
                handover.offer_idle(pool)
            return
        self.slots.make_room(dbname, user, [scope], "slot lent to another worker")

    def adopt_server(self, dbname: str, user: str, state: ServerSnapshot, fd: int) -> None:
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
            self.ledger.give(self.slots.shared_rows(dbname, user))
            return
        spawn(handover.adopt(pool, state, fd))

    # --- PAUSE, RESUME, SUSPEND, KILL, RECONNECT, ENABLE / DISABLE ---------

    def pause(self, dbname: str | None = None) -> None:
        """New transactions wait; servers close as their clients release them."""
        self.flags.pause(dbname)
        for pool in self.pools_of(dbname):
            for server in list(pool.idle):
                pool.close_server(server, "paused")

    def pause_done(self, dbname: str | None = None) -> bool:
        """True once no server of the paused scope is linked or logging in."""
        return not any(pool.busy for pool in self.pools_of(dbname))

    def resume(self, dbname: str | None = None) -> None:
        """Lift PAUSE / SUSPEND (all, or one database's PAUSE): waiting clients run."""
        if self.flags.resume(dbname):
            for client in self.clients:
                if client.console is None and client.transport is not None:
                    client.transport.resume_reading()
        for pool in self.pools_of(dbname):
            if pool.waiting:
                pool.grow()

    def suspend(self) -> None:
        """Stop reading from every client (the console excepted) until RESUME."""
        self.flags.suspend()
        for client in self.clients:
            if client.console is None and client.transport is not None:
                client.transport.pause_reading()

    def kill(self, dbname: str | None = None) -> None:
        """PAUSE the database(s), then drop their clients and servers at once."""
        self.flags.pause(dbname)
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
        self.flags.disable(dbname)

    def enable(self, dbname: str) -> None:
        self.flags.enable(dbname)

    def apply_setting(
        self,
        config: Config,
        pools: Iterable[tuple[Pool, DatabaseConfig, PoolSettings, Timeouts]] = (),
    ) -> None:
        """A console SET: CONFIG is the configuration with the new value; each
        of POOLS inherits it and gets its new database entry, settings and
        timeouts (its servers stay)."""
        self.config = config
        if self.control is not None:
            self.control.config = config
        for pool, database, settings, timeouts in pools:
            pool.apply_settings(database, settings, timeouts)
            # As PgBouncer's: a new statement cap applies to connected clients at
            # their next statement (0: names pass through from then on).
            for client in pool.clients:
                if client.translator is not None:
                    client.translator.limit = settings.max_prepared_statements

    # --- clients ----------------------------------------------------------

    def add_client(self, client: ClientConnection) -> None:
        self.clients.add(client)
        self.client_slots.connection_opened()
        self.logging_in[client] = None
        self._make_room_for_login(client)

    def _make_room_for_login(self, newcomer: ClientConnection) -> None:
        """Over limits.max_logins_in_progress (or listen.max_client_conn), the
        oldest unfinished login goes: a flood of connections that never log in
        only pushes out its own kind, while a real login takes milliseconds."""
        cap = self.config.limits.max_logins_in_progress
        over_logins = cap and len(self.logging_in) > cap
        if not over_logins and self.client_slots.total() <= self.config.listen.max_client_conn:
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
        if client in self.clients:
            self.client_slots.connection_closed()
        self.clients.discard(client)
        self.logging_in.pop(client, None)
        self.cancels.forget(client)

    # --- the parts, as the data path, console and daemon reach them -------

    @property
    def users(self) -> dict[str, str]:
        """Name -> secret from the users file; never logged."""
        return self.auth.users

    @users.setter
    def users(self, users: dict[str, str]) -> None:
        self.auth.users = users

    @property
    def tls(self) -> TlsContexts:
        return self.auth.tls

    @tls.setter
    def tls(self, tls: TlsContexts) -> None:
        """New contexts (reload, SET). Changed tls.server settings replace every
        server, as in PgBouncer: idle ones close now, the others when released,
        so no connection keeps older, maybe weaker, TLS settings."""
        changed = not self.auth.tls.server.same_settings(tls.server)
        self.auth.tls = tls
        if changed:
            for pool in self.pools.values():
                pool.replace_servers(TLS_CHANGED)

    def apply_tls(self, config: Config) -> bool:
        """New TLS contexts from CONFIG's files (a console SET of a TLS
        setting, as PgBouncer's sbuf_tls_setup): False, logged as "TLS setup
        failed", when they do not load; the running contexts then stay."""
        try:
            tls = load_tls(config.tls, config.path)
            check_cert_auth(config)
        except TlsSetupError as exc:
            log.error("tls_setup_failed", error=str(exc))
            return False
        self.tls = tls
        return True

    @property
    def hba(self) -> Hba | None:
        return self.auth.hba

    @hba.setter
    def hba(self, hba: Hba | None) -> None:
        self.auth.hba = hba

    @property
    def paused(self) -> bool:
        return self.flags.paused

    @property
    def suspended(self) -> bool:
        return self.flags.suspended

    @property
    def paused_databases(self) -> set[str]:
        return self.flags.paused_databases

    def is_paused(self, dbname: str) -> bool:
        return self.flags.is_paused(dbname)

    def is_disabled(self, dbname: str) -> bool:
        return self.flags.is_disabled(dbname)

    @property
    def server_count(self) -> int:
        return self.slots.server_count

    @property
    def db_server_count(self) -> Counter[str]:
        return self.slots.db_server_count

    @property
    def user_server_count(self) -> Counter[str]:
        return self.slots.user_server_count

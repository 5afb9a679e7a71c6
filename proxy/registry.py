"""Every pool and client of the daemon, and the limits they share.

PgBouncer's objects.c: pools by (database, user), the client list, cancel
keys, and the server limits that span pools (max_db_connections,
max_user_connections and pgmux's global pool.max_server_connections). When a
shared limit is reached, an idle server of another pool is closed to make
room, so a busy database borrows what idle ones are not using.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
import secrets
from collections import Counter
from typing import TYPE_CHECKING

from pgmux.protocol import messages

from .config import Config, DatabaseConfig
from .log import get_logger
from .tasks import spawn
from .pool import Pool
from .server import ServerCredentials

if TYPE_CHECKING:
    from .client import ClientConnection

log = get_logger("pgmux.registry")


class Registry:
    def __init__(self, config: Config, users: dict[str, str]) -> None:
        self.config = config
        self.users = users  # name -> secret from the users file; never logged
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: set[ClientConnection] = set()
        self.logging_in: set[ClientConnection] = set()
        self.cancel_keys: dict[int, ClientConnection] = {}
        self.server_count = 0
        self.db_server_count: Counter[str] = Counter()
        self.user_server_count: Counter[str] = Counter()
        self.starving: dict[Pool, None] = {}  # pools waiting for a shared slot, in order
        self.shutting_down = False
        self.mock_key = os.urandom(32)  # salts the fake SCRAM exchange of unknown users
        self.scram_cache: dict[tuple[str, str], object] = {}

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
        log.info("pool_created", db=dbname, user=server_user, size=settings.size,
                 mode=settings.mode)
        return Pool(self, database, dbname, server_user, credentials, settings)

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
        blocked = [scope for scope, current, limit in self._limits(pool) if current >= limit]
        if not blocked:
            self.starving.pop(pool, None)
            return True
        if register_starving:
            # Make room by closing one idle server elsewhere under the same limit;
            # its slot is free at once, so the caller may open now.
            victim = self._idle_victim(pool, blocked)
            if victim is not None:
                victim.pool.close_server(victim, "slot lent to a busier pool")
                if not any(c >= lim for _, c, lim in self._limits(pool)):
                    self.starving.pop(pool, None)
                    return True
            self.starving[pool] = None
        return False

    def _idle_victim(self, pool: Pool, scopes: list[str]):  # -> ServerConnection | None
        best = None
        for other in self.pools.values():
            if other is pool or not other.idle or len(other.servers) <= other.settings.min_size:
                continue
            if "db" in scopes and other.dbname != pool.dbname:
                continue
            if "user" in scopes and other.user != pool.user:
                continue
            candidate = other.idle[0]  # least recently used of that pool
            if best is None or candidate.last_used < best.last_used:
                best = candidate
        return best

    def has_starving_pools(self, pool: Pool) -> bool:
        return any(other is not pool for other in self.starving)

    def server_slot_taken(self, pool: Pool) -> None:
        self.server_count += 1
        self.db_server_count[pool.dbname] += 1
        self.user_server_count[pool.user] += 1

    def server_slot_freed(self, pool: Pool) -> None:
        self.server_count -= 1
        self.db_server_count[pool.dbname] -= 1
        self.user_server_count[pool.user] -= 1
        self._feed_starving()

    def _feed_starving(self) -> None:
        for pool in list(self.starving):
            del self.starving[pool]
            if pool.waiting:
                pool.grow()

    # --- clients ----------------------------------------------------------

    def client_count(self) -> int:
        return len(self.clients)

    def add_client(self, client: ClientConnection) -> None:
        self.clients.add(client)
        self.logging_in.add(client)

    def remove_client(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        self.logging_in.discard(client)
        if self.cancel_keys.get(client.cancel_pid) is client:
            del self.cancel_keys[client.cancel_pid]

    def issue_cancel_key(self, client: ClientConnection) -> tuple[int, bytes]:
        while True:
            pid = secrets.randbits(31) or 1
            if pid not in self.cancel_keys:
                break
        self.cancel_keys[pid] = client
        return pid, secrets.token_bytes(4)

    def cancel(self, pid: int, key: bytes) -> None:
        """A CancelRequest: forward it to the server running that client's query."""
        client = self.cancel_keys.get(pid)
        if client is None or not hmac.compare_digest(client.cancel_key, key):
            return  # unknown or forged key: silently nothing, as PostgreSQL does
        if client.server is not None:
            self.cancel_server(client.server)

    def cancel_server(self, server) -> None:  # server: ServerConnection
        """Ask PostgreSQL to cancel what this backend runs (a new connection, its key)."""
        if server.backend_pid:
            spawn(
                _send_cancel(server.credentials, server.backend_pid, server.backend_key)
            )


async def _send_cancel(creds: ServerCredentials, pid: int, key: bytes) -> None:
    try:
        if creds.host.startswith("/"):
            path = f"{creds.host}/.s.PGSQL.{creds.port}"
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(creds.host, creds.port), 5
            )
        writer.write(messages.cancel_request(pid, key))
        await writer.drain()
        await asyncio.wait_for(reader.read(1), 5)  # PostgreSQL closes when done
        writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel_forward_failed", error=str(exc))


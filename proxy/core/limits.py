"""The limits that span pools: server slots and client slots.

PgBouncer's max_db_connections and max_user_connections (objects.c,
janitor.c), plus pgmux's global pool.max_server_connections. When a shared
limit is reached, an idle server of another pool under the same limit is
closed to make room, so a busy database borrows what idle ones are not
using; a pool that finds no room waits in the starving list until a slot
comes free.

With several workers (listen.workers > 1) the counts live in the shared
ledger (proxy/base/ledger.py) and every limit holds across all workers; the
peers are told when a pool starves and when a slot comes free.

Client slots are the same idea for clients: listen.max_client_conn and
max_db/user_client_connections.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import TYPE_CHECKING

from pgmux.proxy.base.ledger import Ledger, scope_key
from pgmux.proxy.core.peers import RoomWanted, SlotFreed

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pgmux.proxy.config import Config
    from pgmux.proxy.core.peers import Peers
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.server import ServerConnection


# The ledger rows a server counts in, in the order of ServerSlots.shared_rows.
SHARED_SCOPES = ("pool", "global", "db", "user")
LENT = "slot lent to a busier pool"  # why a victim closes


class ServerSlots:
    """Server counts (global, per database, per user) and the pools starving for one."""

    def __init__(self, config: Config, pools: Mapping[tuple[str, str], Pool]) -> None:
        self.config = config
        self.pools = pools  # the registry's pools by (database, user), for victims
        self.ledger: Ledger | None = None  # with several workers: the counts they share
        self.peers: Peers | None = None  # ...and how to reach them
        self.server_count = 0
        self.db_server_count: Counter[str] = Counter()
        self.user_server_count: Counter[str] = Counter()
        self.starving: dict[Pool, None] = {}  # pools waiting for a shared slot, in order

    # --- counting ---------------------------------------------------------

    def taken(self, pool: Pool) -> None:
        """A server joins the pool (the ledger, if any, counted it already)."""
        self.server_count += 1
        self.db_server_count[pool.dbname] += 1
        self.user_server_count[pool.user] += 1

    def freed(self, pool: Pool, shared: bool = True) -> None:
        """A server left the pool; SHARED=False when it moved to another worker."""
        self.server_count -= 1
        self.db_server_count[pool.dbname] -= 1
        self.user_server_count[pool.user] -= 1
        if self.ledger is not None and shared:
            assert pool.shared_rows is not None  # every pool has them when there is a ledger
            self.ledger.give(pool.shared_rows)
            self._tell_starving_workers()
        self.feed_starving()

    def limits(self, pool: Pool) -> list[tuple[str, int, int]]:
        """(scope, current, limit) of every limit above the pool's own size."""
        limits = []
        if self.config.max_server_connections:
            limits.append(("global", self.server_count, self.config.max_server_connections))
        if pool.settings.max_db_connections:
            limits.append(
                ("db", self.db_server_count[pool.dbname], pool.settings.max_db_connections)
            )
        max_user = self.max_user_connections(pool)
        if max_user:
            limits.append(("user", self.user_server_count[pool.user], max_user))
        return limits

    def max_user_connections(self, pool: Pool) -> int:
        """The user's own max_user_connections, else the pool's."""
        user_config = self.config.users.get(pool.user)
        if user_config is not None and user_config.max_user_connections:
            return user_config.max_user_connections
        return pool.settings.max_user_connections

    # --- may a pool open one more server? --------------------------------

    def may_open(self, pool: Pool, register_starving: bool = True) -> bool:
        """True when a slot is free (taken in the ledger, if any); else, with
        REGISTER_STARVING, room is made or the pool waits among the starving."""
        if self.ledger is not None:
            return self._may_open_shared(pool, register_starving)
        blocked = self.blocked(pool)
        if not blocked:
            self.stop_starving(pool)
            return True
        if register_starving:
            # Make room by closing one idle server elsewhere under the same limit;
            # its slot is free at once, so the caller may open now.
            lent = self.make_room(pool.dbname, pool.user, blocked, LENT)
            if lent and not self.blocked(pool):
                self.stop_starving(pool)
                return True
            self._starve(pool)
        return False

    def blocked(self, pool: Pool) -> list[str]:
        """The scopes whose limit stops POOL from opening a server."""
        return [scope for scope, current, limit in self.limits(pool) if current >= limit]

    def idle_victim(self, dbname: str, user: str, scopes: list[str]) -> ServerConnection | None:
        """The least recently used idle server another pool can spare under SCOPES."""
        best: ServerConnection | None = None
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

    def make_room(self, dbname: str, user: str, scopes: list[str], reason: str) -> bool:
        """Close an idle victim for pool (DBNAME, USER); False when there is none."""
        victim = self.idle_victim(dbname, user, scopes)
        if victim is None:
            return False
        victim.pool.close_server(victim, reason)
        return True

    # --- starving pools ---------------------------------------------------

    def has_starving_pools(self, pool: Pool) -> bool:
        """Whether a pool other than POOL waits for a shared slot."""
        return bool(self.starving) and any(other is not pool for other in self.starving)

    def _starve(self, pool: Pool) -> None:
        if pool not in self.starving:
            self.starving[pool] = None
            self._publish_starving()

    def stop_starving(self, pool: Pool) -> None:
        if pool in self.starving:
            del self.starving[pool]
            self._publish_starving()

    def feed_starving(self) -> None:
        """A slot came free (here or, with several workers, elsewhere): starving
        pools with waiting clients try again, in the order they started to starve."""
        for pool in list(self.starving):
            del self.starving[pool]
            if pool.waiting:
                pool.grow()
        self._publish_starving()

    def _publish_starving(self) -> None:
        """With several workers: whether ours starve, so a freed slot reaches us."""
        if self.ledger is not None:
            self.ledger.set_waiting(self._starving_row, len(self.starving), 0.0)

    # --- limits shared by several workers (listen.workers > 1) -----------------

    @functools.cached_property
    def _starving_row(self) -> int:
        assert self.ledger is not None
        return self.ledger.row(scope_key("starving"))

    def shared_rows(self, dbname: str, user: str) -> tuple[int, int, int, int]:
        """The ledger rows a server of pool (dbname, user) counts in, as SHARED_SCOPES."""
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
        assert self.ledger is not None and self.peers is not None
        rows = pool.shared_rows
        assert rows is not None
        if pool in self.starving and self.ledger.total(rows[0]) >= pool.size_limit():
            return False  # still full, and the other workers know: no lock taken
        limits = (
            (rows[0], pool.size_limit()),
            (rows[1], self.config.max_server_connections),
            (rows[2], pool.settings.max_db_connections),
            (rows[3], self.max_user_connections(pool)),
        )
        blocked = self.ledger.take(limits)
        if blocked is None:
            self.stop_starving(pool)
            return True
        if not register_starving:
            return False
        scope = SHARED_SCOPES[blocked]
        lent = scope != "pool" and self.make_room(pool.dbname, pool.user, [scope], LENT)
        if lent and self.ledger.take(limits) is None:
            self.stop_starving(pool)
            return True
        if pool not in self.starving:
            # Once per episode: the other workers hand over an idle server of
            # this pool, or close one of another pool under the shared limit.
            self.peers.broadcast(RoomWanted(pool.dbname, pool.user, scope))
        self._starve(pool)
        return False

    def _tell_starving_workers(self) -> None:
        """A shared slot came free: workers with starving pools try again."""
        assert self.ledger is not None and self.peers is not None
        row = self._starving_row
        for index in range(self.ledger.workers):
            if index != self.ledger.index and self.ledger.waiting_of(row, index):
                self.peers.send(index, SlotFreed())


class ClientSlots:
    """Client connections (listen.max_client_conn) and authenticated clients
    per database and per user (max_db/user_client_connections)."""

    def __init__(self) -> None:
        self.ledger: Ledger | None = None  # with several workers: the counts they share
        self.connected = 0  # this process's client connections
        self.db_client_count: Counter[str] = Counter()
        self.user_client_count: Counter[str] = Counter()

    def connection_opened(self) -> None:
        self.connected += 1
        if self.ledger is not None:
            self.ledger.adjust(self._clients_row, 1)

    def connection_closed(self) -> None:
        self.connected -= 1
        if self.ledger is not None:
            self.ledger.adjust(self._clients_row, -1)

    def total(self) -> int:
        """Client connections of all workers (listen.max_client_conn counts these)."""
        if self.ledger is None:
            return self.connected
        return self.ledger.total(self._clients_row)

    def take(self, dbname: str, db_limit: int, user: str, user_limit: int) -> str:
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

    def release(self, dbname: str, user: str) -> None:
        if self.ledger is not None:
            self.ledger.give(self._client_rows(dbname, user))
        for counter, name in ((self.db_client_count, dbname), (self.user_client_count, user)):
            counter[name] -= 1
            if counter[name] <= 0:
                del counter[name]

    @functools.cached_property
    def _clients_row(self) -> int:
        assert self.ledger is not None
        return self.ledger.row(scope_key("clients"))

    def _client_rows(self, dbname: str, user: str) -> tuple[int, int]:
        assert self.ledger is not None
        row = self.ledger.row
        return row(scope_key("db clients", dbname)), row(scope_key("user clients", user))

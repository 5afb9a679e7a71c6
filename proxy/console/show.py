"""The console's SHOW tables, column for column as PgBouncer 1.25 sends them.

Names, order and types (text, int4, int8, numeric) follow PgBouncer's admin.c
and stats.c, so pgbouncer_exporter and existing dashboards read pgmux
unchanged; pgmux-only columns would go at the end. Every value is read from
the live objects (registry, pools, clients, servers) at the moment of the
SHOW: nothing is cached, so the tables cannot drift from reality.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgmux import __version__
from pgmux.build import build
from pgmux.protocol.rows import INT4, INT8, NUMERIC, TEXT
from pgmux.proxy.base.stats import PERIOD_FIELDS, PoolStats
from pgmux.proxy.config import (
    ADMIN_DATABASES,
    FALLBACK_DATABASE,
    RUNTIME_SETTINGS,
    pgbouncer_settings,
    settings_table,
)
from pgmux.proxy.console.hosts import HOSTS_COLUMNS, HOSTS_SPEC, host_rows
from pgmux.proxy.core.states import CLIENT_SHOWN, SERVER_SHOWN

if TYPE_CHECKING:
    from pgmux.proxy.config import DatabaseConfig
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.server import ServerConnection
    from pgmux.proxy.registry import Registry

# The type OIDs of PgBouncer's RowDescription letters (pktbuf.c): s, i, q, N, T.
_CODES = {"s": TEXT, "i": INT4, "q": INT8, "N": NUMERIC, "T": TEXT}

CONSOLE_DB = ADMIN_DATABASES[0]
VERSION = f"pgmux {__version__} ({build()}; PgBouncer 1.25.1 compatible)"

HELP = """
\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION
\tSHOW LISTS|MEM|STATE|SOCKETS|ACTIVE_SOCKETS|LISTENERS
\tSHOW PEERS|PEER_POOLS|DNS_HOSTS|DNS_ZONES
\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS
\tSET key = arg
\tRELOAD
\tPAUSE [<db>]
\tRESUME [<db>]
\tDISABLE <db>
\tENABLE <db>
\tRECONNECT [<db>]
\tKILL [<db>]
\tKILL_CLIENT <client_id>
\tSUSPEND
\tSHUTDOWN
\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS
\tWAIT_CLOSE [<db>]"""


@dataclass
class Result:
    """What one console command answers: a result set, a notice, or just a tag."""

    tag: str
    columns: list[tuple[str, int]] = field(default_factory=list)
    rows: list[Sequence[Any]] = field(default_factory=list)
    notice: tuple[str, str] | None = None  # (message, detail) sent as NoticeResponse
    after: Callable[[], None] | None = None  # runs once the answer is on its way


def table(spec: str, names: Sequence[str], rows: Iterable[Sequence[Any]]) -> Result:
    """A SHOW result; SPEC gives each column's type in PgBouncer's letters."""
    if len(spec) != len(names):
        raise ValueError(f"{len(spec)} types for {len(names)} columns")
    columns = [(name, _CODES[code]) for name, code in zip(names, spec, strict=True)]
    return Result("SHOW", columns, list(rows))


# --- helpers ---------------------------------------------------------------------


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _wall(monotonic_at: float, now: float, wall_now: float) -> str:
    """A monotonic instant as PgBouncer prints times ("2025-01-31 12:00:00 UTC")."""
    if not monotonic_at:
        return ""
    stamp = wall_now - (now - monotonic_at)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def _address(transport: Any, which: str) -> tuple[str, int]:
    info = transport.get_extra_info(which) if transport is not None else None
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return "unix", 0


def _ptr(obj: object | None) -> str:
    return "" if obj is None else f"{id(obj):#x}"


def consoles(registry: Registry) -> list[ClientConnection]:
    return [c for c in registry.clients if c.console is not None]


def _stats_by_database(registry: Registry) -> dict[str, list[PoolStats]]:
    """Each database's pool stats; the console's first, as PgBouncer's admin pool."""
    grouped = {CONSOLE_DB: [registry.console_stats]}
    for pool in registry.pools.values():
        grouped.setdefault(pool.dbname, []).append(pool.stats)
    return grouped


# --- SHOW POOLS --------------------------------------------------------------------

POOLS_COLUMNS = (
    "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
    "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle",
    "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
    "load_balance_hosts",
)  # fmt: skip


def pool_counts(pool: Pool, now: float) -> dict[str, int]:
    """The numbers SHOW POOLS and the /metrics gauges share."""
    waiting = len(pool.waiting)
    maxwait = now - pool.waiting[0].wait_started if pool.waiting else 0.0
    return {
        "cl_active": len(pool.clients) - waiting,
        "cl_waiting": waiting,
        "sv_active": len(pool.active),
        "sv_active_cancel": sum(s.cancels_in_flight for s in pool.active),
        "sv_being_canceled": len(pool.being_canceled),
        "sv_idle": len(pool.idle),
        "sv_used": 0,  # pgmux runs no server_check_query: an idle server is ready
        "sv_tested": len(pool.cleaning),  # being cleaned after a client left
        "sv_login": pool.connecting,
        "maxwait_us_total": _us(maxwait),
    }


def show_pools(registry: Registry, now: float) -> Result:
    rows: list[Sequence[Any]] = []
    # The console's pool, as PgBouncer's admin pool: under the name its clients used.
    for name, count in sorted(Counter(c.dbname for c in consoles(registry)).items()):
        rows.append((name, name, count, *([0] * 12), "statement", None))
    for pool in registry.pools.values():
        c = pool_counts(pool, now)
        wait_us = c["maxwait_us_total"]
        rows.append((
            pool.dbname, pool.user, c["cl_active"], c["cl_waiting"], 0, 0, c["sv_active"],
            c["sv_active_cancel"], c["sv_being_canceled"], c["sv_idle"], c["sv_used"],
            c["sv_tested"], c["sv_login"], wait_us // 1_000_000, wait_us % 1_000_000,
            pool.mode, None,
        ))  # fmt: skip
    return table("ssiiiiiiiiiiiiiss", POOLS_COLUMNS, rows)


# --- SHOW CLIENTS / SERVERS -------------------------------------------------------

SOCKET_COLUMNS = (
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr",
    "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr",
    "link", "remote_pid", "tls", "application_name", "prepared_statements", "id",
    "session_state",  # pgmux: what pins a client / what a server must reset
)  # fmt: skip
SOCKET_TYPES = "ssssssisiTTiiississiis"


def _client_row(client: ClientConnection, state: str, now: float, wall: float) -> tuple:
    addr, port = _address(client.transport, "peername")
    local_addr, local_port = _address(client.transport, "sockname")
    if addr == "unix":
        port = client.registry.config.listen.port
    waited = _us(now - client.wait_started) if client.wait_started else 0
    translator = client.translator
    return (
        "C", client.user, client.dbname, "none", state, addr, port, local_addr, local_port,
        _wall(client.connected_at, now, wall), _wall(client.last_active, now, wall),
        waited // 1_000_000, waited % 1_000_000, 0, _ptr(client), _ptr(client.server), 0, "",
        client.application_name, len(translator.statements) if translator else 0, client.id,
        ",".join(sorted(client.pinned)),
    )  # fmt: skip


def client_state(client: ClientConnection) -> str:
    return CLIENT_SHOWN[client.state]


def show_clients(registry: Registry, now: float) -> Result:
    wall = time.time()
    rows = [_client_row(c, "active", now, wall) for c in consoles(registry)]
    for pool in registry.pools.values():
        members = sorted(pool.clients, key=lambda c: c.id)
        rows += [_client_row(c, client_state(c), now, wall) for c in members]
    return table(SOCKET_TYPES, SOCKET_COLUMNS, rows)


def server_state(pool: Pool, server: ServerConnection) -> str:
    return SERVER_SHOWN[server.state]


def _server_row(pool: Pool, server: ServerConnection, now: float, wall: float) -> tuple:
    creds = server.credentials
    local_addr, local_port = _address(server.transport, "sockname")
    client = server.client
    return (
        "S", pool.user, pool.dbname, "none", server_state(pool, server), creds.host, creds.port,
        local_addr, local_port, _wall(server.connected_at, now, wall),
        _wall(server.last_used, now, wall), 0, 0, int(server.close_when_released),
        _ptr(server), _ptr(client), server.backend_pid, "",
        client.application_name if client is not None else "",
        len(server.prepared), server.id, ",".join(sorted(server.dirty)),
    )  # fmt: skip


def show_servers(registry: Registry, now: float) -> Result:
    wall = time.time()
    rows = []
    for pool in registry.pools.values():
        for server in sorted(pool.servers, key=lambda s: s.id):
            rows.append(_server_row(pool, server, now, wall))
        relay = registry.relays.get(pool)
        if relay is not None and relay.server is not None:
            rows.append(relay_row(pool, relay.server, now, wall))
    return table(SOCKET_TYPES, SOCKET_COLUMNS, rows)


def relay_row(pool: Pool, server: ServerConnection, now: float, wall: float) -> tuple:
    """The notification relay's server: state active, session_state "relay"."""
    row = list(_server_row(pool, server, now, wall))
    row[SOCKET_COLUMNS.index("state")] = "active"
    row[SOCKET_COLUMNS.index("application_name")] = server.credentials.application_name
    row[SOCKET_COLUMNS.index("session_state")] = "relay"
    return tuple(row)


# --- SHOW DATABASES / USERS / LISTS ----------------------------------------------

DATABASES_COLUMNS = (
    "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
    "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
    "max_connections", "current_connections", "max_client_connections",
    "current_client_connections", "paused", "disabled",
)  # fmt: skip


def show_databases(registry: Registry, now: float) -> Result:
    config = registry.config
    names = [n for n in config.databases if n != FALLBACK_DATABASE]
    names += sorted({p.dbname for p in registry.pools.values()} - set(names))
    clients = _counted_clients(registry, "dbname")
    # One row per console name, as PgBouncer's admin database "pgbouncer";
    # its clients count against the global max_db_client_connections.
    rows: list[Sequence[Any]] = [(
        name, None, config.listen.port, name, name, 2, 0, 0, 0, "statement", None, 0, 0,
        config.pool.max_db_client_connections, clients.get(name, 0), 0, 0,
    ) for name in ADMIN_DATABASES]  # fmt: skip
    for name in names:
        db = config.database(name)
        if db is None:
            continue
        paused = registry.paused or name in registry.paused_databases
        rows.append((
            name, _hosts_text(db), db.port, db.dbname or name, db.user, db.pool.size,
            db.pool.min_size, db.pool.reserve_size, int(db.timeouts.server_lifetime),
            db.pool.mode, db.load_balance_hosts if len(db.host_list) > 1 else None,
            db.pool.max_db_connections, registry.db_server_count[name],
            db.pool.max_db_client_connections, clients.get(name, 0),
            int(paused), int(registry.is_disabled(name)),
        ))  # fmt: skip
    return table("ssissiiiissiiiiii", DATABASES_COLUMNS, rows)


def _hosts_text(db: DatabaseConfig) -> str:
    """The host list as PgBouncer shows it (its `host=a,b`); one host: that host."""
    return ",".join(db.host_list) if len(db.host_list) > 1 else db.host


def _counted_clients(registry: Registry, by: str) -> dict[str, int]:
    """Logged-in clients (consoles too) per dbname or user: what
    max_db/user_client_connections count."""
    counts: dict[str, int] = {}
    for client in registry.clients:
        if client.counted:
            key = getattr(client, by)
            counts[key] = counts.get(key, 0) + 1
    return counts


USERS_COLUMNS = (
    "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
    "current_connections", "max_user_client_connections", "current_client_connections",
)  # fmt: skip


def show_users(registry: Registry, now: float) -> Result:
    config = registry.config
    # Names only: the users file's secrets never leave the registry.
    names = set(registry.users) | set(config.users) | {p.user for p in registry.pools.values()}
    names |= set(config.admin.users) | set(config.admin.stats_users)
    clients = _counted_clients(registry, "user")
    rows = []
    for name in sorted(names):
        user = config.users.get(name)
        pool_size = str(user.pool_size) if user is not None and user.pool_size else ""
        reserve = user.reserve_pool_size if user is not None else None
        reserve_size = "" if reserve is None else str(reserve)
        max_conn = user.max_user_connections if user and user.max_user_connections else 0
        max_conn = max_conn or config.pool.max_user_connections
        max_clients = user.max_user_client_connections if user else 0
        max_clients = max_clients or config.pool.max_user_client_connections
        rows.append((
            name, pool_size, reserve_size, user.pool_mode if user is not None else None, max_conn,
            registry.user_server_count[name], max_clients, clients.get(name, 0),
        ))  # fmt: skip
    return table("ssssiiii", USERS_COLUMNS, rows)


def show_lists(registry: Registry, now: float) -> Result:
    config = registry.config
    databases = {n for n in config.databases if n != FALLBACK_DATABASE}
    databases |= {p.dbname for p in registry.pools.values()}
    users = set(registry.users) | set(config.users) | {p.user for p in registry.pools.values()}
    servers = sum(len(p.servers) for p in registry.pools.values())
    rows = [
        ("databases", len(databases) + 1), ("users", len(users)), ("peers", 0),
        ("pools", len(registry.pools)), ("peer_pools", 0), ("free_clients", 0),
        ("used_clients", len(registry.clients)), ("login_clients", len(registry.logging_in)),
        ("free_servers", 0), ("used_servers", servers), ("dns_names", 0), ("dns_zones", 0),
        ("dns_queries", 0), ("dns_pending", 0),
    ]  # fmt: skip
    return table("si", ("list", "items"), rows)


# --- SHOW CONFIG / MEM / STATE / VERSION / HELP ----------------------------------


def show_config(registry: Registry, now: float) -> Result:
    # PgBouncer's setting names first (exporters and dashboards read those),
    # then pgmux's own keys; settings_table prints every password as "****".
    rows = pgbouncer_settings(registry.config)
    rows += [
        (key, value, default, "yes" if key in RUNTIME_SETTINGS else "no")
        for key, value, default in settings_table(registry.config)
    ]
    return table("ssss", ("key", "value", "default", "changeable"), rows)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _object_size(obj: object) -> int:
    size = sys.getsizeof(obj)
    attrs = getattr(obj, "__dict__", None)
    return size + (sys.getsizeof(attrs) if attrs is not None else 0)


def show_mem(registry: Registry, now: float) -> Result:
    """PgBouncer lists its slab caches; pgmux estimates its objects the same way."""
    clients = list(registry.clients)
    servers = [s for p in registry.pools.values() for s in p.servers]
    pools = list(registry.pools.values())
    rows = []
    for name, objects in (
        ("client_cache", clients),
        ("server_cache", servers),
        ("pool_cache", pools),
    ):
        size = _object_size(objects[0]) if objects else 0
        rows.append((name, size, len(objects), 0, size * len(objects)))
    rows.append(("process_rss", 0, 0, 0, _rss_bytes()))
    return table("siiii", ("name", "size", "used", "free", "memtotal"), rows)


def show_state(registry: Registry, now: float) -> Result:
    paused, suspended = registry.paused, registry.suspended
    rows = [
        ("active", "no" if paused or suspended else "yes"),
        ("paused", "yes" if paused and not suspended else "no"),
        ("suspended", "yes" if suspended else "no"),
    ]
    return table("ss", ("key", "value"), rows)


def show_version(registry: Registry, now: float) -> Result:
    return table("s", ("version",), [(VERSION,)])


def show_help(registry: Registry, now: float) -> Result:
    return Result("SHOW", notice=("Console usage", HELP))


# --- SHOW STATS / STATS_TOTALS / STATS_AVERAGES / TOTALS -------------------------

# PgBouncer's names for PoolStats' PERIOD_FIELDS, in SHOW STATS order.
_STAT_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time",
    "query_time", "wait_time",
)  # fmt: skip
# The counters after those: prepared statements (PgBouncer 1.21) and logins (1.25).
_PS_NAMES = ("client_parse_count", "server_parse_count", "bind_count", "client_login_count")
_TIMES = {"xact_time", "query_time", "wait_time"}

STATS_COLUMNS = (
    "database",
    *(f"total_{n}" for n in _STAT_NAMES),
    *(f"total_{n}" for n in _PS_NAMES),
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
    "avg_xact_time", "avg_query_time", "avg_wait_time",
    *(f"avg_{n}" for n in _PS_NAMES),
)  # fmt: skip
STATS_TOTALS_COLUMNS = (
    "database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
    "bytes_sent", "xact_time", "query_time", "wait_time", *_PS_NAMES,
)  # fmt: skip
STATS_AVERAGES_COLUMNS = (
    "database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
    "bytes_sent", "xact_time", "query_time", "wait_time", *(f"avg_{n}" for n in _PS_NAMES),
)  # fmt: skip
TOTALS_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
    "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
    "ps_bind_count", "client_login_count",
)  # fmt: skip


def _ps_counts(stats: Sequence[PoolStats]) -> list[int]:
    """The counters after the main ones: client Parses, server Parses, Binds, logins."""
    return [
        sum(s.total_client_parse_count for s in stats),
        sum(s.total_server_parse_count for s in stats),
        sum(s.total_bind_count for s in stats),
        sum(s.total_client_login_count for s in stats),
    ]


def totals(stats: Sequence[PoolStats]) -> list[int]:
    """Since start, in PgBouncer's units: counts, bytes, microseconds."""
    sums = [0.0] * len(PERIOD_FIELDS)
    for one in stats:
        for i, value in enumerate(one.snapshot()):
            sums[i] += value
    main = zip(_STAT_NAMES, sums[: len(_STAT_NAMES)], strict=True)
    return [_us(v) if n in _TIMES else int(v) for n, v in main]


def averages(stats: Sequence[PoolStats]) -> list[int]:
    """Over the last complete stats_period: per second, durations per event (µs)."""
    rates = [0.0] * len(PERIOD_FIELDS)
    deltas = [0.0] * len(PERIOD_FIELDS)
    for one in stats:
        older, newer = one.older, one.newer
        if older is None or newer is None or newer[0] <= older[0]:
            continue
        seconds = newer[0] - older[0]
        for i in range(len(PERIOD_FIELDS)):
            delta = newer[1][i] - older[1][i]
            deltas[i] += delta
            rates[i] += delta / seconds
    out = []
    counts = dict(zip(_STAT_NAMES, deltas[: len(_STAT_NAMES)], strict=True))
    per = {"xact_time": "xact_count", "query_time": "query_count",
           "wait_time": "server_assignment_count"}  # fmt: skip
    for i, name in enumerate(_STAT_NAMES):
        if name in _TIMES:
            count = counts[per[name]]
            out.append(_us(deltas[i] / count) if count else 0)
        else:
            out.append(int(rates[i]))
    out += [int(rate) for rate in rates[len(_STAT_NAMES) :]]  # parses, binds, logins per second
    return out


def show_stats(registry: Registry, now: float) -> Result:
    rows = [
        (db, *totals(stats), *_ps_counts(stats), *averages(stats))
        for db, stats in _stats_by_database(registry).items()
    ]
    return table("s" + "N" * 24, STATS_COLUMNS, rows)


def show_stats_totals(registry: Registry, now: float) -> Result:
    rows = [(db, *totals(s), *_ps_counts(s)) for db, s in _stats_by_database(registry).items()]
    return table("s" + "N" * 12, STATS_TOTALS_COLUMNS, rows)


def show_stats_averages(registry: Registry, now: float) -> Result:
    rows = [(db, *averages(s)) for db, s in _stats_by_database(registry).items()]
    return table("s" + "N" * 12, STATS_AVERAGES_COLUMNS, rows)


def show_totals(registry: Registry, now: float) -> Result:
    stats = [registry.console_stats, *(pool.stats for pool in registry.pools.values())]
    values = [*totals(stats), *_ps_counts(stats)]
    rows = [(f"total_{n}", v) for n, v in zip(TOTALS_NAMES, values, strict=True)]
    avg = averages(stats)
    rows += [(f"avg_{n}", v) for n, v in zip(TOTALS_NAMES, avg, strict=True)]
    return table("sN", ("name", "value"), rows)


ShowFunction = Callable[["Registry", float], Result]

SHOW: dict[str, ShowFunction] = {
    "clients": show_clients,
    "config": show_config,
    "databases": show_databases,
    "help": show_help,
    "hosts": lambda registry, now: table(HOSTS_SPEC, HOSTS_COLUMNS, host_rows(registry)),
    "lists": show_lists,
    "mem": show_mem,
    "pools": show_pools,
    "servers": show_servers,
    "state": show_state,
    "stats": show_stats,
    "stats_averages": show_stats_averages,
    "stats_totals": show_stats_totals,
    "totals": show_totals,
    "users": show_users,
    "version": show_version,
}

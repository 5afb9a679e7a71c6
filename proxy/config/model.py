"""The configuration objects: frozen dataclasses, one per section.

PgBouncer's loader.c reads an ini file into globals; pgmux builds immutable
objects, so a reload builds a new Config next to the old one and swaps it in
only when it is valid. The defaults live here, in the dataclasses, so parsing
(schema.py) and SHOW CONFIG (show.py) share one source of truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

POOL_MODES = ("transaction", "session", "statement")
SESSION_STATES = ("pin", "reset", "error", "ignore")
LISTEN_MODES = ("relay", "pin", "error")
AUTH_TYPES = ("trust", "password", "md5", "scram-sha-256", "cert")
TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_FORMATS = ("json", "console", "pgbouncer")
LOG_LEVELS = ("debug", "info", "warning", "error")
SYSLOG_FACILITIES = ("auth", "authpriv", "daemon", "user", *(f"local{i}" for i in range(8)))
ADMIN_DATABASES = ("pgmux", "pgbouncer")  # the console; a pool may not take these names
FALLBACK_DATABASE = "*"
MAX_MESSAGE_SIZE = 0x7FFFFFFF  # the length word of a protocol message is an int32


@dataclass(frozen=True, slots=True)
class ListenConfig:
    addresses: tuple[str, ...] = ("127.0.0.1",)
    port: int = 6432
    unix_socket_dir: str | None = None
    unix_socket_mode: int = 0o777
    max_client_conn: int = 2000
    workers: int = 1
    backlog: int = 1024
    # SO_REUSEPORT on the TCP sockets: several pgmux (or PgBouncer) processes
    # on one port, e.g. a peer group on one machine (PgBouncer's so_reuseport).
    reuse_port: bool = False


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The global `pool:` section, and each database's effective settings."""

    mode: str = "transaction"
    size: int = 12
    min_size: int = 0
    reserve_size: int = 0
    reserve_timeout: float = 5.0
    max_db_connections: int = 0  # 0 = unlimited
    max_user_connections: int = 0  # 0 = unlimited
    max_db_client_connections: int = 0  # clients per database; 0 = unlimited
    max_user_client_connections: int = 0  # clients per user; 0 = unlimited
    max_prepared_statements: int = 200
    session_state: str = "pin"
    # LISTEN under transaction/statement pooling: one relay connection per pool
    # listens for the pool's clients (relay), or the client keeps its server
    # (pin), or LISTEN is refused (error). notify_queue bounds each client's
    # notifications not yet taken by its socket.
    listen_mode: str = "relay"
    notify_queue: int = 1000
    rollback_abandoned: bool = True
    # PgBouncer's server_check_query: SQL that checks a server idle for
    # server_check_delay (0: every time) before its next client; "<empty>"
    # sends an empty query, "" turns the check off.
    server_check_query: str = "<empty>"
    server_check_delay: float = 30.0
    # Session mode: a server RECONNECT or a reload marked for replacement closes
    # (with its client) once that client is between transactions, not at its end.
    server_fast_close: bool = False


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Float seconds; 0.0 means off."""

    server_idle: float = 60.0
    server_lifetime: float = 3600.0
    server_connect: float = 5.0
    server_login_retry: float = 5.0
    client_login: float = 60.0
    message: float = 60.0  # a client's message must arrive whole within this
    client_idle: float = 0.0
    idle_transaction: float = 0.0
    transaction: float = 0.0  # a transaction's whole time, idle or running
    query: float = 0.0
    query_wait: float = 20.0
    # A NOTICE to a client queued this long; off in YAML (a direct connection
    # never sends one), PgBouncer's 5 s for a pgbouncer.ini.
    query_wait_notify: float = 0.0
    pool_idle: float = 0.0  # a pool with no client and no server this long is removed
    cancel_wait: float = 10.0
    shutdown_grace: float = 30.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    type: str = "scram-sha-256"
    users_file: str | None = None  # absolute, resolved against the config file's directory
    query: str | None = None
    query_user: str | None = None
    query_password: str | None = field(default=None, repr=False)  # else the users file's
    query_cache_ttl: float = 10.0  # seconds an auth_query answer is reused
    hba_file: str | None = None  # absolute, like users_file
    dbname: str | None = None  # where auth_query runs (PgBouncer's auth_dbname); None: the client's
    # PgBouncer's login rules (set for a pgbouncer.ini): trust admits only the
    # users the users file or auth_query knows, a failed SCRAM exchange is
    # "SASL authentication failed", an unknown database is told after the password.
    pgbouncer_rules: bool = False


@dataclass(frozen=True, slots=True)
class HttpConfig:
    address: str = "127.0.0.1"
    port: int | None = None  # None = no HTTP endpoint


@dataclass(frozen=True, slots=True)
class AdminConfig:
    users: tuple[str, ...] = ()
    stats_users: tuple[str, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    stats_period: float = 60.0  # SHOW STATS averages cover this period (PgBouncer's default)


@dataclass(frozen=True, slots=True)
class TlsSideConfig:
    mode: str = "disable"
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    protocols: str | None = None
    ciphers: str | None = None
    tls13_ciphers: str | None = None  # TLSv1.3 suites, colon-separated; None: OpenSSL's


@dataclass(frozen=True, slots=True)
class TlsConfig:
    client: TlsSideConfig = field(default_factory=TlsSideConfig)
    server: TlsSideConfig = field(default_factory=lambda: TlsSideConfig(mode="prefer"))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = (
        "json"  # json | console | pgbouncer (PgBouncer's lines; a pgbouncer.ini's default)
    )
    level: str = "info"
    wait_threshold: float = 1.0  # log a client that waited this long for a server; 0 = off
    file: str | None = None  # also append to this file (PgBouncer's logfile); reopened on SIGHUP
    syslog: bool = False  # also send to syslog (/dev/log)
    syslog_ident: str = "pgmux"
    syslog_facility: str = "daemon"
    # PgBouncer's log_connections / log_disconnections / log_pooler_errors / log_stats
    connections: bool = True
    disconnections: bool = True
    pooler_errors: bool = True
    stats: bool = True


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """When a host of a multi-host database counts as down, and for how long."""

    failures: int = 3  # failed logins in a row that mark a host down
    interval: float = 5.0  # between probes; a down host is tried last until then
    timeout: float = 2.0  # for one probe's login and check


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_packet_size: int = 1 << 30  # PostgreSQL's own limit
    max_logins_in_progress: int = 1000  # 0 = unlimited


TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE_HOSTS = ("disable", "random", "round-robin")


@dataclass(frozen=True, slots=True)
class ReplicaLag:
    """How far behind its primary a standby may be and stay in rotation:
    WAL bytes not yet replayed, or seconds since its last replayed commit."""

    bytes: int = 0  # 0: no byte limit
    seconds: float = 0.0  # 0: no time limit

    def __bool__(self) -> bool:
        return bool(self.bytes or self.seconds)


@dataclass(frozen=True, slots=True, repr=False)
class DatabaseConfig:
    name: str  # the key in `databases:`; "*" is the fallback
    host: str = "127.0.0.1"  # an absolute directory means a unix socket, as in libpq
    port: int = 5432
    dbname: str | None = None  # None: the database name the client asked for
    user: str | None = None  # force this upstream user
    password: str | None = None  # never printed
    pool: PoolSettings = field(default_factory=PoolSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    application_name: str | None = None
    # Every host to try, in order, and their ports (one port: the same for all);
    # empty: just host and port above, which are always the first of them.
    host_list: tuple[str, ...] = ()
    port_list: tuple[int, ...] = ()
    target_session_attrs: str = "any"  # which server a login must reach (libpq's)
    load_balance_hosts: str = "disable"  # the order hosts are tried in
    max_replica_lag: ReplicaLag = field(default_factory=ReplicaLag)  # off by default
    # auth_query for this database's clients, over the auth section's (PgBouncer's
    # per-database auth_user, auth_query, auth_dbname); None: the global one.
    auth_user: str | None = None
    auth_query: str | None = None
    auth_dbname: str | None = None
    # SQL run on each new server connection before its first client (PgBouncer's
    # per-database connect_query); an error is logged and otherwise ignored.
    connect_query: str | None = None

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.password is not None:
            shown["password"] = "****"
        return f"DatabaseConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


@dataclass(frozen=True, slots=True)
class UserConfig:
    name: str
    pool_mode: str | None = None
    max_user_connections: int = 0
    max_user_client_connections: int = 0
    pool_size: int | None = None
    reserve_pool_size: int | None = None  # None: the database's reserve_size
    # Timeouts of this user's pools, over the database's (None: the database's).
    query: float | None = None
    query_wait: float | None = None
    client_idle: float | None = None
    idle_transaction: float | None = None
    transaction: float | None = None


MAX_PEER_ID = 16383  # PgBouncer's limit: the id travels in two bytes of the cancel key


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Another pgmux (or PgBouncer) of the fleet: where its cancels go."""

    id: int
    host: str  # an absolute directory means a unix socket, as for databases
    port: int = 6432


@dataclass(frozen=True, slots=True)
class PeersConfig:
    """PgBouncer-style peering: instances behind one TCP balancer forward each
    other's CancelRequests (the instance's id is in every cancel key it issues)."""

    peer_id: int = 0  # this instance; 0 = peering off
    members: tuple[PeerConfig, ...] = ()  # may include this instance (ignored)
    secret: str | None = field(default=None, repr=False)  # signs 3.2 keys when set
    # Every client gets PgBouncer's 8-byte BackendKeyData, also under protocol
    # 3.2: PgBouncer (1.25) drops a CancelRequest with a longer key.
    short_keys: bool = False

    def peer(self, peer_id: int) -> PeerConfig | None:
        for member in self.members:
            if member.id == peer_id:
                return member
        return None


@dataclass(frozen=True, slots=True)
class Config:
    path: str | None = None  # absolute, so a reload finds it whatever the cwd
    listen: ListenConfig = field(default_factory=ListenConfig)
    pool: PoolSettings = field(default_factory=PoolSettings)
    max_server_connections: int = 0  # across all pools; 0 = unlimited
    timeouts: Timeouts = field(default_factory=Timeouts)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    databases: Mapping[str, DatabaseConfig] = field(default_factory=lambda: MappingProxyType({}))
    users: Mapping[str, UserConfig] = field(default_factory=lambda: MappingProxyType({}))
    ignore_startup_parameters: tuple[str, ...] = ()
    pidfile: str | None = None
    # The SQLSTATE of pgmux's own errors: "postgres", the code PostgreSQL uses
    # for the same condition; "pgbouncer" (a pgbouncer.ini), 08P01 with
    # PgBouncer's texts for console errors and transaction timeouts.
    error_codes: str = "postgres"
    login_notify_message: str | None = None  # a NOTICE every client gets at login
    # What SIGTERM / SIGINT (SHUTDOWN WAIT_FOR_*) do: "drain", close each
    # client at its transaction boundary; "pgbouncer" (a pgbouncer.ini), serve
    # connected clients until they leave, as PgBouncer (daemon/lifecycle.py).
    shutdown: str = "drain"

    def database(self, name: str) -> DatabaseConfig | None:
        """The entry for NAME, else the "*" fallback renamed to NAME, else None.

        The fallback keeps its dbname (normally None: connect upstream to NAME),
        and its name becomes NAME so each database gets a pool of its own.
        """
        found = self.databases.get(name)
        if found is not None:
            return found
        fallback = self.databases.get(FALLBACK_DATABASE)
        return None if fallback is None else replace(fallback, name=name)

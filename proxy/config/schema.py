"""The schema: which keys each section takes, and the converter of each.

A few small tables (key -> converter, values.py) describe the YAML file;
parsing (build.py), SHOW CONFIG (show.py) and the console's SET
(RUNTIME_SETTINGS) all read them, so a key is declared once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from pgmux.proxy.config.errors import join_key, key_error
from pgmux.proxy.config.model import (
    AUTH_TYPES,
    LISTEN_MODES,
    LOAD_BALANCE_HOSTS,
    LOG_FORMATS,
    LOG_LEVELS,
    POOL_MODES,
    SESSION_STATES,
    SYSLOG_FACILITIES,
    TARGET_SESSION_ATTRS,
    TLS_MODES,
    AdminConfig,
    AuthConfig,
    HealthConfig,
    HttpConfig,
    LimitsConfig,
    ListenConfig,
    LoggingConfig,
    Timeouts,
    TlsConfig,
)
from pgmux.proxy.config.values import (
    Converter,
    boolean,
    expected_error,
    file_mode,
    host_list,
    names,
    non_negative,
    one_of,
    optional,
    optional_port,
    optional_positive,
    optional_text,
    packet_size,
    parse_duration,
    port,
    port_list,
    positive,
    positive_duration,
    replica_lag,
    secret,
    suggestion,
    text,
    workers,
)


def check_query(value: Any, key: str) -> str:
    """server_check_query: SQL, "<empty>" (an empty query), "" or null (off)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise expected_error(key, 'a query, "<empty>", or "" (off)', value)
    return str(value)  # drops the Interpolated marker


@dataclass(frozen=True, slots=True)
class Section:
    """A mapping whose keys are converted onto a base instance (its defaults)."""

    base: Any
    table: Mapping[str, Converter]

    def __call__(self, value: Any, key: str) -> Any:
        return replace(self.base, **convert_table(self.table, value, key))


LISTEN: dict[str, Converter] = {
    "addresses": names,
    "port": port,
    "unix_socket_dir": optional_text,
    "unix_socket_mode": file_mode,
    "max_client_conn": positive,
    "workers": workers,
    "backlog": positive,
    "reuse_port": boolean,
}
POOL: dict[str, Converter] = {
    "mode": one_of(*POOL_MODES),
    "size": positive,
    "min_size": non_negative,
    "reserve_size": non_negative,
    "reserve_timeout": parse_duration,
    "max_db_connections": non_negative,
    "max_user_connections": non_negative,
    "max_db_client_connections": non_negative,
    "max_user_client_connections": non_negative,
    "max_prepared_statements": non_negative,
    "session_state": one_of(*SESSION_STATES),
    "listen_mode": one_of(*LISTEN_MODES),
    "notify_queue": positive,
    "rollback_abandoned": boolean,
    "server_check_query": check_query,
    "server_check_delay": parse_duration,
    "server_fast_close": boolean,
}
# The global section has one key more: the cap across all pools.
POOL_SECTION = {**POOL, "max_server_connections": non_negative}
TIMEOUTS: dict[str, Converter] = {f.name: parse_duration for f in fields(Timeouts)}
_AUTH: dict[str, Converter] = {
    "type": one_of(*AUTH_TYPES),
    "users_file": optional_text,
    "query": optional_text,
    "query_user": optional_text,
    "query_password": secret,
    "query_cache_ttl": parse_duration,
    "hba_file": optional_text,
    "pgbouncer_rules": boolean,
    "dbname": optional_text,
}
_HTTP: dict[str, Converter] = {"address": text, "port": optional_port}
_ADMIN: dict[str, Converter] = {
    "users": names,
    "stats_users": names,
    "http": Section(HttpConfig(), _HTTP),
    "stats_period": positive_duration,
}
_TLS_SIDE: dict[str, Converter] = {
    "mode": one_of(*TLS_MODES),
    **dict.fromkeys(("cert", "key", "ca", "protocols", "ciphers", "tls13_ciphers"), optional_text),
}
_TLS: dict[str, Converter] = {
    "client": Section(TlsConfig().client, _TLS_SIDE),
    "server": Section(TlsConfig().server, _TLS_SIDE),
}
_LOGGING: dict[str, Converter] = {
    "format": one_of(*LOG_FORMATS),
    "level": one_of(*LOG_LEVELS),
    "wait_threshold": parse_duration,
    "file": optional_text,
    "syslog": boolean,
    "syslog_ident": text,
    "syslog_facility": one_of(*SYSLOG_FACILITIES),
    **dict.fromkeys(("connections", "disconnections", "pooler_errors", "stats"), boolean),
}
_LIMITS: dict[str, Converter] = {
    "max_packet_size": packet_size,
    "max_logins_in_progress": non_negative,
}
# Sections that map 1:1 onto a dataclass; `pool` is parsed apart for its extra key.
SECTIONS: dict[str, Section] = {
    "listen": Section(ListenConfig(), LISTEN),
    "timeouts": Section(Timeouts(), TIMEOUTS),
    "auth": Section(AuthConfig(), _AUTH),
    "admin": Section(AdminConfig(), _ADMIN),
    "tls": Section(TlsConfig(), _TLS),
    "logging": Section(LoggingConfig(), _LOGGING),
    "limits": Section(LimitsConfig(), _LIMITS),
    "health": Section(
        HealthConfig(),
        {
            "failures": positive,
            "interval": positive_duration,
            "timeout": positive_duration,
        },
    ),
}
TOP_LEVEL = (
    *("listen", "pool", "timeouts", "auth", "admin", "tls", "logging", "limits", "health"),
    *("peers", "databases", "users", "ignore_startup_parameters", "pidfile", "error_codes"),
    "login_notify_message",
    "shutdown",
)
ERROR_CODES = ("postgres", "pgbouncer")
SHUTDOWN_MODES = ("drain", "pgbouncer")
_DATABASE_OWN: dict[str, Converter] = {
    "host": host_list,
    "port": port_list,
    "dbname": optional_text,
    "user": optional_text,
    "password": secret,
    "application_name": optional_text,
    "target_session_attrs": one_of(*TARGET_SESSION_ATTRS),
    "load_balance_hosts": one_of(*LOAD_BALANCE_HOSTS),
    "max_replica_lag": replica_lag,
    "connect_query": optional_text,
    **dict.fromkeys(("auth_user", "auth_query", "auth_dbname"), optional_text),
}
# YAML key -> the DatabaseConfig field holding it (the others: the same name).
_DATABASE_FIELDS = {"host": "host_list", "port": "port_list"}
# Per-database YAML key -> PoolSettings field: flat, named like PgBouncer's.
_DATABASE_POOL_NAMES = {"pool_size": "size", "pool_mode": "mode"}
_DATABASE_POOL_NAMES |= {name: name for name in POOL if name not in ("size", "mode")}
# Per-database YAML key -> (which object it sets, its field there, converter).
DATABASE_KEYS: dict[str, tuple[str, str, Converter]] = {
    **{
        key: ("db", _DATABASE_FIELDS.get(key, key), convert)
        for key, convert in _DATABASE_OWN.items()
    },
    **{key: ("pool", name, POOL[name]) for key, name in _DATABASE_POOL_NAMES.items()},
    **{key: ("timeouts", key, convert) for key, convert in TIMEOUTS.items()},
}
# The timeouts a [users] entry may set for its own pools (PgBouncer 1.24).
USER_TIMEOUTS = ("query", "query_wait", "client_idle", "idle_transaction", "transaction")
USER_KEYS: dict[str, Converter] = {
    "pool_mode": optional(one_of(*POOL_MODES)),
    "max_user_connections": non_negative,
    "max_user_client_connections": non_negative,
    "pool_size": optional_positive,
    "reserve_pool_size": optional(non_negative),
    **{name: optional(parse_duration) for name in USER_TIMEOUTS},
}


def _runtime_level(value: Any, key: str) -> str:
    """logging.level, or PgBouncer's `SET verbose = N` (0: info, 1 or more: debug)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return "debug" if value > 0 else "info"
    level: str = _LOGGING["level"](value, key)
    return level


# Settings the console's SET may change while pgmux runs (SHOW CONFIG's
# "changeable" column). A timeouts.* or pool.* value also applies to every
# database that does not override it. The rest need a RELOAD or a restart.
RUNTIME_SETTINGS: dict[str, Converter] = {
    "listen.max_client_conn": positive,
    "admin.stats_period": positive_duration,
    "logging.level": _runtime_level,
    "logging.wait_threshold": parse_duration,
    **{f"timeouts.{name}": parse_duration for name in TIMEOUTS},
    **{
        f"pool.{name}": POOL[name]
        for name in (
            "mode",
            "size",
            "min_size",
            "reserve_size",
            "reserve_timeout",
            "max_db_connections",
            "max_user_connections",
            "max_db_client_connections",
            "max_user_client_connections",
            "max_prepared_statements",
            "server_check_query",
            "server_check_delay",
            "server_fast_close",
        )
    },
    # Read at each login: the next client sees the new value.
    "auth.type": _AUTH["type"],
    "auth.query_user": _AUTH["query_user"],
    "auth.dbname": _AUTH["dbname"],
    "admin.users": names,
    "admin.stats_users": names,
    # The TLS contexts are rebuilt from the new files at once (console/settings.py).
    **{
        f"tls.{side}.{name}": _TLS_SIDE[name]
        for side in ("client", "server")
        for name in ("mode", "cert", "key", "ca", "protocols", "ciphers", "tls13_ciphers")
    },
}


def mapping(value: Any, key: str) -> dict[Any, Any]:
    if value is None:  # an empty section (`listen:`) means all defaults
        return {}
    if not isinstance(value, dict):
        raise expected_error(key or "top level", "a mapping", value)
    return value


def reject_unknown(entries: Mapping[Any, Any], allowed: Iterable[str], prefix: str) -> None:
    allowed = list(allowed)
    for name in entries:
        if name not in allowed:
            hint = suggestion(name, allowed) or f" (expected one of: {', '.join(allowed)})"
            raise key_error(join_key(prefix, str(name)), f"unknown key{hint}")


def convert_table(table: Mapping[str, Converter], value: Any, prefix: str) -> dict[str, Any]:
    """VALUE's keys, each converted by TABLE; an unknown key is an error."""
    entries = mapping(value, prefix)
    reject_unknown(entries, table, prefix)
    return {name: table[name](item, join_key(prefix, name)) for name, item in entries.items()}

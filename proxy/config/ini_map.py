"""PgBouncer's settings, mapped onto pgmux's: tables of data, reviewed like tables.

SETTINGS lists every setting of [pgbouncer] with PgBouncer's default and the
pgmux key path it lands on (None: pgmux has no equivalent); a setting the ini
leaves out gets PgBouncer's default (default_pool_size 20, pool_mode session,
query_wait_timeout 120 s, ...), not pgmux's YAML default. DATABASE_PARAMETERS
and USER_PARAMETERS do the same for the connection strings of [databases] and
[users]. The value parsers turn ini text into the value a pgmux YAML file
would hold; pgmux's own validation runs afterwards (build.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pgmux.proxy.config.model import AUTH_TYPES, SYSLOG_FACILITIES, Config

DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)


# -- value parsers: ini text -> the value a pgmux YAML file would hold ----------------


def c_int(text: str) -> int:
    """strtol(text, 0): 0x1F is hex, 0777 is octal, as in PgBouncer."""
    match = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\s*", text)
    if match is None:
        raise ValueError("expected an integer")
    sign, digits = match.groups()
    if digits[:2].lower() == "0x":
        number = int(digits, 16)
    elif digits.startswith("0"):
        number = int(digits, 8)
    else:
        number = int(digits)
    return -number if sign == "-" else number


def seconds(text: str) -> float:
    """PgBouncer times are seconds, possibly fractional."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if value < 0 or value != value or value == float("inf"):
        raise ValueError("expected a number of seconds")
    return value


# PgBouncer's server_lifetime = 0 uses each server once, then closes it; pgmux's
# 0 turns the limit off, so the ini's 0 becomes the shortest lifetime there is.
USED_ONCE = 1e-6


def lifetime_seconds(text: str) -> float:
    return seconds(text) or USED_ONCE


def _show_lifetime(config: Config) -> str:
    lifetime = config.timeouts.server_lifetime
    return "0" if lifetime == USED_ONCE else _format(lifetime)


def text_or_none(text: str) -> str | None:
    return text or None


def name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "on", "yes", "true"):
        return True
    if lowered in ("0", "off", "no", "false"):
        return False
    raise ValueError("expected 0 or 1")


def _path_or_none(text: str) -> str | None:
    # PgBouncer opens relative names from its working directory; pinned here
    # so a later reload or `pgmux convert` output means the same file.
    return os.path.abspath(os.path.expanduser(text)) if text else None


def _auth_type(text: str) -> str:
    method = text.strip().lower()
    if method == "plain":
        return "password"  # PgBouncer's name for clear-text passwords
    if method == "hba":
        return "md5"  # a placeholder: with auth.hba_file set, its rules pick the method
    if method in AUTH_TYPES:
        return method
    others = ", ".join(t for t in AUTH_TYPES if t != "password")
    raise ValueError(
        f"auth_type {method!r} is not supported by pgmux (supported: plain, hba, {others})"
    )


def _auth_dbname(text: str) -> str | None:
    if text == "pgbouncer":  # PgBouncer's cf_set_authdb
        raise ValueError('cannot use the reserved "pgbouncer" database as an auth_dbname')
    return text or None


def _flag(text: str) -> bool:
    """PgBouncer's integer switches: anything but 0 is on."""
    return c_int(text) != 0


def _facility(text: str) -> str:
    name = text.strip().lower()
    if name not in SYSLOG_FACILITIES:
        raise ValueError(f"expected one of {', '.join(SYSLOG_FACILITIES)}")
    return name


def _verbose(text: str) -> str:
    return "debug" if c_int(text) > 0 else "info"


def _tls_protocols(text: str) -> str | None:
    return None if text.strip().lower() in ("", "secure") else text


def _tls_ciphers(text: str) -> str | None:
    lowered = text.strip().lower()
    return None if lowered in ("", "default", "secure", "fast", "normal") else text


def _tls13_ciphers(text: str) -> str | None:
    return text.strip() or None


# -- the settings of [pgbouncer] ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One PgBouncer setting: its default and where it lands in pgmux."""

    name: str
    default: str  # PgBouncer's default, spelled as in the ini
    target: str | None = None  # pgmux key path; None: no pgmux equivalent
    parse: Callable[[str], Any] = text_or_none
    show: Callable[[Config], str] | None = None  # SHOW CONFIG value, when not from target
    note: str = ""  # why it is not supported, or how pgmux differs

    def value_in(self, config: Config) -> str | None:
        """CONFIG's value of this setting, spelled as PgBouncer shows it;
        None when pgmux has no equivalent."""
        if self.show is not None:
            return self.show(config)
        if self.target is not None:
            return _format(_get(config, self.target))
        return None


def _get(config: Config, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ",".join(value)
    return str(value)


def _show_auth_type(config: Config) -> str:
    if config.auth.hba_file:
        return "hba"
    return "plain" if config.auth.type == "password" else config.auth.type


def _show_auth_query(config: Config) -> str:
    return config.auth.query or DEFAULT_AUTH_QUERY


def _show_unix_socket_mode(config: Config) -> str:
    return f"0{config.listen.unix_socket_mode:o}"


def _show_verbose(config: Config) -> str:
    return "1" if config.logging.level == "debug" else "0"


def _show_tls(side: str, name: str, empty: str) -> Callable[[Config], str]:
    return lambda config: getattr(getattr(config.tls, side), name) or empty


def _constant(value: str) -> Callable[[Config], str]:
    return lambda config: value


_ALWAYS = "pgmux always does this"

SETTINGS: tuple[Setting, ...] = (
    # generic
    Setting("logfile", "", "logging.file", _path_or_none),
    Setting("pidfile", "", "pidfile", _path_or_none),
    Setting("listen_addr", "", "listen.addresses", name_list),
    Setting("listen_port", "6432", "listen.port", c_int),
    Setting("unix_socket_dir", "/tmp", "listen.unix_socket_dir", _path_or_none),
    Setting(
        "unix_socket_mode",
        "0777",
        "listen.unix_socket_mode",
        c_int,
        _show_unix_socket_mode,
    ),
    Setting("unix_socket_group", "", note="set the group with systemd"),
    Setting("user", "", note="use `pgmux -u USER` or systemd User="),
    Setting("pool_mode", "session", "pool.mode", str.lower),
    Setting("max_client_conn", "100", "listen.max_client_conn", c_int),
    Setting("default_pool_size", "20", "pool.size", c_int),
    Setting("min_pool_size", "0", "pool.min_size", c_int),
    Setting("reserve_pool_size", "0", "pool.reserve_size", c_int),
    Setting("reserve_pool_timeout", "5", "pool.reserve_timeout", seconds),
    Setting("max_db_connections", "0", "pool.max_db_connections", c_int),
    Setting("max_db_client_connections", "0", "pool.max_db_client_connections", c_int),
    Setting("max_user_connections", "0", "pool.max_user_connections", c_int),
    Setting("max_user_client_connections", "0", "pool.max_user_client_connections", c_int),
    Setting("server_round_robin", "0", note="pgmux reuses servers LIFO"),
    Setting(
        "track_extra_parameters",
        "IntervalStyle",
        show=_constant("(all reported)"),
        note=_ALWAYS + ": every parameter the server reports is tracked",
    ),
    Setting("ignore_startup_parameters", "", "ignore_startup_parameters", name_list),
    Setting("peer_id", "0", "peers.peer_id", c_int),
    Setting("disable_pqexec", "0"),
    Setting("application_name_add_host", "0"),
    Setting("conffile", "", show=lambda config: config.path or ""),
    Setting("service_name", "pgbouncer", note="Windows only"),
    Setting("job_name", "pgbouncer", note="Windows only"),
    Setting("stats_period", "60", "admin.stats_period", seconds),
    Setting("max_prepared_statements", "200", "pool.max_prepared_statements", c_int),
    Setting("scram_iterations", "4096"),
    # authentication
    Setting("auth_type", "md5", "auth.type", _auth_type, _show_auth_type),
    Setting("auth_hba_file", "", "auth.hba_file", _path_or_none),
    Setting("auth_ident_file", ""),
    Setting("auth_file", "", "auth.users_file", _path_or_none),
    Setting("auth_user", "", "auth.query_user", text_or_none),
    Setting("auth_query", DEFAULT_AUTH_QUERY, "auth.query", text_or_none, _show_auth_query),
    Setting("auth_dbname", "", "auth.dbname", _auth_dbname),
    Setting("auth_ldap_options", ""),
    # logging
    Setting("syslog", "0", "logging.syslog", _flag),
    Setting("syslog_ident", "pgbouncer", "logging.syslog_ident", str.strip),
    Setting("syslog_facility", "daemon", "logging.syslog_facility", _facility),
    Setting("log_connections", "1", "logging.connections", _flag),
    Setting("log_disconnections", "1", "logging.disconnections", _flag),
    Setting("log_pooler_errors", "1", "logging.pooler_errors", _flag),
    Setting("log_stats", "1", "logging.stats", _flag),
    Setting("verbose", "0", "logging.level", _verbose, _show_verbose),
    # console access
    Setting("admin_users", "", "admin.users", name_list),
    Setting("stats_users", "", "admin.stats_users", name_list),
    # server connections
    Setting(
        "server_reset_query",
        "DISCARD ALL",
        show=_constant("DISCARD ALL"),
        note="pgmux resets session-pooled servers with DISCARD ALL",
    ),
    Setting("server_reset_query_always", "0", note="see pool.session_state: reset"),
    Setting("server_check_delay", "30", "pool.server_check_delay", seconds),
    Setting("server_check_query", "<empty>", "pool.server_check_query", str.strip),
    Setting("server_fast_close", "0", "pool.server_fast_close", _flag),
    Setting(
        "server_lifetime", "3600", "timeouts.server_lifetime", lifetime_seconds, _show_lifetime
    ),
    Setting("server_idle_timeout", "600", "timeouts.server_idle", seconds),
    Setting("server_connect_timeout", "15", "timeouts.server_connect", seconds),
    Setting("server_login_retry", "15", "timeouts.server_login_retry", seconds),
    Setting("client_login_timeout", "60", "timeouts.client_login", seconds),
    Setting("autodb_idle_timeout", "3600"),
    Setting("pool_idle_timeout", "0", "timeouts.pool_idle", seconds),
    Setting("dns_max_ttl", "15"),
    Setting("dns_nxdomain_ttl", "15"),
    Setting("dns_zone_check_period", "0"),
    Setting("resolv_conf", ""),
    Setting("query_wait_notify", "5", "timeouts.query_wait_notify", seconds),
    Setting("login_notify_message", "", "login_notify_message", text_or_none),
    # TLS
    Setting("client_tls_sslmode", "disable", "tls.client.mode", str.lower),
    Setting("client_tls_key_file", "", "tls.client.key", _path_or_none),
    Setting("client_tls_cert_file", "", "tls.client.cert", _path_or_none),
    Setting("client_tls_ca_file", "", "tls.client.ca", _path_or_none),
    Setting(
        "client_tls_protocols",
        "secure",
        "tls.client.protocols",
        _tls_protocols,
        _show_tls("client", "protocols", "secure"),
    ),
    Setting(
        "client_tls_ciphers",
        "default",
        "tls.client.ciphers",
        _tls_ciphers,
        _show_tls("client", "ciphers", "default"),
    ),
    Setting(
        "client_tls13_ciphers",
        "",
        "tls.client.tls13_ciphers",
        _tls13_ciphers,
        _show_tls("client", "tls13_ciphers", ""),
    ),
    Setting("client_tls_ecdhcurve", "auto"),
    Setting("client_tls_dheparams", "auto"),
    Setting("server_tls_sslmode", "prefer", "tls.server.mode", str.lower),
    Setting("server_tls_ca_file", "", "tls.server.ca", _path_or_none),
    Setting("server_tls_key_file", "", "tls.server.key", _path_or_none),
    Setting("server_tls_cert_file", "", "tls.server.cert", _path_or_none),
    Setting(
        "server_tls_protocols",
        "secure",
        "tls.server.protocols",
        _tls_protocols,
        _show_tls("server", "protocols", "secure"),
    ),
    Setting(
        "server_tls_ciphers",
        "default",
        "tls.server.ciphers",
        _tls_ciphers,
        _show_tls("server", "ciphers", "default"),
    ),
    Setting(
        "server_tls13_ciphers",
        "",
        "tls.server.tls13_ciphers",
        _tls13_ciphers,
        _show_tls("server", "tls13_ciphers", ""),
    ),
    # dangerous timeouts
    Setting("query_timeout", "0", "timeouts.query", seconds),
    Setting("query_wait_timeout", "120", "timeouts.query_wait", seconds),
    Setting("cancel_wait_timeout", "10", "timeouts.cancel_wait", seconds),
    Setting("client_idle_timeout", "0", "timeouts.client_idle", seconds),
    Setting("idle_transaction_timeout", "0", "timeouts.idle_transaction", seconds),
    Setting("transaction_timeout", "0", "timeouts.transaction", seconds),
    # low-level network
    Setting("pkt_buf", "4096", note="pgmux sizes its buffers itself"),
    Setting("max_packet_size", "2147483647", "limits.max_packet_size", c_int),
    Setting("listen_backlog", "128", "listen.backlog", c_int),
    Setting("sbuf_loopcnt", "5", note="pgmux sizes its buffers itself"),
    Setting("so_reuseport", "0", "listen.reuse_port", boolean),
    Setting("tcp_defer_accept", "1"),
    Setting("tcp_socket_buffer", ""),
    Setting("tcp_keepalive", "1"),
    Setting("tcp_keepcnt", ""),
    Setting("tcp_keepidle", ""),
    Setting("tcp_keepintvl", ""),
    Setting("tcp_user_timeout", "0"),
)


SETTINGS_BY_NAME: Mapping[str, Setting] = {setting.name: setting for setting in SETTINGS}
SETTINGS_BY_TARGET: Mapping[str, Setting] = {
    setting.target: setting for setting in SETTINGS if setting.target
}


# -- [databases] and [users] keys ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnKey:
    """A key of a [databases] or [users] connection string."""

    target: str | None  # the pgmux per-database (or per-user) key; None: unsupported
    parse: Callable[[str], Any] = str
    note: str = ""


def _decimal(text: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError("expected an integer")
    return int(text)


def _optional_seconds(text: str) -> float | None:
    return None if _decimal(text) == -1 else float(_decimal(text))  # -1 = not set


def _list_of(parse: Callable[[str], Any], text: str) -> Any:
    """One value, or a list of them for a comma-separated `a,b` (host=, port=)."""
    if "," not in text:
        return parse(text)
    return [parse(part.strip()) for part in text.split(",")]


_SERVER_PARAMETER = "set it with ALTER DATABASE ... SET or ALTER ROLE ... SET"
DATABASE_PARAMETERS: Mapping[str, ConnKey] = {
    "dbname": ConnKey("dbname"),
    "host": ConnKey("host"),
    "port": ConnKey("port", lambda text: _list_of(_decimal, text)),
    "user": ConnKey("user"),
    "password": ConnKey("password"),
    "pool_size": ConnKey("pool_size", _decimal),
    "min_pool_size": ConnKey("min_size", _decimal),
    "reserve_pool": ConnKey("reserve_size", _decimal),
    "reserve_pool_size": ConnKey("reserve_size", _decimal),
    "max_db_connections": ConnKey("max_db_connections", _decimal),
    "pool_mode": ConnKey("pool_mode", str.lower),
    "server_lifetime": ConnKey("server_lifetime", lambda text: float(_decimal(text)) or USED_ONCE),
    "query_wait_timeout": ConnKey("query_wait", _optional_seconds),
    "application_name": ConnKey("application_name"),
    "client_encoding": ConnKey(None, note=_SERVER_PARAMETER),
    "datestyle": ConnKey(None, note=_SERVER_PARAMETER),
    "timezone": ConnKey(None, note=_SERVER_PARAMETER),
    "connect_query": ConnKey("connect_query"),
    "auth_user": ConnKey("auth_user"),
    "auth_query": ConnKey("auth_query"),
    "auth_dbname": ConnKey("auth_dbname"),
    "max_db_client_connections": ConnKey("max_db_client_connections", _decimal),
    "load_balance_hosts": ConnKey("load_balance_hosts", str.lower),
    "target_session_attrs": ConnKey("target_session_attrs", str.lower),
}
USER_PARAMETERS: Mapping[str, ConnKey] = {
    "pool_mode": ConnKey("pool_mode", str.lower),
    "pool_size": ConnKey("pool_size", _decimal),
    "max_user_connections": ConnKey("max_user_connections", _decimal),
    "reserve_pool_size": ConnKey("reserve_pool_size", _decimal),
    "query_timeout": ConnKey("query", _optional_seconds),
    "query_wait_timeout": ConnKey("query_wait", _optional_seconds),
    "idle_transaction_timeout": ConnKey("idle_transaction", _optional_seconds),
    "transaction_timeout": ConnKey("transaction", _optional_seconds),
    "client_idle_timeout": ConnKey("client_idle", _optional_seconds),
    "max_user_client_connections": ConnKey("max_user_client_connections", _decimal),
}

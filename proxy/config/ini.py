"""PgBouncer's pgbouncer.ini, read as a pgmux configuration.

`pgmux -c pgbouncer.ini` runs an existing PgBouncer deployment unchanged: this
module reads the ini file (and its `%include`s) the way PgBouncer's cfparser
does, maps every setting onto the dict that a pgmux YAML file would hold, and
hands that to config.parse_config, so one validation path builds the Config.

The mapping keeps PgBouncer's meaning and PgBouncer's defaults: a setting the
ini leaves out gets PgBouncer's default (default_pool_size 20, pool_mode
session, query_wait_timeout 120 s, ...), not pgmux's YAML default. Settings
pgmux has no equivalent for are collected (`unsupported_settings`) and named
once in a warning at startup; `pgmux --check --strict` rejects them. A setting
of that kind left at PgBouncer's default changes nothing and is not reported.

Syntax, as in PgBouncer: `[section]` lines; `key = value` with the value taken
verbatim up to the end of the line (`;` and `#` start a comment only at the
start of a line); keys in single or double quotes may hold any character;
`%include FILE` reads another file in place. Relative file names (includes,
auth_file, auth_hba_file, pidfile, TLS files) are relative to the current
directory, as in PgBouncer. [databases] and [users] values are libpq-style
`key=value` lists, a value in single quotes may hold spaces ('' is a quote).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pgmux.proxy import config as _config_module
from pgmux.proxy.config import AUTH_TYPES, Config, ConfigError, _read_text, parse_config

MAX_INCLUDE_DEPTH = 10  # PgBouncer's limit
SECTIONS = ("pgbouncer", "databases", "users", "peers")
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_.\-*]+")


# -- reading the ini file ----------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Where:
    """Where a setting was written, for error messages and the converter."""

    file: str
    line: int


@dataclass(frozen=True, slots=True)
class IniEntry:
    section: str
    key: str
    value: str
    where: Where


def read_ini(path: str, text: str | None = None) -> list[IniEntry]:
    """Every `key = value` of PATH and its includes, in file order."""
    entries: list[IniEntry] = []
    _read_file(path, text, entries, {"section": None}, depth=0)
    return entries


def _read_file(
    path: str, text: str | None, entries: list[IniEntry], state: dict[str, Any], depth: int
) -> None:
    if text is None:
        text = _read_text(path)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        where = Where(path, number)
        if not line or line[0] in "#;":
            continue
        if line.startswith("%include") and line[8:9].isspace():
            _include(line[8:].strip(), where, entries, state, depth)
        elif line.startswith("["):
            state["section"] = _section(line, where)
            entries.append(IniEntry(state["section"], "", "", where))  # marks the section
        else:
            key, value = _key_value(line, where)
            if state["section"] is None:
                raise _syntax(where, f"{key!r} is outside any section (add [pgbouncer] above it)")
            entries.append(IniEntry(state["section"], key, value, where))


def _include(
    name: str, where: Where, entries: list[IniEntry], state: dict[str, Any], depth: int
) -> None:
    if depth + 1 >= MAX_INCLUDE_DEPTH:
        raise _syntax(where, f"%include nested deeper than {MAX_INCLUDE_DEPTH} files")
    path = os.path.abspath(os.path.expanduser(name))
    try:
        _read_file(path, None, entries, state, depth + 1)
    except ConfigError as exc:
        if exc.line is None and not exc.key:  # the included file could not be read
            raise ConfigError(where.file, "%include", exc.message, line=where.line) from None
        raise


def _section(line: str, where: Where) -> str:
    end = line.find("]")
    if end < 0:
        raise _syntax(where, "section header without closing ']'")
    if line[end + 1 :].strip():
        raise _syntax(where, "unexpected text after the section header")
    name = line[1:end].strip()
    if name not in SECTIONS:
        expected = ", ".join(f"[{s}]" for s in SECTIONS)
        raise _syntax(where, f"invalid section [{name}] (expected one of {expected})")
    return name


def _key_value(line: str, where: Where) -> tuple[str, str]:
    if line[0] in "'\"":
        key, rest = _quoted_key(line, where)
    else:
        match = _BARE_KEY.match(line)
        if match is None:
            raise _syntax(where, "expected key = value")
        key, rest = match[0], line[match.end() :]
    rest = rest.lstrip(" \t")
    if not rest.startswith("="):
        raise _syntax(where, f"expected '=' after {key!r}")
    return key, rest[1:].strip()


def _quoted_key(line: str, where: Where) -> tuple[str, str]:
    quote, pieces, position = line[0], [], 1
    while True:
        close = line.find(quote, position)
        if close < 0:
            raise _syntax(where, "unterminated quoted name")
        pieces.append(line[position:close])
        if line.startswith(quote, close + 1):  # doubled: a quote inside the name
            pieces.append(quote)
            position = close + 2
            continue
        key = "".join(pieces)
        if not key:
            raise _syntax(where, "empty quoted name")
        return key, line[close + 1 :]


def _syntax(where: Where, message: str) -> ConfigError:
    return ConfigError(where.file, "", f"syntax error: {message}", line=where.line)


def parse_connstr(text: str, where: Where, what: str) -> dict[str, str]:
    """`host=h port=5432 password='a b'` -> {"host": "h", ...}, as PgBouncer reads it."""
    pairs: dict[str, str] = {}
    position, size = 0, len(text)
    while True:
        while position < size and text[position] in " \t":
            position += 1
        if position >= size:
            return pairs
        equals = text.find("=", position)
        if equals < 0:
            # the text itself is not shown: it may be part of a password
            raise _connstr_error(where, what, f"expected key=value after {len(pairs)} pairs")
        key = text[position:equals].strip()
        if not key or " " in key:
            raise _connstr_error(where, what, "expected key=value")
        value, position = _connstr_value(text, equals + 1, where, what, key)
        pairs[key] = value


def _connstr_value(text: str, start: int, where: Where, what: str, key: str) -> tuple[str, int]:
    position = start
    while position < len(text) and text[position] == " ":
        position += 1
    if text.startswith("'", position):
        pieces, position = [], position + 1
        while True:
            close = text.find("'", position)
            if close < 0:
                raise _connstr_error(where, what, f"unterminated quote in {key}")
            pieces.append(text[position:close])
            if not text.startswith("'", close + 1):
                value, position = "".join(pieces), close + 1
                break
            pieces.append("'")
            position = close + 2
    else:
        end = position
        while end < len(text) and text[end] not in " \t":
            end += 1
        value, position = text[position:end], end
    if not value:
        raise _connstr_error(where, what, f"empty value for {key}")
    return value, position


def _connstr_error(where: Where, what: str, message: str) -> ConfigError:
    return ConfigError(
        where.file, what, f"syntax error in connection string: {message}", line=where.line
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


def _verbose(text: str) -> str:
    return "debug" if c_int(text) > 0 else "info"


def _tls_protocols(text: str) -> str | None:
    return None if text.strip().lower() in ("", "secure") else text


def _tls_ciphers(text: str) -> str | None:
    lowered = text.strip().lower()
    return None if lowered in ("", "default", "secure", "fast", "normal") else text


# -- the settings of [pgbouncer] ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One PgBouncer setting: its default and where it lands in pgmux."""

    name: str
    default: str  # PgBouncer's default, spelled as in the ini
    target: str | None = None  # pgmux key path; None: no pgmux equivalent
    parse: Callable[[str], Any] = text_or_none
    show: Callable[[Config], str] | None = None  # SHOW CONFIG value, when not from target
    changeable: bool = True  # PgBouncer applies it on RELOAD
    note: str = ""  # why it is not supported, or how pgmux differs


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


_NO_LOGFILE = "pgmux logs to stderr; under systemd the journal keeps it"
_ALWAYS = "pgmux always does this"

SETTINGS: tuple[Setting, ...] = (
    # generic
    Setting("logfile", "", note=_NO_LOGFILE),
    Setting("pidfile", "", "pidfile", _path_or_none, changeable=False),
    Setting("listen_addr", "", "listen.addresses", name_list, changeable=False),
    Setting("listen_port", "6432", "listen.port", c_int, changeable=False),
    Setting("unix_socket_dir", "/tmp", "listen.unix_socket_dir", _path_or_none, changeable=False),
    Setting(
        "unix_socket_mode",
        "0777",
        "listen.unix_socket_mode",
        c_int,
        _show_unix_socket_mode,
        changeable=False,
    ),
    Setting("unix_socket_group", "", changeable=False, note="set the group with systemd"),
    Setting("user", "", changeable=False, note="use `pgmux -u USER` or systemd User="),
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
    Setting(
        "peer_id",
        "0",
        changeable=False,
        note="use listen.workers; cancels are forwarded between workers",
    ),
    Setting("disable_pqexec", "0", changeable=False),
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
    Setting("auth_dbname", ""),
    Setting("auth_ldap_options", ""),
    # logging
    Setting("syslog", "0", note=_NO_LOGFILE),
    Setting("syslog_ident", "pgbouncer", note=_NO_LOGFILE),
    Setting("syslog_facility", "daemon", note=_NO_LOGFILE),
    Setting("log_connections", "1", note="pgmux always logs logins"),
    Setting("log_disconnections", "1", note="pgmux always logs disconnections"),
    Setting("log_pooler_errors", "1", note="pgmux always logs the errors it sends"),
    Setting("log_stats", "1"),
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
    Setting("server_check_delay", "30"),
    Setting("server_check_query", "<empty>"),
    Setting("server_fast_close", "0"),
    Setting("server_lifetime", "3600", "timeouts.server_lifetime", seconds),
    Setting("server_idle_timeout", "600", "timeouts.server_idle", seconds),
    Setting("server_connect_timeout", "15", "timeouts.server_connect", seconds),
    Setting("server_login_retry", "15", "timeouts.server_login_retry", seconds),
    Setting("client_login_timeout", "60", "timeouts.client_login", seconds),
    Setting("autodb_idle_timeout", "3600"),
    Setting("pool_idle_timeout", "0"),
    Setting("dns_max_ttl", "15"),
    Setting("dns_nxdomain_ttl", "15"),
    Setting("dns_zone_check_period", "0"),
    Setting("resolv_conf", ""),
    Setting("query_wait_notify", "5"),
    Setting("login_notify_message", ""),
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
    Setting("client_tls13_ciphers", ""),
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
    Setting("server_tls13_ciphers", ""),
    # dangerous timeouts
    Setting("query_timeout", "0", "timeouts.query", seconds),
    Setting("query_wait_timeout", "120", "timeouts.query_wait", seconds),
    Setting("cancel_wait_timeout", "10", "timeouts.cancel_wait", seconds),
    Setting("client_idle_timeout", "0", "timeouts.client_idle", seconds),
    Setting("idle_transaction_timeout", "0", "timeouts.idle_transaction", seconds),
    Setting("transaction_timeout", "0"),
    # low-level network
    Setting("pkt_buf", "4096", changeable=False, note="pgmux sizes its buffers itself"),
    Setting("max_packet_size", "2147483647", "limits.max_packet_size", c_int),
    Setting("listen_backlog", "128", "listen.backlog", c_int, changeable=False),
    Setting("sbuf_loopcnt", "5", note="pgmux sizes its buffers itself"),
    Setting("so_reuseport", "0", changeable=False, note="use listen.workers"),
    Setting("tcp_defer_accept", "1"),
    Setting("tcp_socket_buffer", ""),
    Setting("tcp_keepalive", "1"),
    Setting("tcp_keepcnt", ""),
    Setting("tcp_keepidle", ""),
    Setting("tcp_keepintvl", ""),
    Setting("tcp_user_timeout", "0"),
)


def _in_schema(target: str) -> bool:
    try:
        _get(Config(), target)
    except AttributeError:
        return False
    return True


# A target the schema lacks (an older pgmux) makes the setting unsupported, not a crash.
SETTINGS = tuple(
    s if s.target is None or _in_schema(s.target) else replace(s, target=None) for s in SETTINGS
)
SETTINGS_BY_NAME: Mapping[str, Setting] = {setting.name: setting for setting in SETTINGS}
_BY_TARGET = {setting.target: setting for setting in SETTINGS if setting.target}


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


_SERVER_PARAMETER = "set it with ALTER DATABASE ... SET or ALTER ROLE ... SET"
DATABASE_KEYS: Mapping[str, ConnKey] = {
    "dbname": ConnKey("dbname"),
    "host": ConnKey("host"),
    "port": ConnKey("port", _decimal),
    "user": ConnKey("user"),
    "password": ConnKey("password"),
    "pool_size": ConnKey("pool_size", _decimal),
    "min_pool_size": ConnKey("min_size", _decimal),
    "reserve_pool": ConnKey("reserve_size", _decimal),
    "reserve_pool_size": ConnKey("reserve_size", _decimal),
    "max_db_connections": ConnKey("max_db_connections", _decimal),
    "pool_mode": ConnKey("pool_mode", str.lower),
    "server_lifetime": ConnKey("server_lifetime", lambda text: float(_decimal(text))),
    "query_wait_timeout": ConnKey("query_wait", _optional_seconds),
    "application_name": ConnKey("application_name"),
    "client_encoding": ConnKey(None, note=_SERVER_PARAMETER),
    "datestyle": ConnKey(None, note=_SERVER_PARAMETER),
    "timezone": ConnKey(None, note=_SERVER_PARAMETER),
    "connect_query": ConnKey(None, note=_SERVER_PARAMETER),
    "auth_user": ConnKey(None, note="only the global auth_user is supported"),
    "auth_query": ConnKey(None, note="only the global auth_query is supported"),
    "auth_dbname": ConnKey(None),
    "max_db_client_connections": ConnKey("max_db_client_connections", _decimal),
    "load_balance_hosts": ConnKey(None),
    "target_session_attrs": ConnKey(None),
}
USER_KEYS: Mapping[str, ConnKey] = {
    "pool_mode": ConnKey("pool_mode", str.lower),
    "pool_size": ConnKey("pool_size", _decimal),
    "max_user_connections": ConnKey("max_user_connections", _decimal),
    "reserve_pool_size": ConnKey(None),
    "query_timeout": ConnKey(None),
    "query_wait_timeout": ConnKey(None),
    "idle_transaction_timeout": ConnKey(None),
    "transaction_timeout": ConnKey(None),
    "client_idle_timeout": ConnKey(None),
    "max_user_client_connections": ConnKey("max_user_client_connections", _decimal),
}


def _only_known(keys: Mapping[str, ConnKey], schema: Mapping[str, Any]) -> dict[str, ConnKey]:
    return {
        name: key if key.target is None or key.target in schema else ConnKey(None)
        for name, key in keys.items()
    }


DATABASE_KEYS = _only_known(DATABASE_KEYS, _config_module._DATABASE_KEYS)
USER_KEYS = _only_known(USER_KEYS, _config_module._USER)


# -- the translation ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A setting in the ini that pgmux does not honour."""

    name: str  # e.g. "so_reuseport", "[databases] appdb: connect_query", "[peers]"
    value: str
    where: Where
    note: str = ""

    def describe(self) -> str:
        line = f"{self.where.file}:{self.where.line}: {self.name}"
        return f"{line} ({self.note})" if self.note else line


@dataclass
class Translation:
    """The pgmux configuration dict an ini file stands for, and what was left out."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, tuple[Where, str]] = field(default_factory=dict)  # key path -> ini
    unsupported: list[Unsupported] = field(default_factory=list)
    approximated: dict[str, str] = field(default_factory=dict)  # key path -> comment
    explicit: set[str] = field(default_factory=set)  # key paths the ini set itself

    def put(self, path: str, value: Any, where: Where | None = None, label: str = "") -> None:
        """Set PATH in data: "a.b.c", or "\0"-separated when a part (a database
        or user name) may itself hold dots. WHERE marks it as set by the ini."""
        node = self.data
        *parents, last = path.split("\0") if "\0" in path else path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _escape(value)
        if where is not None:
            key = path.replace("\0", ".")
            self.origins[key] = (where, label)
            self.explicit.add(key)


def _escape(value: Any) -> Any:
    """parse_config expands ${VAR}; PgBouncer does not, so a literal stays literal."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, list):
        return [_escape(item) for item in value]
    return value


def translate(entries: list[IniEntry], path: str) -> Translation:
    """The pgmux config dict for the ini ENTRIES (validated later, by parse_config)."""
    result = Translation()
    settings: dict[str, IniEntry] = {}
    databases: dict[str, IniEntry] = {}
    users: dict[str, IniEntry] = {}
    has_main = False
    for entry in entries:  # a later line wins, as in PgBouncer
        if entry.section == "pgbouncer":
            has_main = True
        if not entry.key:
            continue  # a section header
        if entry.section == "pgbouncer":
            settings[entry.key] = entry
        elif entry.section == "databases":
            databases[entry.key] = entry
        elif entry.section == "users":
            users[entry.key] = entry
        else:
            result.unsupported.append(
                Unsupported(
                    "[peers]",
                    entry.value,
                    entry.where,
                    "use listen.workers; cancels are forwarded between workers",
                )
            )
    if not has_main:
        raise ConfigError(path, "", "the [pgbouncer] section is missing")
    _translate_settings(settings, result)
    socket_dir = _socket_dir(settings)
    for name, entry in databases.items():
        _translate_database(name, entry, result, socket_dir)
    for name, entry in users.items():
        _translate_user(name, entry, result)
    _cap_min_pool_size(result)
    result.unsupported.sort(key=lambda item: item.where)
    return result


def _translate_settings(settings: dict[str, IniEntry], result: Translation) -> None:
    for name, entry in settings.items():
        if name not in SETTINGS_BY_NAME:
            raise ConfigError(
                entry.where.file,
                name,
                "unknown parameter" + _did_you_mean(name),
                line=entry.where.line,
            )
    for setting in SETTINGS:
        entry = settings.get(setting.name)
        text = entry.value if entry is not None else setting.default
        if setting.target is None:
            if entry is not None and not _same(text, setting.default):
                result.unsupported.append(
                    Unsupported(setting.name, text, entry.where, setting.note)
                )
            continue
        try:
            value = setting.parse(text)
        except ValueError as exc:
            where = entry.where if entry else Where("<default>", 0)
            raise ConfigError(
                where.file, setting.name, f"invalid value {text!r}: {exc}", line=where.line
            ) from None
        if entry is None:
            result.put(setting.target, value)
        else:
            result.put(setting.target, value, entry.where, setting.name)
    _translate_hba(settings, result)
    # PgBouncer runs auth_query only for auth_user; pgmux wants both or neither.
    if "auth.query_user" not in result.explicit:
        result.data["auth"]["query"] = None
        result.explicit.discard("auth.query")


def _translate_hba(settings: dict[str, IniEntry], result: Translation) -> None:
    """PgBouncer reads auth_hba_file only for auth_type = hba; pgmux applies
    auth.hba_file whenever it is set, so pass it on only in that case."""
    auth_type = settings.get("auth_type")
    is_hba = auth_type is not None and auth_type.value.strip().lower() == "hba"
    if is_hba and not result.data["auth"].get("hba_file"):
        where = auth_type.where
        raise ConfigError(where.file, "auth_type", "hba needs auth_hba_file", line=where.line)
    if not is_hba and result.data["auth"].get("hba_file"):
        result.data["auth"]["hba_file"] = None
        result.explicit.discard("auth.hba_file")
        entry = settings["auth_hba_file"]
        note = "PgBouncer ignores it unless auth_type = hba"
        result.unsupported.append(Unsupported("auth_hba_file", entry.value, entry.where, note))


def _did_you_mean(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(SETTINGS_BY_NAME), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _same(text: str, default: str) -> bool:
    try:
        return float(text) == float(default)
    except ValueError:
        return text.strip().lower() == default.strip().lower()


def _socket_dir(settings: dict[str, IniEntry]) -> str:
    """Where a database without host= is reached: PgBouncer's unix_socket_dir."""
    entry = settings.get("unix_socket_dir")
    value = entry.value if entry is not None else "/tmp"
    return os.path.abspath(value) if value else "/tmp"


def _translate_database(name: str, entry: IniEntry, result: Translation, socket_dir: str) -> None:
    label = f"[databases] {name}"
    pairs = parse_connstr(entry.value, entry.where, label)
    prefix = f"databases\0{name}"
    result.put(prefix, {}, entry.where, label)
    if "host" not in pairs:
        result.put(f"{prefix}\0host", socket_dir)
    for key, text in pairs.items():
        conn_key = _supported_key(DATABASE_KEYS, "connection", key, text, entry, label, result)
        if conn_key is None:
            continue
        value = _parse_conn_value(conn_key, key, text, entry, label)
        if key == "host":
            value = _first_host(value, prefix, result)
        if value is not None:
            result.put(f"{prefix}\0{conn_key.target}", value, entry.where, f"{label}: {key}")


def _supported_key(
    table: Mapping[str, ConnKey],
    kind: str,
    key: str,
    text: str,
    entry: IniEntry,
    label: str,
    result: Translation,
) -> ConnKey | None:
    """The mapping of one key=value of a [databases] / [users] line; None if unsupported."""
    conn_key = table.get(key)
    if conn_key is None:
        raise ConfigError(
            entry.where.file, label, f"unrecognized {kind} parameter: {key}", line=entry.where.line
        )
    if conn_key.target is None:
        result.unsupported.append(Unsupported(f"{label}: {key}", text, entry.where, conn_key.note))
        return None
    return conn_key


def _first_host(value: str, prefix: str, result: Translation) -> str:
    hosts = [host.strip() for host in value.split(",") if host.strip()]
    if len(hosts) > 1:
        key = prefix.replace("\0", ".") + ".host"
        result.approximated[key] = (
            f"PgBouncer host list {value!r}: pgmux connects to the first host only"
        )
    return hosts[0] if hosts else value


def _parse_conn_value(conn_key: ConnKey, key: str, text: str, entry: IniEntry, label: str) -> Any:
    try:
        return conn_key.parse(text)
    except ValueError as exc:
        raise ConfigError(
            entry.where.file,
            f"{label}: {key}",
            f"invalid value {text!r}: {exc}",
            line=entry.where.line,
        ) from None


def _translate_user(name: str, entry: IniEntry, result: Translation) -> None:
    label = f"[users] {name}"
    pairs = parse_connstr(entry.value, entry.where, label)
    prefix = f"users\0{name}"
    result.put(prefix, {}, entry.where, label)
    for key, text in pairs.items():
        conn_key = _supported_key(USER_KEYS, "user", key, text, entry, label, result)
        if conn_key is None:
            continue
        value = _parse_conn_value(conn_key, key, text, entry, label)
        result.put(f"{prefix}\0{conn_key.target}", value, entry.where, f"{label}: {key}")


def _cap_min_pool_size(result: Translation) -> None:
    """PgBouncer caps min_pool_size at the pool size; pgmux would refuse the file."""
    pool = result.data["pool"]
    if isinstance(pool["size"], int) and pool["min_size"] > pool["size"] > 0:
        result.approximated["pool.min_size"] = (
            f"min_pool_size {pool['min_size']} capped at {pool['size']}, as PgBouncer does"
        )
        pool["min_size"] = pool["size"]
    for name, entry in result.data.get("databases", {}).items():
        size = entry.get("pool_size", pool["size"])
        cap = entry.get("max_db_connections", pool["max_db_connections"])
        limit = min(size, cap) if cap else size
        min_size = entry.get("min_size", pool["min_size"])
        if isinstance(size, int) and isinstance(min_size, int) and min_size > limit >= 0:
            entry["min_size"] = limit
            result.approximated[f"databases.{name}.min_size"] = (
                f"min_pool_size {min_size} capped at {limit}, as PgBouncer does"
            )


# -- loading -----------------------------------------------------------------------------

# The last ini load of each file, so the command line can report what was left out.
_UNSUPPORTED: dict[str, list[Unsupported]] = {}


def looks_like_ini(path: str, text: str) -> bool:
    """A .ini file, or one whose first meaningful line is `[section]` or `%include`."""
    if path.lower().endswith(".ini"):
        return True
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        return line.startswith(("[", "%include"))
    return False


def load_pgbouncer_ini(path: str, text: str | None = None) -> Config:
    """Read a pgbouncer.ini into a Config; errors name the ini file and line."""
    absolute = os.path.abspath(path)
    translation = translate(read_ini(absolute, text), absolute)
    config = config_from_translation(translation, absolute)
    _UNSUPPORTED[absolute] = translation.unsupported
    return config


def config_from_translation(translation: Translation, path: str) -> Config:
    try:
        # base_dir: the ini's file names are already absolute (cwd-relative, as PgBouncer)
        return parse_config(translation.data, path=path, env={}, base_dir=os.getcwd())
    except ConfigError as exc:
        raise _locate(exc, translation, path) from None


def _locate(exc: ConfigError, translation: Translation, path: str) -> ConfigError:
    """Point an error about a pgmux key at the ini line (and name) it came from."""
    key = exc.key
    while key:
        if key in translation.origins:
            where, label = translation.origins[key]
            return ConfigError(where.file, label, exc.message, line=where.line)
        key = key.rpartition(".")[0]
    setting = _BY_TARGET.get(exc.key)
    return ConfigError(path, setting.name if setting else exc.key, exc.message)


def unsupported_settings(config: Config) -> list[Unsupported]:
    """The settings of CONFIG's ini file that pgmux does not honour ([] for YAML)."""
    return list(_UNSUPPORTED.get(config.path or "", []))


def unsupported_warning(config: Config) -> str | None:
    """One line naming every unsupported setting, or None."""
    found = unsupported_settings(config)
    if not found:
        return None
    names = ", ".join(dict.fromkeys(item.name for item in found))
    return f"settings not supported by pgmux, ignored: {names}"


# -- SHOW CONFIG ------------------------------------------------------------------------


def pgbouncer_settings(config: Config) -> list[tuple[str, str, str, str]]:
    """SHOW CONFIG rows under PgBouncer's names: (key, value, default, changeable).

    For the admin console (SHOW CONFIG): the columns are PgBouncer's -- key,
    value, default, changeable ("yes"/"no") -- and the rows are PgBouncer's
    setting names, each with pgmux's effective value, spelled as PgBouncer
    shows it (seconds as numbers, booleans as 0/1, lists comma-separated) and
    PgBouncer's own default; changeable is "yes" when SET can change it at run
    time (config.RUNTIME_SETTINGS, through pgmux_key). It works for any
    Config, read from a YAML file or from a pgbouncer.ini. Settings pgmux has
    no equivalent for are left out; the pgmux-only keys are in
    Config.settings_table(), which SHOW CONFIG lists after these rows.
    """
    rows = []
    for setting in SETTINGS:
        if setting.show is not None:
            value = setting.show(config)
        elif setting.target is not None:
            value = _format(_get(config, setting.target))
        else:
            continue
        rows.append((setting.name, value, setting.default, _changeable(setting)))
    return rows


def _changeable(setting: Setting) -> str:
    """Whether the console's SET can change it ("yes"/"no"); pgmux_key maps the name."""
    runtime = getattr(_config_module, "RUNTIME_SETTINGS", None)
    if runtime is None:
        return "yes" if setting.changeable else "no"
    return "yes" if setting.target in runtime else "no"


def pgmux_key(name: str) -> str | None:
    """The pgmux key path for PgBouncer setting NAME ("default_pool_size" ->
    "pool.size"), or None; lets the console's SET accept PgBouncer's names."""
    setting = SETTINGS_BY_NAME.get(name.lower())
    return setting.target if setting is not None else None

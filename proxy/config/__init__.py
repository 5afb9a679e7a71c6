"""Configuration: the YAML file, parsed once into frozen dataclasses.

PgBouncer's loader.c reads an ini file into globals; pgmux reads YAML into
immutable objects, so a reload builds a new Config next to the old one and swaps
it in only when it is valid. The schema is a few small tables (key -> converter);
the defaults live in the dataclasses, so parsing and SHOW CONFIG share one
source of truth. Every error names the file, the key path and what was
expected, and never shows a password.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

import yaml

POOL_MODES = ("transaction", "session", "statement")
SESSION_STATES = ("pin", "reset", "error", "ignore")
AUTH_TYPES = ("trust", "password", "md5", "scram-sha-256")
TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
ADMIN_DATABASES = ("pgmux", "pgbouncer")  # the console; a pool may not take these names
FALLBACK_DATABASE = "*"
MAX_MESSAGE_SIZE = 0x7FFFFFFF  # the length word of a protocol message is an int32


class ConfigError(Exception):
    """A configuration problem: str() is "<file>: [line N: ]<key.path>: <message>"."""

    def __init__(self, path: str | None, key: str, message: str, *, line: int | None = None):
        super().__init__(path, key, message)
        self.path = path
        self.key = key
        self.message = message
        self.line = line

    def __str__(self) -> str:
        parts = [self.path or "<config>"]
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.key:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)


# -- the configuration objects ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenConfig:
    addresses: tuple[str, ...] = ("127.0.0.1",)
    port: int = 6432
    unix_socket_dir: str | None = None
    unix_socket_mode: int = 0o777
    max_client_conn: int = 2000
    workers: int = 1
    backlog: int = 1024


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
    rollback_abandoned: bool = True


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Float seconds; 0.0 means off."""

    server_idle: float = 60.0
    server_lifetime: float = 3600.0
    server_connect: float = 5.0
    server_login_retry: float = 5.0
    client_login: float = 60.0
    client_idle: float = 0.0
    idle_transaction: float = 0.0
    query: float = 0.0
    query_wait: float = 20.0
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


@dataclass(frozen=True, slots=True)
class TlsConfig:
    client: TlsSideConfig = field(default_factory=TlsSideConfig)
    server: TlsSideConfig = field(default_factory=lambda: TlsSideConfig(mode="prefer"))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = "json"
    level: str = "info"
    wait_threshold: float = 1.0  # log a client that waited this long for a server; 0 = off


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_packet_size: int = 1 << 30  # PostgreSQL's own limit
    max_logins_in_progress: int = 1000  # 0 = unlimited


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
    databases: Mapping[str, DatabaseConfig] = field(default_factory=lambda: MappingProxyType({}))
    users: Mapping[str, UserConfig] = field(default_factory=lambda: MappingProxyType({}))
    ignore_startup_parameters: tuple[str, ...] = ()
    pidfile: str | None = None

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

    def settings_table(self) -> list[tuple[str, str, str]]:
        """(key, value, default) rows for SHOW CONFIG; passwords read "****"."""
        return _settings_rows(self)


# -- converters: (value, key path) -> typed value, or ConfigError -------------

Converter = Callable[[Any, str], Any]


class _Interpolated(str):
    """A string that came out of ${VAR} interpolation.

    Environment variables are text, so int and bool keys accept such a string
    ("6432"); a quoted literal "6432" written in the file stays a type error.
    """

    __slots__ = ()


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", list: "a list"}


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def _describe(value: object, *, secret: bool = False) -> str:
    """How an error shows a value: secrets and containers by their type only."""
    if secret or value is None or isinstance(value, list | dict):
        return _kind(value)
    if isinstance(value, bool):
        return "true" if value else "false"  # YAML's spelling, not Python's
    text = repr(str(value) if isinstance(value, str) else value)
    return text if len(text) <= 60 else text[:56] + "...'"


def _error(key: str, message: str) -> ConfigError:
    return ConfigError(None, key, message)


def _expected(
    key: str, expected: str, value: object, hint: str = "", secret: bool = False
) -> ConfigError:
    return _error(key, f"expected {expected}, got {_describe(value, secret=secret)}{hint}")


def _suggestion(word: object, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def _integer(minimum: int, maximum: int | None = None, expected: str = "") -> Converter:
    expected = expected or ("a positive integer" if minimum == 1 else "a non-negative integer")

    def convert(value: Any, key: str) -> int:
        if isinstance(value, _Interpolated) and _INT_TEXT.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            quoted = isinstance(value, str) and _INT_TEXT.fullmatch(value)
            raise _expected(key, expected, value, " (write it without quotes)" if quoted else "")
        if value < minimum or (maximum is not None and value > maximum):
            raise _expected(key, expected, value)
        return value

    return convert


_positive = _integer(1)
_non_negative = _integer(0)
_port = _integer(1, 65535, "a port number between 1 and 65535")


def _optional(convert: Converter) -> Converter:
    """None, or an empty string (`${VAR:-}`), means "not set"."""

    def optional(value: Any, key: str) -> Any:
        return None if value is None or value == "" else convert(value, key)

    return optional


_optional_port = _optional(_port)
_optional_positive = _optional(_positive)
_BOOL_TEXT = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_TEXT |= {"false": False, "no": False, "off": False, "0": False}


def _boolean(value: Any, key: str) -> bool:
    if isinstance(value, _Interpolated) and value.strip().lower() in _BOOL_TEXT:
        return _BOOL_TEXT[value.strip().lower()]
    if not isinstance(value, bool):
        raise _expected(key, "true or false", value)
    return value


def _one_of(*choices: str) -> Converter:
    expected = "one of " + ", ".join(repr(choice) for choice in choices)

    def convert(value: Any, key: str) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise _expected(key, expected, value, _suggestion(value, choices))

    return convert


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _expected(key, "a non-empty string", value)
    return str(value)  # drops the _Interpolated marker


_optional_text = _optional(_text)


def _secret(value: Any, key: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _expected(key, "a string (quote it)", value, secret=True)
    return str(value)


def _names(value: Any, key: str) -> tuple[str, ...]:
    """A list of names, or one comma-separated string (handy from ${VAR})."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, list):
        raise _expected(key, "a list of names", value)
    return tuple(_text(item, f"{key}[{i}]") for i, item in enumerate(value))


def _file_mode(value: Any, key: str) -> int:
    # YAML 1.1 reads an unquoted 0777 as octal already; strings are octal too.
    if isinstance(value, str) and re.fullmatch(r"\s*(0o)?[0-7]{1,4}\s*", value):
        value = int(value.strip(), 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise _expected(key, "a file mode like '0777' or '0700'", value)
    return value


def _workers(value: Any, key: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(os.cpu_count() or 1, 256)
    # At most 256: a cancel key's low byte names its worker (proxy/workers.py).
    return _integer(1, 256, expected="an integer from 1 to 256 or 'auto'")(value, key)


_DURATION = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-z]*)\s*")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_FRACTIONS = {"ms": 1000.0, "us": 1_000_000.0}  # divided: 250ms is exactly 0.25
_DURATION_EXPECTED = "a duration like '250ms', '5s', '10m', '1h', '1d' or 0 for off"


def parse_duration(value: Any, key: str) -> float:
    """Seconds as a float from 5, 0.25, "250ms", "5s", "10m", "1h", "1d"; 0 = off."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        number, unit = float(match[1]), match[2]
        if unit in _DURATION_UNITS:
            seconds = number * _DURATION_UNITS[unit]
        elif unit in _DURATION_FRACTIONS:
            seconds = number / _DURATION_FRACTIONS[unit]
    if seconds is None or not math.isfinite(seconds):
        raise _expected(key, _DURATION_EXPECTED, value)
    if seconds < 0:
        raise _expected(key, _DURATION_EXPECTED, value, " (durations cannot be negative)")
    return seconds


def _positive_duration(value: Any, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise _expected(key, "a duration longer than 0 like '1s' or '60s'", value)
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: parse_duration(format_duration(x)) == x."""
    if seconds == 0:
        return "0"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count = seconds / size
        if count.is_integer() and count * size == seconds:
            return f"{int(count)}{unit}"
    millis = seconds * 1000
    if millis.is_integer() and millis / 1000 == seconds:
        return f"{int(millis)}ms"
    return f"{seconds!r}s"


_SIZE = re.compile(r"\s*(\d+)\s*([a-z]*)\s*", re.IGNORECASE)
# PostgreSQL's units are powers of 1024 whatever their spelling ("1GB" = 1 GiB).
_SIZE_UNITS = {"": 0, "b": 0, "k": 10, "kb": 10, "kib": 10, "m": 20, "mb": 20, "mib": 20}
_SIZE_UNITS |= {"g": 30, "gb": 30, "gib": 30, "t": 40, "tb": 40, "tib": 40}


def parse_size(value: Any, key: str) -> int:
    """Bytes from 1048576, "512kB", "64MiB", "1GB" (= 1 GiB, like PostgreSQL)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        shift = _SIZE_UNITS.get(match[2].lower())
        if shift is not None:
            return int(match[1]) << shift
    raise _expected(key, "a size like '512kB', '64MiB', '1GB' or a number of bytes", value)


def format_size(size: int) -> str:
    """The largest exact binary unit: parse_size(format_size(n)) == n."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"


def _packet_size(value: Any, key: str) -> int:
    size = parse_size(value, key)
    if not 1 <= size <= MAX_MESSAGE_SIZE:
        raise _error(key, f"expected a size between 1 byte and 2GiB-1, got {size}")
    return size


# -- the schema ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Section:
    """A mapping whose keys are converted onto a base instance (its defaults)."""

    base: Any
    table: Mapping[str, Converter]

    def __call__(self, value: Any, key: str) -> Any:
        return replace(self.base, **_convert(self.table, value, key))


_LISTEN: dict[str, Converter] = {
    "addresses": _names,
    "port": _port,
    "unix_socket_dir": _optional_text,
    "unix_socket_mode": _file_mode,
    "max_client_conn": _positive,
    "workers": _workers,
    "backlog": _positive,
}
_POOL: dict[str, Converter] = {
    "mode": _one_of(*POOL_MODES),
    "size": _positive,
    "min_size": _non_negative,
    "reserve_size": _non_negative,
    "reserve_timeout": parse_duration,
    "max_db_connections": _non_negative,
    "max_user_connections": _non_negative,
    "max_db_client_connections": _non_negative,
    "max_user_client_connections": _non_negative,
    "max_prepared_statements": _non_negative,
    "session_state": _one_of(*SESSION_STATES),
    "rollback_abandoned": _boolean,
}
# The global section has one key more: the cap across all pools.
_POOL_SECTION = {**_POOL, "max_server_connections": _non_negative}
_TIMEOUTS: dict[str, Converter] = {f.name: parse_duration for f in fields(Timeouts)}
_AUTH: dict[str, Converter] = {
    "type": _one_of(*AUTH_TYPES),
    "users_file": _optional_text,
    "query": _optional_text,
    "query_user": _optional_text,
    "query_password": _secret,
    "query_cache_ttl": parse_duration,
    "hba_file": _optional_text,
}
_HTTP: dict[str, Converter] = {"address": _text, "port": _optional_port}
_ADMIN: dict[str, Converter] = {
    "users": _names,
    "stats_users": _names,
    "http": _Section(HttpConfig(), _HTTP),
    "stats_period": _positive_duration,
}
_TLS_SIDE: dict[str, Converter] = {
    "mode": _one_of(*TLS_MODES),
    **dict.fromkeys(("cert", "key", "ca", "protocols", "ciphers"), _optional_text),
}
_TLS: dict[str, Converter] = {
    "client": _Section(TlsConfig().client, _TLS_SIDE),
    "server": _Section(TlsConfig().server, _TLS_SIDE),
}
_LOGGING: dict[str, Converter] = {
    "format": _one_of(*LOG_FORMATS),
    "level": _one_of(*LOG_LEVELS),
    "wait_threshold": parse_duration,
}
_LIMITS: dict[str, Converter] = {
    "max_packet_size": _packet_size,
    "max_logins_in_progress": _non_negative,
}
# Sections that map 1:1 onto a dataclass; `pool` is parsed apart for its extra key.
_SECTIONS: dict[str, _Section] = {
    "listen": _Section(ListenConfig(), _LISTEN),
    "timeouts": _Section(Timeouts(), _TIMEOUTS),
    "auth": _Section(AuthConfig(), _AUTH),
    "admin": _Section(AdminConfig(), _ADMIN),
    "tls": _Section(TlsConfig(), _TLS),
    "logging": _Section(LoggingConfig(), _LOGGING),
    "limits": _Section(LimitsConfig(), _LIMITS),
}
_TOP_LEVEL = (
    *("listen", "pool", "timeouts", "auth", "admin", "tls", "logging", "limits"),
    *("databases", "users", "ignore_startup_parameters", "pidfile"),
)
_DATABASE_OWN: dict[str, Converter] = {
    "host": _text,
    "port": _port,
    "dbname": _optional_text,
    "user": _optional_text,
    "password": _secret,
    "application_name": _optional_text,
}
# Per-database YAML key -> PoolSettings field: flat, named like PgBouncer's.
_DATABASE_POOL_NAMES = {"pool_size": "size", "pool_mode": "mode"}
_DATABASE_POOL_NAMES |= {name: name for name in _POOL if name not in ("size", "mode")}
# Per-database YAML key -> (which object it sets, its field there, converter).
_DATABASE_KEYS: dict[str, tuple[str, str, Converter]] = {
    **{key: ("db", key, convert) for key, convert in _DATABASE_OWN.items()},
    **{key: ("pool", name, _POOL[name]) for key, name in _DATABASE_POOL_NAMES.items()},
    **{key: ("timeouts", key, convert) for key, convert in _TIMEOUTS.items()},
}
_USER: dict[str, Converter] = {
    "pool_mode": _optional(_one_of(*POOL_MODES)),
    "max_user_connections": _non_negative,
    "max_user_client_connections": _non_negative,
    "pool_size": _optional_positive,
}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _mapping(value: Any, key: str) -> dict[Any, Any]:
    if value is None:  # an empty section (`listen:`) means all defaults
        return {}
    if not isinstance(value, dict):
        raise _expected(key or "top level", "a mapping", value)
    return value


def _reject_unknown(entries: Mapping[Any, Any], allowed: Iterable[str], prefix: str) -> None:
    allowed = list(allowed)
    for name in entries:
        if name not in allowed:
            hint = _suggestion(name, allowed) or f" (expected one of: {', '.join(allowed)})"
            raise _error(_join(prefix, str(name)), f"unknown key{hint}")


def _convert(table: Mapping[str, Converter], value: Any, prefix: str) -> dict[str, Any]:
    entries = _mapping(value, prefix)
    _reject_unknown(entries, table, prefix)
    return {name: table[name](item, _join(prefix, name)) for name, item in entries.items()}


# -- ${VAR} interpolation --------------------------------------------------------

_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def _interpolate(value: Any, env: Mapping[str, str], key: str) -> Any:
    """A copy of the parsed YAML with ${VAR} replaced in every string scalar.

    Done after YAML parsing so a secret full of YAML syntax stays one string.
    """
    if isinstance(value, dict):
        return {
            name: _interpolate(item, env, _join(key, str(name))) for name, item in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(item, env, f"{key}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        return _substitute(value, env, key)
    return value


def _substitute(text: str, env: Mapping[str, str], key: str) -> str:
    if "${" in _REFERENCE.sub("", text):
        raise _error(key, "malformed ${...}: expected ${NAME} or ${NAME:-default}")
    substituted = False

    def one(match: re.Match[str]) -> str:
        nonlocal substituted
        if match[0] == "$${":  # the escape for a literal "${"
            return "${"
        name, operator, default = match.groups()
        value = env.get(name)
        # ${V:-d} defaults when V is unset or empty, ${V-d} only when unset (as in sh)
        if value is None or (operator == ":-" and value == ""):
            if operator is None:
                hint = f"; write ${{{name}:-default}} to give a default"
                raise _error(key, f"environment variable {name} is not set{hint}")
            value = default
        substituted = True
        return value

    result = _REFERENCE.sub(one, text)
    return _Interpolated(result) if substituted else result


# -- building the Config ---------------------------------------------------------


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; raise ConfigError naming file, line, key.

    A PgBouncer ini file (.ini, or starting with a [section]) is read by
    pgbouncer_ini into the same structure and validated the same way.
    """
    name = os.fspath(path)
    text = _read_text(name)
    from pgmux.proxy.config.ini import load_pgbouncer_ini, looks_like_ini

    if looks_like_ini(name, text):
        return load_pgbouncer_ini(name, text)
    data, lines = _load_yaml(text, name)
    base_dir = os.path.dirname(os.path.abspath(name))
    try:
        config = parse_config(data, path=name, env=env, base_dir=base_dir)
    except ConfigError as exc:
        if exc.line is None:
            exc.line = _line_of(exc.key, lines)
        raise
    return replace(config, path=os.path.abspath(name))


def parse_config(
    data: Any,
    *,
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> Config:
    """Build a Config from already-parsed YAML (a dict); relative file paths are
    resolved against BASE_DIR (default: PATH's directory, else the cwd)."""
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    try:
        return _build(data, path, os.environ if env is None else env, base_dir)
    except ConfigError as exc:
        if exc.path is None:
            exc.path = path
        raise


def _build(data: Any, path: str | None, env: Mapping[str, str], base_dir: str) -> Config:
    root = _interpolate(_mapping(data, ""), env, "")
    _reject_unknown(root, _TOP_LEVEL, "")
    parts = {name: section(root.get(name), name) for name, section in _SECTIONS.items()}
    pool_values = _convert(_POOL_SECTION, root.get("pool"), "pool")
    max_server_connections = pool_values.pop("max_server_connections", 0)
    pool = replace(PoolSettings(), **pool_values)
    databases = {
        _database_name(name): _database(name, entry, pool, parts["timeouts"])
        for name, entry in _mapping(root.get("databases"), "databases").items()
    }
    users = {
        _user_name(name): UserConfig(name=name, **_convert(_USER, entry, f"users.{name}"))
        for name, entry in _mapping(root.get("users"), "users").items()
    }
    config = Config(
        path=path,
        pool=pool,
        max_server_connections=max_server_connections,
        databases=MappingProxyType(databases),
        users=MappingProxyType(users),
        ignore_startup_parameters=_names(
            root.get("ignore_startup_parameters"), "ignore_startup_parameters"
        ),
        pidfile=_optional_text(root.get("pidfile"), "pidfile"),
        **parts,
    )
    _check_limits(config)
    _check_tls(config.tls)
    return _resolve_paths(config, base_dir)


def _database_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise _error(f"databases.{name}", "a database name must be a non-empty string")
    if name in ADMIN_DATABASES:
        raise _error(f"databases.{name}", "this name is reserved for the admin console")
    return name


def _user_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise _error(f"users.{name}", "a user name must be a non-empty string")
    return name


def _database(name: str, entry: Any, pool: PoolSettings, timeouts: Timeouts) -> DatabaseConfig:
    """One `databases:` entry; its flat pool and timeout keys override the globals."""
    prefix = f"databases.{name}"
    entries = _mapping(entry, prefix)
    _reject_unknown(entries, _DATABASE_KEYS, prefix)
    values: dict[str, dict[str, Any]] = {"db": {}, "pool": {}, "timeouts": {}}
    for key, value in entries.items():
        target, field_name, convert = _DATABASE_KEYS[key]
        values[target][field_name] = convert(value, _join(prefix, key))
    return DatabaseConfig(
        name=name,
        pool=replace(pool, **values["pool"]),
        timeouts=replace(timeouts, **values["timeouts"]),
        **values["db"],
    )


def _check_limits(config: Config) -> None:
    """Limits that cannot all hold at once."""
    pool, cap = config.pool, config.max_server_connections
    if pool.min_size > pool.size:
        raise _error("pool.min_size", f"{pool.min_size} is larger than pool.size {pool.size}")
    for db in config.databases.values():
        prefix, settings = f"databases.{db.name}", db.pool
        if settings.min_size > settings.size:
            message = f"min_size {settings.min_size} is larger than pool_size {settings.size}"
            raise _error(f"{prefix}.min_size", message)
        if 0 < settings.max_db_connections < settings.min_size:
            message = f"min_size {settings.min_size} is larger than max_db_connections"
            raise _error(f"{prefix}.min_size", f"{message} {settings.max_db_connections}")
        if 0 < cap < settings.min_size:
            message = f"min_size {settings.min_size} is larger than pool.max_server_connections"
            raise _error(f"{prefix}.min_size", f"{message} {cap}")
    # "*" is left out: its min_size applies to each database it creates later.
    floors = {db.name: db.pool.min_size for db in config.databases.values() if db.pool.min_size}
    floors.pop(FALLBACK_DATABASE, None)
    if 0 < cap < sum(floors.values()):
        detail = ", ".join(f"{name} {size}" for name, size in floors.items())
        message = f"the databases' min_size add up to {sum(floors.values())} ({detail})"
        raise _error("pool.max_server_connections", f"{message}, more than the cap {cap}")


def _check_tls(tls: TlsConfig) -> None:
    client = tls.client
    if client.mode != "disable":
        for name in ("cert", "key"):
            if getattr(client, name) is None:
                message = f"required when tls.client.mode is {client.mode!r}"
                raise _error(f"tls.client.{name}", message)
    if client.mode.startswith("verify-") and client.ca is None:
        raise _error("tls.client.ca", f"required when tls.client.mode is {client.mode!r}")


def _resolve_paths(config: Config, base_dir: str) -> Config:
    """File names in the config are relative to the config file, not the cwd."""

    def absolute(name: str | None) -> str | None:
        if name is None:
            return None
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(name)))

    def side(tls: TlsSideConfig) -> TlsSideConfig:
        return replace(tls, cert=absolute(tls.cert), key=absolute(tls.key), ca=absolute(tls.ca))

    auth = config.auth
    return replace(
        config,
        auth=replace(auth, users_file=absolute(auth.users_file), hba_file=absolute(auth.hba_file)),
        tls=replace(config.tls, client=side(config.tls.client), server=side(config.tls.server)),
        pidfile=absolute(config.pidfile),
    )


# -- reading the file ------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text (byte {exc.start})") from None


def _load_yaml(text: str, path: str) -> tuple[Any, dict[str, int]]:
    """The document, and the line of every key path (for error messages)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict[str, int] = {}
        _index_lines(node, "", lines, path, ())
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        # Never str(exc): PyYAML quotes the offending line, which may hold a secret.
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        column = f" (column {mark.column + 1})" if mark else ""
        line = mark.line + 1 if mark else None
        raise ConfigError(path, "", f"YAML syntax error: {what}{column}", line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"YAML error: {exc}") from None
    finally:
        loader.dispose()


def _index_lines(
    node: yaml.Node, prefix: str, lines: dict[str, int], path: str, parents: tuple[yaml.Node, ...]
) -> None:
    """Record where each key path starts; reject duplicate keys and alias loops."""
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key, line = _join(prefix, key_node.value), key_node.start_mark.line + 1
            if key_node.value in seen:  # PyYAML would silently keep the last one
                raise ConfigError(path, key, "duplicate key", line=line)
            seen.add(key_node.value)
            children.append((key, value_node))
            lines.setdefault(key, line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            children.append((f"{prefix}[{i}]", item))
            lines.setdefault(f"{prefix}[{i}]", item.start_mark.line + 1)
    for key, child in children:
        if any(child is parent for parent in (*parents, node)):
            raise ConfigError(path, key, "recursive YAML alias", line=lines.get(key))
        _index_lines(child, key, lines, path, (*parents, node))


def _line_of(key: str, lines: Mapping[str, int]) -> int | None:
    """The line of KEY, else of its nearest parent that is in the file."""
    while key:
        if key in lines:
            return lines[key]
        parent = re.sub(r"(\[\d+\]|\.?[^.\[]*)$", "", key, count=1)
        if parent == key:  # an odd name like "a[b": give up rather than loop
            return None
        key = parent
    return None


# -- SHOW CONFIG -----------------------------------------------------------------

_FORMATTERS: dict[Any, Callable[[Any], str]] = {
    parse_duration: format_duration,
    _positive_duration: format_duration,
    _packet_size: format_size,
    _file_mode: lambda mode: f"0{mode:o}",
}


def _show(convert: Converter, value: Any) -> str:
    if convert is _secret:
        return "" if value is None else "****"
    if value is None:
        return ""
    if convert in _FORMATTERS:
        return _FORMATTERS[convert](value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)


def _section_rows(
    prefix: str, table: Mapping[str, Converter], value: Any, default: Any
) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, convert in table.items():
        key, current, base = _join(prefix, name), getattr(value, name), getattr(default, name)
        if isinstance(convert, _Section):
            rows += _section_rows(key, convert.table, current, base)
        else:
            rows.append((key, _show(convert, current), _show(convert, base)))
    return rows


def _settings_rows(config: Config) -> list[tuple[str, str, str]]:
    rows = _section_rows("listen", _LISTEN, config.listen, ListenConfig())
    rows += _section_rows("pool", _POOL, config.pool, PoolSettings())
    rows.append(("pool.max_server_connections", str(config.max_server_connections), "0"))
    for name in ("timeouts", "auth", "admin", "tls", "logging", "limits"):
        section = _SECTIONS[name]
        rows += _section_rows(name, section.table, getattr(config, name), section.base)
    rows.append(("ignore_startup_parameters", _show(_names, config.ignore_startup_parameters), ""))
    rows.append(("pidfile", _show(_optional_text, config.pidfile), ""))
    for db in config.databases.values():
        rows += _database_rows(db, config)
    for user in config.users.values():
        rows += _section_rows(f"users.{user.name}", _USER, user, UserConfig(name=user.name))
    return rows


def _database_rows(db: DatabaseConfig, config: Config) -> list[tuple[str, str, str]]:
    """A database's own keys, and those pool/timeout keys it overrides (the
    global value is their default)."""
    rows, defaults = [], DatabaseConfig(name=db.name)
    for key, (target, name, convert) in _DATABASE_KEYS.items():
        if target == "db":
            current, base = getattr(db, name), getattr(defaults, name)
        else:
            current, base = (
                getattr(getattr(db, target), name),
                getattr(getattr(config, target), name),
            )
            if current == base:
                continue
        rows.append((f"databases.{db.name}.{key}", _show(convert, current), _show(convert, base)))
    return rows


# -- SET key = value -------------------------------------------------------------

# Settings the console's SET may change while pgmux runs (SHOW CONFIG's
# "changeable" column). A timeouts.* or pool.* value also applies to every
# database that does not override it. The rest need a RELOAD or a restart.
RUNTIME_SETTINGS: dict[str, Converter] = {
    "listen.max_client_conn": _positive,
    "admin.stats_period": _positive_duration,
    "logging.level": _LOGGING["level"],
    "logging.wait_threshold": parse_duration,
    **{f"timeouts.{name}": parse_duration for name in _TIMEOUTS},
    **{
        f"pool.{name}": _POOL[name]
        for name in ("size", "min_size", "reserve_size", "reserve_timeout")
    },
}


def show_setting(key: str, value: Any) -> str:
    """How SHOW CONFIG spells a RUNTIME_SETTINGS value."""
    return _show(RUNTIME_SETTINGS[key], value)

"""A pgbouncer.ini, translated into the document a pgmux YAML file would hold.

`pgmux -c pgbouncer.ini` runs an existing PgBouncer deployment unchanged: the
entries of the ini (ini_read.py) are mapped through PgBouncer's tables
(ini_map.py) onto a pgmux configuration dict, which build.parse_config then
validates like any YAML file, so one validation path builds the Config; its
errors are pointed back at the ini line they came from.

Settings pgmux has no equivalent for are collected and returned with the
Config (load_pgbouncer_ini); the command line names them once in a warning at
startup, and `pgmux --check --strict` rejects them. A setting of that kind
left at PgBouncer's default changes nothing and is not reported. Relative
file names (auth_file, auth_hba_file, pidfile, TLS files) are relative to the
current directory, as in PgBouncer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pgmux.proxy.config.build import parse_config
from pgmux.proxy.config.errors import ConfigError
from pgmux.proxy.config.ini_map import (
    DATABASE_PARAMETERS,
    SETTINGS,
    SETTINGS_BY_NAME,
    SETTINGS_BY_TARGET,
    USER_PARAMETERS,
    ConnKey,
)
from pgmux.proxy.config.ini_read import IniEntry, Where, parse_connstr, read_ini
from pgmux.proxy.config.model import Config
from pgmux.proxy.config.peers import peer_from_ini
from pgmux.proxy.config.values import suggestion


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
    peers: dict[str, IniEntry] = {}
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
        elif entry.section == "peers":
            peers[entry.key] = entry
        else:
            result.unsupported.append(
                Unsupported(f"[{entry.section}]", entry.value, entry.where, "unknown section")
            )
    if not has_main:
        raise ConfigError(path, "", "the [pgbouncer] section is missing")
    _translate_settings(settings, result)
    result.put("logging.format", "pgbouncer")  # PgBouncer's lines for PgBouncer's users
    result.put("auth.pgbouncer_rules", True)  # and PgBouncer's login rules
    result.put("error_codes", "pgbouncer")  # and its SQLSTATEs
    result.put("shutdown", "pgbouncer")  # and its SIGTERM / SIGINT
    socket_dir = _socket_dir(settings)
    for name, entry in databases.items():
        _translate_database(name, entry, result, socket_dir)
    for name, entry in users.items():
        _translate_user(name, entry, result)
    _translate_peers(peers, result)
    _cap_min_pool_size(result)
    result.unsupported.sort(key=lambda item: item.where)
    return result


def _translate_peers(peers: dict[str, IniEntry], result: Translation) -> None:
    """[peers]: `id = host=... port=...` lines, as peers.members."""
    members = []
    for name, entry in peers.items():
        params = parse_connstr(entry.value, entry.where, f"[peers] {name}")
        try:
            members.append(peer_from_ini(name, params))
        except ValueError as exc:
            raise ConfigError(
                entry.where.file, f"[peers] {name}", str(exc), line=entry.where.line
            ) from None
    if members:
        result.put("peers.members", members, peers[next(iter(peers))].where, "[peers]")
        # A pgbouncer.ini's peers may be PgBouncers, which take 8-byte keys only.
        result.put("peers.short_keys", True)


def _translate_settings(settings: dict[str, IniEntry], result: Translation) -> None:
    for name, written in settings.items():
        if name not in SETTINGS_BY_NAME:
            raise ConfigError(
                written.where.file,
                name,
                "unknown parameter" + suggestion(name, SETTINGS_BY_NAME),
                line=written.where.line,
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
    # auth_query keeps PgBouncer's default: it runs for whichever auth_user
    # applies (global, per database, or one SET later on the console).


def _translate_hba(settings: dict[str, IniEntry], result: Translation) -> None:
    """PgBouncer reads auth_hba_file only for auth_type = hba; pgmux applies
    auth.hba_file whenever it is set, so pass it on only in that case."""
    auth_type = settings.get("auth_type")
    is_hba = auth_type is not None and auth_type.value.strip().lower() == "hba"
    if auth_type is not None and is_hba and not result.data["auth"].get("hba_file"):
        where = auth_type.where
        raise ConfigError(where.file, "auth_type", "hba needs auth_hba_file", line=where.line)
    if not is_hba and result.data["auth"].get("hba_file"):
        result.data["auth"]["hba_file"] = None
        result.explicit.discard("auth.hba_file")
        entry = settings["auth_hba_file"]
        note = "PgBouncer ignores it unless auth_type = hba"
        result.unsupported.append(Unsupported("auth_hba_file", entry.value, entry.where, note))


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
        conn_key = _supported_key(
            DATABASE_PARAMETERS, "connection", key, text, entry, label, result
        )
        if conn_key is None:
            continue
        value = _parse_conn_value(conn_key, key, text, entry, label)
        if key == "host":
            value = _host_list(value)
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


def _host_list(value: str) -> str | list[str]:
    """PgBouncer's host=a,b: the hosts tried in turn (databases.*.host as a list)."""
    hosts = [host.strip() for host in value.split(",") if host.strip()]
    return hosts if len(hosts) > 1 else value


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
        conn_key = _supported_key(USER_PARAMETERS, "user", key, text, entry, label, result)
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


def load_pgbouncer_ini(
    path: str, text: str | None = None
) -> tuple[Config, tuple[Unsupported, ...]]:
    """Read a pgbouncer.ini into a Config, and the settings in it that pgmux
    does not honour; errors name the ini file and line."""
    absolute = os.path.abspath(path)
    translation = translate(read_ini(absolute, text), absolute)
    config = config_from_translation(translation, absolute)
    return config, tuple(translation.unsupported)


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
    setting = SETTINGS_BY_TARGET.get(exc.key)
    return ConfigError(path, setting.name if setting else exc.key, exc.message)


def unsupported_warning(found: Sequence[Unsupported]) -> str | None:
    """One line naming every unsupported setting FOUND, or None."""
    if not found:
        return None
    names = ", ".join(dict.fromkeys(item.name for item in found))
    return f"settings not supported by pgmux, ignored: {names}"

"""SHOW CONFIG under pgmux's key paths: (key, value, default) rows.

The rows come from the same tables that parse the file (schema.py), spelled
the way the file may write them ("250ms", "64MiB", "0700"); every password
reads "****". The console lists them after PgBouncer's names (ini_show.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pgmux.proxy.config.errors import join_key
from pgmux.proxy.config.model import Config, DatabaseConfig, ListenConfig, PoolSettings, UserConfig
from pgmux.proxy.config.schema import DATABASE_KEYS, LISTEN, POOL, SECTIONS, USER_KEYS, Section
from pgmux.proxy.config.values import (
    Converter,
    file_mode,
    format_duration,
    format_size,
    names,
    optional_text,
    packet_size,
    parse_duration,
    positive_duration,
    secret,
)

_FORMATTERS: dict[Any, Callable[[Any], str]] = {
    parse_duration: format_duration,
    positive_duration: format_duration,
    packet_size: format_size,
    file_mode: lambda mode: f"0{mode:o}",
}


def settings_table(config: Config) -> list[tuple[str, str, str]]:
    """(key, value, default) rows for SHOW CONFIG; passwords read "****"."""
    rows = _section_rows("listen", LISTEN, config.listen, ListenConfig())
    rows += _section_rows("pool", POOL, config.pool, PoolSettings())
    rows.append(("pool.max_server_connections", str(config.max_server_connections), "0"))
    for name in ("timeouts", "auth", "admin", "tls", "logging", "limits"):
        section = SECTIONS[name]
        rows += _section_rows(name, section.table, getattr(config, name), section.base)
    rows.append(("ignore_startup_parameters", _show(names, config.ignore_startup_parameters), ""))
    rows.append(("pidfile", _show(optional_text, config.pidfile), ""))
    rows.append(("error_codes", config.error_codes, "postgres"))
    rows.append(("login_notify_message", config.login_notify_message or "", ""))
    rows.append(("shutdown", config.shutdown, "drain"))
    peers = config.peers
    rows.append(("peers.peer_id", str(peers.peer_id), "0"))
    rows.append(("peers.secret", _show(secret, peers.secret), ""))
    rows.append(("peers.short_keys", str(peers.short_keys).lower(), "false"))
    members = ", ".join(f"{m.id}={m.host}:{m.port}" for m in peers.members)
    rows.append(("peers.members", members, ""))
    for db in config.databases.values():
        rows += _database_rows(db, config)
    for user in config.users.values():
        rows += _section_rows(f"users.{user.name}", USER_KEYS, user, UserConfig(name=user.name))
    return rows


def _show(convert: Converter, value: Any) -> str:
    if convert is secret:
        return "" if value is None else "****"
    if value is None:
        return ""
    if convert in _FORMATTERS:
        return _FORMATTERS[convert](value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(str(item) for item in value)
    return str(value)


def _section_rows(
    prefix: str, table: Mapping[str, Converter], value: Any, default: Any
) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, convert in table.items():
        key, current, base = join_key(prefix, name), getattr(value, name), getattr(default, name)
        if isinstance(convert, Section):
            rows += _section_rows(key, convert.table, current, base)
        else:
            rows.append((key, _show(convert, current), _show(convert, base)))
    return rows


def _database_rows(db: DatabaseConfig, config: Config) -> list[tuple[str, str, str]]:
    """A database's own keys, and those pool/timeout keys it overrides (the
    global value is their default)."""
    rows, defaults = [], DatabaseConfig(name=db.name)
    for key, (target, name, convert) in DATABASE_KEYS.items():
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

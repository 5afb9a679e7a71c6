"""The console's SET: change a setting while pgmux runs (PgBouncer's admin.c SET).

Only RUNTIME_SETTINGS (config) may change; PgBouncer's names work too
(`SET default_pool_size = 5`). A value is read as YAML would read it in the
config file, and checked by the same converter. A timeouts.* or pool.*
value also applies to every database and pool that does not override it:
one that still carries the old global value follows the new one. The
registry swaps the configuration in and the pools take their new values
without replacing their servers (Registry.apply_setting, Pool.apply_settings).

A few settings drivers SET or SHOW on connect are answered with fixed
values, as PgBouncer does.
"""

from __future__ import annotations

import re
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pgmux.protocol import sqlstate
from pgmux.proxy.base.log import configure_logging
from pgmux.proxy.config import (
    RUNTIME_SETTINGS,
    Config,
    ConfigError,
    DatabaseConfig,
    pgbouncer_only,
    pgbouncer_value,
    pgmux_key,
)
from pgmux.proxy.console.errors import ConsoleError

if TYPE_CHECKING:
    from pgmux.proxy.config import PoolSettings, Timeouts
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.registry import Registry

    PoolChange = tuple[Pool, DatabaseConfig, PoolSettings, Timeouts]

# Settings some drivers SET or SHOW on connect; PgBouncer fakes them too.
FAKE_PARAMS = {
    "client_encoding": "UTF8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
}

# The sections whose global value databases and pools inherit.
_INHERITED = ("timeouts", "pool")


TLS_NOT_APPLIED = "TLS settings could not be applied, still using old configuration"


def set_setting(registry: Registry, name: str, text: str) -> str:
    """SET NAME = TEXT: check the value, apply it; the pgmux name of the key.

    NAME is pgmux's key path or PgBouncer's setting name (`SET
    default_pool_size = 5`); a PgBouncer name takes its value as the ini
    spells it (seconds as numbers, `plain`, comma-separated lists)."""
    key = pgmux_key(name) or name
    convert = RUNTIME_SETTINGS.get(key)
    if convert is None:
        why = pgbouncer_only(name)
        if why is not None:
            raise ConsoleError(
                sqlstate.FEATURE_NOT_SUPPORTED,
                f'PgBouncer setting "{name}" is not supported: {why}',
            )
        raise ConsoleError(
            sqlstate.UNDEFINED_OBJECT,
            f'unknown setting "{name}" or it cannot change at run time (see SHOW CONFIG)',
        )
    try:
        raw = pgbouncer_value(name, text) if key != name else _yaml_scalar(text)
        value = convert(raw, key)
    except ValueError as exc:  # the ini's own parser refused it
        raise ConsoleError(sqlstate.INVALID_PARAMETER_VALUE, f"{name}: {exc}") from None
    except ConfigError as exc:
        raise ConsoleError(sqlstate.INVALID_PARAMETER_VALUE, str(exc)) from None
    _apply(registry, key, value)
    return key


def _yaml_scalar(text: str) -> Any:
    """A console value as YAML would read it: 5 is an int, 5s a string."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?\d*\.\d+", text):
        return float(text)
    return text


def _apply(registry: Registry, key: str, value: Any) -> None:
    """Swap in a config with KEY set; pools and databases that inherit it follow."""
    config = registry.config
    section, name = key.split(".", 1)
    if section not in _INHERITED:
        config = _replaced(config, key.split("."), value)
        if section == "tls" and not registry.apply_tls(config):
            # PgBouncer keeps the new value and the running contexts (a NOTICE)
            registry.apply_setting(config)
            raise TlsNotApplied(key)
        if key == "logging.level":
            configure_logging(config.logging.format, value)
        registry.apply_setting(config)
        return
    old = getattr(getattr(config, section), name)
    changes = [
        change
        for pool in registry.pools.values()
        if (change := _pool_change(pool, section, name, old, value)) is not None
    ]
    registry.apply_setting(_inherited(config, section, name, old, value), changes)


def _replaced(obj: Any, path: list[str], value: Any) -> Any:
    """OBJ (a frozen dataclass) with the field at PATH ("tls", "server", "mode") set."""
    first, *rest = path
    new = _replaced(getattr(obj, first), rest, value) if rest else value
    return replace(obj, **{first: new})


class TlsNotApplied(Exception):
    """The setting changed but its TLS files did not load: SET answers with a NOTICE."""


def _inherited(config: Config, section: str, name: str, old: Any, value: Any) -> Config:
    """CONFIG with the global SECTION.NAME set to VALUE, and so every
    database's that carries the OLD global value (it did not override it)."""
    databases = {
        db_name: _follow(db, section, name, old, value) for db_name, db in config.databases.items()
    }
    global_part = replace(getattr(config, section), **{name: value})
    return replace(config, **{section: global_part, "databases": MappingProxyType(databases)})


def _follow(
    database: DatabaseConfig, section: str, name: str, old: Any, value: Any
) -> DatabaseConfig:
    part = getattr(database, section)
    if getattr(part, name) != old:
        return database
    return replace(database, **{section: replace(part, **{name: value})})


def _pool_change(pool: Pool, section: str, name: str, old: Any, value: Any) -> PoolChange | None:
    """What POOL takes of the new value: None when it overrides the setting."""
    settings, timeouts = pool.settings, pool.timeouts
    part = timeouts if section == "timeouts" else settings
    if getattr(part, name) != old:
        return None
    if section == "timeouts":
        timeouts = replace(timeouts, **{name: value})
    else:
        settings = replace(settings, **{name: value})
    return pool, _follow(pool.database, section, name, old, value), settings, timeouts

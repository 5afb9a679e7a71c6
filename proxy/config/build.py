"""Building a Config from a parsed document, and the checks across keys.

Both readers end here: the YAML file (yamlfile.py) and a pgbouncer.ini
translated into the same structure (ini_translate.py), so one validation
path builds every Config. Relative file names are resolved here too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from pgmux.proxy.config.errors import ConfigError, join_key, key_error
from pgmux.proxy.config.interpolation import interpolate
from pgmux.proxy.config.model import (
    ADMIN_DATABASES,
    FALLBACK_DATABASE,
    Config,
    DatabaseConfig,
    PoolSettings,
    Timeouts,
    TlsConfig,
    TlsSideConfig,
    UserConfig,
)
from pgmux.proxy.config.peers import parse_peers
from pgmux.proxy.config.schema import (
    DATABASE_KEYS,
    ERROR_CODES,
    POOL_SECTION,
    SECTIONS,
    SHUTDOWN_MODES,
    TOP_LEVEL,
    USER_KEYS,
    convert_table,
    mapping,
    reject_unknown,
)
from pgmux.proxy.config.values import names, one_of, optional_text


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
    root = interpolate(mapping(data, ""), env, "")
    reject_unknown(root, TOP_LEVEL, "")
    parts = {name: section(root.get(name), name) for name, section in SECTIONS.items()}
    pool_values = convert_table(POOL_SECTION, root.get("pool"), "pool")
    max_server_connections = pool_values.pop("max_server_connections", 0)
    pool = replace(PoolSettings(), **pool_values)
    databases = {
        _database_name(name): _database(name, entry, pool, parts["timeouts"])
        for name, entry in mapping(root.get("databases"), "databases").items()
    }
    users = {
        _user_name(name): UserConfig(name=name, **convert_table(USER_KEYS, entry, f"users.{name}"))
        for name, entry in mapping(root.get("users"), "users").items()
    }
    config = Config(
        path=path,
        pool=pool,
        max_server_connections=max_server_connections,
        databases=MappingProxyType(databases),
        users=MappingProxyType(users),
        ignore_startup_parameters=names(
            root.get("ignore_startup_parameters"), "ignore_startup_parameters"
        ),
        pidfile=optional_text(root.get("pidfile"), "pidfile"),
        error_codes=one_of(*ERROR_CODES)(root.get("error_codes", "postgres"), "error_codes"),
        login_notify_message=optional_text(
            root.get("login_notify_message") or None, "login_notify_message"
        ),
        shutdown=one_of(*SHUTDOWN_MODES)(root.get("shutdown", "drain"), "shutdown"),
        peers=parse_peers(root.get("peers")),
        **parts,
    )
    _check_limits(config)
    _check_tls(config.tls)
    return _resolve_paths(config, base_dir)


def _database_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise key_error(f"databases.{name}", "a database name must be a non-empty string")
    if name in ADMIN_DATABASES:
        raise key_error(f"databases.{name}", "this name is reserved for the admin console")
    return name


def _user_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise key_error(f"users.{name}", "a user name must be a non-empty string")
    return name


def _database(name: str, entry: Any, pool: PoolSettings, timeouts: Timeouts) -> DatabaseConfig:
    """One `databases:` entry; its flat pool and timeout keys override the globals."""
    prefix = f"databases.{name}"
    entries = mapping(entry, prefix)
    reject_unknown(entries, DATABASE_KEYS, prefix)
    values: dict[str, dict[str, Any]] = {"db": {}, "pool": {}, "timeouts": {}}
    for key, value in entries.items():
        target, field_name, convert = DATABASE_KEYS[key]
        values[target][field_name] = convert(value, join_key(prefix, key))
    _first_host(values["db"], prefix)
    return DatabaseConfig(
        name=name,
        pool=replace(pool, **values["pool"]),
        timeouts=replace(timeouts, **values["timeouts"]),
        **values["db"],
    )


def _first_host(db: dict[str, Any], prefix: str) -> None:
    """host and port are the first of host_list and port_list (one port: every host's)."""
    hosts, ports = db.get("host_list", ()), db.get("port_list", ())
    if hosts:
        db["host"] = hosts[0]
    if ports:
        db["port"] = ports[0]
    if len(ports) > 1 and len(ports) != max(len(hosts), 1):
        message = f"{len(ports)} ports for {max(len(hosts), 1)} hosts (give one, or one per host)"
        raise key_error(f"{prefix}.port", message)


def _check_limits(config: Config) -> None:
    """Limits that cannot all hold at once."""
    pool, cap = config.pool, config.max_server_connections
    if pool.min_size > pool.size:
        raise key_error("pool.min_size", f"{pool.min_size} is larger than pool.size {pool.size}")
    for db in config.databases.values():
        prefix, settings = f"databases.{db.name}", db.pool
        if settings.min_size > settings.size:
            message = f"min_size {settings.min_size} is larger than pool_size {settings.size}"
            raise key_error(f"{prefix}.min_size", message)
        if 0 < settings.max_db_connections < settings.min_size:
            message = f"min_size {settings.min_size} is larger than max_db_connections"
            raise key_error(f"{prefix}.min_size", f"{message} {settings.max_db_connections}")
        if 0 < cap < settings.min_size:
            message = f"min_size {settings.min_size} is larger than pool.max_server_connections"
            raise key_error(f"{prefix}.min_size", f"{message} {cap}")
    # "*" is left out: its min_size applies to each database it creates later.
    floors = {db.name: db.pool.min_size for db in config.databases.values() if db.pool.min_size}
    floors.pop(FALLBACK_DATABASE, None)
    if 0 < cap < sum(floors.values()):
        detail = ", ".join(f"{name} {size}" for name, size in floors.items())
        message = f"the databases' min_size add up to {sum(floors.values())} ({detail})"
        raise key_error("pool.max_server_connections", f"{message}, more than the cap {cap}")


def _check_tls(tls: TlsConfig) -> None:
    client = tls.client
    if client.mode != "disable":
        for name in ("cert", "key"):
            if getattr(client, name) is None:
                message = f"required when tls.client.mode is {client.mode!r}"
                raise key_error(f"tls.client.{name}", message)
    if client.mode.startswith("verify-") and client.ca is None:
        raise key_error("tls.client.ca", f"required when tls.client.mode is {client.mode!r}")


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

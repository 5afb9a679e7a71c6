"""Configuration: a YAML file or a pgbouncer.ini, parsed once into frozen dataclasses.

PgBouncer's loader.c reads an ini file into globals; pgmux reads its file into
immutable objects, so a reload builds a new Config next to the old one and
swaps it in only when it is valid. Every error names the file, the line, the
key path and what was expected, and never shows a password.

This package's modules, ground up: errors (ConfigError), model (the
dataclasses), values (converters), schema (the key tables), interpolation
(${VAR}), build (document -> Config), show (SHOW CONFIG rows), textfile,
yamlfile, ini_read / ini_map / ini_translate / ini_show (pgbouncer.ini), and
load (load_config, on top of both readers); userlist, hba and tls read the
files the configuration names. This module only re-exports the names the
rest of pgmux uses; the modules import each other directly, never from here.
"""

from __future__ import annotations

from pgmux.proxy.config.build import parse_config
from pgmux.proxy.config.errors import ConfigError
from pgmux.proxy.config.ini_show import (
    pgbouncer_only,
    pgbouncer_settings,
    pgbouncer_value,
    pgmux_key,
)
from pgmux.proxy.config.ini_translate import Unsupported, unsupported_warning
from pgmux.proxy.config.load import LoadedConfig, load_config, read_config
from pgmux.proxy.config.model import (
    ADMIN_DATABASES,
    FALLBACK_DATABASE,
    AdminConfig,
    AuthConfig,
    Config,
    DatabaseConfig,
    HealthConfig,
    HttpConfig,
    LimitsConfig,
    ListenConfig,
    LoggingConfig,
    PoolSettings,
    ReplicaLag,
    Timeouts,
    TlsConfig,
    TlsSideConfig,
    UserConfig,
)
from pgmux.proxy.config.schema import RUNTIME_SETTINGS, USER_TIMEOUTS
from pgmux.proxy.config.show import settings_table
from pgmux.proxy.config.values import format_duration

__all__ = [
    "ADMIN_DATABASES",
    "FALLBACK_DATABASE",
    "RUNTIME_SETTINGS",
    "USER_TIMEOUTS",
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "HealthConfig",
    "HttpConfig",
    "LimitsConfig",
    "ListenConfig",
    "LoadedConfig",
    "LoggingConfig",
    "PoolSettings",
    "ReplicaLag",
    "Timeouts",
    "TlsConfig",
    "TlsSideConfig",
    "Unsupported",
    "UserConfig",
    "format_duration",
    "load_config",
    "parse_config",
    "pgbouncer_only",
    "pgbouncer_settings",
    "pgbouncer_value",
    "pgmux_key",
    "read_config",
    "settings_table",
    "unsupported_warning",
]

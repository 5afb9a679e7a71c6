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
from pgmux.proxy.config.ini_show import pgbouncer_settings, pgmux_key
from pgmux.proxy.config.ini_translate import Unsupported, unsupported_warning
from pgmux.proxy.config.load import LoadedConfig, load_config, read_config
from pgmux.proxy.config.model import (
    ADMIN_DATABASES,
    AUTH_TYPES,
    FALLBACK_DATABASE,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_MESSAGE_SIZE,
    POOL_MODES,
    SESSION_STATES,
    TLS_MODES,
    AdminConfig,
    AuthConfig,
    Config,
    DatabaseConfig,
    HttpConfig,
    LimitsConfig,
    ListenConfig,
    LoggingConfig,
    PoolSettings,
    Timeouts,
    TlsConfig,
    TlsSideConfig,
    UserConfig,
)
from pgmux.proxy.config.schema import RUNTIME_SETTINGS
from pgmux.proxy.config.show import settings_table
from pgmux.proxy.config.values import (
    Converter,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "ADMIN_DATABASES",
    "AUTH_TYPES",
    "FALLBACK_DATABASE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_MESSAGE_SIZE",
    "POOL_MODES",
    "RUNTIME_SETTINGS",
    "SESSION_STATES",
    "TLS_MODES",
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "Converter",
    "DatabaseConfig",
    "HttpConfig",
    "LimitsConfig",
    "ListenConfig",
    "LoadedConfig",
    "LoggingConfig",
    "PoolSettings",
    "Timeouts",
    "TlsConfig",
    "TlsSideConfig",
    "Unsupported",
    "UserConfig",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "pgbouncer_settings",
    "pgmux_key",
    "read_config",
    "settings_table",
    "unsupported_warning",
]

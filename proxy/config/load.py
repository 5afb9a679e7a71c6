"""load_config(path): a YAML file or a pgbouncer.ini, read into a Config.

PgBouncer has one file format; pgmux reads its own YAML and PgBouncer's ini,
and tells them apart by the file's name and first line (looks_like_ini).
This module sits above both readers, so neither needs to know the other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pgmux.proxy.config.ini_read import looks_like_ini
from pgmux.proxy.config.ini_translate import Unsupported, load_pgbouncer_ini
from pgmux.proxy.config.model import Config
from pgmux.proxy.config.textfile import read_text
from pgmux.proxy.config.yamlfile import load_yaml_config


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated Config, and the settings of its file that pgmux does not
    honour (only a pgbouncer.ini has any)."""

    config: Config
    unsupported: tuple[Unsupported, ...] = ()


def read_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate PATH, YAML or pgbouncer.ini; raise ConfigError naming
    file, line and key. ENV (default os.environ) feeds the YAML's ${VAR}."""
    name = os.fspath(path)
    text = read_text(name)
    if looks_like_ini(name, text):
        config, unsupported = load_pgbouncer_ini(name, text)
        return LoadedConfig(config, unsupported)
    return LoadedConfig(load_yaml_config(name, text, env))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """The Config of PATH (see read_config), for callers that need only that."""
    return read_config(path, env).config

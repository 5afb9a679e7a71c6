"""`pgmux convert pgbouncer.ini > pgmux.yaml`: the same configuration, in YAML.

The YAML spells out every setting, because PgBouncer's defaults are not
pgmux's (pool_mode session, default_pool_size 20, query_wait_timeout 120 s,
...): loaded with `pgmux -c`, it gives exactly the Config that the ini gives.
Each value carries the PgBouncer setting it comes from as a comment; values
that are approximated say how, and settings pgmux does not support are listed
at the top, with their file and line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from pgmux.proxy.config import ConfigError, format_duration
from pgmux.proxy.config.ini_map import DATABASE_PARAMETERS, SETTINGS, USER_PARAMETERS
from pgmux.proxy.config.ini_read import read_ini
from pgmux.proxy.config.ini_translate import Translation, config_from_translation, translate

_ORDER = (
    *("listen", "pool", "timeouts", "auth", "admin", "tls", "logging", "limits"),
    *("ignore_startup_parameters", "pidfile", "databases", "users"),
)
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# pgmux key path -> the PgBouncer name it replaces, for the comments
_SOURCES = {setting.target: setting.name for setting in SETTINGS if setting.target}
_CONN_SOURCES = {key.target: name for name, key in DATABASE_PARAMETERS.items() if key.target}
_CONN_SOURCES |= {key.target: name for name, key in USER_PARAMETERS.items() if key.target}
_CONN_SOURCES |= {"reserve_size": "reserve_pool"}


def convert_file(path: str) -> tuple[str, Translation]:
    """The YAML text for the ini at PATH; ConfigError if the ini is invalid."""
    translation = translate(read_ini(path), path)
    config_from_translation(translation, path)  # refuse to write what would not load
    return render(translation, path), translation


def render(translation: Translation, source: str) -> str:
    lines = [
        f"# pgmux configuration converted from {source} by `pgmux convert`.",
        "# Every setting is written out: PgBouncer's defaults are not pgmux's.",
        "# [name] is the PgBouncer setting a value comes from.",
        "# See docs/migrating-from-pgbouncer.md for what differs.",
    ]
    if translation.unsupported:
        lines += ["#", "# Not converted (pgmux has no equivalent; they had no effect):"]
        ordered = sorted(translation.unsupported, key=lambda item: item.where)
        lines += [f"#   {item.describe()}" for item in ordered]
    if any(_is_password(key) for key in translation.explicit):
        lines += [
            "#",
            '# Passwords were copied from the ini; consider password: "${ENV_VAR}".',
        ]
    lines.append("")
    data = translation.data
    for key in (*_ORDER, *(k for k in data if k not in _ORDER)):
        if key in data:
            lines += _emit(key, data[key], key, translation, 0)
    return "\n".join(lines) + "\n"


def _is_password(key: str) -> bool:
    return key.endswith(".password")


def _emit(key: str, value: Any, path: str, translation: Translation, depth: int) -> list[str]:
    indent = "  " * depth
    lines = []
    if path in translation.approximated:
        lines.append(f"{indent}# approximated: {translation.approximated[path]}")
    name = _yaml_key(key)
    if isinstance(value, dict):
        if not value:
            return [*lines, f"{indent}{name}: {{}}"]
        lines.append(f"{indent}{name}:")
        for child, item in value.items():
            lines += _emit(child, item, f"{path}.{child}", translation, depth + 1)
        return lines
    text = f"{indent}{name}: {_scalar(key, value)}"
    source = _source(path)
    return [*lines, f"{text}  # [{source}]" if source else text]


def _source(path: str) -> str | None:
    if path in _SOURCES:
        return _SOURCES[path]
    parts = path.split(".")
    if parts[0] in ("databases", "users") and len(parts) >= 3:
        return _CONN_SOURCES.get(parts[-1])
    return None


def _yaml_key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) else json.dumps(key)


def _scalar(key: str, value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if key == "unix_socket_mode":
        return json.dumps(f"0{value:o}")
    if isinstance(value, float):  # every float here is a duration in seconds
        text = format_duration(value)
        return "0" if text == "0" else json.dumps(text)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string is a YAML double-quoted scalar


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pgmux convert",
        description="Write the pgmux YAML equivalent of a pgbouncer.ini to stdout.",
    )
    parser.add_argument("file", help="pgbouncer.ini")
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        text, translation = convert_file(args.file)
    except ConfigError as exc:
        print(f"pgmux convert: {exc}", file=sys.stderr)
        return 1
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
    else:
        sys.stdout.write(text)
    if translation.unsupported:
        names = ", ".join(dict.fromkeys(item.name for item in translation.unsupported))
        print(f"pgmux convert: not converted (see the comments): {names}", file=sys.stderr)
    return 0

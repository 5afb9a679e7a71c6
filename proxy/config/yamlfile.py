"""The YAML configuration file: parsing, the line of every key, and the Config.

PyYAML builds the document; a walk over its nodes first records the line of
every key path, so an error found later while building the Config still
points at its line, and rejects what PyYAML would let pass silently
(duplicate keys, recursive aliases). A file that defines nothing (empty, only
comments, `---`, a bare `null` or `{}`) is an error, not "all defaults": on a
reload it would drop every database. No error quotes a line of the file: it
may hold a secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import yaml

from pgmux.proxy.config.build import parse_config
from pgmux.proxy.config.errors import ConfigError, join_key
from pgmux.proxy.config.model import Config


def load_yaml_config(path: str, text: str, env: Mapping[str, str] | None = None) -> Config:
    """The Config of the YAML TEXT read from PATH; errors name file, line and key."""
    data, lines = _load_yaml(text, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    try:
        config = parse_config(data, path=path, env=env, base_dir=base_dir)
    except ConfigError as exc:
        if exc.line is None:
            exc.line = _line_of(exc.key, lines)
        raise
    return replace(config, path=os.path.abspath(path))


def _load_yaml(text: str, path: str) -> tuple[Any, dict[str, int]]:
    """The document, and the line of every key path (for error messages)."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # the reader checks every character here
        node = loader.get_single_node()
        if node is None or _is_null(node):
            raise _defines_nothing(path)
        lines: dict[str, int] = {}
        _index_lines(node, "", lines, path, ())
        data = loader.construct_document(node)
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, path) from None
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
        if loader is not None:
            loader.dispose()
    if data == {}:
        raise _defines_nothing(path)
    return data, lines


def _is_null(node: yaml.Node) -> bool:
    """A document that is only `null` / `~` (or an empty `--- `)."""
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _defines_nothing(path: str) -> ConfigError:
    message = "the file defines nothing (empty, only comments or null); expected a mapping"
    return ConfigError(path, "", f"{message} such as `databases:`")


def _reader_error(exc: yaml.reader.ReaderError, text: str, path: str) -> ConfigError:
    """A character YAML does not allow (a NUL, another control character)."""
    position = min(max(exc.position, 0), len(text))
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    character = exc.character if isinstance(exc.character, int) else ord(exc.character)
    message = f"character U+{character:04X} is not allowed in YAML (column {column})"
    return ConfigError(path, "", message, line=line)


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
            key, line = join_key(prefix, key_node.value), key_node.start_mark.line + 1
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

"""The YAML configuration file: parsing, the line of every key, and the Config.

PyYAML builds the document; a walk over its nodes first records the line of
every key path, so an error found later while building the Config still
points at its line, and rejects what PyYAML would let pass silently
(duplicate keys, recursive aliases). No error quotes a line of the file: it
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

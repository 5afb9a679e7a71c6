"""pgbouncer.ini syntax: sections, `key = value`, `%include`, connection strings.

Read the way PgBouncer's cfparser reads it: `[section]` lines; `key = value`
with the value taken verbatim up to the end of the line (`;` and `#` start a
comment only at the start of a line); keys in single or double quotes may
hold any character; `%include FILE` reads another file in place, relative to
the current directory as in PgBouncer. [databases] and [users] values are
libpq-style `key=value` lists (parse_connstr), a value in single quotes may
hold spaces ('' is a quote). What the entries mean is ini_translate.py's job.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from pgmux.proxy.config.errors import ConfigError
from pgmux.proxy.config.textfile import read_text

MAX_INCLUDE_DEPTH = 10  # PgBouncer's limit
INI_SECTIONS = ("pgbouncer", "databases", "users", "peers")
_BARE_KEY = re.compile(r"[A-Za-z0-9_.\-*]+")


@dataclass(frozen=True, slots=True, order=True)
class Where:
    """Where a setting was written, for error messages and the converter."""

    file: str
    line: int


@dataclass(frozen=True, slots=True)
class IniEntry:
    section: str
    key: str
    value: str
    where: Where


def looks_like_ini(path: str, text: str) -> bool:
    """A .ini file, or one whose first meaningful line is `[section]` or `%include`."""
    if path.lower().endswith(".ini"):
        return True
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        return line.startswith(("[", "%include"))
    return False


def read_ini(path: str, text: str | None = None) -> list[IniEntry]:
    """Every `key = value` of PATH and its includes, in file order."""
    entries: list[IniEntry] = []
    _read_file(path, text, entries, {"section": None}, depth=0)
    return entries


def _read_file(
    path: str, text: str | None, entries: list[IniEntry], state: dict[str, Any], depth: int
) -> None:
    if text is None:
        text = read_text(path)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        where = Where(path, number)
        if not line or line[0] in "#;":
            continue
        if line.startswith("%include") and line[8:9].isspace():
            _include(line[8:].strip(), where, entries, state, depth)
        elif line.startswith("["):
            state["section"] = _section(line, where)
            entries.append(IniEntry(state["section"], "", "", where))  # marks the section
        else:
            key, value = _key_value(line, where)
            if state["section"] is None:
                raise _syntax(where, f"{key!r} is outside any section (add [pgbouncer] above it)")
            entries.append(IniEntry(state["section"], key, value, where))


def _include(
    name: str, where: Where, entries: list[IniEntry], state: dict[str, Any], depth: int
) -> None:
    if depth + 1 >= MAX_INCLUDE_DEPTH:
        raise _syntax(where, f"%include nested deeper than {MAX_INCLUDE_DEPTH} files")
    path = os.path.abspath(os.path.expanduser(name))
    try:
        _read_file(path, None, entries, state, depth + 1)
    except ConfigError as exc:
        if exc.line is None and not exc.key:  # the included file could not be read
            raise ConfigError(where.file, "%include", exc.message, line=where.line) from None
        raise


def _section(line: str, where: Where) -> str:
    end = line.find("]")
    if end < 0:
        raise _syntax(where, "section header without closing ']'")
    if line[end + 1 :].strip():
        raise _syntax(where, "unexpected text after the section header")
    name = line[1:end].strip()
    if name not in INI_SECTIONS:
        expected = ", ".join(f"[{s}]" for s in INI_SECTIONS)
        raise _syntax(where, f"invalid section [{name}] (expected one of {expected})")
    return name


def _key_value(line: str, where: Where) -> tuple[str, str]:
    if line[0] in "'\"":
        key, rest = _quoted_key(line, where)
    else:
        match = _BARE_KEY.match(line)
        if match is None:
            raise _syntax(where, "expected key = value")
        key, rest = match[0], line[match.end() :]
    rest = rest.lstrip(" \t")
    if not rest.startswith("="):
        raise _syntax(where, f"expected '=' after {key!r}")
    return key, rest[1:].strip()


def _quoted_key(line: str, where: Where) -> tuple[str, str]:
    quote, pieces, position = line[0], [], 1
    while True:
        close = line.find(quote, position)
        if close < 0:
            raise _syntax(where, "unterminated quoted name")
        pieces.append(line[position:close])
        if line.startswith(quote, close + 1):  # doubled: a quote inside the name
            pieces.append(quote)
            position = close + 2
            continue
        key = "".join(pieces)
        if not key:
            raise _syntax(where, "empty quoted name")
        return key, line[close + 1 :]


def _syntax(where: Where, message: str) -> ConfigError:
    return ConfigError(where.file, "", f"syntax error: {message}", line=where.line)


def parse_connstr(text: str, where: Where, what: str) -> dict[str, str]:
    """`host=h port=5432 password='a b'` -> {"host": "h", ...}, as PgBouncer reads it."""
    pairs: dict[str, str] = {}
    position, size = 0, len(text)
    while True:
        while position < size and text[position] in " \t":
            position += 1
        if position >= size:
            return pairs
        equals = text.find("=", position)
        if equals < 0:
            # the text itself is not shown: it may be part of a password
            raise _connstr_error(where, what, f"expected key=value after {len(pairs)} pairs")
        key = text[position:equals].strip()
        if not key or " " in key:
            raise _connstr_error(where, what, "expected key=value")
        value, position = _connstr_value(text, equals + 1, where, what, key)
        pairs[key] = value


def _connstr_value(text: str, start: int, where: Where, what: str, key: str) -> tuple[str, int]:
    position = start
    while position < len(text) and text[position] == " ":
        position += 1
    if text.startswith("'", position):
        pieces, position = [], position + 1
        while True:
            close = text.find("'", position)
            if close < 0:
                raise _connstr_error(where, what, f"unterminated quote in {key}")
            pieces.append(text[position:close])
            if not text.startswith("'", close + 1):
                value, position = "".join(pieces), close + 1
                break
            pieces.append("'")
            position = close + 2
    else:
        end = position
        while end < len(text) and text[end] not in " \t":
            end += 1
        value, position = text[position:end], end
    if not value:
        raise _connstr_error(where, what, f"empty value for {key}")
    return value, position


def _connstr_error(where: Where, what: str, message: str) -> ConfigError:
    return ConfigError(
        where.file, what, f"syntax error in connection string: {message}", line=where.line
    )

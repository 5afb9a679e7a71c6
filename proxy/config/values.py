"""Converters: (value, key path) -> a typed value, or a ConfigError.

The schema (schema.py) is tables of these. They accept what YAML produces
(ints, bools, strings, lists) and, for int and bool keys, the text of an
environment variable; durations ("250ms", "5s", "1h") and sizes ("64MiB")
have a parser and a formatter each, so SHOW CONFIG spells back what a file
may contain.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from pgmux.proxy.config.errors import ConfigError, key_error
from pgmux.proxy.config.model import MAX_MESSAGE_SIZE, ReplicaLag

Converter = Callable[[Any, str], Any]


class Interpolated(str):
    """A string that came out of ${VAR} interpolation.

    Environment variables are text, so int and bool keys accept such a string
    ("6432"); a quoted literal "6432" written in the file stays a type error.
    """

    __slots__ = ()


# -- how errors show values --------------------------------------------------------

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", list: "a list"}


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def describe(value: object, *, secret: bool = False) -> str:
    """How an error shows a value: secrets and containers by their type only."""
    if secret or value is None or isinstance(value, list | dict):
        return _kind(value)
    if isinstance(value, bool):
        return "true" if value else "false"  # YAML's spelling, not Python's
    text = repr(str(value) if isinstance(value, str) else value)
    return text if len(text) <= 60 else text[:56] + "...'"


def expected_error(
    key: str, expected: str, value: object, hint: str = "", secret: bool = False
) -> ConfigError:
    return key_error(key, f"expected {expected}, got {describe(value, secret=secret)}{hint}")


def suggestion(word: object, choices: Iterable[str]) -> str:
    """' (did you mean ...?)' for the closest of CHOICES, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- numbers, names and choices ------------------------------------------------------

_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def integer(
    minimum: int, maximum: int | None = None, expected: str = ""
) -> Callable[[Any, str], int]:
    expected = expected or ("a positive integer" if minimum == 1 else "a non-negative integer")

    def convert(value: Any, key: str) -> int:
        if isinstance(value, Interpolated) and _INT_TEXT.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            quoted = isinstance(value, str) and _INT_TEXT.fullmatch(value)
            hint = " (write it without quotes)" if quoted else ""
            raise expected_error(key, expected, value, hint)
        if value < minimum or (maximum is not None and value > maximum):
            raise expected_error(key, expected, value)
        return value

    return convert


positive = integer(1)
non_negative = integer(0)
port = integer(1, 65535, "a port number between 1 and 65535")


def optional(convert: Converter) -> Converter:
    """None, or an empty string (`${VAR:-}`), means "not set"."""

    def optional(value: Any, key: str) -> Any:
        return None if value is None or value == "" else convert(value, key)

    return optional


optional_port = optional(port)


def host_list(value: Any, key: str) -> tuple[str, ...]:
    """One host, a list of them, or libpq's comma-separated `a,b`."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise expected_error(key, "a host or a list of hosts", value)
    return tuple(text(item, f"{key}[{i}]").strip() for i, item in enumerate(items))


def port_list(value: Any, key: str) -> tuple[int, ...]:
    """One port (for every host), or one per host: a list or `5432,5433`."""
    if isinstance(value, str) and "," in value:
        value = [part.strip() for part in value.split(",")]
    items = value if isinstance(value, list | tuple) else [value]
    if not items:
        raise expected_error(key, "a port or a list of ports", value)
    return tuple(port(_digits(item), f"{key}[{i}]") for i, item in enumerate(items))


def _digits(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


optional_positive = optional(positive)
_BOOL_TEXT = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_TEXT |= {"false": False, "no": False, "off": False, "0": False}


def boolean(value: Any, key: str) -> bool:
    if isinstance(value, Interpolated) and value.strip().lower() in _BOOL_TEXT:
        return _BOOL_TEXT[value.strip().lower()]
    if not isinstance(value, bool):
        raise expected_error(key, "true or false", value)
    return value


def one_of(*choices: str) -> Converter:
    expected = "one of " + ", ".join(repr(choice) for choice in choices)

    def convert(value: Any, key: str) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise expected_error(key, expected, value, suggestion(value, choices))

    return convert


def text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise expected_error(key, "a non-empty string", value)
    return str(value)  # drops the Interpolated marker


optional_text = optional(text)


def secret(value: Any, key: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise expected_error(key, "a string (quote it)", value, secret=True)
    return str(value)


def names(value: Any, key: str) -> tuple[str, ...]:
    """A list of names, or one comma-separated string (handy from ${VAR})."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, list):
        raise expected_error(key, "a list of names", value)
    return tuple(text(item, f"{key}[{i}]") for i, item in enumerate(value))


def file_mode(value: Any, key: str) -> int:
    # YAML 1.1 reads an unquoted 0777 as octal already; strings are octal too.
    if isinstance(value, str) and re.fullmatch(r"\s*(0o)?[0-7]{1,4}\s*", value):
        value = int(value.strip(), 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise expected_error(key, "a file mode like '0777' or '0700'", value)
    return value


# At most 256: a cancel key's low byte names its worker (proxy/core/peers.py).
_worker_count = integer(1, 256, expected="an integer from 1 to 256 or 'auto'")


def workers(value: Any, key: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(os.cpu_count() or 1, 256)
    return _worker_count(value, key)


# -- durations -----------------------------------------------------------------------

_DURATION = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-z]*)\s*")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_FRACTIONS = {"ms": 1000.0, "us": 1_000_000.0}  # divided: 250ms is exactly 0.25
_DURATION_EXPECTED = "a duration like '250ms', '5s', '10m', '1h', '1d' or 0 for off"


def parse_duration(value: Any, key: str) -> float:
    """Seconds as a float from 5, 0.25, "250ms", "5s", "10m", "1h", "1d"; 0 = off."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        number, unit = float(match[1]), match[2]
        if unit in _DURATION_UNITS:
            seconds = number * _DURATION_UNITS[unit]
        elif unit in _DURATION_FRACTIONS:
            seconds = number / _DURATION_FRACTIONS[unit]
    if seconds is None or not math.isfinite(seconds):
        raise expected_error(key, _DURATION_EXPECTED, value)
    if seconds < 0:
        raise expected_error(key, _DURATION_EXPECTED, value, " (durations cannot be negative)")
    return seconds


def positive_duration(value: Any, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise expected_error(key, "a duration longer than 0 like '1s' or '60s'", value)
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: parse_duration(format_duration(x)) == x."""
    if seconds == 0:
        return "0"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count = seconds / size
        if count.is_integer() and count * size == seconds:
            return f"{int(count)}{unit}"
    millis = seconds * 1000
    if millis.is_integer() and millis / 1000 == seconds:
        return f"{int(millis)}ms"
    return f"{seconds!r}s"


# -- sizes ---------------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+)\s*([a-z]*)\s*", re.IGNORECASE)
# PostgreSQL's units are powers of 1024 whatever their spelling ("1GB" = 1 GiB).
_SIZE_UNITS = {"": 0, "b": 0, "k": 10, "kb": 10, "kib": 10, "m": 20, "mb": 20, "mib": 20}
_SIZE_UNITS |= {"g": 30, "gb": 30, "gib": 30, "t": 40, "tb": 40, "tib": 40}


def parse_size(value: Any, key: str) -> int:
    """Bytes from 1048576, "512kB", "64MiB", "1GB" (= 1 GiB, like PostgreSQL)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        shift = _SIZE_UNITS.get(match[2].lower())
        if shift is not None:
            return int(match[1]) << shift
    raise expected_error(key, "a size like '512kB', '64MiB', '1GB' or a number of bytes", value)


def replica_lag(value: Any, key: str) -> ReplicaLag:
    """max_replica_lag: a size ("1MB", WAL bytes) or a duration ("10s"); 0 = off."""
    if value == 0 or value == "0":
        return ReplicaLag()
    if isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        unit = match[2].lower()  # a size ends in B: "1m" would be ambiguous
        if unit in _SIZE_UNITS and unit.endswith("b"):
            return ReplicaLag(bytes=parse_size(value, key))
    if isinstance(value, str) and (match := _DURATION.fullmatch(value)) and match[2]:
        return ReplicaLag(seconds=parse_duration(value, key))
    raise expected_error(key, "WAL bytes like '1MB' or seconds like '10s' (0: off)", value)


def format_size(size: int) -> str:
    """The largest exact binary unit: parse_size(format_size(n)) == n."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"


def packet_size(value: Any, key: str) -> int:
    size = parse_size(value, key)
    if not 1 <= size <= MAX_MESSAGE_SIZE:
        raise key_error(key, f"expected a size between 1 byte and 2GiB-1, got {size}")
    return size

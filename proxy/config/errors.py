"""ConfigError, and the key paths ("pool.size", "databases.app.port") it names.

Every configuration problem, from the YAML file, a pgbouncer.ini, the users
file, the hba file or the TLS files, is one ConfigError that names the file,
the line when known, the key path and what was expected, never a password.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem: str() is "<file>: [line N: ]<key.path>: <message>"."""

    def __init__(self, path: str | None, key: str, message: str, *, line: int | None = None):
        super().__init__(path, key, message)
        self.path = path
        self.key = key
        self.message = message
        self.line = line

    def __str__(self) -> str:
        parts = [self.path or "<config>"]
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.key:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)


def key_error(key: str, message: str) -> ConfigError:
    """An error about KEY; the reader that knows the file fills in path and line."""
    return ConfigError(None, key, message)


def join_key(prefix: str, name: str) -> str:
    """The key path of NAME inside PREFIX ("" is the top level)."""
    return f"{prefix}.{name}" if prefix else name

"""Reading a configuration file's text, for the YAML and the ini reader alike.

UTF-8 with an optional byte-order mark; a file that cannot be read or decoded
is a ConfigError naming it, and for bad UTF-8 the line and byte where it is.
"""

from __future__ import annotations

from pgmux.proxy.config.errors import ConfigError


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8 text (byte {exc.start}, column {column}: {exc.reason})"
        raise ConfigError(path, "", message, line=line) from None

"""Reading a configuration file's text, for the YAML and the ini reader alike.

UTF-8 with an optional byte-order mark; a file that cannot be read or decoded
is a ConfigError naming it.
"""

from __future__ import annotations

from pgmux.proxy.config.errors import ConfigError


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text (byte {exc.start})") from None

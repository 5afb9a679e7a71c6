"""The users file, in PgBouncer's auth_file format.

One user per line: `"username" "secret"`, each field in double quotes with a
quote inside written twice (`""`); anything after the second field is ignored,
as PgBouncer does. Blank lines and lines starting with `#` or `;` are comments.
A secret is a plain password, `md5<32 hex>` (md5(password + username)) or a
SCRAM-SHA-256 verifier as stored in pg_authid. Errors name the file and line,
never the secret.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import TYPE_CHECKING, Literal

from pgmux.proxy.config.errors import ConfigError

if TYPE_CHECKING:
    from pgmux.proxy.config.model import Config

SecretKind = Literal["plain", "md5", "scram-sha-256"]

_MD5 = re.compile(r"md5[0-9a-f]{32}")
_SCRAM_PREFIX = "SCRAM-SHA-256$"
# SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, base64 parts
_SCRAM = re.compile(
    r"SCRAM-SHA-256\$([1-9]\d*):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)"
)


def load_users(config: Config) -> dict[str, str]:
    """The users of CONFIG's auth.users_file; {} when it names none."""
    return load_users_file(config.auth.users_file) if config.auth.users_file else {}


def load_users_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """{username: secret} from PATH; raise ConfigError naming the file and line."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read the users file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"not UTF-8 text (byte {exc.start})") from None
    return parse_users(text, path=name)


def parse_users(text: str, *, path: str | None = None) -> dict[str, str]:
    """{username: secret} from the text of a users file; a later line for the
    same user wins, as in PgBouncer."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        try:
            username, secret = _parse_line(stripped)
        except ValueError as exc:
            raise ConfigError(path, "", str(exc), line=number) from None
        users[username] = secret
    return users


def secret_kind(secret: str) -> SecretKind:
    """What a stored secret is. An "md5..." that is not md5 + 32 hex digits is a
    plain password, as in PgBouncer."""
    if secret.startswith(_SCRAM_PREFIX):
        return "scram-sha-256"
    if _MD5.fullmatch(secret):
        return "md5"
    return "plain"


def _parse_line(line: str) -> tuple[str, str]:
    """(username, secret) from one non-comment line; ValueError says what is wrong."""
    if not line.startswith('"'):
        raise ValueError('expected a quoted user name: "username" "secret"')
    username, end = _quoted_field(line, 0, "the user name")
    if not username:
        raise ValueError("the user name is empty")
    rest = line[end:]
    if not rest.strip():
        raise ValueError(f'user "{username}": the secret is missing: "username" "secret"')
    if not rest[0].isspace() or not rest.lstrip().startswith('"'):
        raise ValueError(f'user "{username}": expected a space, then the secret in double quotes')
    start = end + len(rest) - len(rest.lstrip())
    secret, end = _quoted_field(line, start, f'the secret of user "{username}"')
    if line[end:] and not line[end].isspace():
        raise ValueError(f'user "{username}": expected a space after the secret\'s closing quote')
    if secret.startswith(_SCRAM_PREFIX) and not _valid_scram(secret):
        raise ValueError(f'user "{username}": malformed SCRAM-SHA-256 secret')
    return username, secret


def _quoted_field(line: str, start: int, what: str) -> tuple[str, int]:
    """The field opening with the quote at START, and the index after it."""
    pieces, position = [], start + 1
    while True:
        close = line.find('"', position)
        if close < 0:
            raise ValueError(f"unterminated quote in {what}")
        pieces.append(line[position:close])
        if not line.startswith('"', close + 1):
            return "".join(pieces), close + 1
        pieces.append('"')  # "" is a quote inside the field
        position = close + 2


def _valid_scram(secret: str) -> bool:
    match = _SCRAM.fullmatch(secret)
    if match is None:
        return False
    try:
        salt, stored_key, server_key = (
            base64.b64decode(part, validate=True) for part in match.groups()[1:]
        )
    except (binascii.Error, ValueError):
        return False
    return bool(salt) and len(stored_key) == len(server_key) == 32  # SHA-256 digests

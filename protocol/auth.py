"""Password checks both ways: md5 and SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL does it).

md5 lives here; SCRAM is split over scram.py (secrets, primitives),
scram_client.py and scram_server.py and re-exported.
"""

from __future__ import annotations

import hashlib
import hmac

from .scram import (
    DEFAULT_ITERATIONS,
    MECHANISM,
    ScramSecret,
    make_scram_secret,
    mock_secret,
    parse_scram_secret,
    secret_from_password,
)
from .scram_client import ScramClient
from .scram_server import ScramServer

__all__ = [
    "DEFAULT_ITERATIONS",
    "MECHANISM",
    "ScramClient",
    "ScramSecret",
    "ScramServer",
    "is_md5_hash",
    "make_scram_secret",
    "md5_hash",
    "md5_response",
    "md5_verify",
    "mock_secret",
    "parse_scram_secret",
    "secret_from_password",
]

_HEX = frozenset("0123456789abcdef")


def _md5hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def is_md5_hash(secret: str) -> bool:
    """True for PostgreSQL's stored md5 format: 'md5' + 32 lowercase hex digits."""
    return len(secret) == 35 and secret.startswith("md5") and _HEX.issuperset(secret[3:])


def md5_hash(user: str, password: str) -> str:
    """What PostgreSQL stores for an md5 password: 'md5' + md5hex(password + user)."""
    return "md5" + _md5hex(password.encode() + user.encode())


def md5_response(user: str, secret: str, salt: bytes) -> str:
    """The PasswordMessage a client sends for AuthenticationMD5Password(salt).

    `secret` may be the plain password or its stored md5 hash: the hash is all
    the exchange needs, which is why pgmux can log in with an md5 auth_file.
    """
    stored = secret if is_md5_hash(secret) else md5_hash(user, secret)
    return "md5" + _md5hex(stored[3:].encode() + salt)


def md5_verify(user: str, secret: str, salt: bytes, response: str) -> bool:
    """Check a client's md5 response; a SCRAM secret can never match."""
    if secret.startswith(MECHANISM + "$"):
        return False
    expected = md5_response(user, secret, salt).encode()
    return hmac.compare_digest(expected, response.encode("utf-8", "surrogatepass"))

"""SCRAM-SHA-256 building blocks shared by ScramClient and ScramServer:
the stored secret format, key derivation and message attribute parsing."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

from .errors import ProtocolError
from .saslprep import saslprep

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # PostgreSQL's scram_iterations default
SALT_LEN = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
RAW_NONCE_LEN = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN
KEY_LEN = 32
GS2_NO_BINDING = b"n,,"  # client does not support channel binding
GS2_NOT_OFFERED = b"y,,"  # client supports it but thinks the server does not
_PREFIX = MECHANISM + "$"


@dataclass(frozen=True)
class ScramSecret:
    """What PostgreSQL keeps in pg_authid.rolpassword for a SCRAM user."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        return (
            f"{_PREFIX}{self.iterations}:{b64encode(self.salt)}"
            f"${b64encode(self.stored_key)}:{b64encode(self.server_key)}"
        )


def parse_scram_secret(text: str) -> ScramSecret | None:
    """'SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>' -> ScramSecret;
    None for anything else (md5 hash, plain text, damaged secret)."""
    if not text.startswith(_PREFIX):
        return None
    head, _, keys = text[len(_PREFIX) :].partition("$")
    iterations, _, salt = head.partition(":")
    stored_key, _, server_key = keys.partition(":")
    if not (iterations.isascii() and iterations.isdigit()) or int(iterations) < 1:
        return None
    try:
        secret = ScramSecret(
            int(iterations), b64decode(salt), b64decode(stored_key), b64decode(server_key)
        )
    except ProtocolError:
        return None
    if not secret.salt or len(secret.stored_key) != KEY_LEN or len(secret.server_key) != KEY_LEN:
        return None
    return secret


def build_secret(password: str, salt: bytes, iterations: int) -> ScramSecret:
    salted = salted_password(password, salt, iterations)
    return ScramSecret(iterations, salt, sha256(client_key_of(salted)), server_key_of(salted))


def make_scram_secret(
    password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """The text PostgreSQL accepts in ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...'."""
    return str(build_secret(password, salt or os.urandom(SALT_LEN), iterations))


def secret_from_password(password: str) -> ScramSecret:
    return build_secret(password, os.urandom(SALT_LEN), DEFAULT_ITERATIONS)


def mock_secret(username: str, mock_key: bytes) -> ScramSecret:
    """A secret for a user that does not exist (like PostgreSQL's scram_mock_salt):
    the salt is stable per username, so probing cannot tell real users apart."""
    digest = hmac.digest(mock_key, username.encode("utf-8", "surrogatepass"), "sha256")
    filler = hmac.digest(mock_key, b"mock keys " + digest, "sha256")
    return ScramSecret(DEFAULT_ITERATIONS, digest[:SALT_LEN], filler, filler)


# --- crypto primitives (RFC 5802 section 3) --------------------------------


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def client_key_of(salted: bytes) -> bytes:
    return hmac_sha256(salted, b"Client Key")


def server_key_of(salted: bytes) -> bytes:
    return hmac_sha256(salted, b"Server Key")


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def make_nonce() -> bytes:
    return base64.b64encode(os.urandom(RAW_NONCE_LEN))


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str | bytes, error: type[ProtocolError] = ProtocolError) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise error("malformed SCRAM message (invalid base64)") from None


# --- message attributes ("r=...,s=...,i=...") ------------------------------


def split_attributes(
    message: bytes, error: type[ProtocolError] = ProtocolError
) -> list[tuple[str, bytes]]:
    """'a=x,b=y' -> [('a', b'x'), ('b', b'y')], keeping order (it matters)."""
    attributes = []
    for part in message.split(b","):
        if len(part) < 2 or part[1:2] != b"=" or not part[:1].isalpha():
            raise error("malformed SCRAM message (expected attribute=value)")
        attributes.append((chr(part[0]), part[2:]))
    return attributes


def expect(
    attributes: list[tuple[str, bytes]],
    index: int,
    name: str,
    error: type[ProtocolError] = ProtocolError,
) -> bytes:
    if index >= len(attributes) or attributes[index][0] != name:
        raise error(f"malformed SCRAM message (expected attribute {name!r})")
    return attributes[index][1]


def is_printable_nonce(nonce: bytes) -> bool:
    # RFC 5802 "printable": %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
    return bool(nonce) and all(0x21 <= c <= 0x7E and c != 0x2C for c in nonce)

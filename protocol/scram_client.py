"""SCRAM-SHA-256 as a client: pgmux logging in to PostgreSQL.

No channel binding (gs2 header "n,,"). Like libpq we send an empty user name:
PostgreSQL takes the user from the startup packet.
"""

from __future__ import annotations

import hmac

from .errors import AuthError, ProtocolError
from .scram import (
    GS2_NO_BINDING,
    b64decode,
    b64encode,
    client_key_of,
    expect,
    hmac_sha256,
    is_printable_nonce,
    make_nonce,
    salted_password,
    server_key_of,
    sha256,
    split_attributes,
    xor,
)

MAX_ITERATIONS = 0x7FFFFFFF  # PostgreSQL's scram_iterations is an int
# The most PBKDF2 rounds pgmux computes for a server's salt: 24 times
# PostgreSQL's default of 4096, some 70 ms of one core, during which the event
# loop of every client waits. A server asking more is refused rather than
# obeyed: the count is the server's to choose, the CPU is pgmux's (pgjdbc's
# CVE-2026-42198). Passthrough logins compute nothing and are not bound.
MAX_COMPUTED_ITERATIONS = 100_000
# The longest server-first and server-final message accepted. PostgreSQL's
# are under 200 bytes (a 48-character nonce, a 16-byte salt, a 32-byte
# signature, all in base64); one of kilobytes is not a SCRAM server.
MAX_SERVER_MESSAGE = 1024


class ScramClient:
    """client_first() -> handle_server_first() -> verify_server_final().

    With `password` the keys are derived from the salt the server sends. With
    `client_key` and `server_key` (passthrough: keys recovered by ScramServer
    from a client's proof) no password is needed, but the server must hold the
    very secret those keys came from: pass its `salt` and `iterations` to get a
    clear AuthError instead of a failed proof when the server's secret differs.
    """

    __slots__ = (
        "_client_key",
        "_expected",
        "_first_bare",
        "_nonce",
        "_password",
        "_server_key",
        "_server_signature",
        "_state",
    )

    def __init__(
        self,
        password: str | None = None,
        *,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: str | None = None,
        username: str = "",
        salt: bytes | None = None,
        iterations: int | None = None,
    ) -> None:
        if password is None and (client_key is None or server_key is None):
            raise ValueError("ScramClient needs a password or both client_key and server_key")
        self._expected = (salt, iterations) if salt is not None else None
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = nonce.encode("ascii") if nonce is not None else make_nonce()
        if not is_printable_nonce(self._nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        self._first_bare = b"n=" + _escape_name(username) + b",r=" + self._nonce
        self._server_signature = b""
        self._state = "start"

    @property
    def finished(self) -> bool:
        """The server proved it knows the secret (verify_server_final passed)."""
        return self._state == "done"

    def client_first(self) -> bytes:
        self._advance("start", "sent-first")
        return GS2_NO_BINDING + self._first_bare

    def handle_server_first(self, data: bytes) -> bytes:
        """server-first-message in, client-final-message out."""
        self._advance("sent-first", "sent-final")
        _check_size(data, "server-first-message")
        nonce, salt, iterations = _parse_server_first(data, self._nonce)
        client_key, server_key = self._keys(salt, iterations)
        without_proof = b"c=" + b64encode(GS2_NO_BINDING).encode() + b",r=" + nonce
        auth_message = self._first_bare + b"," + data + b"," + without_proof
        proof = xor(client_key, hmac_sha256(sha256(client_key), auth_message))
        self._server_signature = hmac_sha256(server_key, auth_message)
        return without_proof + b",p=" + b64encode(proof).encode()

    def verify_server_final(self, data: bytes) -> None:
        """Raises AuthError unless the server proved it knows our secret."""
        self._advance("sent-final", "checking")  # "done" only once the proof holds
        _check_size(data, "server-final-message")
        attributes = split_attributes(data, AuthError)
        name, value = attributes[0]
        if name == "e":
            reason = value.decode("ascii", "replace")
            raise AuthError(f"SCRAM authentication failed: {reason}")
        signature = b64decode(expect(attributes, 0, "v", AuthError), AuthError)
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthError("invalid SCRAM server signature")
        self._state = "done"

    def _keys(self, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        if self._password is None:
            assert self._client_key is not None and self._server_key is not None
            if self._expected is not None and self._expected != (salt, iterations):
                raise AuthError("the server's SCRAM secret differs from the one pgmux knows")
            return self._client_key, self._server_key
        if iterations > MAX_COMPUTED_ITERATIONS:
            raise AuthError(
                f"SCRAM iteration count {iterations} exceeds pgmux's limit of "
                f"{MAX_COMPUTED_ITERATIONS}"
            )
        salted = salted_password(self._password, salt, iterations)
        return client_key_of(salted), server_key_of(salted)

    def _advance(self, current: str, after: str) -> None:
        if self._state != current:
            raise ProtocolError(f"SCRAM exchange out of order (in state {self._state})")
        self._state = after


def _parse_server_first(data: bytes, client_nonce: bytes) -> tuple[bytes, bytes, int]:
    attributes = split_attributes(data, AuthError)
    if attributes[0][0] == "m":
        raise AuthError("server requires an unsupported SCRAM extension")
    nonce = expect(attributes, 0, "r", AuthError)
    salt = b64decode(expect(attributes, 1, "s", AuthError), AuthError)
    raw_iterations = expect(attributes, 2, "i", AuthError)
    if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce):
        raise AuthError("invalid SCRAM response (nonce mismatch)")
    if not is_printable_nonce(nonce):
        raise AuthError("malformed SCRAM message (invalid nonce)")
    if not salt:
        raise AuthError("malformed SCRAM message (empty salt)")
    if not raw_iterations.isdigit() or not 1 <= int(raw_iterations) <= MAX_ITERATIONS:
        raise AuthError("malformed SCRAM message (invalid iteration count)")
    return nonce, salt, int(raw_iterations)


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_SERVER_MESSAGE:
        raise AuthError(
            f"malformed SCRAM message ({what} of {len(data)} bytes, limit {MAX_SERVER_MESSAGE})"
        )


def _escape_name(name: str) -> bytes:
    # RFC 5802 saslname: ',' and '=' are escaped as =2C and =3D.
    return name.replace("=", "=3D").replace(",", "=2C").encode()

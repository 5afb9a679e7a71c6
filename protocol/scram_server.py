"""SCRAM-SHA-256 as a server: pgmux checking a client against a stored secret.

Behaves like PostgreSQL's auth-scram.c: the user name inside the exchange is
ignored (the startup packet's counts), channel binding (tls-server-end-point)
is checked when the connection is TLS and the client chose SCRAM-SHA-256-PLUS,
and an unknown user gets a full exchange with a mock salt before failing, so
the reply does not reveal whether the user exists.
"""

from __future__ import annotations

import hmac

from . import sqlstate
from .errors import AuthError, ProtocolError
from .scram import (
    ScramSecret,
    b64decode,
    b64encode,
    expect,
    hmac_sha256,
    is_printable_nonce,
    make_nonce,
    mock_secret,
    sha256,
    split_attributes,
    xor,
)

FAILED = "password authentication failed"
CHANNEL_BINDING_TYPE = b"tls-server-end-point"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"


class ScramServer:
    """handle_client_first() -> handle_client_final(); `client_key` afterwards."""

    __slots__ = (
        "_binding",
        "_doomed",
        "_first_bare",
        "_gs2_header",
        "_nonce",
        "_plus",
        "_secret",
        "_server_first",
        "_server_nonce",
        "_state",
        "client_key",
        "username",
    )

    def __init__(
        self,
        secret: ScramSecret | None,
        *,
        username: str,
        mock_key: bytes,
        nonce: str | None = None,
        channel_binding: bytes | None = None,
        plus: bool = False,
    ) -> None:
        """`channel_binding`: the tls-server-end-point data of a TLS connection
        (None without TLS); `plus`: the client chose SCRAM-SHA-256-PLUS."""
        if plus and channel_binding is None:
            raise ValueError("SCRAM-SHA-256-PLUS needs channel binding data")
        self.username = username
        self._binding = channel_binding
        self._plus = plus
        self._doomed = secret is None
        self._secret = secret if secret is not None else mock_secret(username, mock_key)
        self._server_nonce = nonce.encode("ascii") if nonce is not None else make_nonce()
        if not is_printable_nonce(self._server_nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        self._gs2_header = b""
        self._first_bare = b""
        self._nonce = b""
        self._server_first = b""
        self._state = "start"
        self.client_key: bytes | None = None

    def handle_client_first(self, data: bytes) -> bytes:
        """client-first-message in, server-first-message out."""
        self._advance("start", "sent-first")
        self._gs2_header, self._first_bare, client_nonce = _parse_client_first(
            data, self._plus, self._binding is not None
        )
        self._nonce = client_nonce + self._server_nonce
        secret = self._secret
        self._server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce,
            b64encode(secret.salt).encode(),
            secret.iterations,
        )
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes:
        """client-final-message in, server-final-message out; AuthError on a bad proof."""
        self._advance("sent-first", "done")
        expected = self._gs2_header
        if self._plus:
            assert self._binding is not None
            expected += self._binding
        without_proof, nonce, proof = _parse_client_final(data, expected)
        auth_message = self._first_bare + b"," + self._server_first + b"," + without_proof
        secret = self._secret
        # Always do the whole check, so an unknown user costs the same time.
        client_key = xor(proof, hmac_sha256(secret.stored_key, auth_message))
        key_ok = hmac.compare_digest(sha256(client_key), secret.stored_key)
        nonce_ok = hmac.compare_digest(nonce, self._nonce)
        if self._doomed or not (key_ok and nonce_ok):
            raise AuthError(FAILED)
        self.client_key = client_key
        return b"v=" + b64encode(hmac_sha256(secret.server_key, auth_message)).encode()

    def _advance(self, current: str, after: str) -> None:
        if self._state != current:
            raise ProtocolError(f"SCRAM exchange out of order (in state {self._state})")
        self._state = after


def _parse_client_first(data: bytes, plus: bool, offered: bool) -> tuple[bytes, bytes, bytes]:
    """-> (gs2 header, client-first-message-bare, client nonce)."""
    flag, comma, rest = data.partition(b",")
    authzid, comma2, bare = rest.partition(b",")
    if not (comma and comma2):
        raise ProtocolError("malformed SCRAM message (invalid gs2 header)")
    _check_binding_flag(flag, plus, offered)
    if authzid.startswith(b"a="):
        raise ProtocolError(
            "client uses authorization identity, but it is not supported",
            sqlstate.FEATURE_NOT_SUPPORTED,
        )
    if authzid:
        raise ProtocolError("malformed SCRAM message (invalid gs2 header)")
    gs2_header = flag + b",,"
    attributes = split_attributes(bare)
    if attributes[0][0] == "m":
        raise ProtocolError(
            "client requires an unsupported SCRAM extension", sqlstate.FEATURE_NOT_SUPPORTED
        )
    expect(attributes, 0, "n")  # ignored, like PostgreSQL
    nonce = expect(attributes, 1, "r")
    if not is_printable_nonce(nonce):
        raise ProtocolError("malformed SCRAM message (invalid nonce)")
    return gs2_header, bare, nonce


def _check_binding_flag(flag: bytes, plus: bool, offered: bool) -> None:
    """The gs2 cbind-flag against the mechanism chosen, as auth-scram.c checks it."""
    if flag.startswith(b"p="):
        if not plus:
            raise ProtocolError(
                "The client selected SCRAM-SHA-256 without channel binding, "
                "but the SCRAM message includes channel binding data."
            )
        if flag[2:] != CHANNEL_BINDING_TYPE:
            raise ProtocolError("unsupported SCRAM channel-binding type")
        return
    if flag not in (b"n", b"y"):
        raise ProtocolError("malformed SCRAM message (unexpected channel-binding flag)")
    if plus:
        raise ProtocolError(
            "The client selected SCRAM-SHA-256-PLUS, "
            "but the SCRAM message does not include channel binding data."
        )
    if flag == b"y" and offered:
        # The client thinks we cannot bind: someone stripped -PLUS on the way.
        raise ProtocolError("SCRAM channel binding negotiation error")


def _parse_client_final(data: bytes, gs2_header: bytes) -> tuple[bytes, bytes, bytes]:
    """-> (client-final-message-without-proof, nonce, proof). Extensions are ignored."""
    without_proof, found, raw_proof = data.rpartition(b",p=")
    if not found or b"," in raw_proof:
        raise ProtocolError("malformed SCRAM message (proof must come last)")
    attributes = split_attributes(without_proof)
    binding = b64decode(expect(attributes, 0, "c"))
    nonce = expect(attributes, 1, "r")
    if not hmac.compare_digest(binding, gs2_header):
        raise ProtocolError("SCRAM channel binding check failed")
    proof = b64decode(raw_proof)
    if len(proof) != len(sha256(b"")):
        raise ProtocolError("malformed SCRAM message (invalid proof length)")
    return without_proof, nonce, proof

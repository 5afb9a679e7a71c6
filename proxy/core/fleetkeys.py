"""Cancel keys that name their instance, laid out as PgBouncer's peering does.

PgBouncer (proto.c, objects.c) puts its `peer_id` into bytes 1 and 2 of the
8-byte BackendKeyData (the second and third byte of the pid, little-endian
id), and a time-to-live into the two low bits of the last key byte, issued as
3. A CancelRequest whose key names another peer is forwarded to that peer
with the TTL one lower; the owner compares keys with the TTL bits set again.
pgmux issues and reads the same layout, so pgmux and PgBouncer instances can
share one balancer. The low byte of the pid still names the worker
(core/peers.py) when an instance runs several.

pgmux forwards a request only when its TTL is whole (it came from a client),
so a request travels at most one hop between pgmux instances and can never
loop, even between instances whose peer lists disagree.

Protocol 3.2 keys are 32 bytes: with a shared `peers.secret`, bytes 16..30
carry an HMAC of the pid and the first 16 bytes, so an instance forwards only
a key a member of the fleet issued, and a forged 3.2 key costs no hop.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TTL_MASK = 0x03  # PgBouncer's CANCELLATION_TTL_MASK
_SIGNED_LENGTH = 32
_NONCE = 16


def peer_of(pid: int) -> int:
    """The peer id bytes 1 and 2 of a cancel key (pid bytes) name."""
    return (pid >> 16 & 0xFF) | (pid >> 8 & 0xFF) << 8


def with_peer(pid: int, peer_id: int) -> int:
    """PID with PEER_ID in its second and third byte, the sign bit clear."""
    return (pid & 0x7F0000FF) | (peer_id & 0xFF) << 16 | (peer_id >> 8 & 0xFF) << 8


def ttl_of(key: bytes) -> int:
    return key[-1] & TTL_MASK if key else 0


def with_ttl(key: bytes, ttl: int = TTL_MASK) -> bytes:
    """KEY with its last byte's TTL bits set to TTL (the stored keys carry 3)."""
    if not key:
        return key
    return key[:-1] + bytes([key[-1] & ~TTL_MASK & 0xFF | ttl])


def _mac(secret: str, pid: int, nonce: bytes) -> bytes:
    message = pid.to_bytes(4, "big") + nonce
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()[
        : _SIGNED_LENGTH - _NONCE - 1
    ]


def new_key(length: int, pid: int, secret: str | None) -> bytes:
    """A fresh key for a peered instance: signed when it is long enough and a
    secret is shared; the TTL bits whole."""
    if secret and length == _SIGNED_LENGTH:
        nonce = secrets.token_bytes(_NONCE)
        key = nonce + _mac(secret, pid, nonce) + secrets.token_bytes(1)
    else:
        key = secrets.token_bytes(length)
    return with_ttl(key)


def signed_by_fleet(pid: int, key: bytes, secret: str | None) -> bool:
    """Whether a key may be forwarded: a 32-byte key must carry the fleet's
    signature when a secret is set; short keys (protocol 3.0) cannot."""
    if not secret or len(key) != _SIGNED_LENGTH:
        return True
    expected = _mac(secret, pid, key[:_NONCE])
    return hmac.compare_digest(key[_NONCE : _SIGNED_LENGTH - 1], expected)

"""SASLprep (RFC 4013) of passwords, the way PostgreSQL's pg_saslprep does it.

Both ends must derive the same bytes or SCRAM fails, so this copies
PostgreSQL's quirks: pure ASCII passes untouched, and a password that is not
valid UTF-8 or holds prohibited characters is used as raw bytes instead of
being rejected.
"""

from __future__ import annotations

import stringprep
import unicodedata

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,  # unassigned in Unicode 3.2
)


def saslprep(password: str) -> bytes:
    """The bytes that go into PBKDF2 for `password`."""
    try:
        raw = password.encode()
    except UnicodeEncodeError:
        return _raw_bytes(password)
    if raw.isascii():
        return raw
    prepared = _prepare(password)
    return raw if prepared is None else prepared.encode()


def _prepare(text: str) -> str | None:
    mapped = "".join(_map(c) for c in text)
    if not mapped:
        return None  # PostgreSQL refuses an empty result and falls back to raw
    normalized = unicodedata.normalize("NFKC", mapped)
    # PostgreSQL checks the mapped (not the normalized) characters; so do we.
    if any(check(c) for c in mapped for check in _PROHIBITED):
        return None
    if not _bidi_ok(mapped):
        return None
    return normalized


def _map(char: str) -> str:
    if stringprep.in_table_c12(char):
        return " "  # non-ASCII space
    if stringprep.in_table_b1(char):
        return ""  # "commonly mapped to nothing"
    return char


def _bidi_ok(text: str) -> bool:
    if not any(stringprep.in_table_d1(c) for c in text):
        return True
    if any(stringprep.in_table_d2(c) for c in text):
        return False
    return stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])


def _raw_bytes(password: str) -> bytes:
    # Bytes that were not UTF-8 arrive decoded with surrogateescape: give them
    # back as they were; any other lone surrogate cannot be typed by a client.
    try:
        return password.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return password.encode("utf-8", "surrogatepass")

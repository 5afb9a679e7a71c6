"""Shared struct formats, a message builder and a bounds-checked body cursor.

Builders and parsers in messages.py / parsers.py / startup.py use these so that
every malformed body ends in ProtocolError, never IndexError or struct.error.
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

INT16 = struct.Struct("!h")
UINT16 = struct.Struct("!H")
INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")
# Type byte + Int32 length (which counts itself but not the type byte). Signed,
# so a negative length reads as "invalid" rather than as a huge size.
HEADER = struct.Struct("!Bi")


def message(kind: bytes, body: bytes = b"") -> bytes:
    """One typed message: `kind` (1 byte) + length + body."""
    return kind + INT32.pack(len(body) + 4) + body


def cstr(text: str) -> bytes:
    """A NUL-terminated UTF-8 string, the protocol's String type."""
    return text.encode() + b"\0"


def decode(raw: bytes, what: str = "string") -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"invalid UTF-8 in {what}") from None


class Cursor:
    """Reads protocol fields from a message body, front to back."""

    __slots__ = ("_buf", "_pos", "_what")

    def __init__(self, buf: bytes, what: str = "message") -> None:
        self._buf = buf
        self._pos = 0
        self._what = what

    def _fail(self, problem: str) -> ProtocolError:
        return ProtocolError(f"invalid {self._what}: {problem}")

    def cstring(self) -> bytes:
        end = self._buf.find(b"\0", self._pos)
        if end < 0:
            raise self._fail("missing string terminator")
        raw = self._buf[self._pos : end]
        self._pos = end + 1
        return raw

    def text(self) -> str:
        return decode(self.cstring(), self._what)

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._buf):
            raise self._fail("truncated")
        raw = self._buf[self._pos : self._pos + n]
        self._pos += n
        return raw

    def _unpack(self, fmt: struct.Struct) -> int:
        if self._pos + fmt.size > len(self._buf):
            raise self._fail("truncated")
        (value,) = fmt.unpack_from(self._buf, self._pos)
        self._pos += fmt.size
        return value

    def int16(self) -> int:
        return self._unpack(INT16)

    def uint16(self) -> int:
        return self._unpack(UINT16)

    def int32(self) -> int:
        return self._unpack(INT32)

    def uint32(self) -> int:
        return self._unpack(UINT32)

    def byte(self) -> int:
        if self._pos >= len(self._buf):
            raise self._fail("truncated")
        self._pos += 1
        return self._buf[self._pos - 1]

    def rest(self) -> bytes:
        raw = self._buf[self._pos :]
        self._pos = len(self._buf)
        return raw

    def at_end(self) -> bool:
        return self._pos >= len(self._buf)

    def end(self) -> None:
        """Insist the body was consumed exactly: trailing bytes mean a confused peer."""
        if self._pos != len(self._buf):
            raise self._fail("trailing bytes")

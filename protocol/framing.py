"""Incremental framing of typed messages: type byte + Int32 length (counting itself).

The reader copies a body out only when asked for a whole message; the proxy's
hot path can use `read_header` on its own buffer and forward bytes untouched.
"""

from __future__ import annotations

from . import sqlstate
from .codec import HEADER
from .errors import ProtocolError

HEADER_SIZE = 5
DEFAULT_MAX_SIZE = 1 << 30  # PostgreSQL's own limit (MaxAllocSize)


def read_header(
    buf: bytes | bytearray | memoryview,
    pos: int = 0,
    max_size: int = DEFAULT_MAX_SIZE,
    limit_name: str = "max_packet_size",
) -> tuple[int, int] | None:
    """(type, end offset of the whole message) for the message at `pos`, or None
    when fewer than 5 bytes are there. The body may still be incomplete."""
    if len(buf) - pos < HEADER_SIZE:
        return None
    kind, length = HEADER.unpack_from(buf, pos)
    if length < 4 or length > max_size:
        raise bad_length(length, max_size, limit_name)
    return kind, pos + 1 + length


def bad_length(length: int, limit: int, limit_name: str = "max_packet_size") -> ProtocolError:
    """The error for a length word under 4 (08P01) or over the limit (54000)."""
    if length > limit:
        return ProtocolError(
            f"message of {length} bytes exceeds {limit_name} ({limit})",
            sqlstate.PROGRAM_LIMIT_EXCEEDED,
        )
    return ProtocolError(f"invalid message length {length}", sqlstate.PROTOCOL_VIOLATION)


class MessageReader:
    """Bytes in, (type, body) out. Raises ProtocolError on an impossible length,
    as soon as the header arrives (an oversized body is never buffered).

    Messages of the types in `discard` come out as (type, b"") as soon as their
    header is read, and their bodies are skipped as they arrive, never buffered:
    they may be as long as `discard_max` (a reader that drops rows need not
    hold one)."""

    __slots__ = ("_buf", "_pos", "_skip", "discard", "discard_max", "limit_name", "max_size")

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_SIZE,
        limit_name: str = "max_packet_size",
        discard: frozenset[int] = frozenset(),
        discard_max: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the first unread message in _buf
        self._skip = 0  # bytes of a discarded body still to come
        self.max_size = max_size
        self.limit_name = limit_name  # named in the error for a message over max_size
        self.discard = discard
        self.discard_max = discard_max

    def feed(self, data: bytes) -> None:
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        if self._pos:
            # Drop what was consumed before growing, so _buf holds one partial
            # message at most plus the new data.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> tuple[int, bytes] | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= HEADER_SIZE and buf[pos] in self.discard:
            return self._discarded(buf[pos])
        header = read_header(buf, pos, self.max_size, self.limit_name)
        if header is None:
            return None
        kind, end = header
        if end > len(buf):
            return None
        body = bytes(buf[pos + HEADER_SIZE : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return kind, body

    def _discarded(self, kind: int) -> tuple[int, bytes]:
        header = read_header(self._buf, self._pos, self.discard_max, "the message limit")
        assert header is not None  # the caller saw five bytes
        end = header[1]
        if end >= len(self._buf):
            self._skip = end - len(self._buf)
            self._buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return kind, b""

    @property
    def mid_message(self) -> bool:
        """Part of a message is in, the rest still to come."""
        return bool(self._skip) or len(self._buf) > self._pos

    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    def take_remaining(self) -> bytes:
        """Hand the unread bytes to someone else (e.g. when switching to forwarding)."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

"""Errors raised by the protocol layer; each carries the SQLSTATE a client should see."""

from __future__ import annotations


class ProtocolError(Exception):
    """Malformed or unacceptable bytes from a peer.

    The proxy turns it into an ErrorResponse with `sqlstate` and closes only
    the connection that sent the bytes.
    """

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, sqlstate={self.sqlstate!r})"


class AuthError(ProtocolError):
    """Authentication failed (wrong password, unknown user, bad server proof)."""

    def __init__(self, message: str, sqlstate: str = "28P01") -> None:
        super().__init__(message, sqlstate)


class LegacyProtocolError(ProtocolError):
    """A client asked for protocol 1.x or 2.x: PostgreSQL answers in 2.0's format."""

    def reply(self) -> bytes:
        """The 2.0 ErrorResponse: 'E' and one string, as PostgreSQL 18 sends it."""
        return b"EFATAL:  " + self.message.encode() + b"\n\0"

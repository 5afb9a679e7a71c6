"""The untyped packets a client sends first: StartupMessage, SSLRequest,
GSSENCRequest and CancelRequest (Int32 length + Int32 code + body)."""

from __future__ import annotations

from dataclasses import dataclass

from . import sqlstate
from .codec import INT32, UINT32, Cursor
from .errors import LegacyProtocolError, ProtocolError

PROTOCOL_V3 = 196608  # 3.0
PROTOCOL_V3_2 = 196610  # 3.2: cancel keys of up to 256 bytes
LATEST_MINOR = 2  # the newest 3.x pgmux speaks to clients, as PostgreSQL 18
PROTOCOL_OPTION_PREFIX = "_pq_."  # protocol options, not session parameters
SSL_REQUEST_CODE = 80877103  # 1234.5679
GSSENC_REQUEST_CODE = 80877104  # 1234.5680
CANCEL_REQUEST_CODE = 80877102  # 1234.5678
MAX_STARTUP_PACKET = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
# PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH: a password or SASL message is at most
# this long, so an unauthenticated client cannot make pgmux buffer more.
MAX_AUTH_MESSAGE = 65535
MAX_CANCEL_KEY = 256  # protocol 3.2 allows keys up to 256 bytes
_REQUEST_MAJOR = 1234


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    params: dict[str, str]  # always has "user" and "database"
    options: tuple[str, ...] = ()  # the _pq_.* protocol options asked for, in order

    @property
    def user(self) -> str:
        return self.params["user"]

    @property
    def database(self) -> str:
        return self.params["database"]

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    @property
    def negotiated_minor(self) -> int:
        """The 3.x both sides speak: what the client asked for, at most 3.2."""
        return min(self.minor, LATEST_MINOR)

    @property
    def needs_negotiation(self) -> bool:
        """A NegotiateProtocolVersion is owed: a newer minor or unknown options.

        pgmux understands no protocol option, like PostgreSQL 18.
        """
        return self.minor > LATEST_MINOR or bool(self.options)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    key: bytes


StartupEvent = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


class StartupReader:
    """Bytes in, startup events out.

    SSLRequest and GSSENCRequest may each come once, before the StartupMessage.
    After a StartupMessage or CancelRequest the reader is done and returns None;
    whatever followed is left for `take_remaining`.
    """

    __slots__ = ("_buf", "_done", "_gss_seen", "_ssl_seen", "max_length")

    def __init__(self, max_length: int = MAX_STARTUP_PACKET) -> None:
        self._buf = bytearray()
        self._done = False
        self._ssl_seen = False
        self._gss_seen = False
        self.max_length = max_length

    @property
    def done(self) -> bool:
        return self._done

    @property
    def untouched(self) -> bool:
        """Nothing was fed yet: the next bytes are the connection's first."""
        return not self._buf and not self._ssl_seen and not self._gss_seen

    def direct_tls(self) -> None:
        """TLS started without an SSLRequest: one may not follow inside it."""
        self._ssl_seen = True

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take_remaining(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next_event(self) -> StartupEvent | None:
        if self._done or len(self._buf) < 4:
            return None
        (length,) = INT32.unpack_from(self._buf, 0)
        if length < 8 or length > self.max_length:
            raise ProtocolError("invalid length of startup packet")
        if len(self._buf) < length:
            return None
        (code,) = UINT32.unpack_from(self._buf, 4)
        body = bytes(self._buf[8:length])
        del self._buf[:length]
        return self._decode(code, body)

    def _decode(self, code: int, body: bytes) -> StartupEvent:
        if code == SSL_REQUEST_CODE and not self._ssl_seen:
            self._ssl_seen = True
            return _negotiation(SSLRequest(), body)
        if code == GSSENC_REQUEST_CODE and not self._gss_seen:
            self._gss_seen = True
            return _negotiation(GSSENCRequest(), body)
        if code == CANCEL_REQUEST_CODE:
            self._done = True
            return _cancel_request(body)
        major, minor = code >> 16, code & 0xFFFF
        if major == _REQUEST_MAJOR:
            raise ProtocolError(f"unknown or repeated request code {major}.{minor}")
        if major != 3:
            # PostgreSQL answers a 1.x or 2.x client in the old format it asked for.
            error = LegacyProtocolError if major in (1, 2) else ProtocolError
            raise error(
                f"unsupported frontend protocol {major}.{minor}: "
                f"server supports 3.0 to 3.{LATEST_MINOR}",
                sqlstate.FEATURE_NOT_SUPPORTED,
            )
        self._done = True
        params = _startup_params(body)
        options = tuple(name for name in params if name.startswith(PROTOCOL_OPTION_PREFIX))
        for name in options:
            del params[name]
        return StartupMessage(code, _complete(params), options)


def _negotiation(event: SSLRequest | GSSENCRequest, body: bytes) -> SSLRequest | GSSENCRequest:
    if body:
        raise ProtocolError(f"invalid length of {type(event).__name__}")
    return event


def _cancel_request(body: bytes) -> CancelRequest:
    # 4-byte pid + secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
    if not 8 <= len(body) <= 4 + MAX_CANCEL_KEY:
        raise ProtocolError("invalid length of CancelRequest")
    (pid,) = UINT32.unpack_from(body, 0)
    return CancelRequest(pid, body[4:])


def _startup_params(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\0"):
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    cursor = Cursor(body, "startup packet")
    params: dict[str, str] = {}
    while True:
        name = cursor.text()
        if not name:
            break
        if cursor.at_end():
            raise ProtocolError("invalid startup packet layout: parameter without a value")
        params[name] = cursor.text()
    cursor.end()
    return params


def _complete(params: dict[str, str]) -> dict[str, str]:
    if not params.get("user"):
        raise ProtocolError(
            "no PostgreSQL user name specified in startup packet", sqlstate.INVALID_AUTHORIZATION
        )
    if not params.get("database"):
        params["database"] = params["user"]
    return params

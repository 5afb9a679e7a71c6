"""The request/reply accounting of one client-server link, on bytes (sans-IO).

A transaction pooler may give a server back to the pool only when the server
owes its client nothing: every request that ends in a ReadyForQuery (Query,
Sync, FunctionCall) has had its ReadyForQuery, no extended-protocol batch is
open (Parse/Bind/Describe/Execute/Close sent after the last Sync), the last
ReadyForQuery said the server is outside a transaction (status 'I'), and
neither direction stopped in the middle of a message. That is the release
rule (docs/architecture.md, "Transaction pooling rules"; PgBouncer's
sbuf/server.c does the same counting).

`LinkAccounting` is the reference implementation: feed it the client's bytes
and the server's bytes, split anywhere, and read `owed`, `in_batch`, `copy`,
`tx_status` and `releasable`. The data path (pgmux.proxy.datapath) keeps its
own inlined scanners, because a call per message would cost more than the
whole scan; tests feed the same streams to both and compare.

A client message counts when its 5-byte header has arrived (the data path
forwards the body as it comes); a server message counts when it is whole
(ReadyForQuery's status byte is in its body).
"""

from __future__ import annotations

import enum
from struct import Struct

from pgmux.protocol import msgtypes as mt
from pgmux.protocol import sqlstate
from pgmux.protocol.errors import ProtocolError

HEADER_SIZE = 5
_LENGTH = Struct("!I").unpack_from


class Batch(enum.Enum):
    """What a client message does to the open extended-protocol batch."""

    OPEN = "open"  # the server will answer, but only a Sync brings ReadyForQuery
    CLOSE = "close"  # no batch is open after it
    KEEP = "keep"  # leaves the batch as it was


class Copy(enum.Enum):
    """The COPY sub-protocol the server has entered, as its replies tell."""

    NONE = "none"
    IN = "in"  # CopyInResponse: the client sends CopyData, then CopyDone or CopyFail
    OUT = "out"  # CopyOutResponse: the server sends CopyData, then CopyDone
    BOTH = "both"  # CopyBothResponse (replication)


# The transition table for client messages: (ReadyForQuery owed, batch effect).
# Terminate is not here: it ends the link.
CLIENT_TRANSITIONS: dict[int, tuple[int, Batch]] = {
    mt.QUERY: (1, Batch.CLOSE),
    mt.SYNC: (1, Batch.CLOSE),
    mt.FUNCTION_CALL: (1, Batch.CLOSE),
    mt.PARSE: (0, Batch.OPEN),
    mt.BIND: (0, Batch.OPEN),
    mt.DESCRIBE: (0, Batch.OPEN),
    mt.EXECUTE: (0, Batch.OPEN),
    mt.CLOSE: (0, Batch.OPEN),
    mt.FLUSH: (0, Batch.KEEP),  # asks for the output so far; psycopg sends a lone one
    # Ignored outside a COPY: a batch open before them (and skipping to its Sync
    # after an error) is still open after them.
    mt.COPY_DATA: (0, Batch.KEEP),
    mt.COPY_DONE: (0, Batch.KEEP),
    mt.COPY_FAIL: (0, Batch.KEEP),
}
# Any other type, as the data path treats it: the server may answer, nothing owed yet.
OTHER_CLIENT_MESSAGE = (0, Batch.OPEN)

# Tables the data path's scanners share (module globals: no cost per message).
OWES_READY_FOR_QUERY = frozenset(k for k, (owed, _) in CLIENT_TRANSITIONS.items() if owed)
NO_BATCH = frozenset(k for k, (_, batch) in CLIENT_TRANSITIONS.items() if batch is Batch.CLOSE)
KEEPS_BATCH = frozenset(k for k, (_, batch) in CLIENT_TRANSITIONS.items() if batch is Batch.KEEP)

# Server replies that start a COPY, and those after which none is running.
COPY_STARTS = {
    mt.COPY_IN_RESPONSE: Copy.IN,
    mt.COPY_OUT_RESPONSE: Copy.OUT,
    mt.COPY_BOTH_RESPONSE: Copy.BOTH,
}
COPY_ENDS = frozenset((mt.COMMAND_COMPLETE, mt.ERROR_RESPONSE, mt.READY_FOR_QUERY))


class LinkAccounting:
    """What the server of one link owes its client, from the bytes both sent."""

    def __init__(self, max_packet: int = 0x7FFFFFFF) -> None:
        self.max_packet = max_packet
        self.owed = 0  # ReadyForQuery the server still owes
        self.in_batch = False
        self.copy = Copy.NONE
        self.tx_status = mt.TX_IDLE
        self.terminated = False  # the client sent Terminate
        self.ready_for_query = 0  # ReadyForQuery messages read so far
        self._client_header = b""  # an incomplete header from the client
        self._client_body_left = 0  # body bytes of the client's current message
        self._server_buffer = bytearray()  # an incomplete server message

    # --- the release rule ----------------------------------------------------

    @property
    def client_mid_message(self) -> bool:
        return bool(self._client_header or self._client_body_left)

    @property
    def server_mid_message(self) -> bool:
        return bool(self._server_buffer)

    @property
    def releasable(self) -> bool:
        """The server may go back to the pool: idle, owing nothing, between messages."""
        return (
            self.tx_status == mt.TX_IDLE
            and self.owed == 0
            and not self.in_batch
            and not self.client_mid_message
            and not self.server_mid_message
        )

    # --- client to server ----------------------------------------------------

    def feed_client(self, data: bytes) -> None:
        """Account for bytes the client sent (any split); nothing counts after Terminate."""
        pos, n = 0, len(data)
        while pos < n and not self.terminated:
            if self._client_body_left:
                step = min(self._client_body_left, n - pos)
                self._client_body_left -= step
                pos += step
                continue
            take = min(HEADER_SIZE - len(self._client_header), n - pos)
            self._client_header += data[pos : pos + take]
            pos += take
            if len(self._client_header) == HEADER_SIZE:
                header, self._client_header = self._client_header, b""
                self._client_body_left = self._client_message(header[0], _LENGTH(header, 1)[0])

    def _client_message(self, kind: int, length: int) -> int:
        """Apply one client message's transition; return its body size."""
        # A Flush has no body: PostgreSQL's error for one would leave its server
        # skipping to a Sync after the link gave it back.
        if length < 4 or length > self.max_packet or (kind == mt.FLUSH and length != 4):
            raise ProtocolError(f"invalid message length {length}", sqlstate.PROTOCOL_VIOLATION)
        if kind == mt.TERMINATE:
            self.terminated = True
            return 0
        owed, batch = CLIENT_TRANSITIONS.get(kind, OTHER_CLIENT_MESSAGE)
        self.owed += owed
        if batch is Batch.OPEN:
            self.in_batch = True
        elif batch is Batch.CLOSE:
            self.in_batch = False
        return length - 4

    # --- server to client ----------------------------------------------------

    def feed_server(self, data: bytes) -> int:
        """Account for bytes the server sent (any split); return the ReadyForQuery count read."""
        buffer = self._server_buffer
        buffer += data
        pos, n, seen = 0, len(buffer), 0
        while n - pos >= HEADER_SIZE:
            length = _LENGTH(buffer, pos + 1)[0]
            if length < 4:
                raise ProtocolError(f"invalid message length {length}", sqlstate.PROTOCOL_VIOLATION)
            end = pos + 1 + length
            if end > n:
                break
            seen += self._server_message(buffer[pos], bytes(buffer[pos + HEADER_SIZE : end]))
            pos = end
        del buffer[:pos]
        return seen

    def _server_message(self, kind: int, body: bytes) -> int:
        """Apply one whole server message; 1 when it was a ReadyForQuery."""
        if kind in COPY_ENDS:
            self.copy = Copy.NONE
        elif kind in COPY_STARTS:
            self.copy = COPY_STARTS[kind]
        if kind != mt.READY_FOR_QUERY:
            return 0
        if not body:
            raise ProtocolError("ReadyForQuery without a status", sqlstate.PROTOCOL_VIOLATION)
        self.owed = max(self.owed - 1, 0)  # one the client never asked for owes nothing back
        self.tx_status = body[0]
        self.ready_for_query += 1
        return 1

"""What a server owes its client, request by request (PgBouncer's prepare.c, server side).

When pgmux rewrites a client's extended-protocol traffic it sends the server
messages the client never wrote (a Parse for a statement this server has not
seen, a Close for an evicted one) and leaves out messages the client did write
(a Parse of a statement the server already has, a Close of the client's own
name). The client must still get exactly the replies PostgreSQL would have
sent, in order. So every request sent to a linked server in transaction mode
puts an Entry on the server's ResponseFilter, and the filter walks the
server's reply headers against them: forward, drop (a reply to our own
message), emit a reply the server never sends (a ParseComplete for a cached
statement), or replace an error with the one the client should see.

An ErrorResponse in the extended protocol makes PostgreSQL skip everything up
to the next Sync; the filter drops those entries too and undoes what they had
registered (a client's statement name, a server's prepared statement).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from struct import Struct
from time import monotonic
from typing import TYPE_CHECKING

from pgmux.protocol import messages, msgtypes
from pgmux.protocol.backend import ASKED, HELD_LIMIT, UNASKED, check_notice_fields, refusal
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.extended import command_tag
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.datapath import pending, startup_values

try:  # compile-time declarations (setup.py); without Cython they change nothing
    import cython
except ImportError:
    from pgmux.protocol import cyshim as cython

log = get_logger("pgmux.server")

# The longest reply held to be read whole (ErrorResponse, CommandComplete,
# ParameterStatus, ...; rows and COPY data stream through): the tables of
# protocol.backend allow no more, so a server announcing more is closed.
HOLD_LIMIT = HELD_LIMIT

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection

_LENGTH = Struct("!I").unpack_from
_PACK_LENGTH = Struct("!I").pack

# What a request is waiting for.
PARSE = 1  # ParseComplete '1'
BIND = 2  # BindComplete '2'
CLOSE = 3  # CloseComplete '3'
DESCRIBE = 4  # [ParameterDescription 't'] then RowDescription 'T' or NoData 'n'
EXECUTE = 5  # CommandComplete 'C', EmptyQueryResponse 'I' or PortalSuspended 's'
SYNC = 6  # ReadyForQuery 'Z'
QUERY = 7  # simple Query / FunctionCall: everything up to ReadyForQuery 'Z'
EMIT = 8  # nothing from the server: send `emit` to the client when it is next

_S = ord("S")  # CommandComplete's tag starts with S: SELECT, SET, SHOW
_IDLE = msgtypes.TX_IDLE
_SUSPENDED = msgtypes.PORTAL_SUSPENDED
# Replies that end a request, by the request they end.
_ENDS = {
    msgtypes.PARSE_COMPLETE: PARSE,
    msgtypes.BIND_COMPLETE: BIND,
    msgtypes.CLOSE_COMPLETE: CLOSE,
    msgtypes.ROW_DESCRIPTION: DESCRIBE,
    msgtypes.NO_DATA: DESCRIBE,
    msgtypes.PORTAL_SUSPENDED: EXECUTE,
}


# What the filter does with each reply type (one table lookup per message).
_FORWARD, _RFQ, _END, _COMPLETE, _ERROR, _STATUS, _EMPTY, _COPY, _NOTICE, _NOTIFY = range(10)
_ACTIONS = [_FORWARD] * 256
for _kind in _ENDS:
    _ACTIONS[_kind] = _END
_ACTIONS[msgtypes.READY_FOR_QUERY] = _RFQ
_ACTIONS[msgtypes.COMMAND_COMPLETE] = _COMPLETE
_ACTIONS[msgtypes.ERROR_RESPONSE] = _ERROR
_ACTIONS[msgtypes.PARAMETER_STATUS] = _STATUS
_ACTIONS[msgtypes.EMPTY_QUERY_RESPONSE] = _EMPTY
_ACTIONS[msgtypes.COPY_IN_RESPONSE] = _COPY
_ACTIONS[msgtypes.COPY_BOTH_RESPONSE] = _COPY
_ACTIONS[msgtypes.NOTICE_RESPONSE] = _NOTICE
_ACTIONS[msgtypes.NOTIFICATION_RESPONSE] = _NOTIFY


class Entry:
    """One request sent to the server (or one reply to make up)."""

    __slots__ = ("emit", "error", "failed", "op", "rename", "rollback", "skip", "text")

    def __init__(
        self,
        op: int,
        *,
        skip: bool = False,
        emit: bytes = b"",
        error: bytes = b"",
        rollback: Callable[[], None] | None = None,
        failed: Callable[[], None] | None = None,
        rename: tuple[bytes, bytes] | None = None,
        text: bytes = b"",
    ) -> None:
        self.op = op
        self.skip = skip  # a reply to pgmux's own message: drop it
        self.emit = emit  # EMIT: what to send; QUERY: replaces EmptyQueryResponse
        self.error = error  # replaces the server's ErrorResponse for this request
        self.rollback = rollback  # undo a registration if PostgreSQL skips the request
        self.failed = failed  # instead of rollback when the request itself fails
        self.rename = rename  # (server-side, client) name: errors show the client's
        self.text = text  # query text, for session-state detection


# Entries without options are shared.
PLAIN = {op: Entry(op) for op in (PARSE, BIND, CLOSE, DESCRIBE, EXECUTE, SYNC, QUERY)}


class ResponseFilter:
    """Replies of one linked server, matched against what its client is owed."""

    __slots__ = (
        "entries",
        "hold",
        "made_up_first",
        "restore",
        "restore_entry",
        "restore_held",
        "skip_bytes",
        "skipped_queries",
        "skipping",
    )

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.skipping = False  # an error arrived; PostgreSQL ignores requests until Sync
        self.hold = b""
        self.skip_bytes = 0
        # Queries PostgreSQL skips unread (sent after a failed request, before its
        # Sync): the client counted a ReadyForQuery for each that will never come.
        self.skipped_queries = 0
        self.made_up_first = False  # a made-up reply waits at the head (made_up)
        # A statement reset parameters (startup_values.py): what the client had
        # seen, the ParameterStatus held back since, pgmux's DO when it is sent.
        self.restore: dict[str, str] | None = None
        self.restore_held: list[bytes] = []
        self.restore_entry: Entry | None = None

    @property
    def mid_message(self) -> bool:
        return bool(self.hold or self.skip_bytes)

    def reset(self) -> None:
        self.entries.clear()
        self.skipping = False
        self.hold = b""
        self.skip_bytes = 0
        self.skipped_queries = 0
        self.made_up_first = False
        if self.restore is not None or self.restore_entry is not None:  # rare: no list per reset
            startup_values.disarm(self)

    def push(self, entry: Entry) -> None:
        if self.skipping:
            if entry.op == SYNC:
                self.skipping = False
                self.entries.append(entry)
            elif entry.op == QUERY:
                self.skipped_queries += 1
            return  # PostgreSQL will skip this request: no reply, no fake reply
        self.entries.append(entry)

    # --- the server's replies --------------------------------------------

    @cython.locals(
        n=cython.Py_ssize_t,
        pos=cython.Py_ssize_t,
        run=cython.Py_ssize_t,
        end=cython.Py_ssize_t,
        length=cython.Py_ssize_t,
        kind=cython.Py_ssize_t,
    )
    def received(self, data: bytes, server: ServerConnection, client: ClientConnection) -> None:
        if self.hold:
            data = self.hold + data
            self.hold = b""
        if self.skipped_queries:
            client.expect_rfq -= self.skipped_queries
            self.skipped_queries = 0
        out: list[bytes] = []  # what goes to the client before data[run:pos]
        n = len(data)
        pos = 0
        if self.skip_bytes:
            pos = min(self.skip_bytes, n)
            out.append(data[:pos])
            self.skip_bytes -= pos
        run = pos  # start of the bytes to forward as they are
        ready = False
        now = 0.0  # when the first ReadyForQuery of this chunk was read
        entries = self.entries
        if self.made_up_first and not self.skip_bytes:
            out.append(self.made_up())  # owed before anything the server sends now
        actions = _ACTIONS
        # What the server may send: anything while a reply is owed, else only
        # what PostgreSQL sends unprompted (protocol.backend).
        limits = ASKED if client.expect_rfq > 0 or client.in_batch else UNASKED
        while pos + 5 <= n:
            kind = data[pos]
            length = _LENGTH(data, pos + 1)[0]
            if length > limits[kind] or length < 4:
                self._refuse(server, client, out, data[run:pos], refusal(kind, length, limits))
                return
            end = pos + 1 + length
            action = actions[kind]
            if action == _FORWARD:  # DataRow, RowDescription mid-query, ...
                pos = end
                continue
            if end > n:
                break  # wait for the whole message (HELD_LIMIT at most)
            if action == _RFQ:
                if length != 5 or client.expect_rfq <= 0:
                    reason = refusal(kind, length, limits if length != 5 else UNASKED)
                    self._refuse(server, client, out, data[run:pos], reason)
                    return
                if self.restore is not None:  # a statement reset parameters
                    out.append(data[run:pos])
                    run = pos
                    entry = Entry(QUERY)
                    if startup_values.at_ready(self, client, server, data[pos + 5], out, entry):
                        pos = run = end  # this ReadyForQuery waits for pgmux's DO
                        continue
                client.expect_rfq -= 1
                status = data[pos + 5]
                server.tx_status = status
                if status == _IDLE:
                    if server.pending.changes:
                        pending.transaction_ended(client, server)  # before the release rule
                    if server.parsed_in_xact:
                        server.parsed_in_xact.clear()  # committed: no rollback can undo them now
                if not now:
                    now = monotonic()
                client.stats_query_done(now)
                if entries:
                    op = entries[0].op
                    while op != SYNC and op != QUERY:
                        entries.popleft()  # out of step: never wait for a reply that cannot come
                        if not entries:
                            break
                        op = entries[0].op
                    if entries:
                        entries.popleft()
                        if entries and entries[0].op == EMIT:
                            run = self._emit_after(out, data, run, end)
                # The release rule (protocol.accounting.LinkAccounting.releasable).
                # The translator holds a client's partial message back, so none of
                # it is on this server, but for one it streams (a COPY row).
                translator = client.translator
                ready = (
                    status == _IDLE
                    and client.expect_rfq <= 0
                    and not client.in_batch
                    and not (translator.streaming if translator is not None else client.mid_message)
                )
                limits = ASKED if client.expect_rfq > 0 or client.in_batch else UNASKED
            elif action == _END:
                if entries and entries[0].op == _ENDS[kind]:
                    head = entries.popleft()
                    if kind == _SUSPENDED and head.text:
                        # A row limit (asyncpg's fetchval) ends the Execute without a
                        # tag; only a statement returning rows gets here: a SELECT.
                        client.command_done(b"SELECT", head.text, server)
                    if head.skip:
                        out.append(data[run:pos])
                        run = end
                    if entries and entries[0].op == EMIT:
                        run = self._emit_after(out, data, run, end)
            elif action == _COMPLETE:
                if entries:
                    head = entries[0]
                    op = head.op
                    # Tags alone tell LISTEN, PREPARE, DISCARD ...; SELECT and SET need text.
                    if op in (EXECUTE, QUERY) and (head.text or data[pos + 5] != _S):
                        if head is self.restore_entry:  # pgmux's DO: not the client's
                            out.append(data[run:pos])
                            run = pos = end
                            continue
                        client.command_done(command_tag(data[pos + 5 : end]), head.text, server)
                    if op == EXECUTE:
                        entries.popleft()
                        if entries and entries[0].op == EMIT:
                            run = self._emit_after(out, data, run, end)
            elif action in (_ERROR, _NOTICE, _STATUS):
                try:
                    if action == _STATUS:
                        server.parameter_status(data[pos + 5 : end], client)
                    elif action == _NOTICE:
                        check_notice_fields(data[pos + 5 : end], "NoticeResponse")
                    else:
                        check_notice_fields(data[pos + 5 : end])
                except ProtocolError as exc:
                    self._refuse(server, client, out, data[run:pos], exc.message)
                    return
                if action == _STATUS and self.restore is not None:
                    out.append(data[run:pos])  # held until the ReadyForQuery (startup_values)
                    self.restore_held.append(data[pos:end])
                    run = end
                elif action == _ERROR:
                    if server.pending.changes:
                        server.pending.failed = True  # ends an implicit transaction in error
                    timed_out = _timeout_cancel(data[pos + 5 : end], client, server)
                    if self._error(out, data, run, pos, end, client):
                        run = end
                    elif timed_out:
                        out.append(data[run:pos])
                        out.append(timed_out)
                        run = end
            elif action == _EMPTY:
                if entries and entries[0].op != QUERY:
                    entries.popleft()  # EmptyQueryResponse ends an Execute
                    if entries and entries[0].op == EMIT:
                        run = self._emit_after(out, data, run, end)
                elif entries and entries[0].emit:
                    out.append(data[run:pos])  # a DEALLOCATE pgmux answered itself
                    out.append(entries[0].emit)
                    run = end
            elif action == _NOTIFY:
                if _relayed(client):  # the pool's relay delivers it: no duplicate
                    out.append(data[run:pos])
                    run = end
            else:  # _COPY
                server.copy_in = True
            pos = end
        if pos > n:
            # A DataRow or CopyData continues in the next chunk.
            self.skip_bytes = pos - n
            pos = n
        elif pos < n:
            self.hold = data[pos:]
        if out:
            out.append(data[run:pos])
            payload = b"".join(out)
        else:
            payload = data[run:pos]  # the chunk itself when nothing was rewritten
        if payload:
            client.transport.write(payload)
        translator = client.translator
        if translator is not None and translator.held and not self.hold:
            translator.release(client, server)  # a ReadyForQuery may be what it waited for
            return
        if ready and not self.hold and not self.skip_bytes:
            client.transaction_done(server, now)

    def _refuse(
        self,
        server: ServerConnection,
        client: ClientConnection,
        out: list[bytes],
        tail: bytes,
        reason: str,
    ) -> None:
        """A reply breaks the protocol: what came before it still reaches the
        client, then the server is dropped (its client gets 08006)."""
        out.append(tail)
        payload = b"".join(out)
        if payload:
            client.transport.write(payload)
        self.reset()
        server.refuse(reason)

    def made_up(self) -> bytes:
        """The made-up replies at the head, taken off: nothing is owed before them.

        They wait there for the client's Flush or Sync (or the server's next
        reply): PostgreSQL too sends the replies of a batch only then, and a
        client (libpq's pipeline) may tell the difference.
        """
        self.made_up_first = False
        entries = self.entries
        replies = []
        while entries and entries[0].op == EMIT:
            replies.append(entries.popleft().emit)
        return b"".join(replies)

    def _emit_after(self, out: list[bytes], data: bytes, run: int, end: int) -> int:
        """Forward up to `end`, then the made-up replies now at the head; the new run start."""
        out.append(data[run:end])
        entries = self.entries
        while entries and entries[0].op == EMIT:
            out.append(entries.popleft().emit)
        return end

    def _error(
        self, out: list[bytes], data: bytes, run: int, pos: int, end: int, client: ClientConnection
    ) -> bool:
        """An ErrorResponse; returns True when it was replaced (not forwarded as is)."""
        entries = self.entries
        if not entries:
            return False
        head = entries[0]
        if head is self.restore_entry:
            out.append(data[run:pos])  # pgmux's DO failed: not the client's error
            startup_values.failed(data[pos + 5 : end], client)
            return True
        if head.op in (QUERY, SYNC):
            if head.error:
                out.append(data[run:pos])
                out.append(head.error)
                return True
            return False
        # Extended protocol: PostgreSQL now skips every request up to the next Sync.
        error = head.error
        if not error and head.rename is not None:
            error = _renamed(data[pos + 5 : end], *head.rename)
        replaced = bool(error)
        if replaced:
            out.append(data[run:pos])
            out.append(error)
        undo = []
        while entries and entries[0].op != SYNC:
            dropped = entries.popleft()
            if dropped.op == QUERY:  # skipped too: its ReadyForQuery will never come
                client.expect_rfq -= 1
            action = dropped.failed if dropped is head and dropped.failed else dropped.rollback
            if action is not None:
                undo.append(action)
        for action in reversed(undo):  # latest first: each one restores what came before it
            action()
        if not entries:
            self.skipping = True
        return replaced


def _relayed(client: ClientConnection) -> bool:
    """Whether the pool's relay, not this server, gives the client its notifications."""
    return client.pool.settings.listen_mode == "relay" and pending.LISTEN not in client.pinned


def query_clock(client: ClientConnection, server: ServerConnection) -> float:
    """When the oldest request still running began, for query_timeout: at its
    arrival, so the wait for a server counts (as PgBouncer's query_start), or
    at the previous ReadyForQuery (pipelines, session mode)."""
    mark = client.query_mark
    if mark == server.linked_at:  # no ReadyForQuery yet: the request that got this server
        return client.query_started or mark
    return max(client.query_started, mark)


def _timeout_cancel(body: bytes, client: ClientConnection, server: ServerConnection) -> bytes:
    """PostgreSQL answers the cancel query_timeout sent with "user request": the
    ErrorResponse that says the statement's real reason, or b"" for any other error."""
    if not client.query_cancelled or b"C57014\x00" not in body:
        return b""
    if client.query_cancelled != query_clock(client, server):
        return b""  # the cancelled query is over: this is another one's error
    body = body.replace(b"due to user request", b"due to query timeout")
    return b"E" + _PACK_LENGTH(len(body) + 4) + body


def _renamed(body: bytes, server_name: bytes, client_name: bytes) -> bytes:
    """The ErrorResponse with the client's statement name in place of pgmux's, or b""."""
    quoted = b'"' + server_name + b'"'
    if quoted not in body:
        return b""
    body = body.replace(quoted, b'"' + client_name + b'"')
    return b"E" + _PACK_LENGTH(len(body) + 4) + body


def error_entry(code: str, message: str) -> Entry:
    """A request pgmux makes fail on purpose, whose error the client sees as `message`."""
    return Entry(PARSE, error=messages.error_response(code, message, severity="ERROR"))

"""Named prepared statements under transaction pooling (PgBouncer 1.21's scheme).

A client's statement names mean nothing to the server it happens to get, so:

* a global StatementCache maps (query text, parameter types) to one Statement
  with a server-side name of pgmux's own (`pgmux_` and a hash of the text);
* each client keeps its own map, client name -> Statement (Translator.statements);
* each server keeps an LRU of the Statements it has prepared, capped by
  `pool.max_prepared_statements`; the overflow is closed before the next Sync.

The Translator rewrites a client's Parse / Bind / Describe / Close on their way
to the linked server: it renames statements, injects the Parse a server is
missing, answers a Parse of an already prepared statement and a Close of a
client name itself, and turns misuse into PostgreSQL's own errors. Every
request it sends leaves an Entry on the server's ResponseFilter
(replies.py), which keeps the replies in step.

Unnamed statements need care too: a driver may Parse in one implicit
transaction and Bind in the next (pg8000), which may run on another server,
so a client's last unnamed Parse is replayed where it is missing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from struct import Struct
from typing import TYPE_CHECKING

from pgmux.protocol import messages, msgtypes, sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.extended import (
    bind_names,
    build_close_statement,
    build_describe_statement,
    build_parse,
    parse_query_text,
    rename_bind,
    split_parse,
    split_target,
)
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.stats import PoolStats
from pgmux.proxy.datapath import rollbacks, session_state, syncwait, unnamed
from pgmux.proxy.datapath.replies import (
    BIND,
    CLOSE,
    DESCRIBE,
    EMIT,
    EXECUTE,
    PARSE,
    PLAIN,
    QUERY,
    SYNC,
    Entry,
    ResponseFilter,
    error_entry,
)
from pgmux.proxy.datapath.statements import Statement, StatementCache

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection

log = get_logger("pgmux.client")

_LENGTH = Struct("!I").unpack_from
_PARSE, _BIND, _DESCRIBE, _CLOSE = msgtypes.PARSE, msgtypes.BIND, msgtypes.DESCRIBE, msgtypes.CLOSE
_EXECUTE, _SYNC, _QUERY = msgtypes.EXECUTE, msgtypes.SYNC, msgtypes.QUERY
_FUNCTION_CALL, _COPY_DATA = msgtypes.FUNCTION_CALL, msgtypes.COPY_DATA
_COPY_FAIL, _FLUSH = msgtypes.COPY_FAIL, msgtypes.FLUSH
_STREAMED = frozenset((_COPY_DATA, _COPY_FAIL, _FUNCTION_CALL))  # rewritten never, held never
_STATEMENT = msgtypes.TARGET_STATEMENT
_FAILED = msgtypes.TX_FAILED
# server.unnamed_gen of an unnamed statement that may exist but is no client's:
# a generation no client has, so Binds of "" replay their Parse or get 26000.
_NOBODY = -1
_HOLD_LIMIT = 1 << 20  # bytes a client's requests may wait in memory for a Sync's answer

_PARSE_COMPLETE = messages.parse_complete()
_CLOSE_COMPLETE = messages.close_complete()
_DEALLOCATE_DONE = messages.command_complete("DEALLOCATE")
# A Parse PostgreSQL rejects (syntax error): it makes the server skip to the
# next Sync exactly as the client's own failing request would; the client
# sees pgmux's error in its place.
_FAILING_PARSE = build_parse(b"", b"pgmux refused this request\0\0\0")
_EMPTY_QUERY = messages.query("")
_RENAMING_LIMIT = 1_000  # per client; past it, Binds just allocate their entry


class Translator:
    """One client's extended-protocol traffic, rewritten for whichever server it has."""

    # The data path's first (see ClientConnection.__slots__).
    __slots__ = (  # noqa: RUF023  (in order of use, not sorted)
        "_partial",
        "_more",
        "_short",
        "_copy_left",
        "refused",
        "track_text",
        "statements",
        "unnamed_parse",
        "_handlers",
        "unnamed_portal_text",
        "portal_text",
        "unnamed_text",
        "unnamed_gen",
        "limit",
        "cache",
        "stats",
        "_renaming_entries",
        "held",
        "wait_for",
        "spans",
        "open_spans",
        "unsure",
        "unsure_now",
        "unsure_all",
        "_held_size",
    )

    def __init__(
        self,
        cache: StatementCache,
        limit: int,
        session_mode: str,
        stats: PoolStats | None = None,
        listen_mode: str = "pin",
    ) -> None:
        self.cache = cache
        self.stats = stats if stats is not None else PoolStats()  # SHOW STATS' prepared counts
        self.limit = limit  # pool.max_prepared_statements; 0 = names pass through
        self.refused = session_state.refused_kinds(session_mode, listen_mode)
        self.track_text = session_mode != "ignore"
        self.statements: dict[bytes, Statement] = {}
        self.portal_text: dict[bytes, bytes] = {}  # named portals -> watched query text
        self.unnamed_portal_text = b""
        self.unnamed_parse: bytes | None = None
        self.unnamed_text = b""
        self.unnamed_gen = 0
        self._renaming_entries: dict[tuple[int, bytes], Entry] = {}
        self._partial = b""  # a message cut short, held until whole (max_packet_size at most)
        self._more: list[bytes] = []  # its later chunks, joined once: no copy per chunk
        self._short = 0  # bytes it still lacks (1 while its header is cut)
        self._copy_left = 0  # bytes of a message passed through unread
        # What follows a Sync whose requests may yet be skipped (an error before
        # them undoes what they registered) waits here for its ReadyForQuery:
        # translated earlier, it would go by names PostgreSQL may not have.
        self.held: list[bytes] = []
        self.wait_for: Entry | None = None  # that Sync's entry
        self._held_size = 0
        # Where the requests before unanswered Syncs lie, and those since the
        # last, in earlier chunks: read by name only if needed (syncwait.py).
        self.spans: list[syncwait.Span] = []
        self.open_spans: list[syncwait.Span] = []
        # The names (client statement names, query texts) read from them.
        self.unsure: set[syncwait.Name] = set()
        self.unsure_now: set[syncwait.Name] = set()
        self.unsure_all = False  # every named request waits (syncwait.replay)
        self._handlers = {
            _PARSE: self._parse,
            _BIND: self._bind,
            _DESCRIBE: self._describe,
            _CLOSE: self._close,
            _QUERY: self._query,
        }

    @property
    def streaming(self) -> bool:  # a CopyData/CopyFail/FunctionCall on the server, half sent
        return self._copy_left > 0

    def translate(self, data: bytes, server: ServerConnection) -> bytes:
        """Client bytes in, the bytes to write to `server` out (entries pushed)."""
        if self.held:
            self.held.append(data)  # behind what waits: the order stays
            self._held_size += len(data)
            if self._held_size <= _HOLD_LIMIT:
                return b""
            # A client pipelining that much is not held in memory: its requests
            # go on unchecked, as they would without the wait.
            data = b"".join(self.held)
            self._stop_waiting()
        n = len(data)
        if (
            data[0] == _QUERY
            and n > 5
            and not self._partial
            and not self._copy_left
            and n == 1 + _LENGTH(data, 1)[0]
        ):
            return self._query(data[5:], data, server)  # the usual chunk: one whole Query
        if self._partial:
            if len(data) < self._short:
                self._more.append(data)
                self._short -= len(data)
                return b""
            data = b"".join((self._partial, *self._more, data))
            self._partial = b""
            self._more.clear()
        responses: ResponseFilter = server.responses
        handlers = self._handlers
        out: list[bytes] = []
        n = len(data)
        pos = 0
        if self._copy_left:
            pos = min(self._copy_left, n)
            self._copy_left -= pos
        run = 0
        short = 1
        checking = False
        if self.wait_for is not None or self.unsure_now:
            if self.spans and not responses.entries and not (self.unsure or self.unsure_now):
                self.wait_for = None  # answered: nothing before it is unsure (the usual)
                self.spans.clear()
            else:
                checking = syncwait.checking(self, responses)
        named = bool(self.open_spans)  # requests since the last Sync, by name unread
        segment = pos  # where they begin in this chunk
        while pos + 5 <= n:
            kind = data[pos]
            end = pos + 1 + _LENGTH(data, pos + 1)[0]
            if end > n:
                if kind in _STREAMED:
                    # Nothing to rewrite: stream it through (large COPY rows, arguments).
                    if kind == _FUNCTION_CALL:
                        responses.push(PLAIN[QUERY])
                    self._copy_left = end - n
                    pos = n
                short = end - n
                break
            handler = handlers.get(kind)
            if handler is not None and kind != _QUERY:
                if not checking:
                    named = True
                else:
                    names = syncwait.names_of(self, kind, data, pos + 5, end)
                    if (self.unsure or self.unsure_all) and syncwait.depends(
                        self, names, kind, responses
                    ):
                        self.held.append(data[pos:])
                        self._held_size = n - pos
                        out.append(data[run:pos])
                        return b"".join(out)
                    self.unsure_now.update(names)
            if handler is not None:
                message = data[pos:end]
                try:
                    sent = handler(data[pos + 5 : end], message, server)
                except ProtocolError as exc:
                    # A body PostgreSQL would refuse (handlers check before they
                    # change anything): its ERROR, in its place, as it would send.
                    sent = self._fail(server, exc.sqlstate, exc.message)
                if sent is not message:
                    out.append(data[run:pos])
                    out.append(sent)
                    run = end
            elif kind == _EXECUTE:
                responses.push(self._execute_entry(data, pos + 5, end))
            elif kind == _SYNC:
                if len(server.prepared) > self.limit:  # over the cap: close some first
                    closes = self._evict(server)
                    if closes:
                        out.append(data[run:pos])
                        out.append(closes)
                        run = pos
                if checking and self.unsure_now:
                    self.unsure |= self.unsure_now
                    self.unsure_now.clear()
                    self.wait_for = Entry(SYNC)
                    responses.push(self.wait_for)
                elif named:
                    if self.open_spans or segment == pos:
                        self._note_span(data, segment, pos)
                    else:
                        self.spans.append((data, segment, pos))
                    named = False
                    # The shared entry: what waits for it waits for every plain
                    # Sync before it (only a pipelining client ever does).
                    self.wait_for = PLAIN[SYNC]
                    responses.push(self.wait_for)
                    # More in this chunk came after that Sync: read by name from here.
                    checking = end < n and syncwait.checking(self, responses)
                else:
                    responses.push(PLAIN[SYNC])
                segment = end
            elif kind == _FUNCTION_CALL:
                responses.push(PLAIN[QUERY])
            elif kind == _FLUSH and responses.made_up_first:
                server.client_send(responses.made_up())  # the server may have nothing to send
            pos = end
        if pos < n:
            self._partial = data[pos:]
            self._short = short
        if named and segment < pos:
            self.open_spans.append((data, segment, pos))
        out.append(data[run:pos])
        return b"".join(out)

    def _note_span(self, data: bytes, start: int, end: int) -> None:
        """The requests before a Sync, to be read by name if more comes before
        its answer (with their parts from earlier chunks)."""
        if self.open_spans:
            self.spans.extend(self.open_spans)
            self.open_spans.clear()
        if start < end:
            self.spans.append((data, start, end))

    def _stop_waiting(self) -> None:
        self.held.clear()
        self._held_size = 0
        syncwait.forget(self)

    def release(self, client: ClientConnection, server: ServerConnection) -> None:
        """After a ReadyForQuery: what waited goes on if its Sync is answered."""
        if self.wait_for is not None and syncwait.must_wait(self, server.responses):
            return
        data = b"".join(self.held)
        self._stop_waiting()
        if not data:
            return
        try:
            data = self.translate(data, server)
        except Exception as exc:  # a bug must cost this client only
            unnamed.untranslatable(client, server, exc)
            return
        if data:
            server.transport.write(data)

    # --- requests ---------------------------------------------------------

    def _parse(self, body: bytes, message: bytes, server: ServerConnection) -> bytes:
        responses = server.responses
        if responses.skipping:
            return message  # PostgreSQL skips it unread: the old unnamed statement stays
        if body[:1] == b"\0":
            # The unnamed statement goes as it is: PostgreSQL judges its tail itself.
            name, rest = b"", body[1:]
        else:  # renamed, maybe answered from the cache: every byte is checked here
            name, rest = split_parse(body, server.params)
        if self.refused:
            refusal = session_state.refusal(parse_query_text(rest), server.params, self.refused)
            if refusal:
                return self._fail(server, sqlstate.FEATURE_NOT_SUPPORTED, refusal)
        if not name:
            text = parse_query_text(rest)  # before anything changes: it may raise
            restore = unnamed.restorer(self, server)
            self.unnamed_parse = message
            self.unnamed_text = text if session_state.needs_text(text) else b""
            self.unnamed_gen += 1
            server.unnamed_owner = self
            server.unnamed_gen = self.unnamed_gen
            responses.push(Entry(PARSE, rollback=restore, failed=unnamed.dropper(self, server)))
            return message
        if not self.limit:
            responses.push(PLAIN[PARSE])
            return message
        self.stats.total_client_parse_count += 1
        if name in self.statements:
            return self._duplicate(server, name, rest)
        statement = self.cache.get(rest)
        self.statements[name] = statement
        prepared = server.prepared

        def forget_name() -> None:
            if self.statements.get(name) is statement:
                del self.statements[name]

        if statement.name in prepared:
            prepared.move_to_end(statement.name)
            if server.tx_status == _FAILED:
                # In a failed transaction PostgreSQL refuses a Parse (but of COMMIT,
                # ROLLBACK...): let it judge, on the unnamed statement, which then
                # is nobody's.
                server.unnamed_owner = self
                server.unnamed_gen = _NOBODY
                responses.push(Entry(PARSE, rollback=forget_name))
                return build_parse(b"", rest)
            self._emit(server, _PARSE_COMPLETE, forget_name)
            return b""

        def forget_both() -> None:
            forget_name()
            prepared.pop(statement.name, None)

        prepared[statement.name] = statement
        close = rollbacks.parse_sent(server, statement.name)
        responses.push(Entry(PARSE, rollback=forget_both))
        self.stats.total_server_parse_count += 1
        return close + statement.parse

    def _duplicate(self, server: ServerConnection, name: bytes, rest: bytes) -> bytes:
        """A Parse of a name the client already uses.

        PostgreSQL parses and analyses the text (syntax error, unknown table, failed
        transaction) before it finds the name taken, so it is asked, under the
        server-side name of the client's statement; its 42P05 names the client's.
        """
        existing = self.statements[name]
        prefix = self._ensure_prepared(server, existing)
        server.responses.push(Entry(PARSE, rename=(existing.name, name)))
        return prefix + build_parse(existing.name, rest)

    def _bind(self, body: bytes, message: bytes, server: ServerConnection) -> bytes:
        responses = server.responses
        if responses.skipping:
            return message
        # Offsets, not slices: the parameters are copied once, into the renamed Bind.
        portal_end, name_end = bind_names(body, server.params)
        if name_end == portal_end + 1:  # the unnamed statement
            prefix = unnamed.ensure(self, server)
            if prefix is None:
                return unnamed.unknown_statement(server, BIND, b"", message)
            responses.push(PLAIN[BIND])
            if self.track_text:
                self._bound(body[:portal_end], self.unnamed_text)
            return prefix + message if prefix else message
        if not self.limit:
            responses.push(PLAIN[BIND])
            return message
        name = body[portal_end + 1 : name_end]
        statement = self.statements.get(name)
        if statement is None:
            return unnamed.unknown_statement(server, BIND, name, message)
        prefix = self._ensure_prepared(server, statement)
        self.stats.total_bind_count += 1
        responses.push(self._renaming(BIND, name, statement))
        if self.track_text:
            self._bound(body[:portal_end], statement.watched)
        renamed = rename_bind(body, portal_end, name_end, statement.name)
        return prefix + renamed if prefix else renamed

    def _describe(self, body: bytes, message: bytes, server: ServerConnection) -> bytes:
        responses = server.responses
        if responses.skipping:
            return message  # PostgreSQL skips it unread
        if body[:1] == b"P" and body[-1:] == b"\0":  # a portal: nothing to rename
            responses.push(PLAIN[DESCRIBE])
            return message
        target, name = split_target(body, server.params)
        if target != _STATEMENT:
            responses.push(PLAIN[DESCRIBE])
            return message
        if not name:
            prefix = unnamed.ensure(self, server)
            if prefix is None:
                return unnamed.unknown_statement(server, DESCRIBE, name, message)
            responses.push(PLAIN[DESCRIBE])
            return prefix + message if prefix else message
        if not self.limit:
            responses.push(PLAIN[DESCRIBE])
            return message
        statement = self.statements.get(name)
        if statement is None:
            return unnamed.unknown_statement(server, DESCRIBE, name, message)
        prefix = self._ensure_prepared(server, statement)
        responses.push(self._renaming(DESCRIBE, name, statement))
        return prefix + build_describe_statement(statement.name)

    def _renaming(self, op: int, name: bytes, statement: Statement) -> Entry:
        """The entry for a Bind/Describe of a named statement: its errors show the
        client's name (PostgreSQL's name them). Kept per name, as Binds are many."""
        key = (op, name)
        entry = self._renaming_entries.get(key)
        if entry is None or entry.rename is None or entry.rename[0] != statement.name:
            entry = Entry(op, rename=(statement.name, name))
            if len(self._renaming_entries) < _RENAMING_LIMIT:
                self._renaming_entries[key] = entry
        return entry

    def _close(self, body: bytes, message: bytes, server: ServerConnection) -> bytes:
        responses = server.responses
        if responses.skipping:
            return message  # PostgreSQL skips it unread
        target, name = split_target(body, server.params)
        if target == _STATEMENT and not name:
            # Whoever's it was, the server's unnamed statement is gone, and so is
            # this client's (unless PostgreSQL skips the Close).
            restore = unnamed.restorer(self, server)
            self.unnamed_parse = None
            server.unnamed_owner = None
            responses.push(Entry(CLOSE, rollback=restore))
            return message
        if target != _STATEMENT or not name or not self.limit:
            responses.push(PLAIN[CLOSE])
            return message
        # The server keeps the statement for others; only the client's name goes.
        statement = self.statements.pop(name, None)

        def put_back() -> None:
            if statement is not None:
                self.statements.setdefault(name, statement)

        self._emit(server, _CLOSE_COMPLETE, put_back)
        return b""

    def _query(self, body: bytes, message: bytes, server: ServerConnection) -> bytes:
        # A simple Query destroys the unnamed statement, in PostgreSQL and here.
        self.unnamed_parse = None
        server.unnamed_owner = None
        text = body[:-1]
        if self.refused:
            refusal = session_state.refusal(text, server.params, self.refused)
            if refusal:
                server.responses.push(error_entry(sqlstate.FEATURE_NOT_SUPPORTED, refusal))
                return _FAILING_QUERY
        name = session_state.deallocated_name(text) if self.statements else None
        if name is not None and name in self.statements and server.tx_status != _FAILED:
            # The name exists only in pgmux; answer for the server (which, in a
            # failed transaction, refuses it: then it is left to say so).
            del self.statements[name]
            server.responses.push(Entry(QUERY, emit=_DEALLOCATE_DONE))
            return _EMPTY_QUERY
        if self.track_text and session_state.needs_text(text):
            server.responses.push(Entry(QUERY, text=text))
        else:
            server.responses.push(PLAIN[QUERY])
        return message

    def _bound(self, portal: bytes, text: bytes) -> None:
        """Remember which text a portal runs, for the tag of its Execute."""
        if portal:
            self.portal_text[portal] = text
        else:
            self.unnamed_portal_text = text

    def _execute_entry(self, data: bytes, start: int, end: int) -> Entry:
        if not self.track_text:
            return PLAIN[EXECUTE]
        name_end = data.find(b"\0", start, end)
        if name_end < 0:
            return PLAIN[EXECUTE]  # no portal name: PostgreSQL refuses it (08P01)
        if name_end == start:
            text = self.unnamed_portal_text
        else:
            text = self.portal_text.get(data[start:name_end], b"")
        return Entry(EXECUTE, text=text) if text else PLAIN[EXECUTE]

    # --- making sure the server has what the client refers to ------------

    def _ensure_prepared(self, server: ServerConnection, statement: Statement) -> bytes:
        prepared = server.prepared
        if statement.name in prepared:
            prepared.move_to_end(statement.name)
            return b""
        prepared[statement.name] = statement

        def forget() -> None:
            prepared.pop(statement.name, None)

        close = rollbacks.parse_sent(server, statement.name)
        server.responses.push(Entry(PARSE, skip=True, rollback=forget))
        self.stats.total_server_parse_count += 1
        return close + statement.parse

    def _evict(self, server: ServerConnection) -> bytes:
        """Close what exceeds the server's cap (only here, so no open portal loses its plan).
        The caller has found the server over its cap."""
        prepared = server.prepared
        if server.responses.skipping:
            return b""
        closes = []
        while len(prepared) > self.limit:
            name, statement = prepared.popitem(last=False)
            closes.append(build_close_statement(name))
            server.responses.push(
                Entry(CLOSE, skip=True, rollback=_restorer(prepared, name, statement))
            )
        return b"".join(closes)

    # --- replies pgmux makes up -------------------------------------------

    def _emit(self, server: ServerConnection, reply: bytes, rollback: Callable[[], None]) -> None:
        # Even with nothing owed before it, it waits for the client's Flush or
        # Sync, as PostgreSQL's reply would (replies.ResponseFilter.made_up).
        responses = server.responses
        responses.made_up_first = responses.made_up_first or not responses.entries
        responses.push(Entry(EMIT, emit=reply, rollback=rollback))

    def _fail(self, server: ServerConnection, code: str, message: str) -> bytes:
        server.responses.push(error_entry(code, message))
        # The failing Parse drops the server's unnamed statement, unless PostgreSQL
        # skips it after an earlier error: either way it is nobody's now.
        server.unnamed_owner = self
        server.unnamed_gen = _NOBODY
        return _FAILING_PARSE


_FAILING_QUERY = messages.query("pgmux refused this statement")


def _restorer(
    prepared: OrderedDict[bytes, Statement], name: bytes, statement: Statement
) -> Callable[[], None]:
    def restore() -> None:
        prepared[name] = statement

    return restore

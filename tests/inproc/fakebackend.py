"""A scripted PostgreSQL backend for the in-process harness (no sockets).

It reads what a ServerConnection writes (the startup packet, then frontend
messages) and queues the replies PostgreSQL would send, for the harness to
deliver when it chooses, whole or split. What it knows of SQL is a handful
of statements, enough for the pooling rules: BEGIN / COMMIT / ROLLBACK move
the transaction status, a statement containing ``1/0`` fails (and fails the
transaction block it is in), so does the Parse pgmux sends to make a request
fail, ``COPY ... FROM STDIN`` enters COPY, and any other statement returns
one row. The extended protocol answers each message
in order, keeps named statements, skips to Sync after an error, and holds
its replies until a Sync or Flush, as PostgreSQL does.
"""

from __future__ import annotations

from collections.abc import Callable
from struct import Struct

from pgmux.protocol import messages

_LENGTH = Struct("!I").unpack_from
_PACK = Struct("!I").pack

SERVER_PARAMS = {
    "server_version": "17.2",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "application_name": "",
}

ROW = messages.row_description([("x", 23)])
ONE_ROW = messages.data_row(["1"])
SELECT_DONE = messages.command_complete("SELECT 1")
DIVISION_BY_ZERO = messages.error_response("22012", "division by zero", severity="ERROR")
IN_FAILED_BLOCK = messages.error_response(
    "25P02",
    "current transaction is aborted, commands ignored until end of transaction block",
    severity="ERROR",
)
SYNTAX_ERROR = messages.error_response("42601", "syntax error", severity="ERROR")
COPY_IN = b"G" + _PACK(4 + 3) + b"\0\0\0"
_READY = {status: messages.ready_for_query(chr(status)) for status in b"ITE"}


class FakeBackend:
    """One scripted backend: `received` takes what the server wrote, `outbox` holds replies."""

    def __init__(
        self,
        pid: int = 4242,
        on_reply: Callable[[FakeBackend], None] | None = None,
        *,
        record: bool = True,
    ) -> None:
        self.pid = pid
        self.record = record  # keep `log` (a benchmark's millions of messages would not fit)
        self.on_reply = on_reply  # told when replies are ready to deliver
        self.outbox: list[bytes] = []
        self.log: list[tuple[str, bytes]] = []  # (message type, body) of every request
        self.status = ord("I")
        self.terminated = False
        self._buffer = b""
        self._started = False
        self._held: list[bytes] = []  # extended-protocol replies until Sync or Flush
        self._skipping = False  # an extended-protocol error: ignore up to Sync
        self._copy_rows = -1  # >= 0 while in COPY FROM STDIN
        self.statements: dict[bytes, bytes] = {}  # name -> query text
        # (query text, status before) -> (reply, status after): SQL is read once per text
        self._replies: dict[tuple[bytes, int], tuple[bytes, int]] = {}
        self._portal = b""  # the query text of the last bound portal

    # --- input ---------------------------------------------------------------

    def received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        pos, n = 0, len(buffer)
        before = len(self.outbox)
        if not self._started and n >= 8:
            pos = _LENGTH(buffer, 0)[0]
            self._started = True
            self._login_replies()
        while self._started and pos + 5 <= n:
            end = pos + 1 + _LENGTH(buffer, pos + 1)[0]
            if end > n:
                break
            self._message(buffer[pos], buffer[pos + 5 : end])
            pos = end
        self._buffer = buffer[pos:]
        if len(self.outbox) > before and self.on_reply is not None:
            self.on_reply(self)

    def take(self) -> bytes:
        """Everything queued for the server, in one chunk."""
        data = b"".join(self.outbox)
        self.outbox.clear()
        return data

    def kinds(self) -> str:
        """The message types received so far, as letters (the startup packet excluded)."""
        return "".join(kind for kind, _ in self.log)

    def queries(self) -> list[str]:
        return [body[:-1].decode() for kind, body in self.log if kind == "Q"]

    # --- replies ---------------------------------------------------------------

    def _login_replies(self) -> None:
        out = [messages.authentication_ok()]
        out += [messages.parameter_status(k, v) for k, v in SERVER_PARAMS.items()]
        out.append(messages.backend_key_data(self.pid, b"\0\0\0\x07"))
        out.append(_READY[self.status])
        self.outbox.append(b"".join(out))

    def _message(self, kind: int, body: bytes) -> None:
        letter = chr(kind)
        if self.record:
            self.log.append((letter, bytes(body)))
        if self._copy_rows >= 0:
            self._copy_message(letter)
        elif letter == "Q":
            self.outbox.append(self._query(bytes(body[:-1])))
        elif letter == "X":
            self.terminated = True
        elif letter == "S":
            self._skipping = False
            self._held.append(_READY[self.status])
            self._flush()
        elif letter == "H":
            self._flush()
        elif not self._skipping:
            self._extended(letter, bytes(body))

    def _flush(self) -> None:
        if self._held:
            self.outbox.append(b"".join(self._held))
            self._held.clear()

    def _query(self, text: bytes) -> bytes:
        """The whole reply to a simple Query, ReadyForQuery included."""
        sql = text.decode().strip().lower()
        if sql.startswith("copy") and "from stdin" in sql:
            self._copy_rows = 0
            return COPY_IN
        return self._run(text) + _READY[self.status]

    def _run(self, text: bytes) -> bytes:
        """One statement's reply (remembered by text and status)."""
        key = (text, self.status)
        known = self._replies.get(key)
        if known is None:
            known = self._statement(text.decode().strip().lower()), self.status
            self._replies[key] = known
        reply, self.status = known
        return reply

    def _statement(self, sql: str) -> bytes:
        """One statement's reply, moving the transaction status as PostgreSQL does."""
        word = sql.split(None, 1)[0].rstrip(";").upper() if sql else ""
        if self.status == ord("E") and word not in ("ROLLBACK", "ABORT"):
            return IN_FAILED_BLOCK
        if "1/0" in sql:
            if self.status == ord("T"):
                self.status = ord("E")
            return DIVISION_BY_ZERO
        if word in ("BEGIN", "START"):
            self.status = ord("T")
            return messages.command_complete("BEGIN")
        if word in ("COMMIT", "END", "ROLLBACK", "ABORT"):
            self.status = ord("I")
            return messages.command_complete("ROLLBACK" if word == "ABORT" else word)
        if word == "SELECT" or not word:
            return ROW + ONE_ROW + SELECT_DONE if word else messages.empty_query_response()
        return messages.command_complete(word)

    def _copy_message(self, letter: str) -> None:
        if letter == "d":
            self._copy_rows += 1
        elif letter in "cf":
            rows, self._copy_rows = self._copy_rows, -1
            if letter == "c":
                reply = messages.command_complete(f"COPY {rows}")
            else:
                reply = messages.error_response("57014", "COPY from stdin failed", severity="ERROR")
            self.outbox.append(reply + _READY[self.status])

    def _extended(self, letter: str, body: bytes) -> None:
        held = self._held
        if letter == "P":
            name, _, rest = body.partition(b"\0")
            if rest.startswith(b"pgmux refused"):  # pgmux's failing Parse: not SQL
                self._fail(SYNTAX_ERROR)
                return
            self.statements[name] = rest.partition(b"\0")[0]
            held.append(messages.parse_complete())
        elif letter == "B":
            statement = body.split(b"\0", 2)[1]
            if statement not in self.statements:
                self._fail(messages.error_response("26000", "prepared statement does not exist"))
                return
            self._portal = self.statements[statement]
            held.append(messages.bind_complete())
        elif letter == "D":
            if body[:1] == b"S":
                held.append(messages.parameter_description([23]))
            held.append(ROW)
        elif letter == "E":
            reply = self._run(self._portal)
            if reply[:1] == b"E":
                self._fail(reply)
                return
            held.append(ONE_ROW + SELECT_DONE if reply[:1] == b"T" else reply)
        elif letter == "C":
            held.append(messages.close_complete())

    def _fail(self, error: bytes) -> None:
        self._held.append(error)
        self._skipping = True
        if self.status == ord("T"):
            self.status = ord("E")

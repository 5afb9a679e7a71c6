"""The evil client of tests/test_fuzz_evil_client.py: attacks, their bytes, their judge.

An Attack is what one raw-socket session sends after its login: a list of
messages, most of them valid (simple Query, BEGIN/COMMIT, the extended
protocol, COPY in and out, the admin console's SHOW), some corrupted
(`corrupt`), the whole stream cut into writes at chosen offsets, and an
ending: a sentinel that asks for a marker row, a plain disconnect, a
Terminate, or a disconnect in the middle of one more message.

`frame` walks the stream as pgmux's framing does (5-byte headers, a length
between 4 and limits.max_packet_size, Terminate ends the session), so the
judge knows whether the session must end in a close or must still answer
the sentinel. `Replies` reads what pgmux sends and rejects anything that is
not a well-formed backend message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import RawClient, error_fields
from hypothesis import strategies as st

from pgmux.protocol import messages

MAX_PACKET = 1 << 20  # limits.max_packet_size of the pgmux under attack
SINK = "evil_sink"  # a table of one text column in the attacked database
NAMES = ("", "a", "b")  # statement names
PORTALS = ("", "p")
MARKER = "evil-marker"

# Frontend message types: a corrupted type byte is drawn from the others.
FRONTEND_TYPES = frozenset(b"BCDEFHPQSXcdfp")
BACKEND_TYPES = frozenset(b"RSKZTDCENI123nstGHWdcAVv")
_SQLSTATE = re.compile(r"^[0-9A-Z]{5}$")


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def copy_data(data: bytes) -> bytes:
    return message(b"d", data)


def copy_done() -> bytes:
    return message(b"c")


def copy_fail(reason: str = "evil") -> bytes:
    return message(b"f", reason.encode() + b"\0")


# --- valid messages ------------------------------------------------------------------

SIMPLE_SQL = (
    "SELECT 1",
    "SELECT generate_series(1, 3) AS n",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SELECT 1/0",
    "SELEC 1",
    "",
    "SELECT 1; SELECT 2",
    f"INSERT INTO {SINK} VALUES ('q')",
    "COPY (SELECT generate_series(1, 5)) TO STDOUT",
)
EXTENDED_SQL = (
    ("SELECT 1", 0),
    ("SELECT $1::int + 1", 1),
    ("SELECT $1::text || 'x', 2 AS two", 1),
    ("SELECT generate_series(1, 3) AS n", 0),
    ("BEGIN", 0),
    ("COMMIT", 0),
    ("SELEC 1", 0),
    ("COPY (SELECT 1 UNION ALL SELECT 2) TO STDOUT", 0),
)
COPY_IN_SQL = f"COPY {SINK} FROM STDIN"
CONSOLE_SQL = (
    "SHOW POOLS",
    "SHOW SERVERS",
    "SHOW CLIENTS",
    "SHOW STATS",
    "SHOW DATABASES",
    "SHOW LISTS",
    "SHOW HELP",
    "SHOW NOSUCHTHING",
    "SELECT 1",
    "",
)

Messages = list[bytes]


@st.composite
def extended_messages(draw: st.DrawFn, sqls: tuple[tuple[str, int], ...]) -> Messages:
    """A short batch of the extended protocol, in a driver's order or any order."""
    name = draw(st.sampled_from(NAMES))
    portal = draw(st.sampled_from(PORTALS))
    sql, nparams = draw(st.sampled_from(sqls))
    params = [draw(st.sampled_from([b"1", b"7", b"x"])) for _ in range(nparams)]
    parse = messages.parse(name, sql)
    bind = messages.bind(portal, name, params)
    describe = messages.describe(draw(st.sampled_from("SP")), draw(st.sampled_from(NAMES)))
    execute = messages.execute(portal, draw(st.sampled_from([0, 0, 1])))
    close = messages.close(draw(st.sampled_from("SP")), draw(st.sampled_from(NAMES)))
    end = draw(st.sampled_from([messages.sync(), messages.sync(), messages.flush()]))
    if draw(st.booleans()):
        return [parse, bind, messages.describe("P", portal), execute, end]
    pool = [parse, bind, describe, execute, close, messages.flush(), messages.sync()]
    return [*draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5)), end]


@st.composite
def copy_in_messages(draw: st.DrawFn) -> Messages:
    """COPY FROM STDIN by a simple Query or by Parse/Bind/Execute, then data, then its end."""
    rows = [copy_data(draw(st.sampled_from([b"a\n", b"b\nc\n", b"\\N\n", b"x\ty\n"])))]
    rows *= draw(st.integers(0, 3))
    end = draw(st.sampled_from([copy_done(), copy_done(), copy_fail()]))
    if draw(st.booleans()):
        return [messages.query(COPY_IN_SQL), *rows, end]
    start = [messages.parse("", COPY_IN_SQL), messages.bind("", "", []), messages.execute("")]
    return [*start, *rows, end, messages.sync()]


@st.composite
def database_unit(draw: st.DrawFn) -> Messages:
    choice = draw(st.integers(0, 9))
    if choice < 4:
        return [messages.query(draw(st.sampled_from(SIMPLE_SQL)))]
    if choice < 7:
        return draw(extended_messages(EXTENDED_SQL))
    if choice < 9:
        return draw(copy_in_messages())
    # Stray COPY messages, Sync and Flush outside any COPY or batch.
    stray = [copy_data(b"z\n"), copy_done(), copy_fail(), messages.sync(), messages.flush()]
    return [draw(st.sampled_from(stray))]


@st.composite
def console_unit(draw: st.DrawFn) -> Messages:
    if draw(st.booleans()):
        return [messages.query(draw(st.sampled_from(CONSOLE_SQL)))]
    sqls = tuple((sql, 0) for sql in CONSOLE_SQL if sql)
    return draw(extended_messages(sqls))


# --- corruptions ---------------------------------------------------------------------

CORRUPTIONS = (
    "length-below-4",
    "length-too-small",
    "length-too-large",
    "length-huge",
    "truncated-body",
    "no-nul",
    "invalid-utf8",
    "unknown-type",
    "bind-counts",
    "trailing-bytes",
    "flipped-byte",
    "random-bytes",
)
BAD_UTF8 = (b"\xff", b"\xc3", b"\xe4\xb8", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80")
HUGE = (0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 0xFFFFFFFC, MAX_PACKET + 1, 0x40000000)


def _with_body(kind: bytes, body: bytes) -> bytes:
    return message(kind, body)


@st.composite
def bogus_bind(draw: st.DrawFn) -> bytes:
    """A Bind whose counts, format codes or parameter lengths do not add up."""
    int16 = st.sampled_from([-1, -32768, 0, 1, 2, 3, 7, 32767])
    int32 = st.sampled_from([-1, -2, -100, -(1 << 31), 0, 1, 5, 1 << 20, (1 << 31) - 1])
    body = draw(st.sampled_from([b"\0", b"p\0"])) + draw(st.sampled_from([b"\0", b"a\0"]))
    formats = draw(st.lists(int16, max_size=3))
    body += struct.pack("!h", draw(st.sampled_from([len(formats), len(formats) + 1, -1])))
    body += b"".join(struct.pack("!h", f) for f in formats)
    nparams = draw(st.integers(0, 3))
    body += struct.pack("!h", draw(st.sampled_from([nparams, nparams + 2, -1, 32767])))
    for _ in range(nparams):
        length = draw(st.sampled_from([-1, 1, 3, *[draw(int32)]]))
        body += struct.pack("!i", length) + (b"7" * min(max(length, 0), 3))
    if draw(st.booleans()):
        results = draw(st.lists(int16, max_size=2))
        body += struct.pack("!h", len(results)) + b"".join(struct.pack("!h", r) for r in results)
    return message(b"B", body)


@st.composite
def corrupted(draw: st.DrawFn, msg: bytes) -> bytes:
    """MSG with one corruption drawn from CORRUPTIONS."""
    kind, body = msg[:1], msg[5:]
    how = draw(st.sampled_from(CORRUPTIONS))
    if how == "length-below-4":
        return kind + struct.pack("!I", draw(st.integers(0, 3))) + body
    if how == "length-too-small" and body:
        return kind + struct.pack("!I", draw(st.integers(4, len(body) + 3))) + body
    if how == "length-too-large":
        return kind + struct.pack("!I", len(body) + 4 + draw(st.integers(1, 64))) + body
    if how == "length-huge":
        return kind + struct.pack("!I", draw(st.sampled_from(HUGE))) + body
    if how == "truncated-body" and body:
        return _with_body(kind, body[: draw(st.integers(0, len(body) - 1))])
    if how == "no-nul" and b"\0" in body:
        nuls = [i for i, byte in enumerate(body) if byte == 0]
        at = draw(st.sampled_from(nuls))
        return _with_body(kind, body[:at] + body[at + 1 :])
    if how == "invalid-utf8":
        at = draw(st.integers(0, len(body)))
        return _with_body(kind, body[:at] + draw(st.sampled_from(BAD_UTF8)) + body[at:])
    if how == "unknown-type":
        other = draw(st.integers(0, 255).filter(lambda b: b not in FRONTEND_TYPES))
        return bytes([other]) + msg[1:]
    if how == "bind-counts":
        return draw(bogus_bind())
    if how == "trailing-bytes":
        return _with_body(kind, body + draw(st.binary(min_size=1, max_size=8)))
    if how == "flipped-byte" and body:
        at = draw(st.integers(0, len(body) - 1))
        flipped = body[at] ^ draw(st.integers(1, 255))
        return _with_body(kind, body[:at] + bytes([flipped]) + body[at + 1 :])
    # random-bytes (and the cases above that do not fit an empty body)
    noise = draw(st.binary(min_size=1, max_size=48))
    return draw(st.sampled_from([noise, noise + msg, msg + noise]))


# --- an attack -----------------------------------------------------------------------

ENDINGS = ("sentinel", "sentinel", "sentinel", "disconnect", "terminate", "cut")


@dataclass(frozen=True)
class Attack:
    target: str  # "transaction", "session" or "console"
    messages: tuple[bytes, ...]
    corrupted: frozenset[int]  # indexes into messages
    cuts: tuple[int, ...]  # offsets into the stream where a new write starts
    ending: str
    cut_message: bytes = b""  # for the "cut" ending: sent in part, then the disconnect

    @property
    def stream(self) -> bytes:
        return b"".join(self.messages)

    def writes(self) -> list[bytes]:
        stream, bounds = self.stream, [0, *self.cuts, len(self.stream)]
        return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def __repr__(self) -> str:  # what a failing example prints
        shown = [
            ("*" if i in self.corrupted else "") + repr(m) for i, m in enumerate(self.messages)
        ]
        return (
            f"Attack(target={self.target!r}, ending={self.ending!r}, cuts={self.cuts}, "
            f"cut_message={self.cut_message!r}, messages=[\n  " + ",\n  ".join(shown) + "])"
        )


@st.composite
def attacks(draw: st.DrawFn) -> Attack:
    target = draw(st.sampled_from(["transaction", "transaction", "session", "console"]))
    unit = console_unit() if target == "console" else database_unit()
    plain = [m for u in draw(st.lists(unit, min_size=1, max_size=5)) for m in u]
    rate = draw(st.sampled_from([0, 0.15, 0.3, 1.0]))
    bad: set[int] = set()
    out = []
    for i, msg in enumerate(plain):
        if rate and draw(st.floats(0, 1)) < rate:
            bad.add(i)
            msg = draw(corrupted(msg))
        out.append(msg)
    total = sum(len(m) for m in out)
    cuts: list[int] = []
    if total > 1 and draw(st.booleans()):
        cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=3)))
    ending = draw(st.sampled_from(ENDINGS))
    cut_message = b""
    if ending == "cut":
        whole = draw(unit)[0]
        cut_message = whole[: draw(st.integers(1, len(whole) - 1))]
    return Attack(target, tuple(out), frozenset(bad), tuple(cuts), ending, cut_message)


# --- what pgmux makes of the stream --------------------------------------------------


@dataclass(frozen=True)
class Framing:
    verdict: str  # "whole", "partial", "fatal" (a bad length) or "terminated"
    missing: int = 0  # "partial": bytes still owed to the last message (-1: its header)


def frame(stream: bytes, max_packet: int = MAX_PACKET) -> Framing:
    """How a reader of 5-byte headers cuts STREAM into messages."""
    pos, n = 0, len(stream)
    while pos + 5 <= n:
        (length,) = struct.unpack_from("!I", stream, pos + 1)
        if length < 4 or length > max_packet:
            return Framing("fatal")
        if stream[pos] == ord("X"):
            return Framing("terminated")
        pos += 1 + length
    if pos == n:
        return Framing("whole")
    if pos > n:
        return Framing("partial", pos - n)
    return Framing("partial", -1)


def sentinel(target: str, number: int) -> bytes:
    """Ends any COPY, batch and transaction, then asks for a row that says MARKER."""
    reset = copy_fail("sentinel") + messages.sync()
    if target == "console":
        return reset + messages.query("SHOW VERSION")
    marker = f"SELECT '{MARKER}-{number}'"
    return reset + messages.query("ROLLBACK") + messages.query(marker)


def marker_seen(target: str, number: int, values: list[bytes | None]) -> bool:
    if target == "console":
        # SHOW VERSION's one row; no other SHOW the attack sends has one column.
        return len(values) == 1 and (values[0] or b"").startswith(b"pgmux ")
    return values == [f"{MARKER}-{number}".encode()]


# --- what pgmux answers --------------------------------------------------------------


class Malformed(AssertionError):
    pass


@dataclass
class Replies:
    """Every message pgmux sent to the attacker, checked as it arrives."""

    got: list[tuple[bytes, bytes]] = field(default_factory=list)
    closed: bool = False
    marker: bool = False  # the sentinel's row, then its ReadyForQuery

    def errors(self) -> list[dict[str, str]]:
        return [error_fields(body) for kind, body in self.got if kind == b"E"]

    def kinds(self) -> str:
        return "".join(kind.decode("latin-1") for kind, _ in self.got)


def check_reply(kind: bytes, body: bytes) -> None:
    if kind[0] not in BACKEND_TYPES:
        raise Malformed(f"unknown backend message type {kind!r}: {body[:100]!r}")
    if kind in (b"E", b"N"):
        if not body.endswith(b"\0"):
            raise Malformed(f"{kind!r} without its final NUL: {body!r}")
        fields = error_fields(body)
        if not _SQLSTATE.match(fields.get("C", "")) or not fields.get("M"):
            raise Malformed(f"{kind!r} without SQLSTATE or message: {body!r}")
        if kind == b"E" and fields.get("S") not in ("ERROR", "FATAL", "PANIC"):
            raise Malformed(f"ErrorResponse of severity {fields.get('S')!r}: {body!r}")
    elif kind == b"Z" and body not in (b"I", b"T", b"E"):
        raise Malformed(f"ReadyForQuery with status {body!r}")
    elif kind == b"D":
        values(body)  # raises on a bad count or length


def values(body: bytes) -> list[bytes | None]:
    (count,) = struct.unpack_from("!H", body)
    pos, out = 2, []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            out.append(None)
            continue
        if pos + length > len(body):
            raise Malformed(f"DataRow value past its end: {body!r}")
        out.append(body[pos : pos + length])
        pos += length
    if pos != len(body):
        raise Malformed(f"DataRow with trailing bytes: {body!r}")
    return out


async def read_replies(
    raw: RawClient, replies: Replies, target: str, number: int, max_size: int = 4 << 20
) -> None:
    """Read until pgmux closes, or until the sentinel's marker and the ReadyForQuery after it."""
    reader = raw.reader
    waiting_rfq = False
    while True:
        try:
            header = await reader.readexactly(5)
            (length,) = struct.unpack("!I", header[1:])
            if length < 4 or length > max_size:
                raise Malformed(f"reply {header[:1]!r} with length {length}")
            body = await reader.readexactly(length - 4)
        except (asyncio.IncompleteReadError, ConnectionError):
            replies.closed = True
            return
        kind = header[:1]
        check_reply(kind, body)
        replies.got.append((kind, body))
        if kind == b"D" and marker_seen(target, number, values(body)):
            waiting_rfq = True
        elif kind == b"Z" and waiting_rfq:
            replies.marker = True
            return


async def send_writes(raw: RawClient, writes: list[bytes], pause: float) -> bool:
    """Write each chunk on its own; False if pgmux closed the connection first."""
    for chunk in writes:
        if raw.writer.is_closing():
            return False
        try:
            raw.writer.write(chunk)
            await asyncio.wait_for(raw.writer.drain(), 10)
        except (ConnectionError, OSError):
            return False
        if pause:
            await asyncio.sleep(pause)
    return True


def abort(raw: RawClient) -> None:
    """Close at once, unsent bytes or not (an abrupt disconnect)."""
    transport = raw.writer.transport
    with contextlib.suppress(Exception):
        transport.abort()


# --- the attacked pgmux's process ----------------------------------------------------

LOG_MARKS = (
    "Traceback",
    "Fatal error on transport",
    "Unhandled",
    "exception",
    "task_failed",
    "translate_failed",
    "janitor_error",
)


def rss_mb(pid: int) -> float:
    """VmRSS of a process and its children (the workers, if any), in MB."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    total = 0
    for one in pids:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


_RAISED = re.compile(r"^[A-Za-z_.]*(Error|Exception)\b")  # the last line of a traceback


class LogWatch:
    """Reads only what the log gained since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_bad_lines(self) -> list[str]:
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            chunk = log.read()
        cut = chunk.rfind(b"\n") + 1  # a line still being written waits for the next look
        self.offset += cut
        text = chunk[:cut].decode(errors="replace")
        lines = text.splitlines()
        return [line for line in lines if any(m in line for m in LOG_MARKS) or _RAISED.match(line)]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

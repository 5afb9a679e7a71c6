"""Hypothesis strategies for the equivalence tests: scripted client sessions.

A Script is a login (startup parameters) and batches, each the bytes a client
writes at once: simple Queries, COPY FROM STDIN with its data, and extended
pipelines (Parse/Bind/Describe/Execute/Close/Flush) each ending in Sync.
Every statement is deterministic on the fixed schema below: no clock, no
randomness, no backend pid (pg_backend_pid, NOTIFY), no ORDER-less row lists,
no statement that leaves state outside the session (no CREATE of a lasting
object), so a session run on a fresh direct connection and through pgmux
must get the same replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from pgmux.protocol import messages
from pgmux.protocol.codec import message as raw_message

# Created once per test database; restored (RESET_SQL) before every run.
SCHEMA_SQL = """
CREATE TABLE t_items (id int PRIMARY KEY, name text NOT NULL, qty int);
CREATE TABLE t_log (id int, note text);
"""
RESET_SQL = """
TRUNCATE t_items, t_log;
INSERT INTO t_items VALUES (1, 'one', 10), (2, 'two', NULL), (3, 'three', 30),
    (4, 'four', 40), (5, 'five', 50);
INSERT INTO t_log VALUES (1, 'first'), (2, NULL);
"""

# Statements without parameters: simple Query, or Parse with none.
PLAIN_SQL = (
    "SELECT id, name, qty FROM t_items ORDER BY id",
    "SELECT count(*) AS n FROM t_log",
    "SELECT id, note FROM t_log ORDER BY id, note",
    "INSERT INTO t_log VALUES (7, 'seven')",
    "INSERT INTO t_items VALUES (1, 'again', 0)",
    "UPDATE t_items SET qty = qty + 1 WHERE id <= 2",
    "DELETE FROM t_log WHERE id = 7",
    "SELECT 1/0",
    "SELECT * FROM equiv_missing",
    "SELEC 1",
    "SELECT generate_series(1, 5) AS n",
    "SELECT repeat('x', 20000) AS big",
    "SELECT NULL::text AS nothing, 1.5::float8 AS f, 'a''b' AS q",
    "SELECT '2024-02-03 04:05:06+00'::timestamptz AS ts, date '2024-02-03' AS d",
    "SELECT 0.1::float8 + 0.2 AS sum",
    "SELECT interval '1 day 2 hours' AS iv",
    "SHOW DateStyle",
    "SHOW work_mem",
    "SHOW TimeZone",
    "SHOW search_path",
    "SHOW application_name",
    "SHOW extra_float_digits",
    "SHOW client_encoding",
    "DO $$ BEGIN RAISE NOTICE 'equiv notice'; END $$",
    "DO $$ BEGIN RAISE WARNING 'careful' USING DETAIL = 'some detail'; END $$",
    "BEGIN",
    "BEGIN ISOLATION LEVEL REPEATABLE READ",
    "START TRANSACTION READ ONLY",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT s1",
    "RELEASE SAVEPOINT s1",
    "ROLLBACK TO SAVEPOINT s1",
    "SAVEPOINT s2",
    "ROLLBACK TO s2",
    "SET work_mem = '8MB'",
    "SET LOCAL work_mem = '16MB'",
    "RESET work_mem",
    "SET DateStyle = 'German, DMY'",
    "SET datestyle TO iso",
    "RESET DateStyle",
    "SET TimeZone = 'America/New_York'",
    "SET LOCAL TimeZone = 'Asia/Tokyo'",
    "RESET TimeZone",
    "SET application_name = 'equiv_app'",
    "RESET application_name",
    "SET extra_float_digits = 0",
    "SET search_path = pg_catalog, public",
    "SET IntervalStyle = 'sql_standard'",
    "SET default_transaction_read_only = on",
    "SET client_encoding = 'LATIN1'",
    "RESET client_encoding",
    "RESET ALL",
    "DISCARD ALL",
    "PREPARE q1 AS SELECT $1::int * 2",
    "EXECUTE q1(21)",
    "DEALLOCATE q1",
    "DEALLOCATE ALL",
    "DECLARE c1 CURSOR FOR SELECT id FROM t_items ORDER BY id",
    "FETCH 2 FROM c1",
    "CLOSE c1",
    "CREATE TEMP TABLE tmp1 (x int)",
    "INSERT INTO tmp1 VALUES (1)",
    # An expression: a temp table's column would name its oid, new in every session.
    "SELECT x + 0 AS x FROM tmp1 ORDER BY x",
    "COPY t_log TO STDOUT",
    "COPY (SELECT id, name FROM t_items ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)",
    "",
)

# Statements with parameters (extended protocol only): (text, parameter count).
PARAM_SQL = (
    ("SELECT $1::int + 1 AS n", 1),
    ("SELECT name FROM t_items WHERE id = $1", 1),
    ("INSERT INTO t_log VALUES ($1, $2)", 2),
    ("SELECT $1::text || $2::text AS cat", 2),
    ("SELECT id FROM t_items WHERE id > $1 ORDER BY id", 1),
)
COPY_IN_SQL = ("COPY t_log FROM STDIN", "COPY t_log (id, note) FROM STDIN WITH (FORMAT csv)")
COPY_ROWS = (b"11\televen\n", b"12\t\\N\n", b"x\ty\n", b"13,csv\n", b"14\n")

STATEMENT_NAMES = ("", "s1", "s2", "s3")
PORTAL_NAMES = ("", "p1")
PARAM_VALUES = (b"1", b"2", b"41", b"abc", None)
INT4_OID = 23
TEXT_OID = 25

# Startup parameters a client may give, each spelled as a client might.
STARTUP_CHOICES = (
    {},
    {"application_name": "equiv"},
    {"DateStyle": "ISO, MDY"},
    {"datestyle": "German"},
    {"datestyle": "sql, dmy"},
    {"DateStyle": "MDY, German"},
    {"datestyle": "postgres"},
    {"TimeZone": "Europe/Paris"},
    {"options": "-c work_mem=5MB"},
    {"search_path": "public"},
    {"extra_float_digits": "2"},
    {"client_encoding": "UTF8"},
    {"IntervalStyle": "postgres_verbose"},
)


@dataclass(frozen=True)
class Msg:
    """One frontend message: its type letter and its fields, readable in a failure."""

    kind: str
    args: tuple[object, ...] = ()

    def wire(self) -> bytes:
        return _ENCODERS[self.kind](*self.args)

    def __repr__(self) -> str:
        return f"{self.kind}{self.args!r}" if self.args else self.kind


def _bind(portal: str, statement: str, params: tuple[bytes | None, ...]) -> bytes:
    return messages.bind(portal, statement, params)


def _parse(name: str, sql: str, oids: tuple[int, ...]) -> bytes:
    return messages.parse(name, sql, oids)


_ENCODERS = {
    "Q": messages.query,
    "P": _parse,
    "B": _bind,
    "D": messages.describe,
    "E": messages.execute,
    "C": messages.close,
    "S": messages.sync,
    "H": messages.flush,
    "d": lambda data: raw_message(b"d", data),
    "c": lambda: raw_message(b"c"),
    "f": messages.copy_fail,
}


@dataclass
class Script:
    """A client session: its startup parameters and what it writes, batch by batch."""

    startup: dict[str, str]
    batches: list[list[Msg]] = field(default_factory=list)

    def wire(self, batch: list[Msg]) -> bytes:
        return b"".join(m.wire() for m in batch)

    @staticmethod
    def readies(batch: list[Msg]) -> int:
        """How many ReadyForQuery the batch gets: one per Query and per Sync."""
        return sum(m.kind in "QS" for m in batch)


# --- units: what a client writes for one request -------------------------------------


@st.composite
def simple_query(draw: st.DrawFn, plain: tuple[str, ...]) -> list[Msg]:
    parts = draw(st.lists(st.sampled_from(plain), min_size=1, max_size=3))
    return [Msg("Q", ("; ".join(parts),))]


@st.composite
def copy_data(draw: st.DrawFn) -> list[Msg]:
    """CopyData rows and the end of the COPY: CopyDone or CopyFail."""
    rows = draw(st.lists(st.sampled_from(COPY_ROWS), max_size=3))
    out = [Msg("d", (row,)) for row in rows]
    if draw(st.integers(0, 4)) == 0:
        out.append(Msg("f", ("client gave up",)))
    else:
        out.append(Msg("c"))
    return out


@st.composite
def copy_in(draw: st.DrawFn) -> list[Msg]:
    """COPY FROM STDIN by simple Query, its data written without waiting for CopyInResponse."""
    return [Msg("Q", (draw(st.sampled_from(COPY_IN_SQL)),)), *draw(copy_data())]


@st.composite
def statement_text(draw: st.DrawFn, plain: tuple[str, ...]) -> tuple[str, int]:
    if draw(st.booleans()):
        return draw(st.sampled_from(PARAM_SQL))
    return draw(st.sampled_from(plain)), 0


@st.composite
def params(draw: st.DrawFn, count: int) -> tuple[bytes | None, ...]:
    # Mostly the right number, sometimes not (PostgreSQL's 08P01).
    if draw(st.integers(0, 9)) == 0:
        count = draw(st.integers(0, 3))
    return tuple(draw(st.lists(st.sampled_from(PARAM_VALUES), min_size=count, max_size=count)))


@st.composite
def parse_msg(draw: st.DrawFn, plain: tuple[str, ...]) -> tuple[Msg, int]:
    sql, count = draw(statement_text(plain))
    oids: tuple[int, ...] = ()
    if count and draw(st.booleans()):
        oids = (INT4_OID,) + (TEXT_OID,) * (count - 1)
    return Msg("P", (draw(st.sampled_from(STATEMENT_NAMES)), sql, oids)), count


@st.composite
def prepare_and_run(draw: st.DrawFn, plain: tuple[str, ...]) -> list[Msg]:
    """Parse, Bind, maybe Describe, Execute: the usual driver request."""
    parse, count = draw(parse_msg(plain))
    name = parse.args[0]
    portal = draw(st.sampled_from(PORTAL_NAMES))
    out = [parse, Msg("B", (portal, name, draw(params(count))))]
    if draw(st.booleans()):
        out.append(Msg("D", ("P", portal)))
    out.append(Msg("E", (portal, draw(st.sampled_from((0, 0, 1, 2))))))
    return out


@st.composite
def reuse(draw: st.DrawFn) -> list[Msg]:
    """Bind and Execute a statement by name, prepared earlier or never."""
    name = draw(st.sampled_from(STATEMENT_NAMES))
    portal = draw(st.sampled_from(PORTAL_NAMES))
    count = draw(st.integers(0, 2))
    return [
        Msg("B", (portal, name, draw(params(count)))),
        Msg("E", (portal, draw(st.sampled_from((0, 1))))),
    ]


@st.composite
def extended_copy_in(draw: st.DrawFn) -> list[Msg]:
    sql = draw(st.sampled_from(COPY_IN_SQL))
    return [Msg("P", ("", sql, ())), Msg("B", ("", "", ())), Msg("E", ("", 0)), *draw(copy_data())]


def _single(draw_msg: st.SearchStrategy[Msg]) -> st.SearchStrategy[list[Msg]]:
    return draw_msg.map(lambda m: [m])


def _target() -> st.SearchStrategy[tuple[str, str]]:
    return st.one_of(
        st.tuples(st.just("S"), st.sampled_from(STATEMENT_NAMES)),
        st.tuples(st.just("P"), st.sampled_from(PORTAL_NAMES)),
    )


def extended_op(plain: tuple[str, ...]) -> st.SearchStrategy[list[Msg]]:
    return st.one_of(
        prepare_and_run(plain),
        prepare_and_run(plain),
        reuse(),
        parse_msg(plain).map(lambda pair: [pair[0]]),
        _single(_target().map(lambda t: Msg("D", t))),
        _single(_target().map(lambda t: Msg("C", t))),
        _single(st.sampled_from(PORTAL_NAMES).map(lambda p: Msg("E", (p, 0)))),
        st.just([Msg("H")]),
        extended_copy_in(),
    )


@st.composite
def pipeline(draw: st.DrawFn, plain: tuple[str, ...]) -> list[Msg]:
    """Extended-protocol requests up to a Sync (two or three Syncs when batched)."""
    ops = draw(st.lists(extended_op(plain), min_size=1, max_size=5))
    return [m for op in ops for m in op] + [Msg("S")]


def unit(plain: tuple[str, ...]) -> st.SearchStrategy[list[Msg]]:
    return st.one_of(
        simple_query(plain), simple_query(plain), copy_in(), pipeline(plain), pipeline(plain)
    )


# Known divergence (test_equivalence.py's xfail test_reset_returns_to_startup_values):
# RESET / DISCARD ALL after startup parameters give the server's values, not the
# client's. Not generated with startup parameters until it is fixed.
RESETTING = ("RESET", "DISCARD ALL")
PLAIN_SQL_NO_RESET = tuple(s for s in PLAIN_SQL if not s.startswith(RESETTING))


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    startup = dict(draw(st.sampled_from(STARTUP_CHOICES)))
    if draw(st.booleans()):
        startup.update(draw(st.sampled_from(STARTUP_CHOICES)))
    plain = PLAIN_SQL_NO_RESET if startup else PLAIN_SQL
    batch = st.lists(unit(plain), min_size=1, max_size=3)
    batches = draw(st.lists(batch, min_size=1, max_size=6))
    return Script(startup, [[m for u in batch for m in u] for batch in batches])

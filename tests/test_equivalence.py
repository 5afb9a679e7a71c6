"""Acceptance: a client sees through pgmux exactly what PostgreSQL sends it.

Hypothesis writes client sessions (tests/equiv_script.py): simple Queries,
extended pipelines with several Syncs, savepoints, errors in the middle of a
pipeline, COPY FROM STDIN ended by CopyDone or CopyFail, COPY TO STDOUT,
SET/RESET, statements prepared and reused by name. Each runs on a fresh
direct connection to PostgreSQL and on a fresh connection through pgmux, in
a transaction-mode and in a session-mode pool, and every message the client
receives must be equal, the login's ParameterStatus (values and order)
included. Only BackendKeyData differs by necessity and is blanked
(tests/equiv_wire.py); no script selects a backend pid or gets a
NotificationResponse.

The tables are restored before each run, so the two runs start alike.

100 generated sessions per mode by default (a few minutes at most);
PGMUX_EQUIV_DEEP=1 runs 2000 per mode, the issue's acceptance run:

    PGMUX_EQUIV_DEEP=1 .venv/bin/python -m pytest -q -p no:cacheprovider \\
        tests/test_equivalence.py --timeout 3000

Hypothesis is derandomized (the same sessions every run) and keeps no
example database.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import os
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from equiv_script import RESET_SQL, SCHEMA_SQL, Msg, Script, scripts
from equiv_wire import Endpoint, Message, WireClient, WireError, normalised, readable
from helpers import APP_PASSWORD, APP_USER, PgmuxFactory, unique
from hypothesis import HealthCheck, given, reject, settings

from pgmux.tempgres import TempPostgres

DEEP = os.environ.get("PGMUX_EQUIV_DEEP") == "1"
EXAMPLES = 2000 if DEEP else 100
MODES = ["transaction", "session"]

pytestmark = pytest.mark.timeout(3600 if DEEP else 300)


@pytest.fixture
def equiv_db(pg: TempPostgres) -> str:
    """A database of the test's own with the scripts' tables, owned by `app`."""
    name = unique("equiv")
    pg.create_database(name, owner=APP_USER)
    pg.sql(f"SET ROLE {APP_USER};" + SCHEMA_SQL, dbname=name)
    return name


@pytest.fixture
def pool_size() -> int:
    # More servers than one session ever holds: a pinned or resetting server
    # never makes the next session wait. A test may give 1 to share a server.
    return 4


def pool_config(mode: str, size: int) -> dict[str, Any]:
    return {"pool": {"mode": mode, "size": size}, "timeouts": {"query_wait": "10s"}}


class Runner:
    """Runs a Script on PostgreSQL and through pgmux and compares the replies."""

    def __init__(self, pg: TempPostgres, mux: Any, dbname: str, loop: asyncio.Runner) -> None:
        self.direct = Endpoint(pg.host, pg.port)
        self.mux = Endpoint(mux.host, mux.port)
        self.dbname = dbname
        self.pg = pg
        self.loop = loop
        self._admin: asyncpg.Connection | None = None

    async def _reset(self) -> None:
        try:
            await self._restore_tables()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._admin = None
            raise AssertionError(f"restoring the tables failed: {exc!r}\n{self._pg_log()}") from exc

    async def _restore_tables(self) -> None:
        if self._admin is None:
            self._admin = await asyncpg.connect(
                host=self.pg.host,
                port=self.pg.port,
                user=self.pg.superuser,
                password=self.pg.password,
                database=self.dbname,
                timeout=15,
                server_settings={"statement_timeout": "20s"},
            )
        await self._admin.execute(RESET_SQL)

    def _skip_if_postgres_crashed(self, mark: int) -> None:
        """PostgreSQL 15.18 (Debian) has been seen to die of a segmentation fault
        in a generated session, on the direct connection as much as through
        pgmux; every connection then ends. Such a session says nothing of pgmux:
        wait for the restart and tell hypothesis to drop it."""
        with open(self.pg.log_path, errors="replace") as log:
            log.seek(mark)
            if "was terminated by signal" not in log.read():
                return
        self._admin = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # refused while it recovers
                self.loop.run(self._reset())
                break
            time.sleep(0.5)
        reject()

    def _pg_log(self) -> str:
        """The end of PostgreSQL's log: why it refused or dropped a connection."""
        with open(self.pg.log_path, errors="replace") as log:
            return "".join(log.readlines()[-40:])

    async def run(self, where: Endpoint, script: Script) -> list[list[Message]]:
        """What the client gets: the login's messages, then each batch's replies.
        A close or a silence ends the run with a marker in place of the replies."""
        await self._reset()
        client = await WireClient.open(where)
        replies: list[list[Message]] = []
        try:
            replies.append(await client.login(APP_USER, APP_PASSWORD, self.dbname, script.startup))
            for batch in script.batches:
                got = await client.exchange(script.wire(batch), script.readies(batch))
                replies.append(normalised(got))
        except (WireError, TimeoutError) as exc:
            replies.append([("!", f"{type(exc).__name__}: {exc}".encode())])
        finally:
            await client.close()
        replies[0] = normalised(replies[0])
        return replies

    def check(self, script: Script) -> None:
        mark = os.path.getsize(self.pg.log_path)
        try:
            expected = self.loop.run(self.run(self.direct, script))
            got = self.loop.run(self.run(self.mux, script))
        except AssertionError:
            self._skip_if_postgres_crashed(mark)
            raise
        self._skip_if_postgres_crashed(mark)
        for step, (want, have) in enumerate(zip(expected, got, strict=False)):
            what = "login" if step == 0 else f"batch {step}: {script.batches[step - 1]!r}"
            if have != want:
                diff = difflib.unified_diff(
                    readable(want), readable(have), "postgres", "pgmux", lineterm=""
                )
                raise AssertionError(f"{what} differs:\n" + "\n".join(diff))
        assert len(got) == len(expected)

    def close(self) -> None:
        if self._admin is not None:
            self.loop.run(self._admin.close())


@pytest.fixture(params=MODES)
def runner(
    request: pytest.FixtureRequest,
    pg: TempPostgres,
    pgmux: PgmuxFactory,
    equiv_db: str,
    pool_size: int,
) -> Iterator[Runner]:
    mux = pgmux(pool_config(request.param, pool_size))
    with asyncio.Runner() as loop:
        run = Runner(pg, mux, equiv_db, loop)
        try:
            yield run
        finally:
            run.close()


def test_generated_sessions_match_postgres(runner: Runner) -> None:
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(script=scripts())
    def check(script: Script) -> None:
        runner.check(script)

    check()


# --- named examples: divergences found and fixed ------------------------------------


def test_plain_login_and_query(runner: Runner) -> None:
    runner.check(Script({}, [[Msg("Q", ("SELECT 1",))]]))


def test_login_reports_parameters_in_postgres_order(runner: Runner) -> None:
    # PostgreSQL reports its parameters in its own order, the client's startup
    # values in their places; pgmux once put the client's at the end.
    startup = {"application_name": "equiv", "TimeZone": "Europe/Paris"}
    runner.check(Script(startup, [[Msg("Q", ("SHOW TimeZone",))]]))


@pytest.mark.parametrize("value", ["German", "sql, dmy", "MDY, German", "postgres", "euro"])
def test_startup_datestyle_spelled_as_postgres_reports_it(runner: Runner, value: str) -> None:
    # PostgreSQL reports DateStyle in its own words ("German" is "German, DMY");
    # pgmux once echoed the client's spelling.
    runner.check(Script({"datestyle": value}, [[Msg("Q", ("SHOW DateStyle",))]]))


def test_unknown_statement_names_get_postgres_own_errors(runner: Runner) -> None:
    # A Bind or Describe of a name the client never prepared goes to
    # PostgreSQL, which writes its error (with its file, line and routine);
    # pgmux once wrote one of its own.
    runner.check(
        Script(
            {},
            [
                [Msg("D", ("S", "s1")), Msg("S")],
                [Msg("B", ("", "s2", ())), Msg("E", ("", 0)), Msg("S")],
                [Msg("P", ("s1", "SELECT 1", ())), Msg("D", ("S", "s3")), Msg("S")],
                [Msg("B", ("", "s1", ())), Msg("E", ("", 0)), Msg("S")],
            ],
        )
    )


@pytest.mark.parametrize("pool_size", [1])
def test_unnamed_statement_left_by_another_client(runner: Runner) -> None:
    # The one server keeps the unnamed statement of the session before; a
    # Describe of the unnamed statement by a client that has none must get
    # PostgreSQL's 26000 each time, even when an error before it makes
    # PostgreSQL skip the first.
    parse = Msg("P", ("", "SELECT $1::int + 1 AS n", (23,)))
    runner.check(Script({}, [[parse, Msg("D", ("S", "")), Msg("S")]]))
    describe = [Msg("D", ("S", "")), Msg("S")]
    failing = [Msg("D", ("P", "p1")), Msg("D", ("S", "")), Msg("S")]
    runner.check(Script({}, [failing + describe + describe, describe]))
    bind = [Msg("B", ("", "", (b"1",))), Msg("E", ("", 0)), Msg("S")]
    runner.check(Script({}, [bind, failing + bind]))


def test_pipeline_after_a_sync_whose_parse_was_skipped(runner: Runner) -> None:
    # An error makes PostgreSQL skip the Parse of s3 up to the Sync; what the
    # client pipelined after that Sync must find s3 unknown. pgmux once
    # rewrote it before the error was known: the second Parse went under the
    # first's server-side name (a statement with another text on the server),
    # and a Parse of the same text under another name got a ParseComplete of
    # pgmux's own for a statement the server never made.
    failing = [Msg("D", ("P", "p1")), Msg("P", ("s3", "SELECT 1 AS one", ())), Msg("S")]
    run = [Msg("B", ("", "s3", ())), Msg("E", ("", 0)), Msg("S")]
    again = [Msg("P", ("s3", "SELECT 2 AS two", ())), *run]
    same_text = [Msg("P", ("s2", "SELECT 1 AS one", ())), Msg("B", ("", "s2", ())), *run[1:]]
    runner.check(Script({}, [failing + again + [Msg("Q", ("SELECT 3",))], run]))
    runner.check(Script({}, [failing + same_text, run]))


def test_invalid_parse_after_an_errored_pipeline(runner: Runner) -> None:
    # A Parse of invalid SQL must get PostgreSQL's syntax error, never a
    # ParseComplete, after a pipeline whose error skipped the same text.
    bad = "SELEC 1"
    errored = [Msg("D", ("P", "p1")), Msg("P", ("s1", bad, ())), Msg("S")]
    again = [Msg("P", ("s2", bad, ())), Msg("S")]
    in_failed = [Msg("Q", ("BEGIN; SELECT 1/0",)), Msg("P", ("s3", bad, ())), Msg("S")]
    runner.check(Script({}, [errored + again, again, in_failed, again, [Msg("Q", ("ROLLBACK",))]]))


def test_long_pipeline_after_an_unanswered_sync(runner: Runner) -> None:
    # More than pgmux keeps waiting in memory (1 MiB) behind a Sync whose
    # Parse an error skipped: it goes on unchecked, and PostgreSQL's own
    # 26000 for the skipped name still reaches the client each time.
    failing = [Msg("D", ("P", "p1")), Msg("P", ("s3", "SELECT 1", ())), Msg("S")]
    run = [Msg("B", ("", "s3", (b"x" * 200,))), Msg("E", ("", 0)), Msg("S")]
    runner.check(Script({}, [failing + run * 6000]))


RESETS = ["RESET application_name", "RESET ALL", "DISCARD ALL", "SET work_mem TO DEFAULT"]


def check_reset_returns_to_startup_values(runner: Runner, sql: str) -> None:
    startup = {"application_name": "equiv", "options": "-c work_mem=5MB"}
    show = "SHOW application_name; SHOW work_mem"
    changed = "SET application_name = 'changed'"
    runner.check(Script(startup, [[Msg("Q", (sql,))], [Msg("Q", (show,))]]))
    # PostgreSQL reports the value that comes back; in a transaction block too
    runner.check(Script(startup, [[Msg("Q", (changed,))], [Msg("Q", (sql,))], [Msg("Q", (show,))]]))
    if not sql.startswith("DISCARD"):  # (not allowed in a transaction block)
        block = [Msg("Q", ("BEGIN",)), Msg("Q", (changed,)), Msg("Q", (sql,))]
        runner.check(Script(startup, [block, [Msg("Q", (show + "; COMMIT",))]]))
    # extended protocol
    extended = [Msg("P", ("", sql, ())), Msg("B", ("", "", ())), Msg("E", ("", 0)), Msg("S")]
    runner.check(Script(startup, [extended, [Msg("Q", (show,))]]))


@pytest.mark.parametrize("sql", RESETS)
def test_reset_returns_to_startup_values(
    runner: Runner, sql: str, request: pytest.FixtureRequest
) -> None:
    # The startup packet's values are a direct session's defaults: RESET and
    # DISCARD ALL go back to them (not to pgmux's login values), and the client
    # gets a ParameterStatus only for a value it sees change.
    if sql.startswith("SET") and request.node.callspec.params["runner"] == "session":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="session mode reads only the tags of replies, and SET ... TO DEFAULT"
                " has the tag of any SET",
            )
        )
    check_reset_returns_to_startup_values(runner, sql)

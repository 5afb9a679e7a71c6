"""Acceptance: through pgmux a driver sees what a direct connection shows it.

Each test drives a real driver through pgmux, in transaction and in session
mode, in a case where a pooler is easy to tell from PostgreSQL: a COPY left
early (psycopg cancels it), a client that reads slower than its query
produces, statements prepared in a rolled-back savepoint, the spelling of
client_encoding.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    direct,
    query_message,
)
from psycopg.pq import TransactionStatus

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

MODES = ["transaction", "session"]


def start(pgmux: PgmuxFactory, mode: str, size: int = 2) -> Any:
    return pgmux({"pool": {"mode": mode, "size": size}})


class Stop(Exception):
    """Raised inside a COPY block to leave it early."""


# -- a COPY left early, a client that reads slowly ------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_leaving_copy_to_stdout_cancels_it(pgmux: PgmuxFactory, mode: str) -> None:
    # psycopg leaves a COPY TO STDOUT block on an exception by cancelling the
    # query; on a direct connection the transaction is then failed. A pooler
    # that reads the whole COPY ahead of the client lets it finish first.
    mux = start(pgmux, mode)
    conn = await connect_psycopg(mux, autocommit=False)
    try:
        with pytest.raises(Stop):
            async with conn.cursor() as cur:
                # More rows than every socket buffer on the way holds, loaded or not.
                copy_sql = "COPY (SELECT generate_series(1, 5000000)) TO STDOUT"
                async with cur.copy(copy_sql) as copy:
                    async for _row in copy.rows():
                        raise Stop
        assert conn.info.transaction_status == TransactionStatus.INERROR
        await conn.rollback()
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
    finally:
        await close_quietly(conn)


async def backend_stays_blocked(pg: TempPostgres, marker: str, seconds: float = 2.0) -> None:
    """The backend running the query tagged MARKER is still writing to its client
    SECONDS after the query began: whoever is in between does not read ahead."""
    conn = await direct(pg, APP_DB)
    sql = (
        "SELECT state, wait_event FROM pg_stat_activity"
        " WHERE query LIKE $1 AND pid <> pg_backend_pid()"
    )
    try:
        deadline = time.monotonic() + seconds
        row = None
        while time.monotonic() < deadline:
            row = await conn.fetchrow(sql, f"%{marker}%")
            if row is None or row["state"] != "active":
                break  # done: pgmux read the whole result while the client did not
            await asyncio.sleep(0.1)
        assert row is not None and tuple(row) == ("active", "ClientWrite")
    finally:
        await close_quietly(conn)


@pytest.mark.parametrize("mode", MODES)
async def test_a_client_that_does_not_read_holds_its_backend(
    pgmux: PgmuxFactory, pg: TempPostgres, mode: str
) -> None:
    # A result (40 MB) far bigger than the socket buffers on its way: the backend must wait for
    # the client (as on a direct connection), not pgmux buffer it all. Once the
    # client has read it, the one server of the pool serves the next client.
    mux = start(pgmux, mode, size=1)
    raw = await RawClient.open(mux)
    other = None
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        marker = "slow_reader_result"
        await raw.send(
            query_message(f"SELECT repeat('x', 16000) AS {marker} FROM generate_series(1, 2500)")
        )
        await backend_stays_blocked(pg, marker)
        rows = 0
        while (msg := await raw.read_message()) is not None and msg[0] != b"Z":
            rows += msg[0] == b"D"
        assert rows == 2500
        if mode == "session":
            await raw.send(b"X\0\0\0\4")  # the next client gets the server once this one left
        other = await connect_psycopg(mux)
        cur = await asyncio.wait_for(other.execute("SELECT 1"), 15)
        assert await cur.fetchone() == (1,)
    finally:
        raw.writer.close()
        await close_quietly(other)


# -- client_encoding in PostgreSQL's spelling ------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("how", "spelling", "reported"),
    [
        ("parameter", "euc-jp", "EUC_JP"),
        ("options", "euc-jp", "EUC_JP"),
        ("environment", "euc-jp", "EUC_JP"),
        ("parameter", "iso-8859-5", "ISO_8859_5"),
        ("parameter", "latin-1", "LATIN1"),
        ("parameter", "shift-jis", "SJIS"),
    ],
)
async def test_client_encoding_is_reported_as_the_server_spells_it(
    pgmux: PgmuxFactory,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    how: str,
    spelling: str,
    reported: str,
) -> None:
    mux = start(pgmux, mode)
    kwargs: dict[str, Any] = {}
    if how == "parameter":
        kwargs["client_encoding"] = spelling
    elif how == "options":
        kwargs["options"] = f"-c client_encoding={spelling}"
    else:
        monkeypatch.setenv("PGCLIENTENCODING", spelling)
    conn = await connect_psycopg(mux, **kwargs)
    try:
        assert conn.info.parameter_status("client_encoding") == reported
        cur = await conn.execute("SHOW client_encoding")
        assert await cur.fetchone() == (reported,)
        assert conn.info.parameter_status("client_encoding") == reported
    finally:
        await close_quietly(conn)


# -- statements that outlive a rolled-back type ------------------------------------

CREATE_TYPE = "CREATE TYPE prepenum AS ENUM ('foo', 'bar', 'baz')"
CREATE_TABLE = "CREATE TABLE preptable (id integer, enum_col prepenum[])"
INSERT_PSYCOPG = "INSERT INTO preptable (enum_col) VALUES (%(enum_col)s::prepenum[])"
INSERT_ASYNCPG = "INSERT INTO preptable (enum_col) VALUES ($1::prepenum[])"


@pytest.mark.parametrize("mode", MODES)
async def test_statements_of_an_abandoned_transaction_are_not_reused(
    pgmux: PgmuxFactory, mode: str
) -> None:
    # Each client prepares (prepare_threshold=0) after creating a type, then
    # leaves mid-transaction: pgmux rolls the server back, and the type is gone.
    # The next client's same text must not run as the old statement, whose
    # parameter is of the old type ("cache lookup failed for type").
    mux = start(pgmux, mode, size=1)
    for _ in range(3):
        conn = await connect_psycopg(mux, autocommit=False, prepare_threshold=0)
        try:
            await conn.execute(CREATE_TYPE)
            await conn.execute(CREATE_TABLE)
            await conn.execute(INSERT_PSYCOPG, {"enum_col": ["foo"]})
        finally:
            await close_quietly(conn)


class Undo(Exception):
    """Raised to roll a savepoint back."""


@pytest.mark.parametrize("mode", MODES)
async def test_statements_of_a_rolled_back_savepoint_are_not_shared(
    pgmux: PgmuxFactory, mode: str
) -> None:
    # asyncpg keeps its statements across a rollback; a new client, whose cache
    # is empty, prepares the same text afresh on a direct connection.
    mux = start(pgmux, mode, size=1)
    for _ in range(3):
        conn = await connect_asyncpg(mux, statement_cache_size=100)
        try:
            async with conn.transaction():
                with pytest.raises(Undo):
                    async with conn.transaction():  # a savepoint
                        await conn.execute(CREATE_TYPE)
                        await conn.execute(CREATE_TABLE)
                        await conn.execute(INSERT_ASYNCPG, ["foo"])
                        raise Undo
                assert await conn.fetchval("SELECT to_regtype('prepenum')") is None
        finally:
            await close_quietly(conn)


@pytest.mark.parametrize("mode", MODES)
async def test_savepoints_rolled_back_in_one_transaction(pgmux: PgmuxFactory, mode: str) -> None:
    # psycopg's own case: it drops its statements (DEALLOCATE ALL) after each
    # ROLLBACK TO SAVEPOINT, and prepares them again in the next round.
    mux = start(pgmux, mode, size=1)
    conn = await connect_psycopg(mux, prepare_threshold=0)
    try:
        async with conn.transaction():
            for _ in range(3):
                with pytest.raises(Undo):
                    async with conn.transaction():
                        await conn.execute(CREATE_TYPE)
                        await conn.execute(CREATE_TABLE)
                        await conn.execute(INSERT_PSYCOPG, {"enum_col": ["foo"]})
                        raise Undo
    finally:
        await close_quietly(conn)


# -- RESET goes back to the client's startup values ---------------------------------

PLAIN_FORWARDING = {"max_prepared_statements": 0, "session_state": "ignore"}


@pytest.mark.parametrize(
    "pool",
    [{"mode": "transaction"}, {"mode": "session"}, {"mode": "transaction", **PLAIN_FORWARDING}],
)
@pytest.mark.parametrize("sql", ["RESET ALL", "DISCARD ALL", "RESET application_name"])
async def test_reset_returns_to_the_startup_values(
    pgmux: PgmuxFactory, pool: dict[str, Any], sql: str
) -> None:
    mux = pgmux({"pool": {**pool, "size": 1}})
    conn = await connect_psycopg(mux, application_name="fidelity", options="-c work_mem=5MB")
    try:
        await conn.execute("SET application_name = 'changed'")
        assert conn.info.parameter_status("application_name") == "changed"
        await conn.execute(sql)
        # PostgreSQL reported the startup value coming back, as on a direct connection.
        assert conn.info.parameter_status("application_name") == "fidelity"
        cur = await conn.execute(
            "SELECT current_setting('application_name'), current_setting('work_mem')"
        )
        assert await cur.fetchone() == ("fidelity", "5MB")
    finally:
        await close_quietly(conn)

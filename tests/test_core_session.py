"""Acceptance: session pooling mode.

With pool_mode session a client keeps one server from its first query until
it disconnects; the server then goes back to the pool reset with DISCARD ALL,
so the next client finds none of the previous one's temp tables, settings,
prepared statements or session advisory locks.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    direct,
    error_fields,
    fresh_database,
    query_message,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(60)


def session_config(size: int) -> dict[str, object]:
    return {"pool": {"mode": "session", "size": size}, "timeouts": {"query_wait": "1s"}}


async def test_session_mode_keeps_one_server_per_client(pgmux: PgmuxFactory) -> None:
    mux = pgmux(session_config(2))
    a = await connect_asyncpg(mux)
    b = await connect_asyncpg(mux)
    c = None
    try:
        pid_a = await a.fetchval("SELECT pg_backend_pid()")
        pid_b = await b.fetchval("SELECT pg_backend_pid()")
        assert pid_a != pid_b
        await a.execute("SET work_mem = '7MB'")  # plain session state, no tracking needed
        for _ in range(5):
            assert await a.fetchval("SELECT pg_backend_pid()") == pid_a
            assert await b.fetchval("SELECT pg_backend_pid()") == pid_b
            assert await a.fetchval("SHOW work_mem") == "7MB"

        # Both servers belong to a and b for as long as they stay connected.
        c = await connect_asyncpg(mux)
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncio.wait_for(c.fetchval("SELECT 1"), 20)
        # 08003 when asyncpg reads the FATAL error and the close in one go.
        assert info.value.sqlstate in ("08P01", "08003")
        assert "query_wait_timeout" in str(info.value)
        await close_quietly(c)

        # a leaves: its server is reset and handed to the next client.
        await a.close()
        c = await connect_asyncpg(mux)
        assert await c.fetchval("SELECT pg_backend_pid()") == pid_a
        assert await c.fetchval("SHOW work_mem") != "7MB"
    finally:
        await close_quietly(a, b, c)


async def test_session_mode_discard_all_on_release(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    dbname = fresh_database(pg)
    mux = pgmux(session_config(1))
    key = 777001
    monitor = await direct(pg, dbname)
    first = await connect_asyncpg(mux, dbname)
    second = None
    try:
        pid = await first.fetchval("SELECT pg_backend_pid()")
        await first.execute(
            "CREATE TEMP TABLE session_tmp (v int); INSERT INTO session_tmp VALUES (1);"
            "SET work_mem = '9MB'; PREPARE session_stmt AS SELECT 42;"
        )
        assert await first.fetchval("SELECT pg_advisory_lock($1)::text", key) == ""
        assert await first.fetchval("SELECT count(*) FROM session_tmp") == 1
        assert await monitor.fetchval("SELECT pg_try_advisory_lock($1)", key) is False
        await first.close()

        second = await connect_asyncpg(mux, dbname)
        # The same server (pool size 1), not a new one: it was reset, not replaced.
        assert await second.fetchval("SELECT pg_backend_pid()") == pid
        with pytest.raises(asyncpg.UndefinedTableError):
            await second.fetchval("SELECT count(*) FROM session_tmp")
        assert await second.fetchval("SHOW work_mem") != "9MB"
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            await second.execute("EXECUTE session_stmt")
        # The session advisory lock went with DISCARD ALL.
        assert await monitor.fetchval("SELECT pg_try_advisory_lock($1)", key) is True
        await monitor.fetchval("SELECT pg_advisory_unlock($1)", key)
        assert (
            await second.fetchval(
                "SELECT count(*) FROM pg_class WHERE relname = 'session_tmp'"
                " AND relpersistence = 't'"
            )
            == 0
        )
    finally:
        await close_quietly(monitor, first, second)


async def test_statement_mode_releases_after_each_statement(pgmux: PgmuxFactory) -> None:
    """pool.mode: statement, as PgBouncer: one server for many clients, no transaction blocks."""
    mux = pgmux({"pool": {"mode": "statement", "size": 1}, "timeouts": {"query_wait": "5s"}})
    a = await connect_asyncpg(mux)
    b = await connect_asyncpg(mux)
    try:
        pid = await a.fetchval("SELECT pg_backend_pid()")
        assert await b.fetchval("SELECT pg_backend_pid()") == pid
        raw = await RawClient.open(mux)
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        await raw.send(query_message("BEGIN"))
        replies = await raw.read_until_closed()
        kinds = [kind for kind, _ in replies]
        assert kinds == [b"C", b"Z", b"E"], replies
        assert error_fields(replies[-1][1])["C"] == "25001"
        assert "statement pooling mode" in error_fields(replies[-1][1])["M"]
        await raw.close()
        # The server was rolled back and is b's again, outside any transaction.
        assert await b.fetchval("SELECT pg_backend_pid()") == pid
        with pytest.raises(asyncpg.NoActiveSQLTransactionError):
            await b.execute("SAVEPOINT s")
    finally:
        await close_quietly(a, b)


async def test_statement_mode_refusal_under_pgbouncer_error_codes(pgmux: PgmuxFactory) -> None:
    """error_codes: pgbouncer: a transaction block in statement mode ends the
    client with PgBouncer's 08P01 and words (a connection error to drivers)."""
    mux = pgmux({"pool": {"mode": "statement", "size": 1}, "error_codes": "pgbouncer"})
    raw = await RawClient.open(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        await raw.send(query_message("BEGIN"))
        replies = await raw.read_until_closed()
        fields = error_fields(replies[-1][1])
        assert (fields["C"], fields["M"]) == (
            "08P01",
            "transaction blocks not allowed in statement pooling mode",
        ), replies
    finally:
        await raw.close()

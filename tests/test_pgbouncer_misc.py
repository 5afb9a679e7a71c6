"""PgBouncer's server checks and client notices, for pgmux started from a
pgbouncer.ini: connect_query, server_check_query / server_check_delay,
server_fast_close, login_notify_message, query_wait_notify (doc/config.md).
"""

from __future__ import annotations

import asyncpg
from helpers import APP_PASSWORD
from test_logging import IniStarter, ini_pgmux, logfile, wait_for_log

from pgmux.tempgres import TempPostgres

__all__ = ["ini_pgmux"]  # the fixture, imported for the tests below


def url(mux: object, dbname: str, user: str = "app", password: str = APP_PASSWORD) -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{mux.port}/{dbname}"  # type: ignore[attr-defined]


def database(pg: TempPostgres, name: str, options: str) -> str:
    return f"{name} = host={pg.host} port={pg.port} dbname=appdb {options}\n"


async def test_connect_query_runs_on_each_new_server(
    ini_pgmux: IniStarter, pg: TempPostgres
) -> None:
    """Each new server runs the database's connect_query before its first
    client; one that fails is logged and the server is used all the same."""
    databases = database(
        pg, "tuned", "connect_query='set enable_seqscan=off; set enable_nestloop=off'"
    )
    databases += database(pg, "broken", "connect_query='select no_such_column'")
    mux = ini_pgmux.start(databases=databases)
    first = await asyncpg.connect(url(mux, "tuned"))
    second = await asyncpg.connect(url(mux, "tuned"))
    try:
        async with first.transaction(), second.transaction():  # two servers at once
            for conn in (first, second):
                assert await conn.fetchval("SHOW enable_seqscan") == "off"
                assert await conn.fetchval("SHOW enable_nestloop") == "off"
            pids = {await conn.fetchval("SELECT pg_backend_pid()") for conn in (first, second)}
        assert len(pids) == 2, pids
    finally:
        await first.close()
        await second.close()
    conn = await asyncpg.connect(url(mux, "broken"))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW enable_seqscan") == "on"
    finally:
        await conn.close()
    await wait_for_log(logfile(mux), r"connect_query_failed: sqlstate=42703")

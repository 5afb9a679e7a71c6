"""auth_query per database: PgBouncer's auth_user, auth_query and auth_dbname.

A database entry may name its own auth_user and auth_query, and the database
the lookup runs in (auth_dbname, else auth.dbname, else the client's own);
an auth database that is not configured, is the console or is disabled
refuses the login with PgBouncer's words, and so does an auth_query that
PostgreSQL rejects (src/client.c prepare_auth_database, handle_auth_query_response).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from helpers import PgmuxFactory, connect_asyncpg
from test_logging import IniStarter, ini_pgmux, logfile, wait_for_log

from pgmux.tempgres import TempPostgres

__all__ = ["ini_pgmux"]  # the fixture, imported for the tests below

pytestmark = pytest.mark.timeout(120)

AUTH_USER = "adb_auth"
AUTH_PASSWORD = "adb-auth-secret"
CLIENT, CLIENT_PASSWORD = "adb_client", "adb-client-pass"
QUERY = "SELECT usename, passwd FROM public.adb_lookup($1)"
LOOKUP_FUNCTION = f"""
CREATE OR REPLACE FUNCTION public.adb_lookup(p_user text,
    OUT usename name, OUT passwd text) RETURNS SETOF record
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
$$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = p_user $$;
REVOKE ALL ON FUNCTION public.adb_lookup(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.adb_lookup(text) TO {AUTH_USER};
"""


@pytest.fixture(scope="module")
def lookup_pg(pg: TempPostgres) -> Iterator[TempPostgres]:
    """The lookup function exists in database "other" only: a lookup that
    runs anywhere else fails, so a login proves where its lookup ran."""
    pg.create_role(AUTH_USER, AUTH_PASSWORD)
    pg.create_role(CLIENT, CLIENT_PASSWORD)
    pg.sql(f"GRANT CONNECT ON DATABASE appdb TO {CLIENT}")
    pg.sql(LOOKUP_FUNCTION, "other")
    yield pg


def databases(pg: TempPostgres, **app: Any) -> dict[str, Any]:
    where = {"host": pg.host, "port": pg.port}
    return {"other": {**where, "dbname": "other"}, "app": {**where, "dbname": "appdb", **app}}


async def logs_in(mux: Any, dbname: str = "app") -> str:
    conn = await connect_asyncpg(mux, dbname=dbname, user=CLIENT, password=CLIENT_PASSWORD)
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


async def test_database_auth_user_query_and_dbname(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres
) -> None:
    """Nothing in the auth section: the database entry's auth_user runs its
    auth_query in its auth_dbname."""
    app = {"auth_user": AUTH_USER, "auth_query": QUERY, "auth_dbname": "other"}
    mux = pgmux(
        {"databases": databases(lookup_pg, **app), "auth": {"type": "scram-sha-256"}},
        users={AUTH_USER: AUTH_PASSWORD},
    )
    assert await logs_in(mux) == CLIENT


async def test_global_auth_dbname(pgmux: PgmuxFactory, lookup_pg: TempPostgres) -> None:
    auth = {"type": "scram-sha-256", "query": QUERY, "query_user": AUTH_USER, "dbname": "other"}
    mux = pgmux({"databases": databases(lookup_pg), "auth": auth}, users={AUTH_USER: AUTH_PASSWORD})
    assert await logs_in(mux) == CLIENT


async def test_the_database_entry_wins_over_the_global_auth_dbname(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres
) -> None:
    auth = {"type": "scram-sha-256", "query": QUERY, "query_user": AUTH_USER, "dbname": "app"}
    mux = pgmux(
        {"databases": databases(lookup_pg, auth_dbname="other"), "auth": auth},
        users={AUTH_USER: AUTH_PASSWORD},
    )
    assert await logs_in(mux) == CLIENT


def auth_ini(pg: TempPostgres, app: str = "", extra: str = "") -> tuple[str, str]:
    """(settings, [databases] lines) for an ini whose appdb clients use auth_query."""
    where = f"host={pg.host} port={pg.port}"
    settings = f"auth_user = {AUTH_USER}\nauth_query = {QUERY}\n{extra}"
    lines = f"other = {where} dbname=other\nadb = {where} dbname=appdb {app}\n"
    return settings, lines


async def start_with_auth_user(ini_pgmux: IniStarter, pg: TempPostgres, **kw: str) -> Any:
    settings, lines = auth_ini(pg, **kw)
    return ini_pgmux.start(settings, databases=lines, users={AUTH_USER: AUTH_PASSWORD})


async def ini_login_error(mux: Any, dbname: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        url = f"postgresql://{CLIENT}:{CLIENT_PASSWORD}@127.0.0.1:{mux.port}/{dbname}"
        conn = await asyncpg.connect(url, timeout=20)
        await conn.close()
    return info.value


async def test_ini_auth_dbname_refusals(ini_pgmux: IniStarter, lookup_pg: TempPostgres) -> None:
    mux = await start_with_auth_user(ini_pgmux, lookup_pg, app="auth_dbname=nowhere")
    error = await ini_login_error(mux, "adb")
    assert str(error) == "bouncer config error", error
    await wait_for_log(logfile(mux), r'authentication database "nowhere" is not configured\.')


async def test_ini_auth_dbname_console_refused(
    ini_pgmux: IniStarter, lookup_pg: TempPostgres
) -> None:
    mux = await start_with_auth_user(ini_pgmux, lookup_pg, app="auth_dbname=pgbouncer")
    error = await ini_login_error(mux, "adb")
    assert str(error) == "bouncer config error", error
    pattern = r'cannot use the reserved "pgbouncer" database as an auth_dbname'
    await wait_for_log(logfile(mux), pattern)


async def test_ini_rejected_auth_query_is_a_config_error(
    ini_pgmux: IniStarter, lookup_pg: TempPostgres
) -> None:
    """The lookup function does not exist in appdb: PostgreSQL's error is logged."""
    mux = await start_with_auth_user(ini_pgmux, lookup_pg)
    error = await ini_login_error(mux, "adb")
    assert str(error) == "bouncer config error", error
    await wait_for_log(logfile(mux), r"function public\.adb_lookup\(\w+\) does not exist")
    assert CLIENT_PASSWORD not in logfile(mux).read_text()


async def test_ini_global_auth_dbname(ini_pgmux: IniStarter, lookup_pg: TempPostgres) -> None:
    mux = await start_with_auth_user(ini_pgmux, lookup_pg, extra="auth_dbname = other\n")
    url = f"postgresql://{CLIENT}:{CLIENT_PASSWORD}@127.0.0.1:{mux.port}/adb"
    conn = await asyncpg.connect(url, timeout=20)
    try:
        assert await conn.fetchval("SELECT current_user") == CLIENT
    finally:
        await conn.close()

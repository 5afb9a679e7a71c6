"""Acceptance: auth.query (issue 8).

Users the users file does not list are looked up in PostgreSQL through a
SECURITY DEFINER function (PgBouncer's recommended setup), as auth.query_user.
SCRAM secrets from the lookup work end to end through SCRAM passthrough
(PgBouncer #774), md5 secrets for md5 clients; a failed lookup is an ordinary
28P01, never a crash; the query user itself cannot log in as a client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from helpers import PgmuxFactory, RawClient, close_quietly, connect_asyncpg
from test_auth_methods import DRIVERS, assert_password_failure, login_and_query

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

QUERY_USER = "pgmux_auth"
QUERY_PASSWORD = "auth-query-secret"
QUERY = "SELECT usename, passwd FROM public.pgmux_user_lookup($1)"
LOOKUP_FUNCTION = """
CREATE OR REPLACE FUNCTION public.pgmux_user_lookup(p_user text,
    OUT usename name, OUT passwd text) RETURNS SETOF record
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
$$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = p_user $$;
REVOKE ALL ON FUNCTION public.pgmux_user_lookup(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.pgmux_user_lookup(text) TO pgmux_auth;
"""


@pytest.fixture(scope="module")
def lookup_pg(pg: TempPostgres) -> Iterator[TempPostgres]:
    pg.create_role(QUERY_USER, QUERY_PASSWORD)
    pg.create_role("aq_scram", "scram-pass")
    pg.sql("GRANT CONNECT ON DATABASE appdb TO aq_scram")
    # An md5-stored password, as older clusters have them.
    pg.sql("SET password_encryption = 'md5'; DROP ROLE IF EXISTS aq_md5; "
           "CREATE ROLE aq_md5 LOGIN PASSWORD 'md5-pass'")  # fmt: skip
    for dbname in ("appdb", "other"):
        pg.sql(LOOKUP_FUNCTION, dbname)
    yield pg


def config(pg: TempPostgres, **auth: Any) -> dict[str, Any]:
    return {
        "auth": {
            "type": "scram-sha-256",
            "query": QUERY,
            "query_user": QUERY_USER,
            "query_password": QUERY_PASSWORD,
            **auth,
        },
        "timeouts": {"query_wait": "5s"},
    }


@pytest.mark.parametrize("driver", DRIVERS)
async def test_scram_user_from_auth_query(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres, driver: str
) -> None:
    """The lookup yields a SCRAM secret: client SCRAM, then passthrough to PostgreSQL."""
    mux = pgmux(config(lookup_pg), users={})
    assert await login_and_query(mux, driver, "aq_scram", "scram-pass") == "aq_scram"
    await assert_password_failure(mux, driver, "aq_scram", "wrong")
    await assert_password_failure(mux, driver, "nosuchuser", "scram-pass")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg", "psql"])
async def test_md5_user_from_auth_query(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres, driver: str
) -> None:
    """An md5 secret from the lookup checks an md5 client; the server login is the
    database's own user here (PostgreSQL's hba wants SCRAM, which md5 cannot do)."""
    cfg = config(lookup_pg, type="md5")
    cfg["databases"] = {
        "appdb": {"host": lookup_pg.host, "port": lookup_pg.port, "user": "app",
                  "password": "app-secret"},
    }  # fmt: skip
    mux = pgmux(cfg, users={})
    assert await login_and_query(mux, driver, "aq_md5", "md5-pass") == "app"
    await assert_password_failure(mux, driver, "aq_md5", "wrong")


async def test_concurrent_logins_share_the_lookup(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres
) -> None:
    mux = pgmux(config(lookup_pg), users={})
    results = await asyncio.gather(
        *(login_and_query(mux, "asyncpg", "aq_scram", "scram-pass") for _ in range(20))
    )
    assert results == ["aq_scram"] * 20


async def test_changed_password_is_seen_after_a_failure(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres
) -> None:
    """Answers are cached, but a failed login drops the cached one."""
    lookup_pg.create_role("aq_change", "old-pass")
    mux = pgmux(config(lookup_pg, query_cache_ttl="1h"), users={})
    assert await login_and_query(mux, "asyncpg", "aq_change", "old-pass") == "aq_change"
    lookup_pg.create_role("aq_change", "new-pass")  # ALTER ROLE
    # Cached: the old password still passes pgmux (PostgreSQL is not asked again).
    with pytest.raises(asyncpg.InvalidPasswordError):
        await login_and_query(mux, "asyncpg", "aq_change", "new-pass")
    assert await login_and_query(mux, "asyncpg", "aq_change", "new-pass") == "aq_change"


@pytest.mark.parametrize(
    "broken",
    [
        {"query": "SELECT usename, passwd FROM no_such_function($1)"},
        {"query_password": "wrong-password"},
        {"query_user": "no_such_role"},
    ],
    ids=["bad-query", "bad-password", "bad-user"],
)
async def test_failed_lookup_is_a_login_failure(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres, broken: dict[str, str]
) -> None:
    mux = pgmux(config(lookup_pg, **broken))
    for _ in range(3):
        await assert_password_failure(mux, "asyncpg", "aq_scram", "scram-pass")
    # The users file still works and the daemon is fine.
    assert await login_and_query(mux, "asyncpg") == "app"
    assert mux.proc.poll() is None
    assert "auth_query_failed" in mux.logs()
    assert "wrong-password" not in mux.logs()


async def test_lookup_against_a_dead_server(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres, free_port: Any
) -> None:
    cfg = config(lookup_pg)
    cfg["databases"] = {"appdb": {"host": "127.0.0.1", "port": free_port()}}
    cfg["timeouts"]["server_connect"] = "2s"
    mux = pgmux(cfg, users={})
    await assert_password_failure(mux, "asyncpg", "aq_scram", "scram-pass")
    assert mux.proc.poll() is None


async def test_query_user_cannot_log_in_as_a_client(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres
) -> None:
    mux = pgmux(config(lookup_pg), users={})
    await assert_password_failure(mux, "asyncpg", QUERY_USER, QUERY_PASSWORD)
    raw = await RawClient.open(mux)
    try:
        with pytest.raises(Exception) as info:
            await raw.login(QUERY_USER, QUERY_PASSWORD, "appdb")
        assert "28P01" in str(info.value)
    finally:
        await raw.close()


async def test_users_file_wins_over_auth_query(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres
) -> None:
    mux = pgmux(config(lookup_pg), users={"app": "app-secret"})
    conn = await connect_asyncpg(mux)
    try:
        assert await conn.fetchval("SELECT current_user") == "app"
    finally:
        await close_quietly(conn)
    assert await login_and_query(mux, "asyncpg", "aq_scram", "scram-pass") == "aq_scram"


async def test_refused_query_user_login_is_logged_as_a_server_login(
    pgmux: PgmuxFactory, lookup_pg: TempPostgres
) -> None:
    """PostgreSQL refusing the query user's login is a failed server login, logged
    with PostgreSQL's severity and SQLSTATE (PgBouncer's "server login failed")."""
    mux = pgmux(config(lookup_pg, query_password="wrong-password"))
    await assert_password_failure(mux, "asyncpg", "aq_scram", "scram-pass")
    lines = [line for line in mux.logs().splitlines() if "server_connect_failed" in line]
    assert lines, mux.logs()
    assert "auth_query" in lines[0] and "FATAL" in lines[0] and "28P01" in lines[0], lines
    assert "wrong-password" not in mux.logs()

"""PgBouncer's login rules, for pgmux started from a pgbouncer.ini.

`auth_type = trust` still wants the user known (users file or auth_query), a
failed SCRAM exchange is "SASL authentication failed", an unknown database is
told only after the password, and a login PostgreSQL refuses reaches the
waiting clients in PostgreSQL's own words (src/client.c, objects.c).
"""

from __future__ import annotations

import itertools
import re

import asyncpg
import pytest
from helpers import APP_PASSWORD
from test_logging import WRONG_PASSWORD, IniStarter, ini_pgmux, logfile, wait_for_log

from pgmux.tempgres import TempPostgres

__all__ = ["ini_pgmux"]  # the fixture, imported for the tests below


def url(mux: object, dbname: str, user: str = "app", password: str = APP_PASSWORD) -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{mux.port}/{dbname}"  # type: ignore[attr-defined]


async def login_error(dsn: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await asyncpg.connect(dsn, timeout=20)
        await conn.close()
    return info.value


async def test_unknown_database_is_told_after_the_password(ini_pgmux: IniStarter) -> None:
    mux = ini_pgmux.start()
    wrong = await login_error(url(mux, "nosuchdb", password=WRONG_PASSWORD))
    assert wrong.sqlstate == "28P01", wrong
    unknown = await login_error(url(mux, "nosuchdb", user="nosuchuser"))
    assert unknown.sqlstate == "28P01", unknown  # an unknown user fails the same way
    right = await login_error(url(mux, "nosuchdb"))
    assert right.sqlstate == "3D000" and "no such database: nosuchdb" in str(right), right
    await wait_for_log(logfile(mux), r"closing because: no such database: nosuchdb \(age=")


async def test_trust_still_wants_a_known_user(ini_pgmux: IniStarter) -> None:
    mux = ini_pgmux.start("auth_type = trust\n")
    error = await login_error(url(mux, "appdb", user="nosuchuser"))
    assert error.sqlstate == "28000" and '"trust" authentication failed' in str(error), error
    await wait_for_log(logfile(mux), r'closing because: "trust" authentication failed \(age=')
    conn = await asyncpg.connect(url(mux, "appdb", password="anything"))
    try:
        assert await conn.fetchval("SELECT current_user") == "app"
    finally:
        await conn.close()


async def test_failed_scram_is_sasl_authentication_failed(ini_pgmux: IniStarter) -> None:
    mux = ini_pgmux.start("auth_type = scram-sha-256\n")
    for user, password in (("nosuchuser", "whatever"), ("app", WRONG_PASSWORD)):
        error = await login_error(url(mux, "appdb", user=user, password=password))
        assert error.sqlstate == "28P01" and str(error) == "SASL authentication failed", error
    await wait_for_log(logfile(mux), r"closing because: SASL authentication failed \(age=")


async def test_refused_server_login_reaches_clients_in_postgresql_words(
    ini_pgmux: IniStarter, pg: TempPostgres
) -> None:
    databases = f"gone = host={pg.host} port={pg.port} dbname=no_such_database_here\n"
    mux = ini_pgmux.start(databases=databases)
    error = await login_error(url(mux, "gone"))
    assert error.sqlstate == "3D000", error
    assert str(error) == 'database "no_such_database_here" does not exist', error
    text = await wait_for_log(
        logfile(mux), r'closing because: database "no_such_database_here" does not exist'
    )
    assert re.search(r'server login failed: FATAL database "no_such_database_here"', text)


async def test_server_lifetime_zero_uses_each_server_once(ini_pgmux: IniStarter) -> None:
    """PgBouncer's server_lifetime = 0: a server serves one client, then is
    closed; so each new client gets a new backend and the next two socket ids
    (the client's, then its server's), as PgBouncer numbers them."""
    mux = ini_pgmux.start("pool_mode = session\nserver_lifetime = 0\nadmin_users = admin\n")
    admin = await asyncpg.connect(url(mux, "pgbouncer", "admin", "admin-secret"))
    try:
        config = await admin.fetch("SHOW CONFIG")
        lifetime = [row["value"] for row in config if row["key"] == "server_lifetime"]
        assert lifetime == ["0"], lifetime
        pids, ids = [], []
        for _ in range(3):
            conn = await asyncpg.connect(url(mux, "appdb"))
            try:
                pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
                rows = await admin.fetch("SHOW SOCKETS")
                ids.append(sorted(row["id"] for row in rows if row["database"] == "appdb"))
            finally:
                await conn.close()
        assert len(set(pids)) == 3, pids  # a new backend each time
        assert [b - a for a, b in ids] == [1, 1, 1], ids  # the client's id, then its server's
        firsts = [pair[0] for pair in ids]
        assert [b - a for a, b in itertools.pairwise(firsts)] == [2, 2], ids
    finally:
        await admin.close()


# -- auth_query under PgBouncer's rules ---------------------------------------------

AUTH_USER, AUTH_PASSWORD = "lr_auth", "lr-auth-secret"  # a superuser: the default query


@pytest.fixture
def auth_pg(pg: TempPostgres) -> TempPostgres:
    """Roles for PgBouncer's default auth_query (pg_authid): a user without a
    password and one whose password expired (both give NULL), and a known one."""
    pg.create_role(AUTH_USER, AUTH_PASSWORD, superuser=True)
    pg.create_role("lr_known", "lr-known-pass")
    pg.sql("DROP ROLE IF EXISTS lr_nopass; CREATE ROLE lr_nopass LOGIN")
    pg.create_role("lr_expired", "lr-expired-pass")
    pg.sql("ALTER ROLE lr_expired VALID UNTIL '1999-01-01'")
    return pg


def start_with_auth_user(
    ini_pgmux: IniStarter, auth_type: str = "md5", databases: str = ""
) -> object:
    settings = f"auth_type = {auth_type}\nauth_user = {AUTH_USER}\n"
    return ini_pgmux.start(settings, databases=databases, users={AUTH_USER: AUTH_PASSWORD})


async def logs_in_as(dsn: str) -> str:
    conn = await asyncpg.connect(dsn, timeout=20)
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


async def test_auth_query_finding_nobody_is_no_such_user(
    ini_pgmux: IniStarter, auth_pg: TempPostgres
) -> None:
    """PgBouncer tells a client auth_query found no row for "no such user", before
    any password; a NULL password (expired) is an ordinary failed password."""
    mux = start_with_auth_user(ini_pgmux)
    error = await login_error(url(mux, "appdb", user="lr_nobody", password="whatever"))
    assert error.sqlstate == "28000" and str(error) == "no such user", error
    await wait_for_log(logfile(mux), r"closing because: no such user \(age=")
    expired = await login_error(url(mux, "appdb", user="lr_expired", password="lr-expired-pass"))
    assert expired.sqlstate == "28P01", expired
    assert await logs_in_as(url(mux, "appdb", "lr_known", "lr-known-pass")) == "lr_known"
    # Renewing the expired password is seen at once: the failed login dropped the answer.
    auth_pg.sql("ALTER ROLE lr_expired VALID UNTIL 'infinity'")
    dsn = url(mux, "appdb", user="lr_expired", password="lr-expired-pass")
    assert await logs_in_as(dsn) == "lr_expired"


async def test_trust_lets_in_a_user_found_with_a_null_password(
    ini_pgmux: IniStarter, auth_pg: TempPostgres
) -> None:
    """auth_query's row with a NULL password is a known user: trust lets it in
    (PgBouncer's "md5" placeholder password), while nobody found is refused."""
    forced = f"forced = host={auth_pg.host} port={auth_pg.port} dbname=appdb user=app\n"
    mux = start_with_auth_user(ini_pgmux, "trust", databases=forced)
    assert await logs_in_as(url(mux, "forced", user="lr_nopass", password="x")) == "app"
    error = await login_error(url(mux, "forced", user="lr_nobody", password="x"))
    assert error.sqlstate == "28000" and str(error) == "no such user", error


async def test_refused_auth_query_login_is_logged_as_a_server_login(
    ini_pgmux: IniStarter, auth_pg: TempPostgres
) -> None:
    """An automatic database PostgreSQL does not have: the auth_user's login is
    refused, logged as PgBouncer logs a failed server login."""
    auto = f"* = host={auth_pg.host} port={auth_pg.port}\n"
    mux = start_with_auth_user(ini_pgmux, databases=auto)
    error = await login_error(url(mux, "lr_nosuchdb", user="lr_nobody"))
    assert str(error) == 'database "lr_nosuchdb" does not exist', error
    text = await wait_for_log(
        logfile(mux), r'closing because: database "lr_nosuchdb" does not exist'
    )
    assert re.search(r'server login failed: FATAL database "lr_nosuchdb" does not exist', text)


LONGEST_PASSWORD = "a" * 65530  # PgBouncer's MAX_PASSWORD - 1, and the authentication limit


async def test_oversized_password_is_a_failed_password(ini_pgmux: IniStarter) -> None:
    """A password longer than the authentication limit could never match (PgBouncer
    keeps none that long): a failed password, refused without reading it."""
    forced = "longdb = host={h} port={p} dbname=appdb user=app\n"
    pg = ini_pgmux.pg
    mux = ini_pgmux.start(
        "auth_type = plain\n",
        databases=forced.format(h=pg.host, p=pg.port),
        users={"longpass": LONGEST_PASSWORD},
    )
    assert await logs_in_as(url(mux, "longdb", "longpass", LONGEST_PASSWORD)) == "app"
    error = await login_error(url(mux, "longdb", "longpass", "X" + LONGEST_PASSWORD))
    assert error.sqlstate == "28P01", error
    assert str(error) == 'password authentication failed for user "longpass"', error

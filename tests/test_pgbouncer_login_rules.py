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

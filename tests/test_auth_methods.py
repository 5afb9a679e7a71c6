"""Acceptance: client authentication against the users file (issue 8).

psql, asyncpg and psycopg 3 log in with md5 and scram-sha-256 (and the
password and trust methods), fail with 28P01 on a wrong password, and an
unknown user gets exactly the error a wrong password gets, after a complete
SCRAM exchange with a mock salt that is stable per user name. SCRAM
passthrough: with only PostgreSQL's own SCRAM secrets in the users file,
clients log in and pgmux logs in to PostgreSQL with the keys they proved.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import struct
import subprocess
from typing import Any

import asyncpg
import psycopg
import pytest
from helpers import (
    APP_PASSWORD,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    error_fields,
    message,
    startup_packet,
)

from pgmux.protocol.auth import make_scram_secret, md5_hash
from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

PSQL = shutil.which("psql")
DRIVERS = ["asyncpg", "psycopg", "psql"]


async def login_and_query(mux: Any, driver: str, user: str = "app", password: str = APP_PASSWORD,
                          dbname: str = "appdb") -> str:  # fmt: skip
    """Log in with DRIVER and return current_user; raise the driver's error."""
    if driver == "asyncpg":
        conn = await connect_asyncpg(mux, dbname, user, password)
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await close_quietly(conn)
    if driver == "psycopg":
        pconn = await connect_psycopg(mux, dbname, user, password)
        try:
            cur = await pconn.execute("SELECT current_user")
            row = await cur.fetchone()
            assert row is not None
            return row[0]
        finally:
            await pconn.close()
    if PSQL is None:
        pytest.skip("psql not found")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = password
    conninfo = f"host={mux.host} port={mux.port} user={user} dbname={dbname} sslmode=disable"
    result = await asyncio.to_thread(
        subprocess.run,
        [PSQL, conninfo, "-XAtc", "SELECT current_user"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return result.stdout.strip()


async def assert_password_failure(mux: Any, driver: str, user: str, password: str) -> None:
    expected = f'password authentication failed for user "{user}"'
    if driver == "asyncpg":
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await login_and_query(mux, driver, user, password)
        assert info.value.sqlstate == "28P01"
    elif driver == "psycopg":
        with pytest.raises(psycopg.OperationalError) as info:
            await login_and_query(mux, driver, user, password)
    else:
        with pytest.raises(RuntimeError) as info:
            await login_and_query(mux, driver, user, password)
    assert expected in str(info.value)


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
@pytest.mark.parametrize("driver", DRIVERS)
async def test_login_and_wrong_password(pgmux: PgmuxFactory, method: str, driver: str) -> None:
    mux = pgmux({"auth": {"type": method}})
    assert await login_and_query(mux, driver) == "app"
    await assert_password_failure(mux, driver, "app", "not-the-password")
    # an unknown user: the very same error
    await assert_password_failure(mux, driver, "ghost", "whatever")
    assert mux.proc.poll() is None


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_md5_hash_in_users_file(pgmux: PgmuxFactory, pg: TempPostgres, driver: str) -> None:
    """PgBouncer's md5 auth_file entries; the server login uses the database's password."""
    users = {"app": md5_hash("app", APP_PASSWORD)}
    config = {
        "auth": {"type": "md5"},
        "databases": {"appdb": {"host": pg.host, "port": pg.port, "user": "app",
                                "password": APP_PASSWORD}},
    }  # fmt: skip
    mux = pgmux(config, users=users)
    assert await login_and_query(mux, driver) == "app"
    await assert_password_failure(mux, driver, "app", "wrong")


@pytest.mark.parametrize("method", ["password", "trust"])
async def test_password_and_trust_methods(pgmux: PgmuxFactory, method: str) -> None:
    mux = pgmux({"auth": {"type": method}})
    assert await login_and_query(mux, "asyncpg") == "app"
    if method == "password":
        await assert_password_failure(mux, "asyncpg", "app", "wrong")
    else:  # trust asks for nothing; the server login still uses the users file
        assert await login_and_query(mux, "asyncpg", password="anything") == "app"


# -- no user enumeration ---------------------------------------------------------


async def scram_exchange(mux: Any, user: str, proof: bytes = b"\0" * 32) -> tuple[bytes, dict]:
    """A SCRAM exchange by hand with a bogus proof: (salt, the final ErrorResponse)."""
    raw = await RawClient.open(mux)
    try:
        await raw.send(startup_packet({"user": user, "database": "appdb"}))
        kind, body = await raw.read_message() or (b"", b"")
        assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 10, (kind, body)
        assert b"SCRAM-SHA-256\0" in body[4:]
        first = b"n,,n=,r=clientnonce"
        await raw.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
        kind, body = await raw.read_message() or (b"", b"")
        assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 11, (kind, body)
        attributes = dict(part.split(b"=", 1) for part in body[4:].split(b","))
        salt = base64.b64decode(attributes[b"s"])
        assert attributes[b"i"] == b"4096"
        final = b"c=biws,r=" + attributes[b"r"] + b",p=" + base64.b64encode(proof)
        await raw.send(message(b"p", final))
        kind, body = await raw.read_message() or (b"", b"")
        assert kind == b"E", (kind, body)
        return salt, error_fields(body)
    finally:
        await raw.close()


async def test_unknown_user_gets_a_full_scram_exchange(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"auth": {"type": "scram-sha-256"}})
    salt_known, error_known = await scram_exchange(mux, "app")
    salt_ghost, error_ghost = await scram_exchange(mux, "ghost")
    salt_ghost_again, _ = await scram_exchange(mux, "ghost")
    salt_other, error_other = await scram_exchange(mux, "nobody")
    assert salt_ghost == salt_ghost_again, "the mock salt must be stable per user"
    assert salt_ghost != salt_other, "the mock salt must differ between users"
    assert len(salt_ghost) == len(salt_known) == 16
    # The errors differ only by the user name they quote.
    for error, user in ((error_known, "app"), (error_ghost, "ghost"), (error_other, "nobody")):
        assert (error["S"], error["C"]) == ("FATAL", "28P01")
        assert error["M"] == f'password authentication failed for user "{user}"'
    without_message = [{k: v for k, v in e.items() if k != "M"} for e in (error_known, error_ghost)]
    assert without_message[0] == without_message[1]


# -- SCRAM passthrough ---------------------------------------------------------------


def pg_secret(pg: TempPostgres, role: str) -> str:
    secret = pg.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
    assert secret.startswith("SCRAM-SHA-256$"), "tempgres stores SCRAM secrets"
    return secret


@pytest.mark.parametrize("driver", DRIVERS)
async def test_scram_passthrough(pgmux: PgmuxFactory, pg: TempPostgres, driver: str) -> None:
    """Only PostgreSQL's own SCRAM secrets are known to pgmux: no plain password
    anywhere, yet clients log in and run queries on real server connections."""
    assert pg.sql("SHOW password_encryption") == "scram-sha-256"
    users = {"app": pg_secret(pg, "app"), "report": pg_secret(pg, "report")}
    mux = pgmux({"auth": {"type": "scram-sha-256"}}, users=users)
    assert await login_and_query(mux, driver) == "app"
    assert await login_and_query(mux, driver, "report", "report-secret", "other") == "report"
    await assert_password_failure(mux, driver, "app", "wrong")
    # Several clients at once share the pool's servers.
    conns = [await connect_asyncpg(mux) for _ in range(5)]
    try:
        values = await asyncio.gather(*(c.fetchval("SELECT $1::int + 1", i) for i, c in
                                        enumerate(conns)))  # fmt: skip
        assert values == [1, 2, 3, 4, 5]
    finally:
        await close_quietly(*conns)


async def test_passthrough_with_a_different_secret_fails_clearly(
    pgmux: PgmuxFactory, pg: TempPostgres
) -> None:
    """Same password, another salt: the client passes pgmux, but the keys cannot
    open PostgreSQL's door; the client hears why instead of hanging."""
    users = {"app": make_scram_secret(APP_PASSWORD, salt=b"another salt 16b")}
    mux = pgmux({"timeouts": {"query_wait": "5s"}}, users=users)
    with pytest.raises(asyncpg.PostgresError) as info:
        await login_and_query(mux, "asyncpg")
    assert "SCRAM secret differs" in str(info.value)
    assert mux.proc.poll() is None


async def test_md5_client_with_scram_secret_runs_scram(
    pgmux: PgmuxFactory, pg: TempPostgres
) -> None:
    """auth.type md5 with a SCRAM secret on file: SCRAM instead, as PostgreSQL does."""
    mux = pgmux({"auth": {"type": "md5"}}, users={"app": pg_secret(pg, "app")})
    assert await login_and_query(mux, "asyncpg") == "app"

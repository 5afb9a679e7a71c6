"""Session state follows PostgreSQL's transaction semantics (pool.session_state).

A SET, SET ROLE, SET SESSION AUTHORIZATION, set_config(..., false), LISTEN,
a WITH HOLD cursor or a temporary table made in a transaction that is rolled
back (whole, or to a savepoint) is gone, so it must not pin the client or
cost a reset; one that commits must. RESET ALL leaves the role and the
session authorization, so it does not clear them; RESET ALL rolled back
clears nothing. A session advisory lock survives a rollback.

Each case runs on a pool of one server in transaction mode: the next client
necessarily gets the same backend, and must find the session as clean as the
holder found it, whether the holder is still connected (nothing pinned) or
has left (pgmux reset what it left).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
from helpers import (
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

SUPER = "super"  # the case needs the cluster's superuser (SET SESSION AUTHORIZATION, SET ROLE)

# Everything a case may leave behind, as the next client sees it.
PROBE = (
    "SELECT current_setting('work_mem'), current_user::text, session_user::text,"
    " (SELECT count(*) FROM pg_listening_channels()),"
    " (SELECT count(*) FROM pg_cursors WHERE name = 'sr_cursor'),"
    " to_regclass('pg_temp.sr_tmp') IS NOT NULL,"
    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 9009002"
    "  AND pid = pg_backend_pid())"
)


@dataclass(frozen=True)
class Case:
    steps: tuple[str, ...]  # a step starting with "!" must fail
    pinned: bool  # whether session state outlives the script
    user: str = APP_USER
    simple_only: bool = False  # several statements in one Query


CASES = {
    "set_rolled_back": Case(("BEGIN", "SET work_mem = '7MB'", "ROLLBACK"), False),
    "set_rolled_back_to_savepoint": Case(
        ("BEGIN", "SAVEPOINT a", "SET work_mem = '7MB'", "ROLLBACK TO SAVEPOINT a", "COMMIT"),
        False,
    ),
    "set_before_the_savepoint_kept": Case(
        ("BEGIN", "SET work_mem = '7MB'", "SAVEPOINT a", "SELECT 1", "ROLLBACK TO a", "COMMIT"),
        True,
    ),
    "set_in_released_savepoint_kept": Case(
        ("BEGIN", "SAVEPOINT a", "SET work_mem = '7MB'", "RELEASE SAVEPOINT a", "COMMIT"),
        True,
    ),
    "set_in_nested_savepoints_rolled_back": Case(
        (
            "BEGIN",
            "SAVEPOINT a",
            "SAVEPOINT b",
            "SET work_mem = '7MB'",
            "RELEASE b",
            "ROLLBACK TO a",
            "COMMIT",
        ),
        False,
    ),
    "set_in_failed_transaction_committed": Case(
        ("BEGIN", "SET work_mem = '7MB'", "!SELECT 1/0", "COMMIT"), False
    ),
    "set_recovered_by_savepoint_committed": Case(
        ("BEGIN", "SET work_mem = '7MB'", "SAVEPOINT a", "!SELECT 1/0", "ROLLBACK TO a", "COMMIT"),
        True,
    ),
    "set_in_failed_implicit_transaction": Case(
        ("!SET work_mem = '7MB'; SELECT 1/0",), False, simple_only=True
    ),
    "set_committed": Case(("BEGIN", "SET work_mem = '7MB'", "COMMIT"), True),
    "set_local": Case(("BEGIN", "SET LOCAL work_mem = '7MB'", "COMMIT"), False),
    "reset_all_rolled_back": Case(("SET work_mem = '7MB'", "BEGIN", "RESET ALL", "ROLLBACK"), True),
    "reset_all_committed": Case(("SET work_mem = '7MB'", "BEGIN", "RESET ALL", "COMMIT"), False),
    # Reset when the server is released, never pinned: drivers call it for
    # their own ends (asyncpg's type introspection turns jit off and on).
    "set_config_session": Case(("SELECT set_config('work_mem', '7MB', false)",), False),
    "set_config_local": Case(
        ("BEGIN", "SELECT set_config('work_mem', '7MB', true)", "COMMIT"), False
    ),
    "set_config_rolled_back": Case(
        ("BEGIN", "SELECT set_config('work_mem', '7MB', false)", "ROLLBACK"), False
    ),
    "set_role": Case(("SET ROLE app",), True, SUPER),
    "set_role_rolled_back": Case(("BEGIN", "SET ROLE app", "ROLLBACK"), False, SUPER),
    "set_role_outlives_reset_all": Case(("SET ROLE app", "RESET ALL"), True, SUPER),
    "reset_role": Case(("SET ROLE app", "RESET ROLE"), False, SUPER),
    "set_local_role": Case(("BEGIN", "SET LOCAL ROLE app", "COMMIT"), False, SUPER),
    "set_config_role": Case(("SELECT set_config('role', 'app', false)",), True, SUPER),
    "session_authorization": Case(("SET SESSION AUTHORIZATION app",), True, SUPER),
    "session_authorization_rolled_back": Case(
        ("BEGIN", "SET SESSION AUTHORIZATION app", "ROLLBACK"), False, SUPER
    ),
    "session_authorization_outlives_reset_all": Case(
        ("SET SESSION AUTHORIZATION app", "RESET ALL"), True, SUPER
    ),
    "session_authorization_default": Case(
        ("SET SESSION AUTHORIZATION app", "SET SESSION AUTHORIZATION DEFAULT"), False, SUPER
    ),
    "listen_rolled_back": Case(("BEGIN", "LISTEN sr_channel", "ROLLBACK"), False),
    "hold_cursor_rolled_back": Case(
        ("BEGIN", "DECLARE sr_cursor CURSOR WITH HOLD FOR SELECT 1", "ROLLBACK"), False
    ),
    "temp_table_rolled_back": Case(
        ("BEGIN", "CREATE TEMP TABLE sr_tmp (v int)", "ROLLBACK"), False
    ),
    "advisory_lock_outlives_rollback": Case(
        ("BEGIN", "SELECT pg_advisory_lock(9009002)", "ROLLBACK"), True
    ),
}

DRIVERS = ["asyncpg-extended", "psycopg"]  # psycopg without parameters: the simple protocol


def config(mode: str) -> dict[str, Any]:
    pool = {"size": 1, "session_state": mode, "listen_mode": "pin"}  # LISTEN as session state
    return {"pool": pool, "timeouts": {"query_wait": "1s"}}


def credentials(pg: TempPostgres, user: str) -> tuple[str, str]:
    return (pg.superuser, pg.password) if user == SUPER else (APP_USER, APP_PASSWORD)


class Session:
    """One client through pgmux, by one driver and protocol."""

    def __init__(self, driver: str, conn: Any) -> None:
        self.driver = driver
        self.conn = conn

    @classmethod
    async def open(cls, mux: Any, driver: str, user: str, password: str) -> Session:
        if driver == "psycopg":
            return cls(driver, await connect_psycopg(mux, user=user, password=password))
        return cls(driver, await connect_asyncpg(mux, user=user, password=password))

    async def run(self, sql: str) -> None:
        if self.driver == "psycopg":
            await self.conn.execute(sql.encode())  # no parameters: the simple protocol
        elif self.driver == "asyncpg-simple":
            await self.conn.execute(sql)
        else:
            await self.conn.fetch(sql)  # Parse/Bind/Execute/Sync

    async def step(self, step: str) -> None:
        if not step.startswith("!"):
            await self.run(step)
            return
        with pytest.raises((asyncpg.PostgresError, psycopg.Error)):
            await self.run(step[1:])

    async def probe(self) -> tuple[Any, ...]:
        if self.driver == "psycopg":
            cursor = await self.conn.execute(PROBE)
            row = await cursor.fetchone()
            return tuple(row)
        return tuple(await self.conn.fetchrow(PROBE))

    async def close(self) -> None:
        await close_quietly(self.conn)


async def next_client_probe(mux: Any, user: str, password: str) -> tuple[Any, ...] | None:
    """What the next client finds on the one server; None: it is kept from it."""
    conn = await connect_asyncpg(mux, user=user, password=password)
    try:
        return tuple(await conn.fetchrow(PROBE))
    except asyncpg.PostgresError as exc:  # 08P01 query_wait_timeout: the server is pinned
        assert "query_wait_timeout" in str(exc), exc
        return None
    except asyncpg.ConnectionDoesNotExistError:
        return None
    finally:
        await close_quietly(conn)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("name", list(CASES))
async def test_pin_follows_the_transaction(
    pg: TempPostgres, pgmux: PgmuxFactory, name: str, driver: str
) -> None:
    case = CASES[name]
    if case.simple_only and driver == "asyncpg-extended":
        pytest.skip("several statements in one Query: the simple protocol only")
    user, password = credentials(pg, case.user)
    mux = pgmux(config("pin"))
    holder = await Session.open(mux, driver, user, password)
    try:
        clean = await holder.probe()
        for step in case.steps:
            await holder.step(step)
        found = await next_client_probe(mux, user, password)
        if case.pinned:
            assert found is None, f"not pinned: the next client got the server and saw {found}"
        else:
            assert found == clean, "pinned, or the next client found state left behind"
    finally:
        await holder.close()
    # Gone with its client: the next one finds the session as the holder did.
    assert await next_client_probe(mux, user, password) == clean


@pytest.mark.parametrize(
    "name", [name for name, case in CASES.items() if case.pinned] + ["set_config_session"]
)
async def test_reset_cleans_what_committed(
    pg: TempPostgres, pgmux: PgmuxFactory, name: str
) -> None:
    """session_state: reset: the holder stays connected, yet the next client on
    its server finds none of what it left (RESET ALL alone would keep the role)."""
    case = CASES[name]
    user, password = credentials(pg, case.user)
    mux = pgmux(config("reset"))
    holder = await Session.open(mux, "asyncpg-simple", user, password)
    try:
        clean = await holder.probe()
        for step in case.steps:
            await holder.step(step)
        assert await next_client_probe(mux, user, password) == clean
    finally:
        await holder.close()


REFUSED = [
    "SET ROLE app",
    "SET SESSION AUTHORIZATION app",
    "SELECT set_config('role', 'app', false)",
]
ALLOWED = [
    "BEGIN; SET LOCAL ROLE app; COMMIT",
    "BEGIN; SET LOCAL SESSION AUTHORIZATION app; COMMIT",
    "SELECT set_config('work_mem', '7MB', true)",
    "SELECT set_config('work_mem', '7MB', false)",  # reset on release, not refused
]


async def test_error_refuses_identity_changes(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux(config("error"))
    conn = await connect_asyncpg(mux, user=pg.superuser, password=pg.password)
    try:
        clean = tuple(await conn.fetchrow(PROBE))
        for sql in REFUSED:
            with pytest.raises(asyncpg.PostgresError) as caught:
                await conn.execute(sql)
            assert caught.value.sqlstate == "0A000", sql
            assert "pool.session_state = error" in str(caught.value), sql
        for sql in ALLOWED:
            await conn.execute(sql)
        assert tuple(await conn.fetchrow(PROBE)) == clean
    finally:
        await close_quietly(conn)


async def test_asyncpg_type_introspection_pins_nothing(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    """asyncpg introspects a type it has not seen with set_config('jit', ..., false)
    around the query: the client is not pinned, and the next one on the server
    finds jit as it was."""
    mux = pgmux(config("pin"))
    first = await connect_asyncpg(mux)
    second = None
    try:
        jit = await first.fetchval("SELECT current_setting('jit')")
        assert await first.fetchval("SELECT ARRAY[1, 2]::int[]") == [1, 2]
        second = await connect_asyncpg(mux)
        assert await asyncio.wait_for(second.fetchval("SELECT current_setting('jit')"), 10) == jit
    finally:
        await close_quietly(first, second)

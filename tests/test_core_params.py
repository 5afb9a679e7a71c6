"""Acceptance: per-client session parameters under transaction pooling.

Two clients with different TimeZone / application_name / search_path take
turns on ONE server connection (pool size 1). Each must see its own values on
every turn, which only happens when pgmux re-applies the client's parameters
on the server before the client's transaction (DESIGN.md "Session state under
transaction pooling"). All checks ask the server itself: SHOW,
current_setting() and pg_stat_activity for the backend running the query.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from helpers import (
    APP_DB,
    PgmuxFactory,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    direct,
    unique,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(60)

ONE_SERVER = {"pool": {"size": 1}, "timeouts": {"query_wait": "20s"}}
ROUNDS = 8

SEEN_SQL = """
SELECT current_setting('TimeZone'),
       current_setting('search_path'),
       (SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()),
       pg_backend_pid()
"""


@dataclass(frozen=True)
class Seen:
    timezone: str
    search_path: str
    application_name: str
    pid: int


async def seen_asyncpg(conn: Any) -> Seen:
    tz, path, app, pid = await conn.fetchrow(SEEN_SQL)
    assert await conn.fetchval("SHOW timezone") == tz
    return Seen(tz, path, app, pid)


async def seen_psycopg(conn: psycopg.AsyncConnection[Any]) -> Seen:
    cur = await conn.execute(SEEN_SQL)
    tz, path, app, pid = await cur.fetchone()  # type: ignore[misc]
    cur = await conn.execute("SHOW timezone")
    assert await cur.fetchone() == (tz,)
    return Seen(tz, path, app, pid)


def make_schemas(pg: TempPostgres) -> tuple[str, str]:
    """Two schemas, each with a table `marker` holding the schema's own name."""
    names = unique("sa"), unique("sb")
    for name in names:
        pg.sql(
            f"CREATE SCHEMA {name} AUTHORIZATION app;"
            f"CREATE TABLE {name}.marker (v text); INSERT INTO {name}.marker VALUES ('{name}');"
            f"ALTER TABLE {name}.marker OWNER TO app",
            APP_DB,
        )
    return names


async def server_defaults(pg: TempPostgres) -> tuple[str, str]:
    conn = await direct(pg, APP_DB)
    try:
        return await conn.fetchval("SHOW timezone"), await conn.fetchval("SHOW search_path")
    finally:
        await conn.close()


async def test_startup_parameters_follow_each_client(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """TimeZone, application_name and search_path given in the startup packet (asyncpg)."""
    mux = pgmux(ONE_SERVER)
    schema_a, schema_b = make_schemas(pg)
    want = {
        "a": ("Asia/Tokyo", schema_a, "hub_a"),
        "b": ("America/New_York", schema_b, "hub_b"),
    }
    conns = {
        key: await connect_asyncpg(
            mux,
            server_settings={"TimeZone": tz, "search_path": path, "application_name": app},
        )
        for key, (tz, path, app) in want.items()
    }
    plain = await connect_asyncpg(mux)
    default_tz, default_path = await server_defaults(pg)
    try:
        pids = set()
        for _ in range(ROUNDS):
            for key, conn in conns.items():
                seen = await seen_asyncpg(conn)
                assert (seen.timezone, seen.search_path, seen.application_name) == want[key]
                # search_path really is in effect, not just displayed:
                assert await conn.fetchval("SELECT v FROM marker") == want[key][1]
                pids.add(seen.pid)
            seen = await seen_asyncpg(plain)
            assert (seen.timezone, seen.search_path) == (default_tz, default_path)
            assert seen.application_name not in {"hub_a", "hub_b"}
            pids.add(seen.pid)
        assert len(pids) == 1, "the clients did not share the one server"

        # Concurrently too: every answer still matches its own client.
        async def check(key: str) -> None:
            for _ in range(ROUNDS):
                seen = await seen_asyncpg(conns[key])
                assert (seen.timezone, seen.search_path, seen.application_name) == want[key]

        await asyncio.gather(check("a"), check("b"))
    finally:
        await close_quietly(plain, *conns.values())


async def test_set_parameters_follow_each_client(pgmux: PgmuxFactory) -> None:
    """SET TimeZone / application_name at run time (psycopg), and SET LOCAL ending with COMMIT."""
    mux = pgmux(ONE_SERVER)
    a = await connect_psycopg(mux)
    b = await connect_psycopg(mux)
    want = {"a": ("Asia/Tokyo", "set_a"), "b": ("America/Lima", "set_b")}
    conns = {"a": a, "b": b}
    try:
        for key, conn in conns.items():
            tz, app = want[key]
            await conn.execute(f"SET TimeZone = '{tz}'")
            await conn.execute(f"SET application_name = '{app}'")
        pids = set()
        for _ in range(ROUNDS):
            for key, conn in conns.items():
                seen = await seen_psycopg(conn)
                assert (seen.timezone, seen.application_name) == want[key]
                pids.add(seen.pid)
        assert len(pids) == 1, "the clients did not share the one server"

        # SET LOCAL lasts until the end of the transaction only.
        async with a.transaction():
            await a.execute("SET LOCAL TimeZone = 'Asia/Kolkata'")
            assert (await seen_psycopg(a)).timezone == "Asia/Kolkata"
        for key, conn in [("b", b), ("a", a), ("b", b)]:
            seen = await seen_psycopg(conn)
            assert (seen.timezone, seen.application_name) == want[key]

        # Changing it again later is followed too.
        await b.execute("SET TimeZone = 'Europe/Paris'")
        assert (await seen_psycopg(a)).timezone == "Asia/Tokyo"
        assert (await seen_psycopg(b)).timezone == "Europe/Paris"
    finally:
        await close_quietly(a, b)


async def test_options_startup_parameter(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """libpq `options=-c ...` (search_path, statement_timeout) is honoured per client."""
    mux = pgmux(ONE_SERVER)
    _, schema_b = make_schemas(pg)
    _, default_path = await server_defaults(pg)
    a = await connect_psycopg(mux)
    b = await connect_psycopg(mux, options=f"-c search_path={schema_b} -c statement_timeout=1500")
    try:
        for _ in range(3):
            cur = await b.execute("SELECT current_setting('search_path'), v FROM marker")
            assert await cur.fetchone() == (schema_b, schema_b)
            cur = await b.execute("SHOW statement_timeout")
            assert await cur.fetchone() == ("1500ms",)
            cur = await a.execute("SELECT current_setting('search_path')")
            assert await cur.fetchone() == (default_path,)
            cur = await a.execute("SHOW statement_timeout")
            assert await cur.fetchone() == ("0",)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await b.execute("SELECT pg_sleep(5)")
        cur = await a.execute("SELECT 'a not cancelled' FROM pg_sleep(2)")
        assert await cur.fetchone() == ("a not cancelled",)
    finally:
        await close_quietly(a, b)

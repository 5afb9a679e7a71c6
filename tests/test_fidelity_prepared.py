"""Acceptance: what a driver sees of its prepared statements through pgmux.

Drivers' own test suites read pg_prepared_statements: they count the
statements there and check their parameter types. A client that connects
after one that left in the middle of a transaction must find none (PgBouncer
closes such a server; pgmux keeps it and drops the statements), and the
statements a client prepares show the parameter types it declared, as on a
direct connection. Each test runs with psycopg 3 and asyncpg, in transaction
and session mode.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from helpers import (
    PgmuxFactory,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

MODES = ["transaction", "session"]

# What a client sees in pg_prepared_statements, but for this query itself (asyncpg prepares it).
PREPARED_SQL = (
    "SELECT statement, parameter_types::text[] FROM pg_prepared_statements"
    " WHERE statement NOT LIKE '%pg_prepared_statements%' ORDER BY statement"
)


def start(pgmux: PgmuxFactory, mode: str) -> Any:
    # One server: every client gets the server the previous one left.
    return pgmux({"pool": {"mode": mode, "size": 1}})


async def psycopg_prepared(conn: Any) -> list[tuple[str, list[str]]]:
    cur = await conn.execute(PREPARED_SQL, prepare=False)
    return [(text, types) for text, types in await cur.fetchall()]


async def asyncpg_prepared(conn: Any) -> list[tuple[str, list[str]]]:
    rows = await conn.fetch(PREPARED_SQL)
    return [(row[0], list(row[1])) for row in rows]


# -- a client that left mid-transaction leaves no statements behind ------------------


@pytest.mark.parametrize("mode", MODES)
async def test_psycopg_after_a_client_left_mid_transaction_sees_no_statements(
    pgmux: PgmuxFactory, mode: str
) -> None:
    # psycopg's tests run each test in a transaction of a new connection and
    # close it without COMMIT, then count the statements the next test prepared.
    mux = start(pgmux, mode)
    for i in range(3):
        conn = await connect_psycopg(mux, autocommit=False, prepare_threshold=0)
        try:
            assert await psycopg_prepared(conn) == []
            await conn.execute("SELECT %s::int + " + str(i), [1])
            # psycopg declares the int 1 a smallint (the cast is PostgreSQL's to apply).
            assert await psycopg_prepared(conn) == [(f"SELECT $1::int + {i}", ["smallint"])]
        finally:
            await close_quietly(conn)


@pytest.mark.parametrize("mode", MODES)
async def test_asyncpg_after_a_client_left_mid_transaction_sees_no_statements(
    pgmux: PgmuxFactory, mode: str
) -> None:
    mux = start(pgmux, mode)
    for i in range(3):
        conn = await connect_asyncpg(mux, statement_cache_size=100)
        try:
            assert await asyncpg_prepared(conn) == []
            transaction = conn.transaction()
            await transaction.start()
            assert await conn.fetchval(f"SELECT $1::int + {i}", 1) == 1 + i
            assert await asyncpg_prepared(conn) == [(f"SELECT $1::int + {i}", ["integer"])]
        finally:
            await close_quietly(conn)  # the transaction still open


# -- parameter types as the client declared them ---------------------------------------


async def psycopg_declared_types(endpoint: Any) -> list[tuple[str, list[str]]]:
    conn = await connect_psycopg(endpoint, prepare_threshold=0)
    try:
        # psycopg declares date, smallint and numeric for these Python values.
        await conn.execute("SELECT %s, %s, %s", [dt.date(2020, 12, 10), 42, Decimal(42)])
        await conn.execute("SELECT %s", ["{}"])  # text: untyped, as psycopg sends str
        await conn.execute("SELECT %s::jsonb", ["{}"])
        return await psycopg_prepared(conn)
    finally:
        await close_quietly(conn)


async def asyncpg_declared_types(endpoint: Any) -> list[tuple[str, list[str]]]:
    conn = await connect_asyncpg(endpoint, statement_cache_size=100)
    try:
        # asyncpg declares no types: PostgreSQL infers them, and says which.
        await conn.fetchval("SELECT $1::date, $2::int2, $3::numeric", dt.date(2020, 1, 1), 1, 2)
        await conn.fetchval("SELECT $1 || 'x'", "y")
        return await asyncpg_prepared(conn)
    finally:
        await close_quietly(conn)


@pytest.mark.parametrize("mode", MODES)
async def test_psycopg_sees_the_parameter_types_it_declared(
    pgmux: PgmuxFactory, pg: TempPostgres, mode: str
) -> None:
    want = await psycopg_declared_types(pg)
    assert ("SELECT $1, $2, $3", ["date", "smallint", "numeric"]) in want
    assert await psycopg_declared_types(start(pgmux, mode)) == want


@pytest.mark.parametrize("mode", MODES)
async def test_asyncpg_sees_the_parameter_types_postgresql_inferred(
    pgmux: PgmuxFactory, pg: TempPostgres, mode: str
) -> None:
    want = await asyncpg_declared_types(pg)
    assert ("SELECT $1::date, $2::int2, $3::numeric", ["date", "smallint", "numeric"]) in want
    assert await asyncpg_declared_types(start(pgmux, mode)) == want

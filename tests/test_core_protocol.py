"""Acceptance: the wire protocol through pgmux in transaction pooling mode.

Pipelined extended-protocol queries (psycopg 3 pipeline mode, asyncpg
executemany), multi-statement simple queries, failed transactions, large
messages. Most tests run with ONE server connection and a second client, so a
pooler that releases a server at the wrong moment (before the last
ReadyForQuery of a pipeline, or while a transaction is open or failed) hands
the other client a server in the middle of someone else's work and the
results come out wrong.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    message,
    unique,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(60)

ONE_SERVER = {"pool": {"size": 1}, "timeouts": {"query_wait": "20s"}}


def make_table(pg: TempPostgres) -> str:
    name = unique("t")
    pg.sql(f"CREATE TABLE {name} (id serial PRIMARY KEY, v int NOT NULL, who text)", APP_DB)
    pg.sql(f"ALTER TABLE {name} OWNER TO app", APP_DB)
    return name


async def pid_of(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_one_server_is_shared_between_transactions(pgmux: PgmuxFactory) -> None:
    """Transaction pooling: two clients, one server, and a transaction keeps it."""
    mux = pgmux(ONE_SERVER)
    a = await connect_asyncpg(mux)
    b = await connect_asyncpg(mux)
    try:
        assert await pid_of(a) == await pid_of(b)
        tx = a.transaction()
        await tx.start()
        blocked = asyncio.create_task(b.fetchval("SELECT 7"))
        await asyncio.sleep(0.3)
        assert not blocked.done(), "b got a server while a's transaction held the only one"
        assert await a.fetchval("SELECT 1") == 1
        await tx.commit()
        assert await asyncio.wait_for(blocked, 15) == 7
    finally:
        await close_quietly(a, b)


async def pipeline_inserts(conn: psycopg.AsyncConnection[Any], table: str, who: str) -> None:
    """30 INSERT ... RETURNING in one pipeline with a Sync every 10, then check every result."""
    cursors = []
    async with conn.pipeline() as pipeline:
        for i in range(30):
            cursors.append(
                await conn.execute(
                    f"INSERT INTO {table} (v, who) VALUES (%s, %s) RETURNING v * 10, who",
                    (i, who),
                )
            )
            if i % 10 == 9:
                await pipeline.sync()
        total = await conn.execute(f"SELECT count(*), sum(v) FROM {table} WHERE who = %s", (who,))
    for i, cur in enumerate(cursors):
        assert await cur.fetchall() == [(i * 10, who)]
    assert await total.fetchone() == (30, sum(range(30)))


async def test_psycopg_pipeline_mode(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux(ONE_SERVER)
    table = make_table(pg)
    a = await connect_psycopg(mux)
    b = await connect_psycopg(mux)
    try:
        # Two pipelines interleaving on the only server.
        await asyncio.gather(pipeline_inserts(a, table, "a"), pipeline_inserts(b, table, "b"))
        cur = await a.execute(f"SELECT who, count(*) FROM {table} GROUP BY who ORDER BY who")
        assert await cur.fetchall() == [("a", 30), ("b", 30)]
    finally:
        await close_quietly(a, b)


async def test_psycopg_pipeline_error_midway(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    """An error aborts the pipeline up to the next Sync; the connection and server stay usable."""
    mux = pgmux(ONE_SERVER)
    table = make_table(pg)
    conn = await connect_psycopg(mux)
    other = await connect_psycopg(mux)
    try:
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with conn.pipeline():
                await conn.execute(f"INSERT INTO {table} (v, who) VALUES (1, 'before')")
                await conn.execute("SELECT 1 / 0")
                await conn.execute(f"INSERT INTO {table} (v, who) VALUES (2, 'after')")
        # Everything up to the Sync was one implicit transaction: nothing stayed.
        cur = await other.execute(f"SELECT count(*) FROM {table}")
        assert await cur.fetchone() == (0,)
        # Both clients go on using the only server.
        async with conn.pipeline():
            c1 = await conn.execute("SELECT 1")
            c2 = await conn.execute("SELECT 'x' || %s", ("y",))
        assert await c1.fetchone() == (1,)
        assert await c2.fetchone() == ("xy",)
        cur = await other.execute("SELECT 2")
        assert await cur.fetchone() == (2,)
    finally:
        await close_quietly(conn, other)


async def test_lone_flush_does_not_keep_the_server(pgmux: PgmuxFactory) -> None:
    """A Flush with nothing outstanding (psycopg sends one after a pipeline) gets
    no answer from PostgreSQL; the only server must not stay with that client."""
    mux = pgmux(ONE_SERVER)
    raw = await RawClient.open(mux)
    other = await connect_asyncpg(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        for _ in range(3):
            await raw.send(message(b"H"))
            await asyncio.sleep(0.05)
            assert await asyncio.wait_for(other.fetchval("SELECT 41 + 1"), 5) == 42
        # The client that sent them still works.
        assert (await raw.query("SELECT 7")).rows == [["7"]]
    finally:
        await raw.close()
        await close_quietly(other)


async def test_asyncpg_executemany(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux(ONE_SERVER)
    table = make_table(pg)
    a = await connect_asyncpg(mux)
    b = await connect_asyncpg(mux)
    query = f"INSERT INTO {table} (v, who) VALUES ($1, $2)"
    try:

        async def a_twice() -> None:
            await a.executemany(query, [(i, "a") for i in range(200)])
            await a.executemany(query, [(1000, "a")] * 5)

        await asyncio.gather(a_twice(), b.executemany(query, [(i, "b") for i in range(100)]))
        rows = await a.fetch(
            f"SELECT who, count(*) AS n, sum(v) AS s FROM {table} GROUP BY who ORDER BY who"
        )
        assert [tuple(r) for r in rows] == [
            ("a", 205, sum(range(200)) + 5000),
            ("b", 100, sum(range(100))),
        ]
        # A failing executemany is atomic (one implicit transaction up to Sync).
        with pytest.raises(asyncpg.NotNullViolationError):
            await b.executemany(query, [(5, "c"), (None, "c"), (6, "c")])
        assert await a.fetchval(f"SELECT count(*) FROM {table} WHERE who = 'c'") == 0
        assert await b.fetchval("SELECT 3") == 3
    finally:
        await close_quietly(a, b)


async def test_multi_statement_simple_query(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux(ONE_SERVER)
    table = make_table(pg)
    conn = await connect_psycopg(mux)
    raw = await RawClient.open(mux)
    try:
        # psycopg sends a parameterless execute as one simple Query.
        cur = await conn.execute("SELECT 1 AS a; SELECT 'two', 3; VALUES (4), (5)")
        results = [await cur.fetchall()]
        while cur.nextset():
            results.append(await cur.fetchall())
        assert results == [[(1,)], [("two", 3)], [(4,), (5,)]]

        await raw.login("app", "app-secret", APP_DB)
        got = await raw.query(
            f"INSERT INTO {table} (v) VALUES (1); INSERT INTO {table} (v) VALUES (2);"
            f"SELECT sum(v) FROM {table}"
        )
        assert got.tags == ["INSERT 0 1", "INSERT 0 1", "SELECT 1"]
        assert got.rows == [["3"]]
        assert not got.errors and got.status == "I"

        # A failing statement rolls back the whole implicit transaction.
        got = await raw.query(
            f"INSERT INTO {table} (v) VALUES (10); SELECT 1 / 0;INSERT INTO {table} (v) VALUES (20)"
        )
        assert [e["C"] for e in got.errors] == ["22012"]
        assert got.status == "I"
        got = await raw.query(f"SELECT count(*), sum(v) FROM {table}")
        assert got.rows == [["2", "3"]]

        # The other client still gets the (only) server.
        cur = await conn.execute("SELECT 'still fine'")
        assert await cur.fetchone() == ("still fine",)
    finally:
        await raw.close()
        await close_quietly(conn)


async def test_failed_transaction_is_rolled_back_and_connection_reused(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    mux = pgmux(ONE_SERVER)
    table = make_table(pg)
    a = await connect_asyncpg(mux)
    b = await connect_psycopg(mux)
    try:
        # asyncpg: an exception inside transaction() makes it send ROLLBACK.
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with a.transaction():
                await a.execute(f"INSERT INTO {table} (v) VALUES (1)")
                await a.fetchval("SELECT 1 / 0")
        assert await a.fetchval(f"SELECT count(*) FROM {table}") == 0

        # psycopg: explicit BEGIN, a failure, a refused statement (25P02), ROLLBACK.
        await b.execute("BEGIN")
        await b.execute(f"INSERT INTO {table} (v) VALUES (2)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            await b.execute(f"INSERT INTO {table} (id, v) SELECT id, v FROM {table}")
        assert b.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        # The failed transaction keeps the only server: a's query must wait...
        waiting = asyncio.create_task(a.fetchval(f"SELECT count(*) FROM {table}"))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            await b.execute("SELECT 1")
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await b.execute("ROLLBACK")
        # ...and sees nothing of it once b has rolled back.
        assert await asyncio.wait_for(waiting, 15) == 0

        # Both connections are as good as new.
        for i in range(5):
            async with a.transaction():
                await a.execute(f"INSERT INTO {table} (v) VALUES ($1)", i)
            async with b.transaction():
                await b.execute(f"INSERT INTO {table} (v) VALUES (%s)", (i,))
        assert await a.fetchval(f"SELECT count(*) FROM {table}") == 10
        cur = await b.execute("SELECT now() = statement_timestamp()")
        assert await cur.fetchone() == (True,)  # not inside some leftover transaction
    finally:
        await close_quietly(a, b)


async def test_large_messages_both_ways(pgmux: PgmuxFactory) -> None:
    """A 4 MB query and a ~20 MB result go through whole, with another client in between."""
    mux = pgmux({"pool": {"size": 1}})
    a = await connect_asyncpg(mux)
    b = await connect_asyncpg(mux)
    try:
        literal = "x" * (4 << 20)
        big, small = await asyncio.gather(
            a.fetchval(f"SELECT length('{literal}')"),
            b.fetchval("SELECT length($1::text)", literal),
        )
        assert big == small == len(literal)
        rows = await a.fetch("SELECT i, repeat('y', 1000) AS pad FROM generate_series(1, 20000) i")
        assert len(rows) == 20000
        assert sum(r["i"] for r in rows) == sum(range(1, 20001))
        assert all(len(r["pad"]) == 1000 for r in rows)
        assert await b.fetchval("SELECT 5") == 5
    finally:
        await close_quietly(a, b)


async def test_psycopg_and_asyncpg_share_a_pool(pgmux: PgmuxFactory) -> None:
    """Different drivers on the same pool: both see correct, independent results."""
    mux = pgmux(ONE_SERVER)
    a = await connect_asyncpg(mux)
    b = await connect_psycopg(mux)
    try:

        async def via_asyncpg() -> None:
            for i in range(50):
                assert await a.fetchval("SELECT $1::int + 1", i) == i + 1

        async def via_psycopg() -> None:
            for i in range(50):
                cur = await b.execute("SELECT %s::int * 3", (i,))
                assert await cur.fetchone() == (i * 3,)

        await asyncio.gather(via_asyncpg(), via_psycopg())
    finally:
        await close_quietly(a, b)

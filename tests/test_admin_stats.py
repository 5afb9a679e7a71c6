"""Acceptance: SHOW POOLS / STATS numbers are true, from the real data path.

Known load in, exact numbers out: N clients holding transactions are N
cl_active and N sv_active; a client queued on a saturated pool is cl_waiting
with a growing maxwait; M transactions are M in total_xact_count, in
STATS_TOTALS and in /metrics; the bytes of one hand-written Query and of
PostgreSQL's answer are counted to the byte.
"""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest
from helpers import (
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from test_admin_console import admin_psycopg, console_config, row_for, show

pytestmark = pytest.mark.timeout(120)


def scrape(mux: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, labels)."""
    port = mux.config["admin"]["http"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


APP = (("database", "appdb"), ("user", "app"))


async def pools_row(console: Any) -> dict[str, Any]:
    return row_for(await show(console, "POOLS"), database="appdb", user="app")


async def test_show_pools_matches_reality(pgmux: PgmuxFactory) -> None:
    mux = pgmux({**console_config(), "pool": {"size": 3}})
    holders = [await connect_asyncpg(mux) for _ in range(3)]
    waiter = await connect_asyncpg(mux)
    console = await admin_psycopg(mux)
    try:
        transactions = []
        for conn in holders:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("SELECT 1")
            transactions.append(tx)
        row = await pools_row(console)
        assert (row["cl_active"], row["cl_waiting"], row["sv_active"]) == (4, 0, 3)
        assert row["sv_idle"] == 0 and row["maxwait"] == 0 and row["maxwait_us"] == 0
        metrics = scrape(mux)
        assert metrics[("pgmux_pool_server_active", APP)] == 3
        assert metrics[("pgmux_pool_client_waiting", APP)] == 0

        # The fourth client has to wait: the pool is saturated.
        query = asyncio.create_task(waiter.fetchval("SELECT 42"))
        row = await wait_until(
            lambda: pools_row(console),
            lambda r: r["cl_waiting"] == 1 and (r["maxwait"] or r["maxwait_us"]),
            timeout=10,
            what="a waiting client with maxwait > 0",
        )
        assert (row["cl_active"], row["sv_active"]) == (3, 3)
        clients = [c for c in await show(console, "CLIENTS") if c["database"] == "appdb"]
        assert [c["state"] for c in clients].count("waiting") == 1
        metrics = scrape(mux)
        assert metrics[("pgmux_pool_client_waiting", APP)] == 1
        assert metrics[("pgmux_pool_max_wait_seconds", APP)] > 0
        assert not query.done()

        await transactions[0].commit()  # frees a server: the waiter gets it
        assert await asyncio.wait_for(query, 10) == 42
        row = await pools_row(console)
        assert (row["cl_waiting"], row["sv_active"], row["sv_idle"]) == (0, 2, 1)
        for tx in transactions[1:]:
            await tx.commit()
        row = await pools_row(console)
        assert (row["cl_active"], row["sv_active"], row["sv_idle"]) == (4, 0, 3)
        stats = row_for(await show(console, "STATS"), database="appdb")
        assert stats["total_wait_time"] > 0  # the waiter's wait, in microseconds
    finally:
        await close_quietly(*holders, waiter, console)


CLIENTS = 4
AUTOCOMMIT = 5


async def test_stats_count_transactions_and_queries_exactly(pgmux: PgmuxFactory) -> None:
    mux = pgmux({**console_config(), "pool": {"size": 2}})
    console = await admin_psycopg(mux)
    conns = [await connect_psycopg(mux) for _ in range(CLIENTS)]
    try:

        async def work(conn: Any) -> None:
            for i in range(AUTOCOMMIT):
                await conn.execute("SELECT %s::int", (i,))  # one transaction, one query
            async with conn.transaction():  # BEGIN, 2 x SELECT, COMMIT: 1 transaction
                await conn.execute("SELECT 1")
                await conn.execute("SELECT 2")

        await asyncio.gather(*(work(c) for c in conns))
        xacts = CLIENTS * (AUTOCOMMIT + 1)
        queries = CLIENTS * (AUTOCOMMIT + 4)
        stats = row_for(await show(console, "STATS"), database="appdb")
        assert stats["total_xact_count"] == xacts
        assert stats["total_query_count"] == queries
        assert stats["total_server_assignment_count"] >= xacts
        assert stats["total_received"] > 0 and stats["total_sent"] > 0
        assert stats["total_xact_time"] > 0 and stats["total_query_time"] > 0
        totals = row_for(await show(console, "STATS_TOTALS"), database="appdb")
        assert (totals["xact_count"], totals["query_count"]) == (xacts, queries)
        assert totals["bytes_received"] == stats["total_received"]
        overall = {r["name"]: r["value"] for r in await show(console, "TOTALS")}
        assert overall["total_xact_count"] == xacts + 3  # and the console's three SHOWs
        metrics = scrape(mux)
        assert metrics[("pgmux_transactions_total", APP)] == xacts
        assert metrics[("pgmux_queries_total", APP)] == queries
        assert metrics[("pgmux_transaction_duration_seconds_count", APP)] == xacts
        assert metrics[("pgmux_query_duration_seconds_count", APP)] == queries
        assert metrics[("pgmux_received_bytes_total", APP)] == stats["total_received"]

        # One more transaction adds exactly one, and exactly its bytes.
        raw = await RawClient.open(mux)
        await raw.login("app", "app-secret", "appdb")
        before = row_for(await show(console, "STATS"), database="appdb")
        result = await raw.query("SELECT 1")
        assert result.rows == [["1"]]
        after = row_for(await show(console, "STATS"), database="appdb")
        await raw.close()
        assert after["total_xact_count"] - before["total_xact_count"] == 1
        assert after["total_query_count"] - before["total_query_count"] == 1
        # Query 'Q' + length + "SELECT 1\0"
        assert after["total_received"] - before["total_received"] == 1 + 4 + 9
        # RowDescription(34) + DataRow(12) + CommandComplete(14) + ReadyForQuery(6)
        assert after["total_sent"] - before["total_sent"] == 34 + 12 + 14 + 6
    finally:
        await close_quietly(console, *conns)


async def test_stats_averages_cover_the_last_period(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config(stats_period="1s"))
    console = await admin_psycopg(mux)
    conn = await connect_psycopg(mux)
    try:
        for _ in range(10):
            await conn.execute("SELECT pg_sleep(0.05)")
        row = await wait_until(
            lambda: show(console, "STATS_AVERAGES"),
            lambda rows: any(r["database"] == "appdb" and r["xact_count"] > 0 for r in rows),
            timeout=10,
            what="a stats period with transactions",
        )
        avg = row_for(row, database="appdb")
        assert avg["xact_time"] >= 50_000  # each transaction slept 50 ms
        assert avg["query_time"] >= 50_000
        assert avg["bytes_received"] > 0 and avg["bytes_sent"] > 0
        full = row_for(await show(console, "STATS"), database="appdb")
        assert full["avg_xact_count"] >= 0 and full["avg_xact_time"] >= 0
        # Idle periods bring the rates back to zero; the totals stay.
        row = await wait_until(
            lambda: show(console, "STATS_AVERAGES"),
            lambda rows: row_for(rows, database="appdb")["xact_count"] == 0,
            timeout=10,
            what="an idle stats period",
        )
        assert row_for(await show(console, "STATS"), database="appdb")["total_xact_count"] == 10
    finally:
        await close_quietly(console, conn)

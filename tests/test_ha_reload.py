"""A reload that changes a database's host list, under transfer load.

One PostgreSQL reachable two ways (its unix socket and 127.0.0.1) stands for
two hosts of one database, so the transfers see the same rows whichever
server they get. `load_balance_hosts: round-robin` spreads the servers over
both; the reload (SIGHUP or the console's RELOAD) drops the TCP host: its
servers drain (idle ones close, busy ones when their transaction ends),
no transaction is dropped, and the new servers use the socket only.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from faultload import SETUP_SQL, check_books, start_load, stop_load
from helpers import APP_DB, PgmuxFactory, close_quietly, connect_asyncpg, wait_until

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(90)

CLIENTS = 12
HELD_WRITE = "INSERT INTO transfers VALUES (9999, 1, 1, 1, 0)"  # moves nothing


def database(pg: TempPostgres, *hosts: str) -> dict:
    return {"host": list(hosts), "port": pg.port, "load_balance_hosts": "round-robin"}


async def tcp_backends(pg: TempPostgres) -> int:
    query = (
        f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{APP_DB}'"
        " AND usename = 'app' AND client_addr IS NOT NULL"
    )
    return int(await asyncio.to_thread(pg.sql, query))


async def reload(mux: object, how: str) -> None:
    if how == "sighup":
        mux.signal(signal.SIGHUP)  # type: ignore[attr-defined]
        return
    console = await connect_asyncpg(mux, dbname="pgmux", user="admin", password="admin-secret")
    try:
        await console.execute("RELOAD")
    finally:
        await console.close()


@pytest.mark.parametrize("how", ["sighup", "console"])
async def test_reload_drops_a_host_without_dropping_transactions(
    own_pg: TempPostgres, pgmux: PgmuxFactory, how: str
) -> None:
    pg = own_pg
    pg.sql(SETUP_SQL, APP_DB)
    config = {
        "databases": {APP_DB: database(pg, pg.socket_dir, "127.0.0.1")},
        "pool": {"mode": "transaction", "size": 6},
        "admin": {"users": ["admin"]},
    }
    mux = pgmux(config)
    held = await connect_asyncpg(mux)  # a transaction open on the TCP host across the reload
    load, stop, tasks = start_load(mux, CLIENTS)
    try:
        await wait_until(lambda: tcp_backends(pg), lambda n: n >= 2, timeout=10, what="TCP servers")
        transaction = held.transaction()
        for _ in range(10):  # round-robin: one of the next servers is a TCP one
            await transaction.start()
            if await held.fetchval("SELECT inet_server_addr() IS NOT NULL"):
                break
            await transaction.rollback()
            transaction = held.transaction()
        else:
            pytest.fail("no transaction landed on the TCP host")
        await held.execute(HELD_WRITE)  # no row lock the transfers would wait for
        committed_before = len(load.acknowledged)

        mux.write_config({**config, "databases": {APP_DB: database(pg, pg.socket_dir)}})
        await reload(mux, how)
        await wait_until(
            lambda: asyncio.to_thread(mux.logs),
            lambda logs: "server_host_unlisted" in logs,
            timeout=10,
            what="the reload",
        )
        assert await tcp_backends(pg) >= 1, "the busy TCP server was closed mid-transaction"
        assert await held.fetchval("SELECT inet_server_addr() IS NOT NULL")  # still there
        await transaction.commit()
        await wait_until(lambda: tcp_backends(pg), lambda n: n == 0, timeout=10, what="drained")
        await asyncio.sleep(0.5)  # the load runs on, on the socket only
        assert await tcp_backends(pg) == 0, "a new server used the unlisted host"
        assert await held.fetchval("SELECT inet_server_addr() IS NULL")
    finally:
        await stop_load(stop, tasks)
        await close_quietly(held)
    assert len(load.acknowledged) > committed_before, "no commit after the reload"
    errors = [error for c in load.clients for (_, _, error) in c.errors]
    assert not errors and load.hangs == 0, f"{len(errors)} errors: {errors[:3]}"
    check_books(load, lambda query: pg.sql(query, APP_DB))
    assert pg.sql("SELECT count(*) FROM transfers WHERE client = 9999", APP_DB) == "1"

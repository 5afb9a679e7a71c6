"""Acceptance: pgmux survives its neighbours failing.

PostgreSQL stopped and started again (clients get a clear error while it is
down, no hang, and the pool heals), and a client killed in the middle of a
transaction (its server is rolled back or closed, never handed on with the
transaction, its row lock or its advisory lock still held).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import asyncpg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    close_quietly,
    connect_asyncpg,
    direct,
    fresh_database,
    wait_until,
)

from pgmux.tempgres import TempPostgres

# The clear error must come within query_wait (+ connect and retry time),
# so a wait of this long means pgmux hung.
HANG = 20.0


@pytest.fixture
def own_pg() -> Iterator[TempPostgres]:
    """A PostgreSQL of this test's own, so stopping it does not disturb the others."""
    with TempPostgres(max_connections=20) as cluster:
        cluster.create_role(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        yield cluster


async def attempt(mux: object) -> str:
    """Connect and query; 'ok', or the error a client saw ('hang' if none came)."""
    conn = None
    try:
        conn = await asyncio.wait_for(connect_asyncpg(mux), HANG)
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), HANG) == 1
        return "ok"
    except TimeoutError:
        return "hang"
    except asyncpg.PostgresError as exc:
        return f"{exc.sqlstate}: {exc}"
    finally:
        await close_quietly(conn)


@pytest.mark.timeout(120)
async def test_postgres_restart(own_pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux(
        {
            "databases": {"*": {"host": own_pg.host, "port": own_pg.port}},
            "pool": {"size": 2},
            "timeouts": {"query_wait": "2s", "server_connect": "1s", "server_login_retry": "1s"},
        }
    )
    old = await connect_asyncpg(mux)
    try:
        assert await old.fetchval("SELECT 1") == 1
        own_pg.stop("fast")

        # While it is down: an ErrorResponse with a SQLSTATE, promptly, for a new client...
        outcome = await attempt(mux)
        assert outcome != "hang", "pgmux hung while PostgreSQL was down"
        assert outcome != "ok", "a query succeeded with PostgreSQL stopped?"
        assert outcome[:2] in {"08", "57", "53"}, outcome
        # ...and for a client that was connected before (an error or a close, not a hang).
        try:
            await asyncio.wait_for(old.fetchval("SELECT 1"), HANG)
            pytest.fail("a query succeeded with PostgreSQL stopped?")
        except TimeoutError:
            pytest.fail("pgmux hung an existing client while PostgreSQL was down")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
            pass

        own_pg.start()
        await wait_until(
            lambda: attempt(mux), lambda r: r == "ok", timeout=30, interval=0.5, what="pool healed"
        )
        # Several clients at once, more than the pool size: the pool is whole again.
        results = await asyncio.gather(*(attempt(mux) for _ in range(6)))
        assert results == ["ok"] * 6
        if not old.is_closed():
            assert await asyncio.wait_for(old.fetchval("SELECT 2"), HANG) == 2
    finally:
        await close_quietly(old)


# A client that takes a row lock and a transaction-level advisory lock, says so,
# and waits to be killed.
LOCKER = textwrap.dedent(
    """
    import asyncio, sys
    import asyncpg

    async def main(port, dbname, table, key):
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app",
                                     password="app-secret", database=dbname,
                                     statement_cache_size=0)
        await conn.execute("BEGIN")
        await conn.fetchval(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE")
        await conn.execute(f"UPDATE {table} SET v = v + 100 WHERE id = 1")
        await conn.fetchval("SELECT pg_advisory_xact_lock($1)", key)
        print("locked", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rollback_abandoned", [True, False])
async def test_client_killed_mid_transaction(
    pg: TempPostgres, pgmux: PgmuxFactory, rollback_abandoned: bool
) -> None:
    dbname = fresh_database(pg)
    table, key = "locked_rows", 424242
    pg.sql(
        f"CREATE TABLE {table} (id int PRIMARY KEY, v int); INSERT INTO {table} VALUES (1, 1)",
        dbname,
    )
    pg.sql(f"ALTER TABLE {table} OWNER TO app", dbname)
    mux = pgmux({"pool": {"size": 1, "rollback_abandoned": rollback_abandoned}})

    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(mux.port), dbname, table, str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    monitor = await direct(pg, dbname)
    client = None
    try:
        assert locker.stdout is not None and locker.stderr is not None
        line = await asyncio.wait_for(asyncio.to_thread(locker.stdout.readline), 20)
        if line.strip() != "locked":
            locker.kill()
            pytest.fail(f"the locking client failed: {line}{locker.stderr.read()}")
        # The locks really are held (by the server pgmux gave the locker).
        assert await monitor.fetchval("SELECT pg_try_advisory_lock($1)", key) is False
        locker.kill()
        locker.wait(10)
        killed_at = await monitor.fetchval("SELECT clock_timestamp()")

        # Directly on PostgreSQL: the transaction is gone with its locks.
        await wait_until(
            lambda: monitor.fetchval("SELECT pg_try_advisory_lock($1)", key),
            lambda got: got is True,
            timeout=15,
            what="the advisory xact lock released",
        )
        await monitor.fetchval("SELECT pg_advisory_unlock($1)", key)
        async with monitor.transaction():
            row = await monitor.fetchval(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE NOWAIT")
        assert row == 1, "the killed client's UPDATE was committed"
        assert (
            await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                " AND state LIKE 'idle in transaction%'",
                dbname,
            )
            == 0
        )

        # Through pgmux, on the pool's only server: no open transaction, locks free.
        client = await connect_asyncpg(mux, dbname)
        # An open transaction left behind would report its old start time.
        assert await client.fetchval("SELECT now() >= $1::timestamptz", killed_at) is True
        async with client.transaction():
            assert await client.fetchval("SELECT pg_try_advisory_xact_lock($1)", key) is True
            assert (
                await client.fetchval(f"UPDATE {table} SET v = v + 1 WHERE id = 1 RETURNING v") == 2
            )
        assert await client.fetchval(f"SELECT v FROM {table} WHERE id = 1") == 2
    finally:
        if locker.poll() is None:
            locker.kill()
        locker.wait(10)
        for stream in (locker.stdout, locker.stderr):
            if stream is not None:
                stream.close()
        await close_quietly(monitor, client)

"""Acceptance: the console commands change what clients see, and only that.

PAUSE makes new transactions wait and RESUME lets them run without errors;
KILL_CLIENT ends one client; DISABLE refuses new logins with a clear error;
RECONNECT replaces servers once their transaction ends; SHUTDOWN
WAIT_FOR_CLIENTS lets running transactions finish. Every wait is a bounded
poll; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest
from helpers import PgmuxFactory, close_quietly, connect_asyncpg, connect_psycopg, wait_until
from test_admin_console import admin_psycopg, console_config, psql, row_for, show

pytestmark = pytest.mark.timeout(120)


async def begin(conn: asyncpg.Connection) -> Any:
    tx = conn.transaction()
    await tx.start()
    await conn.execute("SELECT 1")
    return tx


async def state(console: Any) -> dict[str, str]:
    return {r["key"]: r["value"] for r in await show(console, "STATE")}


async def test_pause_waits_for_transactions_and_resume_releases(pgmux: PgmuxFactory) -> None:
    mux = pgmux({**console_config(), "pool": {"size": 2}, "timeouts": {"query_wait": "30s"}})
    running = await connect_asyncpg(mux)
    later = await connect_asyncpg(mux)
    pauser = await admin_psycopg(mux)
    watcher = await admin_psycopg(mux)
    try:
        tx = await begin(running)
        pause = asyncio.create_task(pauser.execute("PAUSE"))
        await wait_until(lambda: state(watcher), lambda s: s["paused"] == "yes", timeout=10)
        await asyncio.sleep(0.3)
        assert not pause.done(), "PAUSE returned while a transaction was still running"
        # The running transaction is not disturbed and may finish.
        assert await running.fetchval("SELECT 2") == 2
        await tx.commit()
        await asyncio.wait_for(pause, 10)
        servers = [s for s in await show(watcher, "SERVERS") if s["database"] == "appdb"]
        assert servers == [], "PAUSE leaves no server connected"

        # New transactions wait while paused...
        query = asyncio.create_task(later.fetchval("SELECT 3"))
        await wait_until(
            lambda: show(watcher, "POOLS"),
            lambda rows: row_for(rows, database="appdb")["cl_waiting"] == 1,
            timeout=10,
        )
        await asyncio.sleep(0.3)
        assert not query.done()
        # ...and RESUME lets them run, without an error.
        await watcher.execute("RESUME")
        assert await asyncio.wait_for(query, 10) == 3
        assert (await state(watcher))["paused"] == "no"
    finally:
        await close_quietly(running, later, pauser, watcher)


async def test_pause_one_database(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    app = await connect_asyncpg(mux)
    other = await connect_asyncpg(mux, dbname="other")
    console = await admin_psycopg(mux)
    try:
        await console.execute("PAUSE appdb")
        query = asyncio.create_task(app.fetchval("SELECT 1"))
        assert await other.fetchval("SELECT 2") == 2  # another database runs on
        databases = await show(console, "DATABASES")
        assert row_for(databases, name="appdb")["paused"] == 1
        assert row_for(databases, name="other")["paused"] == 0
        await asyncio.sleep(0.3)
        assert not query.done()
        await console.execute("RESUME appdb")
        assert await asyncio.wait_for(query, 10) == 1
    finally:
        await close_quietly(app, other, console)


async def test_kill_client_ends_one_client_only(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    victim = await connect_psycopg(mux, application_name="victim")
    bystander = await connect_asyncpg(mux, server_settings={"application_name": "bystander"})
    console = await admin_psycopg(mux)
    try:
        clients = await show(console, "CLIENTS")
        target = row_for(clients, application_name="victim")["id"]
        cur = await console.execute(f"KILL_CLIENT {target}")
        assert cur.statusmessage == "KILL_CLIENT"
        with pytest.raises(psycopg.OperationalError, match="admin forced disconnect"):
            await victim.execute("SELECT 1")
        assert await bystander.fetchval("SELECT 2") == 2
        names = [c["application_name"] for c in await show(console, "CLIENTS")]
        assert "victim" not in names and "bystander" in names
    finally:
        await close_quietly(victim, bystander, console)


async def test_disable_refuses_new_logins(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    connected = await connect_asyncpg(mux)
    console = await admin_psycopg(mux)
    try:
        await console.execute("DISABLE appdb")
        with pytest.raises(asyncpg.PostgresError) as info:
            refused = await connect_asyncpg(mux)
            await refused.close()
        assert info.value.sqlstate == "57P03"
        assert 'database "appdb" is disabled' in str(info.value)
        assert await connected.fetchval("SELECT 1") == 1  # those inside stay
        assert row_for(await show(console, "DATABASES"), name="appdb")["disabled"] == 1
        await console.execute("ENABLE appdb")
        welcome = await connect_asyncpg(mux)
        assert await welcome.fetchval("SELECT 2") == 2
        await welcome.close()
    finally:
        await close_quietly(connected, console)


async def test_reconnect_replaces_servers_after_their_transaction(pgmux: PgmuxFactory) -> None:
    mux = pgmux({**console_config(), "pool": {"size": 1}})
    conn = await connect_asyncpg(mux)
    console = await admin_psycopg(mux)
    waiter = await admin_psycopg(mux)
    try:
        tx = await begin(conn)
        before = await conn.fetchval("SELECT pg_backend_pid()")
        await console.execute("RECONNECT appdb")
        server = row_for(await show(console, "SERVERS"), database="appdb")
        assert server["close_needed"] == 1 and server["remote_pid"] == before
        wait_close = asyncio.create_task(waiter.execute("WAIT_CLOSE appdb"))
        # The transaction in progress keeps its server to the end.
        assert await conn.fetchval("SELECT pg_backend_pid()") == before
        await asyncio.sleep(0.3)
        assert not wait_close.done()
        await tx.commit()
        await asyncio.wait_for(wait_close, 10)
        after = await conn.fetchval("SELECT pg_backend_pid()")
        assert after != before
    finally:
        await close_quietly(conn, console, waiter)


async def test_kill_database_then_resume(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    app = await connect_psycopg(mux)
    other = await connect_asyncpg(mux, dbname="other")
    console = await admin_psycopg(mux)
    try:
        await app.execute("SELECT 1")
        await console.execute("KILL appdb")
        with pytest.raises(psycopg.OperationalError, match="KILL"):
            await app.execute("SELECT 1")
        assert await other.fetchval("SELECT 2") == 2
        await console.execute("RESUME appdb")
        again = await connect_asyncpg(mux)
        assert await again.fetchval("SELECT 3") == 3
        await again.close()
    finally:
        await close_quietly(app, other, console)


async def test_suspend_and_resume(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    app = await connect_asyncpg(mux)
    console = await admin_psycopg(mux)
    try:
        await console.execute("SUSPEND")
        assert (await state(console))["suspended"] == "yes"
        query = asyncio.create_task(app.fetchval("SELECT 5"))
        await asyncio.sleep(0.3)
        assert not query.done()
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            await console.execute("PAUSE")
        await console.execute("RESUME")
        assert await asyncio.wait_for(query, 10) == 5
    finally:
        await close_quietly(app, console)


async def test_reload(pgmux: PgmuxFactory) -> None:
    mux = pgmux({**console_config(), "pool": {"size": 4}})
    console = await admin_psycopg(mux)
    try:
        mux.write_config({"admin": mux.config["admin"], "pool": {"size": 7}})
        cur = await console.execute("RELOAD")
        assert cur.statusmessage == "RELOAD"
        config = {r["key"]: r["value"] for r in await show(console, "CONFIG")}
        assert config["pool.size"] == "7"
        mux.config_path.write_text("pool: {size: [not a number]}\n")
        with pytest.raises(psycopg.errors.ConfigFileError):
            await console.execute("RELOAD")
        assert (await show(console, "VERSION"))[0]["version"]  # still usable
    finally:
        await close_quietly(console)


async def test_set_pool_size_serves_the_queue_and_keeps_servers(
    pgmux: PgmuxFactory, pg: Any
) -> None:
    """SET pool.size applies to the pools that inherit it at once: a waiting
    client gets a new server, the busy one stays linked to its client, and a
    database with its own pool_size keeps it."""
    own = {"host": pg.host, "port": pg.port, "pool_size": 3}
    mux = pgmux({**console_config(), "pool": {"size": 1}, "databases": {"other": own}})
    holder = await connect_asyncpg(mux)
    queued = await connect_asyncpg(mux)
    console = await admin_psycopg(mux)
    try:
        tx = await begin(holder)
        backend = await holder.fetchval("SELECT pg_backend_pid()")
        query = asyncio.create_task(queued.fetchval("SELECT 6"))
        await asyncio.sleep(0.3)
        assert not query.done(), "pool.size 1 served a second client"
        cur = await console.execute("SET pool.size = 2")
        assert cur.statusmessage == "SET pool.size=2"
        assert await asyncio.wait_for(query, 10) == 6
        assert await holder.fetchval("SELECT pg_backend_pid()") == backend
        await tx.commit()
        appdb = row_for(await show(console, "POOLS"), database="appdb")
        assert appdb["sv_active"] + appdb["sv_idle"] == 2
        databases = await show(console, "DATABASES")
        assert row_for(databases, name="appdb")["pool_size"] == 2
        assert row_for(databases, name="other")["pool_size"] == 3
    finally:
        await close_quietly(holder, queued, console)


async def test_shutdown_wait_for_clients_lets_transactions_finish(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    conn = await connect_asyncpg(mux)
    try:
        tx = await begin(conn)
        done = psql(mux, "SHUTDOWN WAIT_FOR_CLIENTS")
        assert done.returncode == 0, done.stderr
        # No new client gets in...
        with pytest.raises((OSError, asyncpg.PostgresError, asyncio.TimeoutError)):
            late = await connect_asyncpg(mux, timeout=3)
            await late.close()
        # ...the running transaction finishes...
        assert await conn.fetchval("SELECT 41 + 1") == 42
        await tx.commit()
        # ...then pgmux exits cleanly.
        assert await asyncio.to_thread(mux.wait, 20) == 0
    finally:
        await close_quietly(conn)

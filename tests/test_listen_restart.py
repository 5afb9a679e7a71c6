"""Acceptance: the notification relay across a PostgreSQL restart.

A psycopg 3 and an asyncpg client listen through pgmux while PostgreSQL is
restarted (pg_ctl restart -m fast, as test_faults_postgres.py does). The
relay's connection is lost with it; pgmux reconnects, listens again, tells
each listening client with a NOTICE that notifications may have been missed,
and every notification sent after that NOTICE is delivered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from helpers import APP_DB, close_quietly, connect_asyncpg, connect_psycopg
from test_faults_postgres import pg_ctl_restart
from test_listen_notify import ADMIN, drain_psycopg, notify, until

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)


async def test_relay_comes_back_after_a_restart(own_pg: TempPostgres, pgmux: Any) -> None:
    mux = pgmux(
        {
            "databases": {APP_DB: {"host": own_pg.host, "port": own_pg.port}},
            "pool": {"mode": "transaction", "size": 2},
            "admin": {"users": ["admin"]},
            "timeouts": {"query_wait": "30s", "server_connect": "2s"},
        }
    )
    ps = await connect_psycopg(mux)
    notices: list[str] = []
    ps.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    await ps.execute("LISTEN restart_ps")
    ap = await connect_asyncpg(mux)
    ap_notices: list[str] = []
    ap_got: list[str] = []
    ap.add_log_listener(lambda conn, msg: ap_notices.append(str(msg)))
    await ap.add_listener("restart_ap", lambda *a: ap_got.append(a[3]))
    before = [f"before {i}" for i in range(10)]
    await notify(own_pg, "restart_ps", before)
    await notify(own_pg, "restart_ap", before)
    assert await drain_psycopg(ps, 10, 10) == before
    await until(lambda: len(ap_got) == 10, 10, "asyncpg's first notifications")

    await asyncio.to_thread(pg_ctl_restart, own_pg, "fast")
    # psycopg hands a NOTICE to its handler as it reads: a query reads
    await until_notice(ps, notices)
    await until(lambda: bool(ap_notices), 30, "asyncpg's NOTICE")
    assert "may have been missed" in notices[0] and "may have been missed" in ap_notices[0]

    after = [f"after {i}" for i in range(100)]
    await notify(own_pg, "restart_ps", after)
    await notify(own_pg, "restart_ap", after)
    assert await drain_psycopg(ps, 100, 20) == after
    await until(lambda: len(ap_got) == 110, 20, "asyncpg's later notifications")
    assert ap_got[10:] == after
    console = await connect_psycopg(mux, dbname="pgmux", user=ADMIN[0], password=ADMIN[1])
    cur = await console.execute("SHOW LISTENERS")
    names = [d.name for d in cur.description or []]
    row = dict(zip(names, (await cur.fetchall())[0], strict=True))
    assert row["relay_reconnects"] == 1 and row["channels"] == 2
    await close_quietly(ps, ap, console)


async def until_notice(conn: psycopg.AsyncConnection[Any], notices: list[str]) -> None:
    """psycopg sees an unprompted NOTICE when it next reads: poll with a query."""
    for _ in range(300):
        if notices:
            return
        await conn.execute("SELECT 1")
        await asyncio.sleep(0.1)
    raise AssertionError("no NOTICE from the relay after the restart")

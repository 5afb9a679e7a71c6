"""Fault suite: a client killed in every protocol state.

A hand-written client gets into a state (before its startup packet, half way
through it, inside a password message or between SCRAM messages, idle, mid
Query header or body, idle in a transaction holding a row lock, mid extended
batch before Sync, inside COPY FROM STDIN, while COPY TO STDOUT streams,
queued for the only server, during a long query) and its socket is then
closed: with a FIN, or with an RST (SO_LINGER 0). The pool has one server,
so the next client needs that very server back. After each kill: the pool's
counters settle (SHOW POOLS: no client active or waiting, no server active
or being cleaned; SHOW CLIENTS has nobody left) within a short bound, the
next client takes the same row lock within it (the server went back clean or
was closed), and pgmux logged no unhandled exception. The times are printed
(run with -s).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from helpers import (
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    direct,
    fresh_database,
    message,
    query_message,
    startup_packet,
    wait_until,
)
from scramp import ScramClient
from test_admin_console import admin_psycopg, console_config, show

from pgmux.tempgres import TempPostgres

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

CLEAN_WITHIN = 5.0  # generous for a loaded 2-core machine; the measured times are far lower
LOCK = "UPDATE t SET v = v + 1 WHERE id = 1"


@pytest.fixture(scope="module")
def killdb(pg: TempPostgres) -> str:
    dbname = fresh_database(pg)
    pg.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0);"
        "CREATE TABLE sink (a int, b int); GRANT ALL ON t, sink TO app",
        dbname,
    )
    return dbname


@dataclass
class Victim:
    raw: RawClient
    backend: int | None = None  # the backend it held, if it had one


# --- getting into each state --------------------------------------------------


async def opened(mux: object, dbname: str) -> Victim:
    return Victim(await RawClient.open(mux))


async def mid_startup(mux: object, dbname: str) -> Victim:
    raw = await RawClient.open(mux)
    packet = startup_packet({"user": APP_USER, "database": dbname})
    await raw.send(packet[: len(packet) // 2])
    return Victim(raw)


async def asked_for_sasl(mux: object, dbname: str) -> tuple[RawClient, bytes]:
    """Startup sent, AuthenticationSASL read; returns the SASLInitialResponse to send."""
    raw = await RawClient.open(mux)
    await raw.send(startup_packet({"user": APP_USER, "database": dbname}))
    request = await raw.read_message()
    assert request is not None and struct.unpack("!I", request[1][:4])[0] == 10, request
    scram = ScramClient(["SCRAM-SHA-256"], APP_USER, APP_PASSWORD)
    first = scram.get_client_first().encode()
    return raw, message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)


async def mid_password_message(mux: object, dbname: str) -> Victim:
    """Half of the SASLInitialResponse sent."""
    raw, initial = await asked_for_sasl(mux, dbname)
    await raw.send(initial[: len(initial) // 2])
    await asyncio.sleep(0.1)
    return Victim(raw)


async def mid_scram(mux: object, dbname: str) -> Victim:
    """SASLInitialResponse sent, SASLContinue read; the SASLResponse never comes."""
    raw, initial = await asked_for_sasl(mux, dbname)
    await raw.send(initial)
    reply = await raw.read_message()
    assert reply is not None and struct.unpack("!I", reply[1][:4])[0] == 11, reply
    return Victim(raw)


async def logged_in(mux: object, dbname: str) -> Victim:
    raw = await RawClient.open(mux)
    await raw.login(APP_USER, APP_PASSWORD, dbname)
    return Victim(raw)


async def holding_lock(mux: object, dbname: str) -> Victim:
    """In a transaction that holds the row lock the next client will want."""
    victim = await logged_in(mux, dbname)
    assert (await victim.raw.query("BEGIN")).status == "T"
    assert (await victim.raw.query(LOCK)).status == "T"
    result = await victim.raw.query("SELECT pg_backend_pid()")
    victim.backend = int(result.rows[0][0] or 0)
    return victim


def then_send(data: bytes) -> Callable[[object, str], Awaitable[Victim]]:
    async def state(mux: object, dbname: str) -> Victim:
        victim = await holding_lock(mux, dbname)
        await victim.raw.send(data)
        await asyncio.sleep(0.1)  # let pgmux read it
        return victim

    return state


def execute(sql: str) -> bytes:
    """Parse, Bind and Execute of SQL (unnamed statement and portal)."""
    return (
        message(b"P", b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))
        + message(b"B", b"\0\0" + struct.pack("!HHH", 0, 0, 0))
        + message(b"E", b"\0" + struct.pack("!I", 0))
    )


async def mid_batch(mux: object, dbname: str) -> Victim:
    """The locking UPDATE and pg_backend_pid() in a batch with a Flush; the Sync never comes."""
    victim = await logged_in(mux, dbname)
    await victim.raw.send(execute(LOCK) + execute("SELECT pg_backend_pid()") + message(b"H"))
    completed = 0
    while completed < 2:
        reply = await victim.raw.read_message()
        assert reply is not None, "closed mid batch"
        if reply[0] == b"D":
            victim.backend = int(reply[1][6:])  # one column: count, length, the text
        completed += reply[0] == b"C"
    return victim


async def in_copy_in(mux: object, dbname: str) -> Victim:
    victim = await holding_lock(mux, dbname)
    await victim.raw.send(query_message("COPY sink FROM STDIN"))
    reply = await victim.raw.read_message()
    assert reply is not None and reply[0] == b"G", reply
    await victim.raw.send(message(b"d", b"1\t2\n"))
    await asyncio.sleep(0.1)
    return victim


async def in_copy_out(mux: object, dbname: str) -> Victim:
    """COPY TO STDOUT of 5 million rows, a few hundred read, the rest still coming."""
    victim = await holding_lock(mux, dbname)
    await victim.raw.send(
        query_message("COPY (SELECT g, g FROM generate_series(1, 5000000) g) TO STDOUT")
    )
    for _ in range(300):
        reply = await victim.raw.read_message()
        assert reply is not None and reply[0] in (b"H", b"d"), reply
    return victim


async def long_query(mux: object, dbname: str) -> Victim:
    victim = await holding_lock(mux, dbname)
    await victim.raw.send(query_message("SELECT pg_sleep(60)"))
    await asyncio.sleep(0.3)  # it reaches PostgreSQL
    return victim


STATES: dict[str, Callable[[object, str], Awaitable[Victim]]] = {
    "before_startup": opened,
    "mid_startup": mid_startup,
    "mid_password_message": mid_password_message,
    "mid_scram": mid_scram,
    "idle": logged_in,
    "idle_in_transaction": holding_lock,
    "mid_query_header": then_send(b"Q\x00"),
    "mid_query_body": then_send(b"Q" + struct.pack("!I", 1000) + b"SELECT 1"),
    "mid_batch": mid_batch,
    "copy_in": in_copy_in,
    "copy_out": in_copy_out,
    "waiting_for_server": logged_in,  # and then a query while another holds the server
    "long_query": long_query,
}


# --- the kill and what must follow --------------------------------------------


def kill(raw: RawClient, how: str) -> None:
    """FIN: close(); RST: SO_LINGER 0 then close, so the kernel resets the connection."""
    if how == "rst":
        sock = raw.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.writer.transport.abort()


async def pool_state(console: object, dbname: str) -> tuple[int, ...]:
    """(cl_active, cl_waiting, sv_active, sv_tested, clients listed) for DBNAME."""
    pools = [r for r in await show(console, "POOLS") if r["database"] == dbname]
    clients = [r for r in await show(console, "CLIENTS") if r["database"] == dbname]
    total = [
        sum(r[k] for r in pools) for k in ("cl_active", "cl_waiting", "sv_active", "sv_tested")
    ]
    return (*total, len(clients))


async def take_the_lock(mux: object, dbname: str) -> int:
    """The next client: the only server, the row lock; returns its backend pid."""
    conn = await connect_asyncpg(mux, dbname)
    try:
        async with conn.transaction():
            await conn.execute(LOCK)
            return int(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await close_quietly(conn)


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("state", list(STATES))
async def test_client_killed(
    pg: TempPostgres, pgmux: PgmuxFactory, killdb: str, state: str, how: str
) -> None:
    mux = pgmux({"pool": {"size": 1}, "timeouts": {"query_wait": "10s"}, **console_config()})
    console = await admin_psycopg(mux)
    holder = None
    try:
        victim = await STATES[state](mux, killdb)
        if state == "waiting_for_server":
            holder = await connect_asyncpg(mux, killdb)
            holding = holder.transaction()
            await holding.start()
            await holder.execute("SELECT 1")  # the only server is linked to it
            await victim.raw.send(query_message("SELECT 1"))
            await wait_until(
                lambda: pool_state(console, killdb),
                lambda s: s[1] == 1,
                timeout=10,
                interval=0.02,
                what="the victim queued",
            )
        killed = time.monotonic()
        kill(victim.raw, how)
        expected = (1, 0, 1, 0, 1) if holder is not None else (0, 0, 0, 0, 0)
        await wait_until(
            lambda: pool_state(console, killdb),
            lambda s: s == expected,
            timeout=CLEAN_WITHIN + 5,
            interval=0.01,
            what="the pool counters settled",
        )
        settled = time.monotonic() - killed
        if holder is not None:
            await holding.rollback()
            await close_quietly(holder)
            holder = None
        backend = await asyncio.wait_for(take_the_lock(mux, killdb), CLEAN_WITHIN + 5)
        locked = time.monotonic() - killed
        await wait_until(
            lambda: pool_state(console, killdb),
            lambda s: s == (0, 0, 0, 0, 0),
            timeout=5,
            interval=0.01,
            what="the pool counters after the next client",
        )
    finally:
        await close_quietly(holder, console)
    fate = "-" if victim.backend is None else ("reused" if backend == victim.backend else "closed")
    print(
        f"{state}/{how}: counters settled {settled * 1000:.0f} ms, next client had the lock "
        f"{locked * 1000:.0f} ms after the kill; the victim's server: {fate}"
    )
    assert settled < CLEAN_WITHIN, f"the pool settled {settled:.2f} s after the kill"
    assert locked < CLEAN_WITHIN, f"the next client got the lock {locked:.2f} s after the kill"
    observer = await direct(pg, killdb)
    try:
        held = await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state <> 'idle'"
            " AND pid <> pg_backend_pid()",
            killdb,
        )
        assert held == 0, f"{held} backends of {killdb} still busy after the kill"
    finally:
        await close_quietly(observer)
    logs = mux.logs()
    assert "Traceback" not in logs and "[error" not in logs, logs[-3000:]

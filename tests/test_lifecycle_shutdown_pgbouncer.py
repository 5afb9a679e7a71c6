"""Acceptance: `shutdown: pgbouncer`, PgBouncer's SIGTERM / SIGINT.

SIGTERM stops TCP and serves every connected client, new transactions too,
until it leaves; SIGINT lets a client holding a server go on and closes one
that asks for a server, then exits once no server is in use. Meanwhile the
unix socket takes console logins only, RESUME and SIGUSR2 are refused, and a
second signal drops the sockets without a message. `shutdown: drain` (the
default) is tests/test_lifecycle_signals.py's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    wait_until,
)

from pgmux.proxy.base import pgblog
from pgmux.proxy.config import ConfigError, parse_config
from pgmux.proxy.config.ini_translate import load_pgbouncer_ini

pytestmark = pytest.mark.timeout(120)

ADMIN = ("admin", "admin-secret")
PGBOUNCER = {
    "listen": {"workers": 1},  # signals go to the daemon itself
    "admin": {"users": [ADMIN[0]]},
    "shutdown": "pgbouncer",
    "timeouts": {"shutdown_grace": "60s"},
}
DROPPED = (ConnectionError, OSError, asyncpg.exceptions.ConnectionDoesNotExistError)


async def via_unix(mux: Any, dbname: str, user: str, password: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=mux.socket_dir,
        port=mux.port,
        user=user,
        password=password,
        database=dbname,
        timeout=10,
        statement_cache_size=0,
    )


def refused(mux: Any) -> bool:
    try:
        with socket.create_connection((mux.host, mux.port), timeout=2):
            return False
    except OSError:
        return True


def unix_socket(mux: Any) -> Path:
    return Path(mux.socket_dir) / f".s.PGSQL.{mux.port}"


def test_the_setting() -> None:
    assert parse_config({}).shutdown == "drain"
    assert parse_config({"shutdown": "pgbouncer"}).shutdown == "pgbouncer"
    with pytest.raises(ConfigError, match="shutdown"):
        parse_config({"shutdown": "later"})


def test_a_pgbouncer_ini_sets_pgbouncer(tmp_path: Path) -> None:
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\n[pgbouncer]\nlisten_port = 6432\n")
    config, _ = load_pgbouncer_ini(str(ini))
    assert config.shutdown == "pgbouncer"


async def test_sigterm_serves_connected_clients_until_they_leave(pgmux: PgmuxFactory) -> None:
    mux = pgmux(PGBOUNCER)
    conn = await connect_asyncpg(mux)
    console = await via_unix(mux, "pgbouncer", *ADMIN)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        mux.signal(signal.SIGTERM)
        await wait_until(lambda: asyncio.to_thread(refused, mux), bool, timeout=10)
        await asyncio.sleep(0.3)
        # New transactions still run; drain would have ended this client.
        for i in range(3):
            assert await conn.fetchval("SELECT $1::int", i) == i
        # The unix socket: the console yes, a client of a pool no.
        late = await via_unix(mux, "pgbouncer", *ADMIN)
        assert await late.fetchval("SHOW VERSION")
        await close_quietly(late)
        with pytest.raises(asyncpg.PostgresError, match="pooler is shutting down"):
            await via_unix(mux, APP_DB, APP_USER, APP_PASSWORD)
        with pytest.raises(asyncpg.PostgresError, match="pooler is shutting down"):
            await console.execute("RESUME")
        assert mux.proc.poll() is None
    finally:
        await close_quietly(conn, console)
    # The last client left: pgmux exits and the unix socket is gone.
    assert await asyncio.to_thread(mux.wait, 15) == 0
    assert not unix_socket(mux).exists()


async def test_sigint_closes_a_client_asking_for_a_server(pgmux: PgmuxFactory) -> None:
    mux = pgmux(PGBOUNCER)
    holder = await connect_asyncpg(mux)
    asker = await connect_asyncpg(mux)
    try:
        assert await asker.fetchval("SELECT 1") == 1
        tr = holder.transaction()
        await tr.start()
        assert await holder.fetchval("SELECT 1") == 1
        mux.signal(signal.SIGINT)
        await wait_until(lambda: asyncio.to_thread(refused, mux), bool, timeout=10)
        mux.signal(signal.SIGUSR2)  # ignored (logged): a RESUME would lift the pause
        await asyncio.sleep(0.5)
        assert not asker.is_closed()  # idle, not closed yet (drain would have)
        with pytest.raises((asyncpg.PostgresError, *DROPPED)):
            await asyncio.wait_for(asker.fetchval("SELECT 2"), 10)
        # The transaction goes on, and its end is pgmux's.
        assert await holder.fetchval("SELECT 3") == 3
        assert mux.proc.poll() is None
        await tr.commit()
        assert await asyncio.to_thread(mux.wait, 15) == 0
    finally:
        await close_quietly(holder, asker)
    logs = mux.logs()
    assert "resume_ignored" in logs
    assert "server connections dropped" in logs


async def test_sigint_in_session_mode_waits_for_the_session(pgmux: PgmuxFactory) -> None:
    mux = pgmux({**PGBOUNCER, "pool": {"mode": "session"}})
    conn = await connect_asyncpg(mux)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        mux.signal(signal.SIGINT)
        await wait_until(lambda: asyncio.to_thread(refused, mux), bool, timeout=10)
        await asyncio.sleep(0.3)
        for i in range(3):  # the session keeps its server: it goes on
            assert await conn.fetchval("SELECT $1::int", i) == i
        assert mux.proc.poll() is None
    finally:
        await close_quietly(conn)
    assert await asyncio.to_thread(mux.wait, 15) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_second_signal_drops_the_sockets_silently(
    pgmux: PgmuxFactory, sig: signal.Signals
) -> None:
    mux = pgmux(PGBOUNCER)
    raw = await RawClient.open(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        await raw.query("BEGIN")  # holds a server: SIGINT waits for it too
        mux.signal(sig)
        await wait_until(lambda: asyncio.to_thread(refused, mux), bool, timeout=10)
        assert mux.proc.poll() is None
        mux.signal(sig)
        assert await asyncio.to_thread(mux.wait, 10) == 0
        got = await raw.read_until_closed(10)
        assert got == [], f"expected a dropped socket, got {got!r}"
    finally:
        await raw.close()
    assert not os.path.exists(unix_socket(mux))


def test_sigusr2_while_shutting_down_is_logged_in_pgbouncer_words() -> None:
    lines = pgblog.render("resume_ignored", 20, {"signal": "SIGUSR2"}, pgblog.LogEvents())
    assert [text for _, text in lines] == ["got SIGUSR2 while shutting down, ignoring"]

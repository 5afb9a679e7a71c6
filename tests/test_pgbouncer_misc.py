"""PgBouncer's server checks and client notices, for pgmux started from a
pgbouncer.ini: connect_query, server_check_query / server_check_delay,
server_fast_close, login_notify_message, query_wait_notify (doc/config.md).
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncpg
import pytest
from helpers import APP_PASSWORD
from test_logging import IniStarter, ini_pgmux, logfile, wait_for_log

from pgmux.proxy.config import parse_config
from pgmux.tempgres import TempPostgres

__all__ = ["ini_pgmux"]  # the fixture, imported for the tests below


def url(mux: object, dbname: str, user: str = "app", password: str = APP_PASSWORD) -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{mux.port}/{dbname}"  # type: ignore[attr-defined]


def database(pg: TempPostgres, name: str, options: str) -> str:
    return f"{name} = host={pg.host} port={pg.port} dbname=appdb {options}\n"


async def test_connect_query_runs_on_each_new_server(
    ini_pgmux: IniStarter, pg: TempPostgres
) -> None:
    """Each new server runs the database's connect_query before its first
    client; one that fails is logged and the server is used all the same."""
    databases = database(
        pg, "tuned", "connect_query='set enable_seqscan=off; set enable_nestloop=off'"
    )
    databases += database(pg, "broken", "connect_query='select no_such_column'")
    mux = ini_pgmux.start(databases=databases)
    first = await asyncpg.connect(url(mux, "tuned"))
    second = await asyncpg.connect(url(mux, "tuned"))
    try:
        async with first.transaction(), second.transaction():  # two servers at once
            for conn in (first, second):
                assert await conn.fetchval("SHOW enable_seqscan") == "off"
                assert await conn.fetchval("SHOW enable_nestloop") == "off"
            pids = {await conn.fetchval("SELECT pg_backend_pid()") for conn in (first, second)}
        assert len(pids) == 2, pids
    finally:
        await first.close()
        await second.close()
    conn = await asyncpg.connect(url(mux, "broken"))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW enable_seqscan") == "on"
    finally:
        await conn.close()
    await wait_for_log(logfile(mux), r"connect_query_failed: sqlstate=42703")


async def _checks_so_far(pg: TempPostgres, sequence: str) -> int:
    direct = await asyncpg.connect(pg.dsn("appdb", "app", APP_PASSWORD))
    try:
        row = await direct.fetchrow(f"SELECT last_value, is_called FROM {sequence}")
        return int(row["last_value"]) if row["is_called"] else 0
    finally:
        await direct.close()


async def test_server_check_query_runs_before_reuse(
    ini_pgmux: IniStarter, pg: TempPostgres
) -> None:
    """server_check_delay = 0: a server that served a client runs
    server_check_query before its next one (a fresh one does not); a server
    that fails the check is closed and the client gets another."""
    direct = await asyncpg.connect(pg.dsn("appdb", "app", APP_PASSWORD))
    try:
        await direct.execute("DROP SEQUENCE IF EXISTS pgmux_checks; CREATE SEQUENCE pgmux_checks")
    finally:
        await direct.close()
    extra = "server_check_delay = 0\nserver_check_query = SELECT nextval('pgmux_checks')\n"
    mux = ini_pgmux.start(extra + "default_pool_size = 1\n")
    conn = await asyncpg.connect(url(mux, "appdb"))
    admin = await asyncpg.connect(url(mux, "pgbouncer", "admin", "admin-secret"))
    try:
        first = await conn.fetchval("SELECT pg_backend_pid()")
        assert await _checks_so_far(pg, "pgmux_checks") == 0  # fresh from its login
        for expected in (1, 2):
            assert await conn.fetchval("SELECT pg_backend_pid()") == first
            assert await _checks_so_far(pg, "pgmux_checks") == expected
        config = {row["key"]: row["value"] for row in await admin.fetch("SHOW CONFIG")}
        assert config["server_check_delay"] == "0"
        assert config["server_check_query"] == "SELECT nextval('pgmux_checks')"
        await admin.execute("SET server_check_query = 'SELECT 1/0'")
        replaced = await conn.fetchval("SELECT pg_backend_pid()")  # no error for the client
        assert replaced != first
        await wait_for_log(logfile(mux), r"closing because: server check failed: division by zero")
    finally:
        await admin.close()
        await conn.close()


async def test_server_check_delay_spares_recently_used_servers(
    ini_pgmux: IniStarter, pg: TempPostgres
) -> None:
    """Within server_check_delay of its last client a server is handed out unchecked."""
    direct = await asyncpg.connect(pg.dsn("appdb", "app", APP_PASSWORD))
    try:
        await direct.execute("DROP SEQUENCE IF EXISTS pgmux_late; CREATE SEQUENCE pgmux_late")
    finally:
        await direct.close()
    extra = "server_check_delay = 1\nserver_check_query = SELECT nextval('pgmux_late')\n"
    mux = ini_pgmux.start(extra + "default_pool_size = 1\n")
    conn = await asyncpg.connect(url(mux, "appdb"))
    try:
        for _ in range(3):
            await conn.fetchval("SELECT 1")
        assert await _checks_so_far(pg, "pgmux_late") == 0
        await asyncio.sleep(1.2)  # idle past the delay
        await conn.fetchval("SELECT 1")
        assert await _checks_so_far(pg, "pgmux_late") == 1
    finally:
        await conn.close()


def _psql(pg: TempPostgres, mux: object, sql: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD, "PGCONNECT_TIMEOUT": "10"}
    port = str(mux.port)  # type: ignore[attr-defined]
    return subprocess.run(
        [os.path.join(pg.bindir, "psql"), "-X", "-At", "-h", "127.0.0.1", "-p", port,
         "-U", "app", "-d", "appdb", "-c", sql],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_login_notify_message_reaches_every_client(ini_pgmux: IniStarter, pg: TempPostgres) -> None:
    """login_notify_message: a NOTICE between BackendKeyData and ReadyForQuery."""
    mux = ini_pgmux.start("login_notify_message = You are connected to pgmux\n")
    for _ in range(2):
        done = _psql(pg, mux, "SELECT 1")
        assert done.returncode == 0, done.stderr
        assert done.stderr == "NOTICE:  You are connected to pgmux\n"
        assert done.stdout == "1\n"


QUEUED = "No server connection available in postgres backend, client being queued"


async def test_query_wait_notify_tells_a_queued_client_once_per_wait(
    ini_pgmux: IniStarter,
) -> None:
    """query_wait_notify: a client queued longer than that gets PgBouncer's
    NOTICE, once per wait; one served at once gets none."""
    mux = ini_pgmux.start("query_wait_notify = 1\ndefault_pool_size = 1\n")
    holder = await asyncpg.connect(url(mux, "appdb"))
    waiter = await asyncpg.connect(url(mux, "appdb"))
    notices: list[str] = []
    waiter.add_log_listener(lambda _conn, message: notices.append(message.message))
    try:
        assert await waiter.fetchval("SELECT 1") == 1
        assert notices == []  # a free server: no wait, no notice
        for expected in (1, 2):
            async with holder.transaction():  # the only server, held
                await holder.execute("SELECT 1")
                queued = asyncio.ensure_future(waiter.fetchval("SELECT 2"))
                await asyncio.sleep(2.5)  # past query_wait_notify, several janitor ticks
                assert not queued.done()
            assert await asyncio.wait_for(queued, 10) == 2
            assert notices == [QUEUED] * expected, notices
    finally:
        await holder.close()
        await waiter.close()


async def _closed_within(conn: asyncpg.Connection, seconds: float) -> bool:
    for _ in range(int(seconds / 0.05)):
        if conn.is_closed():
            return True
        await asyncio.sleep(0.05)
    return conn.is_closed()


async def test_server_fast_close_ends_idle_sessions_after_reconnect(
    ini_pgmux: IniStarter,
) -> None:
    """Session mode with server_fast_close: after RECONNECT an idle session's
    server closes at once, and so does its client; one inside a transaction
    finishes it first. Without the setting, sessions keep their servers."""
    mux = ini_pgmux.start("pool_mode = session\n")
    admin = await asyncpg.connect(url(mux, "pgbouncer", "admin", "admin-secret"))
    idle = await asyncpg.connect(url(mux, "appdb"))
    busy = await asyncpg.connect(url(mux, "appdb"))
    try:
        for conn in (idle, busy):  # each holds its session's server
            await conn.fetchval("SELECT 1")
        await admin.execute("RECONNECT appdb")
        assert not await _closed_within(idle, 1.0)  # the default: at the session's end
        await admin.execute("SET server_fast_close = 1")
        transaction = busy.transaction()
        await transaction.start()
        await busy.fetchval("SELECT 1")
        assert await _closed_within(idle, 5.0)
        assert not await _closed_within(busy, 1.0)  # its transaction is not interrupted
        await transaction.commit()
        assert await _closed_within(busy, 5.0)
        text = await wait_for_log(
            logfile(mux), r"S-\S+ .*closing because: database configuration changed"
        )
        assert "C-" in text
        fresh = await asyncpg.connect(url(mux, "appdb"))
        assert await fresh.fetchval("SELECT 1") == 1  # a new server for a new session
        await fresh.close()
    finally:
        await admin.close()
        idle.terminate()
        busy.terminate()


async def test_auto_database_is_logged_once(ini_pgmux: IniStarter, pg: TempPostgres) -> None:
    """A database the "*" entry stands for is logged in PgBouncer's words
    when its first client arrives, not again for the next; a listed one never."""
    mux = ini_pgmux.start(databases=f"* = host={pg.host} port={pg.port}\n")
    for dbname in ("other", "other", "appdb"):
        conn = await asyncpg.connect(url(mux, dbname))
        assert await conn.fetchval("SELECT current_database()") == dbname
        await conn.close()
    text = await wait_for_log(
        logfile(mux), r"LOG C-\S+ other/app@\S+ registered new auto-database: other\n"
    )
    assert text.count("registered new auto-database") == 1, text


async def test_options_that_are_not_settings_are_refused_in_pgbouncer_words(
    ini_pgmux: IniStarter,
) -> None:
    """An options value other than `-c name=value` / `--name=value` switches is
    refused with PgBouncer's message; the settings in it are applied."""
    mux = ini_pgmux.start()
    for options in ("-d", "-c timezone", "-c timezone=UTC -B 8"):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(url(mux, "appdb"), server_settings={"options": options})
        assert str(info.value) == (
            "unsupported options startup parameter: "
            "only '-c config=val' and '--config=val' are allowed"
        ), options
    options = "-ctimezone=Europe/Lisbon  --datestyle=German,\\ YMD"
    conn = await asyncpg.connect(url(mux, "appdb"), server_settings={"options": options})
    try:
        assert await conn.fetchval("SHOW timezone") == "Europe/Lisbon"
        assert await conn.fetchval("SHOW datestyle") == "German, YMD"
    finally:
        await conn.close()


def test_the_yaml_file_takes_the_same_settings() -> None:
    """Each setting above has its pgmux key, per database where it concerns servers."""
    config = parse_config(
        {
            "pool": {"server_check_query": None, "server_fast_close": True},
            "timeouts": {"query_wait_notify": "2s"},
            "login_notify_message": "Welcome",
            "databases": {
                "a": {"connect_query": "SET work_mem = '8MB'", "server_check_delay": 0},
                "b": {},
            },
        }
    )
    assert config.pool.server_check_query == "" and config.pool.server_fast_close
    assert config.timeouts.query_wait_notify == 2.0
    assert config.login_notify_message == "Welcome"
    a, b = config.databases["a"], config.databases["b"]
    assert a.connect_query == "SET work_mem = '8MB'" and b.connect_query is None
    assert a.pool.server_check_delay == 0.0 and b.pool.server_check_delay == 30.0
    defaults = parse_config({})
    assert defaults.pool.server_check_query == "<empty>" and not defaults.pool.server_fast_close
    assert defaults.timeouts.query_wait_notify == 0.0 and defaults.login_notify_message is None

"""A reload with a file that defines nothing, or that YAML cannot read, changes nothing.

An empty file (or only comments, `---`, `null`, `{}`), a scalar or a list at
the top, a NUL or another control character, bytes that are not UTF-8, a
YAML scanner or parser error: each SIGHUP and each console RELOAD logs
`reload_failed` with the reason, keeps the running configuration (the
connected client stays, new logins to its database still work) and sends
READY=1 to systemd again, saying the reload failed.
"""

from __future__ import annotations

import asyncio
import signal

import psycopg
import pytest
from helpers import PgmuxFactory, close_quietly, connect_asyncpg, wait_until
from test_admin_console import admin_psycopg, console_config
from test_lifecycle_systemd import FakeSystemd

from pgmux.tempgres import TempPostgres, free_port

pytestmark = pytest.mark.timeout(120)

# (file bytes, what the reload_failed line must say)
BAD_FILES = [
    (b"", "defines nothing"),
    (b"# all commented out\n", "defines nothing"),
    (b"---\n", "defines nothing"),
    (b"null\n", "defines nothing"),
    (b"{}\n", "defines nothing"),
    (b"a scalar\n", "expected a mapping"),
    (b"- a list\n", "expected a mapping"),
    (b"pool:\n  size: 4\x00\n", "character U+0000 is not allowed"),
    (b"pool:\n  size: 4\n  mode: \x1b\n", "character U+001B is not allowed"),
    (b"pool:\n  mode: \xff\xfe\n", "not UTF-8 text"),
    (b"pool:\n  size: 4\n\tmode: x\n", "YAML syntax error"),
    (b"[databases]\n", "the [pgbouncer] section is missing"),  # read as a pgbouncer.ini
]


async def test_sighup_with_a_bad_file_keeps_everything(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    fake = FakeSystemd(f"@pgmux-badconfig-{free_port()}")
    try:
        mux = pgmux({"listen": {"workers": 1}}, env={"NOTIFY_SOCKET": fake.path})
        fake.wait_for("READY")
        conn = await connect_asyncpg(mux)
        try:
            await conn.execute("CREATE TEMP TABLE kept (n int)")  # lost if the client were moved
            for number, (content, reason) in enumerate(BAD_FILES, start=1):
                mux.config_path.write_bytes(content)
                mux.signal(signal.SIGHUP)
                fake.wait_for("RELOADING")
                status = fake.wait_for("READY")["STATUS"]
                assert "reload failed" in status, (content, status)
                logs = await wait_until(
                    lambda: asyncio.sleep(0, mux.logs()),
                    lambda text, n=number: text.count("reload_failed") >= n,
                    timeout=10,
                )
                failure = logs.split("reload_failed")[-1].splitlines()[0]
                assert reason in failure, (content, failure)
                assert "Traceback" not in logs
                assert await conn.fetchval("SELECT count(*) FROM kept") == 0
                fresh = await connect_asyncpg(mux)  # the database is still served
                assert await fresh.fetchval("SELECT 1") == 1
                await close_quietly(fresh)
            assert mux.proc.poll() is None
            assert '"event": "reload"' not in mux.logs()
        finally:
            await close_quietly(conn)
    finally:
        fake.close()


async def test_console_reload_with_an_empty_file_is_refused(pgmux: PgmuxFactory) -> None:
    mux = pgmux({**console_config(), "pool": {"size": 4}})
    console = await admin_psycopg(mux)
    app = await connect_asyncpg(mux)
    try:
        for content in (b"", b"pool:\n  size: 4\x00\n"):
            mux.config_path.write_bytes(content)
            with pytest.raises(psycopg.errors.ConfigFileError):
                await console.execute("RELOAD")
            assert await app.fetchval("SELECT 1") == 1
            fresh = await connect_asyncpg(mux)
            await close_quietly(fresh)
        assert mux.logs().count("reload_failed") == 2
    finally:
        await close_quietly(console, app)

"""The console as PgBouncer's users and tools expect it (PgBouncer 1.25).

Who gets in without a password (the daemon's own OS user on the unix
socket), PgBouncer's setting names in SET and SHOW CONFIG, the SHOW STATS
column names, KILL of every database and SHUTDOWN's two waiting modes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import asyncpg
import psycopg
import pytest
from helpers import (
    PgmuxFactory,
    close_quietly,
    conftest_attr,
    connect_asyncpg,
    connect_psycopg,
    wait_until,
)
from test_admin_console import STATS_USER, admin_psycopg, console_config, row_for, show

pytestmark = pytest.mark.timeout(90)


def psql_as(
    mux: Any, host: str, user: str, sql: str, password: str = ""
) -> subprocess.CompletedProcess[str]:
    """psql to the console as USER, with no password unless PASSWORD is given."""
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGPASSWORD", None)
    if password:
        env["PGPASSWORD"] = password
    return subprocess.run(
        ["psql", "-X", "-A", "-w", "-F", "\t", "-P", "footer=off", "-h", host, "-p",
         str(mux.port), "-U", user, "-d", "pgbouncer", "-c", sql],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


# --- the daemon's own OS user ----------------------------------------------------


@pytest.mark.parametrize("user", ["pgbouncer", "pgmux"])
def test_own_os_user_gets_in_over_the_unix_socket_only(pgmux: PgmuxFactory, user: str) -> None:
    # Neither name is in admin.users nor in the users file; the test runs as
    # the daemon's OS user, which SO_PEERCRED shows on the unix socket.
    mux = pgmux(console_config())
    done = psql_as(mux, mux.socket_dir, user, "SHOW POOLS")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("database\tuser\tcl_active")
    # An admin: commands work too, not only SHOW.
    done = psql_as(mux, mux.socket_dir, user, "PAUSE; RESUME")
    assert done.returncode == 0, done.stderr
    # Over TCP the peer is unknown: the usual password check, which fails.
    done = psql_as(mux, "127.0.0.1", user, "SHOW POOLS")
    assert done.returncode != 0
    assert "password" in done.stderr, done.stderr
    done = psql_as(mux, "127.0.0.1", user, "SHOW POOLS", password="anything")
    assert done.returncode != 0
    assert "password authentication failed" in done.stderr, done.stderr


def test_other_users_on_the_unix_socket_still_need_their_password(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    done = psql_as(mux, mux.socket_dir, "admin", "SHOW POOLS")
    assert done.returncode != 0 and "password" in done.stderr, done.stderr
    done = psql_as(mux, mux.socket_dir, "admin", "SHOW POOLS", password="admin-secret")
    assert done.returncode == 0, done.stderr
    # The own-user rule is for the console only, not for a database.
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    done = subprocess.run(
        ["psql", "-X", "-w", "-h", mux.socket_dir, "-p", str(mux.port), "-U", "pgbouncer",
         "-d", "appdb", "-c", "SELECT 1"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode != 0, done.stdout


# --- PgBouncer's setting names in SET and SHOW CONFIG -------------------------------


async def test_set_takes_pgbouncer_names_and_values(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    console = await admin_psycopg(mux)
    try:
        before = config_rows(await show(console, "CONFIG"))
        assert before["pool_mode"][:2] == ("transaction", "session")  # value, PgBouncer default
        for name in ("pool_mode", "auth_type", "max_prepared_statements", "admin_users",
                     "stats_users", "max_db_client_connections", "query_timeout"):  # fmt: skip
            assert before[name][2] == "yes", name  # changeable
        cur = await console.execute("SET pool_mode = session")
        assert cur.statusmessage == "SET pool_mode=session"  # the name as given
        # PgBouncer's spelling of the value: seconds as a number, 'plain'.
        await console.execute("SET query_timeout = 2.5")
        await console.execute("SET auth_type = plain")
        await console.execute("SET stats_users = 'report, other'")
        after = config_rows(await show(console, "CONFIG"))
        assert after["pool_mode"][0] == "session" and after["pool.mode"][0] == "session"
        assert after["query_timeout"][0] == "2.5" and after["timeouts.query"][0] == "2500ms"
        assert after["auth_type"][0] == "plain" and after["stats_users"][0] == "report,other"
        # Applied: the next client of appdb gets a session pool, logs in with
        # a clear-text password (psql would fail on a SCRAM-only plain check).
        app = await connect_asyncpg(mux)
        pools = await show(console, "POOLS")
        assert row_for(pools, database="appdb", user="app")["pool_mode"] == "session"
        await app.close()
        # A value the ini would refuse is refused, and nothing changes.
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            await console.execute("SET query_timeout = soon")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            await console.execute("SET pool_mode = sometimes")
        with pytest.raises(psycopg.errors.UndefinedObject):
            await console.execute("SET no_such_setting = 1")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="server_round_robin"):
            await console.execute("SET server_round_robin = 1")  # PgBouncer's, not pgmux's
        final = config_rows(await show(console, "CONFIG"))
        assert final["query_timeout"][0] == "2.5" and final["pool_mode"][0] == "session"
    finally:
        await close_quietly(console)


def config_rows(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
    return {r["key"]: (r["value"], r["default"], r.get("changeable", "")) for r in rows}


# --- SHOW STATS -------------------------------------------------------------------


async def test_stats_count_client_logins(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    for _ in range(3):
        app = await connect_asyncpg(mux)
        await app.fetchval("SELECT 1")
        await app.close()
    console = await admin_psycopg(mux)
    try:
        stats = row_for(await show(console, "STATS"), database="appdb")
        assert stats["total_client_login_count"] == 3
        assert "avg_client_login_count" in stats
        totals = row_for(await show(console, "STATS_TOTALS"), database="appdb")
        assert totals["client_login_count"] == 3
        averages = row_for(await show(console, "STATS_AVERAGES"), database="appdb")
        assert "avg_client_login_count" in averages
        # The console is a database of its own, as PgBouncer's admin pool: one
        # login, and each command a transaction of one query (this is the 4th).
        own = row_for(await show(console, "STATS"), database="pgmux")
        assert own["total_client_login_count"] == 1
        assert own["total_xact_count"] == own["total_query_count"] == 4
        overall = {r["name"]: r["value"] for r in await show(console, "TOTALS")}
        assert overall["total_client_login_count"] == 3 + 1
        assert overall["total_query_count"] == stats["total_query_count"] + 5
    finally:
        await close_quietly(console)


# --- console clients count against the client limits ----------------------------------


async def test_console_clients_count_against_the_global_client_limits(
    pgmux: PgmuxFactory,
) -> None:
    mux = pgmux(console_config())
    console = await admin_psycopg(mux)
    others: list[Any] = []
    try:
        await console.execute("SET max_db_client_connections = 2")
        others.append(await admin_psycopg(mux, user=STATS_USER))
        row = row_for(await show(console, "DATABASES"), name="pgmux")
        assert (row["current_client_connections"], row["max_client_connections"]) == (2, 2)
        with pytest.raises(psycopg.OperationalError, match="max_db_client_connections"):
            await close_quietly(await admin_psycopg(mux, user=STATS_USER))
        # An admin is counted but never refused (PgBouncer's rule): it can fix things.
        others.append(await admin_psycopg(mux))
        row = row_for(await show(console, "DATABASES"), name="pgmux")
        assert row["current_client_connections"] == 3
        await close_quietly(others.pop())
        await console.execute("SET max_db_client_connections = 0")
        await console.execute("SET max_user_client_connections = 1")
        user = row_for(await show(console, "USERS"), name="report")
        assert (user["current_client_connections"], user["max_user_client_connections"]) == (1, 1)
        with pytest.raises(psycopg.OperationalError, match="max_user_client_connections"):
            await close_quietly(await admin_psycopg(mux, user=STATS_USER))
        await close_quietly(others.pop())
        others.append(await admin_psycopg(mux, user=STATS_USER))  # the slot came back
    finally:
        await close_quietly(console, *others)


# --- every SHOW PgBouncer has, and --version ---------------------------------------


async def test_every_pgbouncer_show_answers(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    app = await connect_asyncpg(mux)
    await app.fetchval("SELECT 1")
    console = await admin_psycopg(mux)
    try:
        for item in ("clients", "config", "databases", "help", "lists", "peers", "peer_pools",
                     "pools", "servers", "sockets", "active_sockets", "state", "stats",
                     "stats_totals", "stats_averages", "users", "totals", "mem", "dns_hosts",
                     "dns_zones"):  # fmt: skip
            await console.execute(f"SHOW {item}")
        sockets = await show(console, "SOCKETS")
        states = sorted((r["type"], r["state"], r["database"]) for r in sockets)
        assert states == [("C", "cl_active", "appdb"), ("C", "cl_active", "pgmux"),
                          ("S", "sv_idle", "appdb")], states  # fmt: skip
        clients = {r["id"] for r in await show(console, "CLIENTS")}
        assert {r["id"] for r in sockets if r["type"] == "C"} == clients
        assert await show(console, "ACTIVE_SOCKETS") == []  # nothing runs
        assert await show(console, "PEERS") == [] and await show(console, "DNS_HOSTS") == []
    finally:
        await close_quietly(console, app)


def test_version_line_is_show_version(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    shown = psql_as(mux, mux.socket_dir, "pgbouncer", "SHOW VERSION").stdout.splitlines()[1]
    printed = subprocess.run(
        [sys.executable, "-m", "pgmux", "--version"], capture_output=True, text=True, timeout=30
    )
    assert printed.stdout.splitlines()[0] == shown
    # PgBouncer's --version names its TLS library on a "tls:" line; tools read it.
    assert printed.stdout.splitlines()[2].startswith("tls: OpenSSL ")


async def test_set_tls_settings_rebuild_the_contexts_or_keep_the_old(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    console = await admin_psycopg(mux)
    try:
        await console.execute("SET server_tls_sslmode = disable")
        rows = config_rows(await show(console, "CONFIG"))
        assert (
            rows["server_tls_sslmode"][0] == "disable" and rows["tls.server.mode"][0] == "disable"
        )
        app = await connect_asyncpg(mux)  # servers still connect
        assert (
            await app.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False
        )
        await app.close()
        # Client TLS without a certificate cannot load: as in PgBouncer the new
        # value is kept (a key may come before its certificate) with a NOTICE,
        # and the running contexts stay.
        notices: list[str] = []
        console.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        await console.execute("SET client_tls_sslmode = require")
        assert notices == ["TLS settings could not be applied, still using old configuration"]
        rows = config_rows(await show(console, "CONFIG"))
        assert rows["client_tls_sslmode"][0] == "require"
        app = await connect_asyncpg(mux)  # and clients without TLS still get in
        await app.close()
    finally:
        await close_quietly(console)


async def test_show_users_shows_each_users_own_pool_sizes(pgmux: PgmuxFactory) -> None:
    # PgBouncer's test_show_user: a user without sizes does not take the previous row's.
    users = {"app": {"pool_size": 1, "reserve_pool_size": 2}, "report": {}}
    mux = pgmux({**console_config(), "users": users, "pool": {"reserve_timeout": "200ms"}})
    console = await admin_psycopg(mux)
    apps = [await connect_asyncpg(mux) for _ in range(3)]
    try:
        rows = await show(console, "USERS")
        app_row, report_row = row_for(rows, name="app"), row_for(rows, name="report")
        assert (app_row["pool_size"], app_row["reserve_pool_size"]) == ("1", "2")
        assert (report_row["pool_size"], report_row["reserve_pool_size"]) == ("", "")
        # The user's reserve applies: three open transactions get three servers.
        for app in apps:
            await app.execute("BEGIN")

        async def servers_in_use() -> int:
            pool = row_for(await show(console, "POOLS"), database="appdb", user="app")
            return int(pool["sv_active"])

        await wait_until(servers_in_use, lambda n: n == 3, timeout=20, what="3 servers")
    finally:
        await close_quietly(console, *apps)


# --- [users] timeouts -------------------------------------------------------------


async def test_a_users_own_query_wait_timeout_applies_to_its_pools(pgmux: PgmuxFactory) -> None:
    # PgBouncer's test_query_wait_timeout[None-2-None]: the user's value, not the global one.
    config = {**console_config(), "pool": {"size": 1}, "timeouts": {"query_wait": "120s"}}
    mux = pgmux({**config, "users": {"app": {"query_wait": "1s"}}})
    holder = await connect_asyncpg(mux)
    waiter = await connect_asyncpg(mux)
    try:
        await holder.execute("BEGIN")  # the only server of appdb/app
        with pytest.raises(asyncpg.PostgresError, match="query_wait"):
            await asyncio.wait_for(waiter.fetchval("SELECT 1"), timeout=30)
        console = await admin_psycopg(mux)
        rows = config_rows(await show(console, "CONFIG"))
        assert rows["users.app.query_wait"][0] in ("1s", "1.0")
        await close_quietly(console)
    finally:
        await close_quietly(holder, waiter)


async def test_a_set_value_lasts_until_reload_as_in_pgbouncer(pgmux: PgmuxFactory) -> None:
    # PgBouncer's RELOAD fills every setting from its default, then the file:
    # a value SET on the console is gone after it; pgmux reads the file again.
    mux = pgmux({**console_config(), "pool": {"size": 7}})
    console = await admin_psycopg(mux)
    try:
        await console.execute("SET default_pool_size = 3")
        await console.execute("SET pool_mode = session")
        rows = config_rows(await show(console, "CONFIG"))
        assert (rows["default_pool_size"][0], rows["pool_mode"][0]) == ("3", "session")
        await console.execute("RELOAD")
        rows = config_rows(await show(console, "CONFIG"))
        assert (rows["default_pool_size"][0], rows["pool_mode"][0]) == ("7", "transaction")
        # A file that no longer loads: PgBouncer's error, and the running values stay.
        await console.execute("SET default_pool_size = 4")
        mux.config_path.write_text("pool: {size: [not a number]}\n")
        with pytest.raises(psycopg.errors.ConfigFileError, match="RELOAD failed, see logs"):
            await console.execute("RELOAD")
        assert config_rows(await show(console, "CONFIG"))["default_pool_size"][0] == "4"
    finally:
        await close_quietly(console)


@pytest.mark.parametrize("error_codes", ["postgres", "pgbouncer"])
async def test_console_errors_carry_the_chosen_sqlstates(
    pgmux: PgmuxFactory, request: pytest.FixtureRequest, error_codes: str
) -> None:
    """error_codes: pgbouncer (a pgbouncer.ini's) answers every console error
    with PgBouncer's 08P01 and texts, but a failed RELOAD's F0000; postgres
    keeps the SQLSTATE of what went wrong. The console's pool is listed under
    the name its clients used, as PgBouncer lists "pgbouncer"."""
    no_fallback = {"databases": {"*": conftest_attr(request.config, "REMOVE")}}
    mux = pgmux({**console_config(), "error_codes": error_codes, **no_fallback})
    conn = await connect_psycopg(mux, dbname="pgbouncer", user="admin", password="admin-secret")
    try:
        pools = await show(conn, "POOLS")
        assert (pools[0]["database"], pools[0]["user"]) == ("pgbouncer", "pgbouncer"), pools
        expected = {
            "KILL nosuchdb": ("3D000", "no such database: nosuchdb"),
            "KILL_CLIENT 999999": ("42704", "client not found"),
            "KILL_CLIENT x": ("22023", "invalid client id supplied"),
        }
        for command, (code, text) in expected.items():
            with pytest.raises(psycopg.Error) as caught:
                await conn.execute(command)
            if error_codes == "pgbouncer":
                code = "08P01"
                text = text.replace("client id", "client pointer")
            assert caught.value.sqlstate == code, command
            assert caught.value.diag.message_primary == text, command
        mux.config_path.write_text("listen: [unbalanced\n")
        with pytest.raises(psycopg.Error) as caught:
            await conn.execute("RELOAD")
        assert caught.value.sqlstate == "F0000"
    finally:
        await close_quietly(conn)

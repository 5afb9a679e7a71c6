"""Acceptance: the admin console over psql, psycopg 3 and asyncpg.

The column lists below are written down from PgBouncer 1.25's documentation
(doc/usage.md) and source (src/admin.c, src/stats.c): names, order and type
(text, int4, int8, numeric). pgmux must send exactly those, whatever the
client and whichever protocol it speaks. Helpers here are shared by the other
test_admin_*.py files.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import urllib.request
from typing import Any

import asyncpg
import psycopg
import pytest
from helpers import (
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    error_fields,
    message,
    wait_until,
)

from pgmux.tempgres import free_port

pytestmark = pytest.mark.timeout(90)

ADMIN = ("admin", "admin-secret")
STATS_USER = ("report", "report-secret")
TEXT, INT4, INT8, NUMERIC = 25, 23, 20, 1700

# --- PgBouncer 1.25 ---------------------------------------------------------------

POOLS = [
    ("database", TEXT), ("user", TEXT), ("cl_active", INT4), ("cl_waiting", INT4),
    ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4), ("sv_active", INT4),
    ("sv_active_cancel", INT4), ("sv_being_canceled", INT4), ("sv_idle", INT4),
    ("sv_used", INT4), ("sv_tested", INT4), ("sv_login", INT4), ("maxwait", INT4),
    ("maxwait_us", INT4), ("pool_mode", TEXT), ("load_balance_hosts", TEXT),
]  # fmt: skip
SOCKETS = [
    ("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT),
    ("state", TEXT), ("addr", TEXT), ("port", INT4), ("local_addr", TEXT),
    ("local_port", INT4), ("connect_time", TEXT), ("request_time", TEXT), ("wait", INT4),
    ("wait_us", INT4), ("close_needed", INT4), ("ptr", TEXT), ("link", TEXT),
    ("remote_pid", INT4), ("tls", TEXT), ("application_name", TEXT),
    ("prepared_statements", INT4), ("id", INT4),
]  # fmt: skip
_STAT_TOTALS = [
    "total_server_assignment_count", "total_xact_count", "total_query_count",
    "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
    "total_client_parse_count", "total_server_parse_count", "total_bind_count",
    "total_client_login_count",
]  # fmt: skip
_STAT_AVERAGES = [
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv",
    "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
    "avg_server_parse_count", "avg_bind_count", "avg_client_login_count",
]  # fmt: skip
STATS = [("database", TEXT)] + [(n, NUMERIC) for n in _STAT_TOTALS + _STAT_AVERAGES]
STATS_TOTALS = [("database", TEXT)] + [
    (n, NUMERIC)
    for n in (
        "server_assignment_count", "xact_count", "query_count", "bytes_received",
        "bytes_sent", "xact_time", "query_time", "wait_time", "client_parse_count",
        "server_parse_count", "bind_count", "client_login_count",
    )
]  # fmt: skip
STATS_AVERAGES = [("database", TEXT)] + [
    (n, NUMERIC)
    for n in (
        "server_assignment_count", "xact_count", "query_count", "bytes_received",
        "bytes_sent", "xact_time", "query_time", "wait_time", "avg_client_parse_count",
        "avg_server_parse_count", "avg_bind_count", "avg_client_login_count",
    )
]  # fmt: skip
DATABASES = [
    ("name", TEXT), ("host", TEXT), ("port", INT4), ("database", TEXT),
    ("force_user", TEXT), ("pool_size", INT4), ("min_pool_size", INT4),
    ("reserve_pool_size", INT4), ("server_lifetime", INT4), ("pool_mode", TEXT),
    ("load_balance_hosts", TEXT), ("max_connections", INT4), ("current_connections", INT4),
    ("max_client_connections", INT4), ("current_client_connections", INT4), ("paused", INT4),
    ("disabled", INT4),
]  # fmt: skip
USERS = [
    ("name", TEXT), ("pool_size", TEXT), ("reserve_pool_size", TEXT), ("pool_mode", TEXT),
    ("max_user_connections", INT4), ("current_connections", INT4),
    ("max_user_client_connections", INT4), ("current_client_connections", INT4),
]  # fmt: skip
PGBOUNCER_125 = {
    "POOLS": POOLS,
    "CLIENTS": SOCKETS,
    "SERVERS": SOCKETS,
    "STATS": STATS,
    "STATS_TOTALS": STATS_TOTALS,
    "STATS_AVERAGES": STATS_AVERAGES,
    "TOTALS": [("name", TEXT), ("value", NUMERIC)],
    "DATABASES": DATABASES,
    "USERS": USERS,
    "LISTS": [("list", TEXT), ("items", INT4)],
    "CONFIG": [("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)],
    "MEM": [("name", TEXT), ("size", INT4), ("used", INT4), ("free", INT4), ("memtotal", INT4)],
    "STATE": [("key", TEXT), ("value", TEXT)],
    "VERSION": [("version", TEXT)],
}


# --- shared helpers ---------------------------------------------------------------


def console_config(**admin: Any) -> dict[str, Any]:
    """pgmux config with the console users, a 1 s stats period and an HTTP port."""
    section = {
        "users": ["admin"],
        "stats_users": ["report"],
        "stats_period": "1s",
        "http": {"address": "127.0.0.1", "port": free_port()},
        **admin,
    }
    return {"admin": section}


def psql(
    mux: Any, sql: str, user: tuple[str, str] = ADMIN, dbname: str = "pgmux"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": user[1], "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(
        ["psql", "-X", "-A", "-F", "\t", "-P", "footer=off", "-h", mux.host, "-p",
         str(mux.port), "-U", user[0], "-d", dbname, "-c", sql],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def psql_table(mux: Any, sql: str, user: tuple[str, str] = ADMIN) -> list[dict[str, str]]:
    done = psql(mux, sql, user)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


async def admin_asyncpg(mux: Any, user: tuple[str, str] = ADMIN, **kw: Any) -> Any:
    return await connect_asyncpg(mux, dbname="pgmux", user=user[0], password=user[1], **kw)


async def admin_psycopg(mux: Any, user: tuple[str, str] = ADMIN, **kw: Any) -> Any:
    return await connect_psycopg(mux, dbname="pgmux", user=user[0], password=user[1], **kw)


async def show(conn: Any, what: str) -> list[dict[str, Any]]:
    """SHOW WHAT as dicts, over psycopg (extended protocol)."""
    cur = await conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


def row_for(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one row matching {match}: {rows}"
    return found[0]


# --- column lists over the three clients -----------------------------------------


async def test_psql_columns_match_pgbouncer(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    app = await connect_asyncpg(mux)
    try:
        await app.execute("SELECT 1")  # a pool, a client and a server to list
        for what, columns in PGBOUNCER_125.items():
            done = psql(mux, f"SHOW {what}")
            assert done.returncode == 0, done.stderr
            header = done.stdout.splitlines()[0].split("\t")
            # PgBouncer's columns in its order; pgmux's own only after them.
            assert header[: len(columns)] == [name for name, _ in columns], what
    finally:
        await close_quietly(app)


async def test_psycopg_columns_and_types_match_pgbouncer(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    app = await connect_asyncpg(mux)
    console = await admin_psycopg(mux)
    try:
        await app.execute("SELECT 1")
        for what, columns in PGBOUNCER_125.items():
            cur = await console.execute(f"SHOW {what}")
            got = [(d.name, d.type_code) for d in cur.description]
            assert got[: len(columns)] == columns, what
            assert await cur.fetchall(), f"SHOW {what} returned no rows"
        # Named prepared statements work too (psycopg prepares after the first run).
        prepared = await psycopg.AsyncConnection.connect(
            host=mux.host, port=mux.port, user=ADMIN[0], password=ADMIN[1], dbname="pgmux",
            autocommit=True, prepare_threshold=0, connect_timeout=15,
        )  # fmt: skip
        for _ in range(3):
            rows = await show(prepared, "POOLS")
            assert row_for(rows, database="appdb", user="app")["cl_active"] == 1
        await prepared.close()
    finally:
        await close_quietly(app, console)


@pytest.mark.parametrize("statement_cache", [0, 100], ids=["unnamed", "named"])
async def test_asyncpg_columns_and_types_match_pgbouncer(
    pgmux: PgmuxFactory, statement_cache: int
) -> None:
    mux = pgmux(console_config())
    app = await connect_asyncpg(mux)
    console = await asyncpg.connect(
        host=mux.host, port=mux.port, user=ADMIN[0], password=ADMIN[1], database="pgmux",
        statement_cache_size=statement_cache, timeout=15,
    )  # fmt: skip
    try:
        await app.execute("SELECT 1")
        for what, columns in PGBOUNCER_125.items():
            statement = await console.prepare(f"SHOW {what}")
            got = [(a.name, a.type.oid) for a in statement.get_attributes()]
            assert got[: len(columns)] == columns, what
            rows = await console.fetch(f"SHOW {what}")  # binary results, decoded
            assert rows and list(rows[0].keys())[: len(columns)] == [n for n, _ in columns]
        pools = await console.fetch("SHOW POOLS")
        app_pool = next(r for r in pools if r["database"] == "appdb")
        assert app_pool["cl_active"] == 1 and app_pool["sv_idle"] >= 1
        stats = await console.fetch("SHOW STATS")
        assert next(r for r in stats if r["database"] == "appdb")["total_xact_count"] >= 1
    finally:
        await close_quietly(app, console)


async def test_show_help_version_state_and_fake_params(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    done = psql(mux, "SHOW HELP")
    assert done.returncode == 0, done.stderr
    assert "Console usage" in done.stderr and "KILL_CLIENT" in done.stderr
    assert psql_table(mux, "SHOW VERSION")[0]["version"].startswith("pgmux ")
    state = {r["key"]: r["value"] for r in psql_table(mux, "show state;")}
    assert state == {"active": "yes", "paused": "no", "suspended": "no"}
    assert psql_table(mux, "SHOW client_encoding") == [{"client_encoding": "UTF8"}]
    done = psql(mux, "SET client_encoding = 'UTF8'")
    assert done.returncode == 0 and "SET ignored" in done.stderr
    done = psql(mux, "SHOW VERSION; SHOW STATE;")  # one Query, two commands
    assert done.returncode == 0 and "suspended" in done.stdout, done.stderr


# --- who may use it ---------------------------------------------------------------


async def test_normal_user_cannot_open_console(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    for dbname in ("pgmux", "pgbouncer"):
        with pytest.raises(asyncpg.PostgresError) as info:
            conn = await connect_asyncpg(mux, dbname=dbname)  # user app
            await conn.close()
        assert info.value.sqlstate == "28000", str(info.value)
    done = psql(mux, "SHOW POOLS", user=("app", "app-secret"))
    assert done.returncode != 0 and "not allowed" in done.stderr
    # A wrong password is a password failure, as anywhere else.
    with pytest.raises(asyncpg.InvalidPasswordError):
        await admin_asyncpg(mux, user=("admin", "wrong"))
    # The alias works for the real admin.
    conn = await connect_asyncpg(mux, dbname="pgbouncer", user=ADMIN[0], password=ADMIN[1])
    assert await conn.fetchval("SHOW VERSION")
    await conn.close()


async def test_stats_user_may_show_but_not_command(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    console = await admin_psycopg(mux, user=STATS_USER)
    try:
        assert await show(console, "POOLS") is not None
        for command in (
            "PAUSE",
            "RESUME",
            "RELOAD",
            "SHUTDOWN",
            "KILL appdb",
            "DISABLE appdb",
            "RECONNECT",
            "SET listen.max_client_conn = 5",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                await console.execute(command)
            assert "admin access needed" in str(info.value)
        # Still usable, and nothing was paused.
        state = {r["key"]: r["value"] for r in await show(console, "STATE")}
        assert state["paused"] == "no"
    finally:
        await close_quietly(console)


async def test_bad_commands_get_errors_and_console_stays_usable(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    console = await admin_psycopg(mux)
    apg = await admin_asyncpg(mux)
    try:
        cases = {
            "SHOW NOTHING": psycopg.errors.SyntaxError,
            "FROBNICATE": psycopg.errors.SyntaxError,
            "SELECT 1": psycopg.errors.SyntaxError,
            "SHUTDOWN SOMETIME": psycopg.errors.SyntaxError,
            "RESUME nosuchdb": psycopg.errors.ObjectNotInPrerequisiteState,
            "ENABLE pgbouncer": psycopg.errors.ObjectNotInPrerequisiteState,
            "KILL_CLIENT abc": psycopg.errors.InvalidParameterValue,
            "KILL_CLIENT 999999": psycopg.errors.UndefinedObject,
            "RESUME": psycopg.errors.ObjectNotInPrerequisiteState,
            "DISABLE": psycopg.errors.SyntaxError,
            "PAUSE pgmux": psycopg.errors.ObjectNotInPrerequisiteState,
            "SET nosuch.key = 1": psycopg.errors.UndefinedObject,
            "SET timeouts.query_wait = banana": psycopg.errors.InvalidParameterValue,
        }
        for command, error in cases.items():
            with pytest.raises(error):
                await console.execute(command)
            assert (await show(console, "VERSION"))[0]["version"]
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await apg.fetch("SHOW NOTHING")
        assert await apg.fetchval("SHOW VERSION")
        # The simple protocol: an error, and the next command works.
        done = psql(mux, "SHOW NOTHING")
        assert done.returncode != 0 and "invalid command" in done.stderr
        assert psql_table(mux, "SHOW VERSION")
    finally:
        await close_quietly(console, apg)


async def test_set_changes_a_runtime_setting(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    console = await admin_psycopg(mux)
    try:
        cur = await console.execute("SET timeouts.query_wait = '3s'")
        assert cur.statusmessage == "SET timeouts.query_wait=3s"
        await console.execute("SET listen.max_client_conn = 2")
        config = {r["key"]: r for r in await show(console, "CONFIG")}
        assert config["timeouts.query_wait"]["value"] == "3s"
        assert config["timeouts.query_wait"]["changeable"] == "yes"
        assert config["listen.max_client_conn"]["value"] == "2"
        assert config["listen.addresses"]["changeable"] == "no"
        # max_client_conn = 2 now holds: console + one more, the third is refused.
        one = await connect_asyncpg(mux)
        with pytest.raises(asyncpg.TooManyConnectionsError):
            extra = await connect_asyncpg(mux)
            await extra.close()
        await one.close()
    finally:
        await close_quietly(console)


async def test_console_lists_are_true(pgmux: PgmuxFactory) -> None:
    """SHOW CLIENTS / SERVERS / DATABASES / USERS / LISTS describe what is connected."""
    mux = pgmux(console_config())
    apps = [await connect_asyncpg(mux, server_settings={"application_name": f"hub{i}"})
            for i in range(2)]  # fmt: skip
    console = await admin_psycopg(mux)
    try:
        tx = apps[0].transaction()
        await tx.start()
        backend = await apps[0].fetchval("SELECT pg_backend_pid()")
        clients = [r for r in await show(console, "CLIENTS") if r["database"] == "appdb"]
        assert sorted(r["application_name"] for r in clients) == ["hub0", "hub1"]
        holder = row_for(clients, application_name="hub0")
        assert holder["state"] == "active" and holder["link"]
        assert row_for(clients, application_name="hub1")["state"] == "idle"
        servers = [r for r in await show(console, "SERVERS") if r["database"] == "appdb"]
        linked = row_for(servers, state="active")
        assert linked["remote_pid"] == backend and linked["link"] == holder["ptr"]
        assert linked["application_name"] == "hub0"
        databases = await show(console, "DATABASES")
        assert row_for(databases, name="appdb")["current_client_connections"] == 2
        users = await show(console, "USERS")
        assert row_for(users, name="app")["current_client_connections"] == 2
        lists = {r["list"]: r["items"] for r in await show(console, "LISTS")}
        assert lists["used_clients"] == 3 and lists["pools"] >= 1
        await tx.rollback()
    finally:
        await close_quietly(*apps, console)


async def test_no_secret_in_console_output(pgmux: PgmuxFactory, pg: Any) -> None:
    secret_db_password = "app-secret"  # the forced login's password, in the config file
    config = console_config()
    config["databases"] = {
        "forced": {
            "host": pg.host, "port": pg.port, "dbname": "appdb", "user": "app",
            "password": secret_db_password,
        },
        "*": {"host": pg.host, "port": pg.port},
    }  # fmt: skip
    mux = pgmux(config)
    app = await connect_asyncpg(mux, dbname="forced")
    await app.execute("SELECT 1")
    try:
        everything = ""
        for what in PGBOUNCER_125:
            done = psql(mux, f"SHOW {what}")
            assert done.returncode == 0, done.stderr
            everything += done.stdout
        port = mux.config["admin"]["http"]["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            everything += reply.read().decode()
        assert 'database="forced"' in everything
        for secret in (secret_db_password, "admin-secret", "report-secret"):
            assert secret not in everything
        assert "****" in everything  # SHOW CONFIG names the password, hides its value
    finally:
        await close_quietly(app)
    await wait_until(lambda: asyncio.sleep(0, mux.logs()), lambda logs: "login" in logs,
                     timeout=5)  # fmt: skip
    assert secret_db_password not in mux.logs()


async def test_extended_protocol_by_hand(pgmux: PgmuxFactory) -> None:
    """Parse/Bind/Describe/Execute/Sync as drivers send them, and an error in a batch."""
    mux = pgmux(console_config())
    raw = await RawClient.open(mux)
    try:
        await raw.login(*ADMIN, "pgmux")
        await raw.send(
            message(b"P", b"st1\0SHOW LISTS\0\0\0")
            + message(b"D", b"Sst1\0")
            + message(b"B", b"\0st1\0\0\0\0\0\0\x01\0\x01")  # every result column binary
            + message(b"E", b"\0\0\0\0\0")
            + message(b"S")
        )
        kinds, rows = [], []
        while (msg := await raw.read_message()) is not None:
            kinds.append(msg[0])
            if msg[0] == b"D":
                rows.append(msg[1])
            if msg[0] == b"Z":
                break
        assert kinds[:4] == [b"1", b"t", b"T", b"2"] and kinds[-2:] == [b"C", b"Z"]
        assert len(rows) == 14
        # "items" in binary int4: 4 bytes after the text "list" value.
        assert rows[0].endswith(b"\x00\x00\x00\x04" + (1).to_bytes(4, "big"))
        # An unknown statement: one error, the rest of the batch skipped until Sync.
        await raw.send(
            message(b"B", b"\0nosuch\0\0\0\0\0\0\0") + message(b"E", b"\0\0\0\0\0") + message(b"S")
        )
        first = await raw.read_message()
        assert first is not None and first[0] == b"E"
        assert error_fields(first[1])["C"] == "26000"
        assert await raw.read_message() == (b"Z", b"I")
        result = await raw.query("SHOW VERSION")
        assert result.rows and not result.errors
    finally:
        await raw.close()


async def test_malformed_extended_messages(pgmux: PgmuxFactory) -> None:
    """A Bind or Describe the console cannot read is that batch's error (08P01):
    the rest is skipped until Sync, and the console stays usable."""
    mux = pgmux(console_config())
    raw = await RawClient.open(mux)
    try:
        await raw.login(*ADMIN, "pgmux")
        await raw.send(
            message(b"P", b"st1\0SHOW VERSION\0\0\0")
            + message(b"B", b"\0st1\0\0\0\0\x01")  # one parameter announced, none sent
            + message(b"E", b"\0\0\0\0\0")
            + message(b"S")
        )
        replies = await raw.read_until_ready()
        assert [kind for kind, _body in replies] == [b"1", b"E", b"Z"]
        fields = error_fields(replies[1][1])
        assert fields["C"] == "08P01" and fields["M"] == "invalid Bind message"
        assert (await raw.query("SHOW VERSION")).rows
        for describe in (b"Xst1\0", b"Sst1"):  # no such target type; no terminator
            await raw.send(message(b"D", describe) + message(b"E", b"\0\0\0\0\0") + message(b"S"))
            replies = await raw.read_until_ready()
            assert [kind for kind, _body in replies] == [b"E", b"Z"]
            assert error_fields(replies[0][1])["C"] == "08P01"
        # Two result formats for SHOW VERSION's one column: PostgreSQL's error.
        await raw.send(
            message(b"B", b"\0st1\0\0\0\0\0\0\x02\0\x01\0\x01")
            + message(b"E", b"\0\0\0\0\0")
            + message(b"S")
        )
        replies = await raw.read_until_ready()
        assert [kind for kind, _body in replies] == [b"2", b"E", b"Z"]
        assert "2 result formats" in error_fields(replies[1][1])["M"]
        assert (await raw.query("SHOW VERSION")).rows
    finally:
        await raw.close()

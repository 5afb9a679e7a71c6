"""The test infrastructure itself: the throwaway PostgreSQL and the fixtures.

Everything else trusts these, so they are proven against the real server:
SCRAM logins over TCP with both drivers, exact connection counts, restarts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from pgmux.tempgres import TempPostgres, TempPostgresError, free_port


async def wait_for_count(
    pg: TempPostgres, expected: int, *, dbname: str, timeout: float = 10.0
) -> int:
    """Poll server_connections(): a closed client's backend exits asynchronously."""
    deadline = time.monotonic() + timeout
    while (count := pg.server_connections(dbname)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return count


# -- free_port ------------------------------------------------------------------


def test_free_port_gives_distinct_bindable_ports_in_range() -> None:
    ports = [free_port() for _ in range(5)]
    assert len(set(ports)) == 5, "the same port was handed out twice"
    for port in ports:
        assert 20000 <= port <= 32000
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_free_port_refuses_the_ephemeral_range() -> None:
    with pytest.raises(ValueError):
        free_port(30000, 40000)


def test_free_port_fixture_is_the_function(free_port: Callable[..., int]) -> None:
    assert 20000 <= free_port() <= 32000


# -- the session cluster ------------------------------------------------------------


def test_roles_and_databases_exist(pg: TempPostgres) -> None:
    roles = pg.sql(
        "SELECT rolname, rolsuper, rolcanlogin FROM pg_roles "
        "WHERE rolname IN ('app', 'report', 'admin') ORDER BY rolname"
    )
    assert roles.splitlines() == ["admin|f|t", "app|f|t", "report|f|t"]
    owners = pg.sql(
        "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
        "WHERE datname IN ('hubs', 'appdb', 'other') ORDER BY datname"
    )
    assert owners.splitlines() == ["appdb|app", "hubs|app", "other|app"]
    assert pg.sql("SHOW max_connections") == "100"


def test_tcp_logins_are_scram_only(pg: TempPostgres) -> None:
    # With a scram-sha-256 hba line and a SCRAM verifier stored, a TCP login
    # can only succeed through a SCRAM exchange.
    host_rules = pg.sql("SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'")
    assert host_rules == "scram-sha-256"
    verifiers = pg.sql(
        "SELECT rolname FROM pg_authid WHERE rolname IN ('app', 'report', 'admin', 'postgres') "
        "AND rolpassword LIKE 'SCRAM-SHA-256$%' ORDER BY rolname"
    )
    assert verifiers.splitlines() == ["admin", "app", "postgres", "report"]
    assert pg.sql("SHOW listen_addresses") == "127.0.0.1"


async def test_asyncpg_logs_in_with_scram(pg: TempPostgres) -> None:
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user="app", password="app-secret", database="appdb"
    )
    try:
        row = await conn.fetchrow(
            "SELECT current_user, current_database(), inet_server_addr()::text AS addr"
        )
        assert tuple(row) == ("app", "appdb", "127.0.0.1/32")
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg.dsn("appdb", "app", password="wrong"))


async def test_psycopg_logs_in_with_scram(pg: TempPostgres) -> None:
    assert pg.dsn("hubs", "report") == (
        f"postgresql://report:report-secret@127.0.0.1:{pg.port}/hubs"
    )
    async with await psycopg.AsyncConnection.connect(pg.dsn("hubs", "report")) as conn:
        cur = await conn.execute("SELECT current_user, current_database()")
        assert await cur.fetchone() == ("report", "hubs")
        assert conn.pgconn.used_password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await psycopg.AsyncConnection.connect(pg.dsn("hubs", "report", password="wrong"))


def test_superuser_needs_its_password_over_tcp(pg: TempPostgres) -> None:
    with psycopg.connect(pg.dsn()) as conn:
        assert conn.execute("SELECT current_setting('is_superuser')").fetchone() == ("on",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(password="not-" + pg.password))


def test_sql_raises_on_error(pg: TempPostgres) -> None:
    with pytest.raises(TempPostgresError, match="no_such_table"):
        pg.sql("SELECT * FROM no_such_table")


def test_create_helpers_are_idempotent(pg: TempPostgres) -> None:
    pg.create_role("app", "app-secret")
    pg.create_database("appdb", owner="app")
    assert pg.sql("SELECT count(*) FROM pg_database WHERE datname = 'appdb'") == "1"


async def test_server_connections_counts_client_backends(pg: TempPostgres) -> None:
    # A database of its own, so backends of other tests cannot blur the count.
    pg.create_database("tempgres_count", owner="app")
    assert await wait_for_count(pg, 0, dbname="tempgres_count") == 0

    apps = [await asyncpg.connect(pg.dsn("tempgres_count", "app")) for _ in range(3)]
    reports = [
        await psycopg.AsyncConnection.connect(pg.dsn("tempgres_count", "report")) for _ in range(2)
    ]
    try:
        assert pg.server_connections("tempgres_count") == 5
        assert pg.server_connections("tempgres_count", "app") == 3
        assert pg.server_connections("tempgres_count", "report") == 2
        assert pg.server_connections(user="report") >= 2
        assert pg.server_connections() >= 5
        # The psql doing the counting (postgres@postgres) is not a server connection.
        assert pg.server_connections("postgres", "postgres") == 0
    finally:
        for conn in apps:
            await conn.close()
        for aconn in reports:
            await aconn.close()
    assert await wait_for_count(pg, 0, dbname="tempgres_count") == 0


# -- lifecycle of a cluster of its own ------------------------------------------------


def test_restart_keeps_port_data_and_settings() -> None:
    with TempPostgres(max_connections=20, settings={"log_connections": "on"}) as pg:
        port, first_pid = pg.port, pg.pid
        assert pg.is_running()
        assert pg.sql("SHOW max_connections") == "20"
        assert pg.sql("SHOW log_connections") == "on"
        pg.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        conn = psycopg.connect(pg.dsn(), autocommit=True)

        pg.restart()

        assert pg.is_running()
        assert (pg.port, pg.sql("SELECT x FROM t")) == (port, "42")
        assert pg.pid != first_pid
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")  # the old server ended this session
        conn.close()
        with psycopg.connect(pg.dsn()) as again:
            assert again.execute("SELECT x FROM t").fetchone() == (42,)

        pg.stop()
        assert not pg.is_running()
        pg.stop()  # stopping a stopped server is a no-op
        pg.settings["max_connections"] = "30"  # settings are re-read at start
        pg.start()
        assert pg.sql("SHOW max_connections") == "30"
        base_dir = pg.base_dir
    assert not os.path.exists(base_dir), "cleanup() must remove the temp dir"


def test_taken_auto_port_moves_before_first_start() -> None:
    pg = TempPostgres()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", pg.port))
    squatter.listen()
    try:
        with pg:
            assert pg.port != squatter.getsockname()[1]
            assert pg.sql("SELECT 1") == "1"
    finally:
        squatter.close()


def test_explicit_port_that_is_taken_fails_with_the_log() -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", free_port()))
    squatter.listen()
    try:
        pg = TempPostgres(port=squatter.getsockname()[1])
        with pytest.raises(TempPostgresError, match="could not bind"), pg:
            pass
        assert not os.path.exists(pg.base_dir)
    finally:
        squatter.close()


# -- the pgmux fixture ----------------------------------------------------------------


def test_pgmux_fixture_reports_a_daemon_that_dies(pgmux: Callable[..., object]) -> None:
    # An impossible setting makes any pgmux exit at startup; the fixture must
    # say so at once, with the daemon's output, instead of waiting 15 s.
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="pgmux exited with code") as failure:
        pgmux({"pool": {"size": "not-a-number"}})
    assert time.monotonic() - started < 15
    assert "pgmux.yaml" in str(failure.value) or "Error" in str(failure.value)


daemon_missing = pytest.mark.skipif(
    importlib.util.find_spec("pgmux.proxy.cli") is None, reason="pgmux daemon not written yet"
)


@daemon_missing
def test_pgmux_fixture_starts_serves_and_stops(pg: TempPostgres, pgmux) -> None:
    handle = pgmux()
    assert handle.host == "127.0.0.1"
    assert 20000 <= handle.port <= 32000
    assert handle.config["databases"]["*"] == {"host": pg.host, "port": pg.port}
    with psycopg.connect(handle.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "app",
            "appdb",
        )
    assert handle.stop() is not None
    assert handle.proc.poll() is not None
    assert isinstance(handle.logs(), str)

"""Drop-in migration from PgBouncer: the pgbouncer.ini files in tests/ini start
pgmux, and clients connect with the DSNs and credentials they used with PgBouncer.

Each ini is a template: @PG_HOST@, @PG_PORT@, @PG_SOCKET@, @LISTEN_PORT@ and
@WORKDIR@ are filled in per test. The daemon is started the way an operator
would (`python -m pgmux -c pgbouncer.ini`, from the config's directory).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import APP_PASSWORD, close_quietly, conftest_attr

from pgmux.proxy.config import load_config
from pgmux.tempgres import TempPostgres, free_port

INI_DIR = Path(__file__).with_name("ini")
INI_FILES = sorted(path.name for path in INI_DIR.glob("*.ini"))
START_TIMEOUT = 15.0


def md5_secret(user: str, password: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def scram_secret(password: str, salt: bytes = b"pgmux-test-salt!", iterations: int = 4096) -> str:
    """A SCRAM-SHA-256 verifier as PostgreSQL stores it (RFC 5803)."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    encode = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{encode(salt)}${encode(stored_key)}:{encode(server_key)}"


def fill_templates(workdir: Path, pg: TempPostgres, port: int) -> None:
    """Copy every tests/ini file into WORKDIR with its placeholders filled in."""
    values = {
        "@PG_HOST@": pg.host,
        "@PG_PORT@": str(pg.port),
        "@PG_SOCKET@": pg.socket_dir,
        "@LISTEN_PORT@": str(port),
        "@WORKDIR@": str(workdir),
    }
    for template in INI_DIR.iterdir():
        text = template.read_text()
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        (workdir / template.name).write_text(text)


def plain_users(pg: TempPostgres) -> dict[str, str]:
    return {
        "app": APP_PASSWORD,
        "report": "report-secret",
        "admin": "admin-secret",
        pg.superuser: pg.password,
    }


class IniMux:
    """Starts pgmux on an ini file from tests/ini; stops them all at the end."""

    def __init__(self, pg: TempPostgres, factory: pytest.TempPathFactory, config: Any) -> None:
        self.pg = pg
        self.factory = factory
        self.conftest = lambda name: conftest_attr(config, name)
        self.started: list[Any] = []

    def prepare(self, users: dict[str, str] | None = None) -> tuple[Path, int]:
        workdir = self.factory.mktemp("ini")  # short: unix socket paths are limited
        port = free_port()
        fill_templates(workdir, self.pg, port)
        write_users = self.conftest("write_users_file")
        write_users(workdir / "userlist.txt", users or plain_users(self.pg))
        return workdir, port

    def start(
        self,
        name: str,
        users: dict[str, str] | None = None,
        *,
        workdir: Path | None = None,
        port: int | None = None,
        args: tuple[str, ...] = (),
        tcp: bool = True,
    ) -> Any:
        if workdir is None or port is None:
            workdir, port = self.prepare(users)
        config_path = workdir / name
        log_path = workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args:
            proc = self._popen([*args, "-c", str(config_path)], log_path, workdir, env)
        else:
            proc = self.conftest("_start_daemon")(config_path, log_path, env)
        process_class = self.conftest("PgmuxProcess")
        handle = process_class(
            proc,
            config={"listen": {"port": port, "unix_socket_dir": str(workdir)}},
            config_path=config_path,
            log_path=log_path,
            defaults={},
        )
        self.started.append(handle)
        if tcp:
            self.conftest("_wait_until_accepting")(handle)
        else:
            wait_for_socket(handle, workdir / f".s.PGSQL.{port}")
        return handle

    def _popen(
        self, args: list[str], log_path: Path, cwd: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "pgmux", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                preexec_fn=self.conftest("_die_with_parent"),
            )

    def stop_all(self) -> None:
        for handle in self.started:
            handle.stop()


def wait_for_socket(handle: Any, path: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(f"pgmux exited during startup:\n{handle.logs()}")
        if path.exists():
            return
        time.sleep(0.05)
    raise RuntimeError(f"no unix socket {path} after {timeout}s:\n{handle.logs()}")


@pytest.fixture
def ini_mux(
    pg: TempPostgres, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[IniMux]:
    mux = IniMux(pg, tmp_path_factory, request.config)
    yield mux
    mux.stop_all()
    conftest_attr(request.config, "_report_logs_on_failure")(request, mux.started)


def dsn(port: int, dbname: str = "appdb", user: str = "app", password: str = APP_PASSWORD) -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{port}/{dbname}"


def psql(conninfo: str, sql: str, env: dict[str, str] | None = None) -> str:
    """psql -X -At; returns stdout, fails the test with stderr on error."""
    result = subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PGCONNECT_TIMEOUT": "15", **(env or {})},
    )
    assert result.returncode == 0, f"psql failed: {result.stderr}"
    return result.stdout.strip()


async def fetchval(conninfo: str, sql: str, **kwargs: Any) -> Any:
    # statement_cache_size=0: the same settings an app behind PgBouncer < 1.21 uses
    conn = await asyncpg.connect(conninfo, statement_cache_size=0, timeout=15, **kwargs)
    try:
        return await conn.fetchval(sql)
    finally:
        await close_quietly(conn)


# -- acceptance 1: each ini starts pgmux and the same DSNs work ----------------------------


async def test_minimal_ini(ini_mux: IniMux) -> None:
    mux = ini_mux.start("minimal.ini")
    assert await fetchval(dsn(mux.port), "SELECT current_database()") == "appdb"
    assert psql(dsn(mux.port), "SELECT current_user") == "app"
    # PgBouncer's default pool_mode is session: one client keeps its server.
    conn = await asyncpg.connect(dsn(mux.port), statement_cache_size=0, timeout=15)
    try:
        pids = {await conn.fetchval("SELECT pg_backend_pid()") for _ in range(5)}
        await conn.execute("SET application_name = 'kept'")
        assert await conn.fetchval("SHOW application_name") == "kept"
    finally:
        await close_quietly(conn)
    assert len(pids) == 1


async def test_transaction_pooling_md5_and_scram_auth_file(
    ini_mux: IniMux, pg: TempPostgres
) -> None:
    users = {
        "app": md5_secret("app", APP_PASSWORD),
        "report": scram_secret("report-secret"),
    }
    mux = ini_mux.start("transaction_md5_scram.ini", users)
    assert await fetchval(dsn(mux.port), "SELECT current_user") == "app"  # md5
    report = dsn(mux.port, "other", "report", "report-secret")
    assert await fetchval(report, "SELECT current_database()") == "other"  # SCRAM
    assert psql(report, "SELECT 40 + 2") == "42"
    assert psql(dsn(mux.port), "SELECT current_database()") == "appdb"
    with pytest.raises(asyncpg.InvalidPasswordError):
        await fetchval(dsn(mux.port, password="wrong"), "SELECT 1")
    # ignore_startup_parameters = extra_float_digits, options (pgjdbc sends them)
    value = await fetchval(dsn(mux.port), "SELECT 1", server_settings={"extra_float_digits": "3"})
    assert value == 1
    # Transaction pooling: many clients, at most default_pool_size = 5 servers.
    clients = [dsn(mux.port) for _ in range(12)]
    pids = await asyncio.gather(
        *(fetchval(c, "SELECT pg_backend_pid() FROM pg_sleep(0.05)") for c in clients)
    )
    assert 1 <= len(set(pids)) <= 5
    # logfile: PgBouncer's lines there (and on stderr); no setting of this ini is ignored.
    logfile = Path(mux.config_path).with_name("pgbouncer.log").read_text()
    assert " LOG process up: pgmux " in logfile and " login attempt: db=appdb " in logfile
    assert "unsupported" not in mux.logs()
    pidfile = Path(mux.config_path).with_name("pgbouncer.pid")
    assert pidfile.read_text().strip() == str(mux.pid)


async def test_per_database_pool_sizes_and_fallback(ini_mux: IniMux) -> None:
    mux = ini_mux.start("pools_fallback.ini")
    port = mux.port
    assert await fetchval(dsn(port), "SELECT current_database()") == "appdb"
    assert await fetchval(dsn(port, "reports"), "SELECT current_database()") == "other"
    assert await fetchval(dsn(port, "hubs"), "SELECT current_database()") == "hubs"  # "*"
    assert psql(dsn(port, "hubs-alias"), "SELECT current_database()") == "hubs"
    assert await fetchval(dsn(port, "hubs-alias"), "SHOW application_name") == "hub alias"
    # appdb: pool_size=2, max_db_connections=3 (2 + reserve_pool_size 1).
    sql = "SELECT pg_backend_pid() FROM pg_sleep(0.3)"
    pids = await asyncio.gather(*(fetchval(dsn(port), sql) for _ in range(6)))
    assert 1 <= len(set(pids)) <= 3
    config = load_config(mux.config_path)
    assert config.databases["appdb"].pool.size == 2
    assert config.databases["reports"].pool.mode == "session"
    assert config.database("hubs").pool.size == 4  # default_pool_size
    assert config.users["report"].max_user_connections == 2


async def test_admin_and_stats_users(ini_mux: IniMux) -> None:
    mux = ini_mux.start("admin_stats.ini")
    assert await fetchval(dsn(mux.port), "SELECT 1") == 1
    config = load_config(mux.config_path)
    assert config.admin.users == ("admin",)
    assert config.admin.stats_users == ("report", "monitor")
    admin = dsn(mux.port, "pgbouncer", "admin", "admin-secret")
    rows = psql(admin, "SHOW CONFIG")
    assert "default_pool_size|20|20|yes" in rows.splitlines()
    assert "pool_mode|transaction|session|" in rows
    assert "listen_port|" in rows and "max_client_conn|100|100|" in rows
    stats = dsn(mux.port, "pgbouncer", "report", "report-secret")
    assert "appdb" in psql(stats, "SHOW DATABASES")
    # SET takes PgBouncer's names for the settings that can change at run time.
    psql(admin, "SET default_pool_size = 7")
    assert "default_pool_size|7|20|yes" in psql(admin, "SHOW CONFIG").splitlines()


async def test_unix_socket_only(ini_mux: IniMux) -> None:
    workdir, port = ini_mux.prepare()
    mux = ini_mux.start("unix_socket.ini", workdir=workdir, port=port, tcp=False)
    socket_path = workdir / f".s.PGSQL.{port}"
    assert socket_path.stat().st_mode & 0o777 == 0o770  # unix_socket_mode
    conninfo = f"host={workdir} port={port} dbname=appdb user=app"
    assert psql(conninfo, "SELECT current_user", {"PGPASSWORD": APP_PASSWORD}) == "app"
    conn = await asyncpg.connect(
        host=str(workdir),
        port=port,
        user="app",
        password=APP_PASSWORD,
        database="appdb",
        statement_cache_size=0,
        timeout=15,
    )
    try:
        assert await conn.fetchval("SELECT 7") == 7
    finally:
        await close_quietly(conn)
    with pytest.raises(OSError):  # no listen_addr: no TCP, as in PgBouncer
        await fetchval(dsn(port), "SELECT 1")
    assert mux.proc.poll() is None


async def test_include_relative_to_the_working_directory(
    ini_mux: IniMux, monkeypatch: pytest.MonkeyPatch
) -> None:
    mux = ini_mux.start("include.ini")
    assert await fetchval(dsn(mux.port), "SELECT current_database()") == "appdb"
    monkeypatch.chdir(Path(mux.config_path).parent)  # where the daemon runs
    config = load_config(mux.config_path)
    assert config.databases["appdb"].pool.size == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="-u needs root")
async def test_u_switches_user_after_binding(ini_mux: IniMux) -> None:
    workdir, port = ini_mux.prepare()
    os.chmod(workdir, 0o777)  # the socket is removed by the unprivileged user at exit
    mux = ini_mux.start("minimal.ini", workdir=workdir, port=port, args=("-u", "nobody"))
    nobody = [str(pwd.getpwnam("nobody").pw_uid)] * 4
    # The kernel accepts into the backlog once the socket listens, a moment
    # before the daemon's loop runs the switch: give it that moment.
    deadline = time.monotonic() + 10
    while (uids := process_uids(mux.pid)) != nobody and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert uids == nobody
    assert await fetchval(dsn(port), "SELECT 1") == 1
    assert mux.stop() == 0


def process_uids(pid: int) -> list[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]


# -- acceptance 2: `pgmux convert` gives the same configuration ------------------------------


@pytest.mark.parametrize("name", INI_FILES)
def test_convert_gives_the_same_configuration(
    name: str, pg: TempPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_templates(tmp_path, pg, free_port())
    (tmp_path / "userlist.txt").write_text('"app" "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "pgmux", "convert", name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (tmp_path / "converted.yaml").write_text(result.stdout)
    monkeypatch.chdir(tmp_path)  # the ini's relative names are relative to the cwd
    from_ini = load_config(tmp_path / name)
    from_yaml = load_config(tmp_path / "converted.yaml")
    assert replace(from_ini, path=None) == replace(from_yaml, path=None)


async def test_converted_yaml_serves_the_same_databases(ini_mux: IniMux) -> None:
    workdir, port = ini_mux.prepare()
    converted = subprocess.run(
        [sys.executable, "-m", "pgmux", "convert", "pools_fallback.ini"],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=60,
    )
    assert converted.returncode == 0, converted.stderr
    (workdir / "pgmux.yaml").write_text(converted.stdout)
    check = subprocess.run(
        [sys.executable, "-m", "pgmux", "--check", "-c", "pgmux.yaml"],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    seen = []
    for name in ("pools_fallback.ini", "pgmux.yaml"):
        mux = ini_mux.start(name, workdir=workdir, port=port)
        row = [
            await fetchval(dsn(port, db), "SELECT current_database()")
            for db in ("appdb", "reports", "hubs", "hubs-alias")
        ]
        admin = dsn(port, "pgbouncer", "admin", "admin-secret")
        with contextlib.suppress(AssertionError):  # admin_users is not set here
            row.append(psql(admin, "SHOW DATABASES"))
        seen.append(row)
        assert mux.stop() == 0
    assert seen[0] == seen[1]


# -- the real PgBouncer, same files -----------------------------------------------------------


@pytest.mark.skipif(shutil.which("pgbouncer") is None, reason="PgBouncer is not installed")
async def test_same_ini_and_dsn_work_with_pgbouncer_and_pgmux(
    pg: TempPostgres, ini_mux: IniMux
) -> None:
    # PgBouncer will not run as root: give it a directory of its own.
    workdir = Path(tempfile.mkdtemp(prefix="pgb-"))
    try:
        port = free_port()
        fill_templates(workdir, pg, port)
        conftest_attr_users = ini_mux.conftest("write_users_file")
        conftest_attr_users(workdir / "userlist.txt", plain_users(pg))
        become = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            for path in (workdir, *workdir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)

            def become() -> None:
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)

        ini = workdir / "minimal.ini"
        results = []
        with open(workdir / "pgbouncer.out", "wb") as out:
            bouncer = subprocess.Popen(
                ["pgbouncer", str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=become,
            )
        try:
            results.append(await query_when_up(port, bouncer.poll))
        finally:
            bouncer.send_signal(signal.SIGTERM)  # PgBouncer's immediate shutdown
            try:
                bouncer.wait(15)
            except subprocess.TimeoutExpired:
                bouncer.kill()
                bouncer.wait()
        assert results, (workdir / "pgbouncer.out").read_text()
        # Stop PgBouncer, start pgmux on the very same files.
        mux = ini_mux.start("minimal.ini", workdir=workdir, port=port)
        results.append(await query_when_up(mux.port, mux.proc.poll))
        assert results[0] == results[1] == ("appdb", "app", "42")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def query_when_up(port: int, poll: Callable[[], int | None]) -> tuple[str, str, str]:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            database = await fetchval(dsn(port), "SELECT current_database()")
            break
        except OSError:
            if poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    user = await fetchval(dsn(port), "SELECT current_user")
    return database, user, psql(dsn(port), "SELECT 40 + 2")

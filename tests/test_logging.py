"""Logging as PgBouncer does it: logfile (reopened on SIGHUP, shared by the
workers), PgBouncer's line format and texts, syslog, log_connections /
log_disconnections / log_pooler_errors / log_stats, verbose and -v.

The texts matched here are the ones PgBouncer's own test suite and operators'
log parsers match on (src/client.c, objects.c, server.c, stats.c).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import APP_PASSWORD, close_quietly, conftest_attr, wait_until

from pgmux.proxy.base.log import LogEvents, LogOutputs, configure_logging, get_logger
from pgmux.tempgres import TempPostgres, free_port

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+ \[(\d+)\]"
LINE = re.compile(STAMP + r" (LOG|WARNING|ERROR|FATAL|DEBUG|NOISE) \S")
PTR = r"0x[0-9a-f]+"
WRONG_PASSWORD = "not-the-password-9f3c"


def ini_text(
    pg: TempPostgres, workdir: Path, port: int, extra: str = "", databases: str = ""
) -> str:
    return f"""[databases]
appdb = host={pg.host} port={pg.port} dbname=appdb
{databases}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {workdir}
auth_type = md5
auth_file = {workdir}/userlist.txt
admin_users = admin
logfile = {workdir}/pgbouncer.log
pool_mode = transaction
{extra}
"""


class IniStarter:
    """Starts `python -m pgmux [ARGS] pgbouncer.ini` as an operator would."""

    def __init__(self, pg: TempPostgres, factory: pytest.TempPathFactory, config: Any) -> None:
        self.pg = pg
        self.factory = factory
        self.conftest: Callable[[str], Any] = lambda name: conftest_attr(config, name)
        self.started: list[Any] = []

    def start(
        self,
        extra: str = "",
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        databases: str = "",
        users: dict[str, str] | None = None,
    ) -> Any:
        workdir = self.factory.mktemp("log")
        port = free_port()
        ini = workdir / "pgbouncer.ini"
        ini.write_text(ini_text(self.pg, workdir, port, extra, databases))
        users = {"app": APP_PASSWORD, "admin": "admin-secret", **(users or {})}
        self.conftest("write_users_file")(workdir / "userlist.txt", users)
        stderr_path = workdir / "stderr.log"
        with open(stderr_path, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pgmux", *args, str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                preexec_fn=self.conftest("_die_with_parent"),
            )
        handle = self.conftest("PgmuxProcess")(
            proc,
            config={"listen": {"port": port, "unix_socket_dir": str(workdir)}},
            config_path=ini,
            log_path=stderr_path,
            defaults={},
        )
        self.started.append(handle)
        self.conftest("_wait_until_accepting")(handle)
        return handle


@pytest.fixture
def ini_pgmux(
    pg: TempPostgres, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[IniStarter]:
    starter = IniStarter(pg, tmp_path_factory, request.config)
    yield starter
    for handle in starter.started:
        handle.stop()
    conftest_attr(request.config, "_report_logs_on_failure")(request, starter.started)


def logfile(mux: Any) -> Path:
    return Path(mux.config_path).with_name("pgbouncer.log")


def dsn(mux: Any, password: str = APP_PASSWORD, user: str = "app") -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{mux.port}/appdb"


async def one_session(mux: Any) -> str:
    """Log in, run a query, close: returns the client's own address as host:port."""
    conn = await asyncpg.connect(dsn(mux))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        host, port = conn._transport.get_extra_info("sockname")[:2]
    finally:
        await conn.close()
    return f"{host}:{port}"


async def failed_login(mux: Any) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(dsn(mux, password=WRONG_PASSWORD))


async def wait_for_log(path: Path, pattern: str, timeout: float = 10) -> str:
    async def read() -> str:
        return path.read_text() if path.exists() else ""

    return await wait_until(
        read, lambda text: re.search(pattern, text) is not None, timeout=timeout, what=pattern
    )


# -- logfile and the line format --------------------------------------------------------


async def test_ini_logfile_gets_pgbouncer_lines(ini_pgmux: IniStarter) -> None:
    mux = ini_pgmux.start(args=("--quiet",))  # as PgBouncer's test suite runs it
    path = logfile(mux)
    peer = await one_session(mux)
    await failed_login(mux)
    text = await wait_for_log(path, r"closing because: password authentication failed")
    lines = text.splitlines()
    assert lines and all(LINE.match(line) for line in lines), text
    assert {LINE.match(line).group(1) for line in lines} == {str(mux.pid)}
    assert re.search(STAMP + r" LOG process up: pgmux \S+, Python", text)
    client = rf"C-{PTR}: appdb/app@{re.escape(peer)}"
    assert re.search(
        STAMP + rf" LOG {client} login attempt: db=appdb user=app tls=no replication=no$",
        text,
        re.M,
    ), text
    assert re.search(
        rf" LOG {client} closing because: client close request \(age=\d+s\)$", text, re.M
    )
    assert re.search(
        rf" LOG S-{PTR}: appdb/app@[^ ]+:\d+ new connection to server \(from 127\.0\.0\.1:\d+\)$",
        text,
        re.M,
    ), text
    assert re.search(
        rf" WARNING C-{PTR}: appdb/app@127\.0\.0\.1:\d+ pooler error: "
        r'password authentication failed for user "app"$',
        text,
        re.M,
    )
    assert re.search(
        rf" LOG C-{PTR}: appdb/app@127\.0\.0\.1:\d+ closing because: "
        r'password authentication failed for user "app" \(age=\d+s\)$',
        text,
        re.M,
    )
    # -q: nothing on stderr while a log file takes the lines, as with PgBouncer.
    assert mux.logs() == ""
    # Secrets never reach the log, not even the wrong one a client sent.
    assert APP_PASSWORD not in text and WRONG_PASSWORD not in text


async def test_client_id_in_the_log_is_show_clients_ptr(ini_pgmux: IniStarter) -> None:
    mux = ini_pgmux.start()
    conn = await asyncpg.connect(dsn(mux))
    admin = await asyncpg.connect(
        f"postgresql://admin:admin-secret@127.0.0.1:{mux.port}/pgbouncer", statement_cache_size=0
    )
    try:
        rows = await admin.fetch("SHOW CLIENTS")
        ptrs = [row["ptr"] for row in rows if row["database"] == "appdb"]
        assert len(ptrs) == 1
        text = await wait_for_log(logfile(mux), rf"C-{ptrs[0]}: appdb/app@\S+ login attempt")
        assert f"C-{ptrs[0]}: appdb/app@" in text
    finally:
        await close_quietly(conn, admin)


async def test_logfile_reopened_on_sighup(ini_pgmux: IniStarter) -> None:
    mux = ini_pgmux.start()
    path = logfile(mux)
    await one_session(mux)
    await wait_for_log(path, "login attempt")
    rotated = path.with_name("pgbouncer.log.1")
    path.rename(rotated)  # logrotate's move, then its postrotate SIGHUP
    mux.signal(signal.SIGHUP)
    await wait_until(lambda: asyncio.sleep(0, path.exists()), bool, timeout=10, what="new file")
    before = rotated.read_text().count("login attempt")
    await one_session(mux)
    text = await wait_for_log(path, "login attempt")
    assert text.count("login attempt") == 1
    assert rotated.read_text().count("login attempt") == before  # the old file is done


async def test_workers_share_one_logfile(pgmux, tmp_path: Path) -> None:
    """YAML: logging.format pgbouncer and logging.file; every worker appends whole lines."""
    path = tmp_path / "mux.log"
    config = {
        "listen": {"workers": 2},
        "logging": {"format": "pgbouncer", "file": str(path)},
    }
    mux = pgmux(config=config)

    async def session() -> None:
        conn = await asyncpg.connect(mux.dsn())
        try:
            await conn.fetchval("SELECT pg_sleep(0.01)")
        finally:
            await conn.close()

    deadline = time.monotonic() + 60
    rounds = 0
    while rounds < 10 and time.monotonic() < deadline:
        await asyncio.gather(*(session() for _ in range(8)))
        rounds += 1
    text = await wait_for_log(path, "closing because: client close request")
    lines = text.splitlines()
    assert all(LINE.match(line) for line in lines), [x for x in lines if not LINE.match(x)][:5]
    pids = {LINE.match(line).group(1) for line in lines}
    assert len(pids) >= 3, pids  # the supervisor and both workers
    assert text.count("login attempt: db=appdb user=app") == rounds * 8


# -- what gets logged ------------------------------------------------------------------


async def test_log_switches_off(ini_pgmux: IniStarter) -> None:
    extra = (
        "log_connections = 0\nlog_disconnections = 0\nlog_pooler_errors = 0\n"
        "log_stats = 0\nstats_period = 1\n"
    )
    mux = ini_pgmux.start(extra)
    await one_session(mux)
    await failed_login(mux)
    await asyncio.sleep(2.5)  # two stats periods
    text = logfile(mux).read_text()
    assert "process up" in text
    for words in ("login attempt", "closing because", "new connection to server", "pooler error"):
        assert words not in text, words
    assert " LOG stats: " not in text


async def test_stats_line_every_stats_period(ini_pgmux: IniStarter) -> None:
    mux = ini_pgmux.start("stats_period = 1\n")
    conn = await asyncpg.connect(dsn(mux))
    try:
        for _ in range(5):  # >= 1 xacts/s even when a loaded machine stretches the period
            await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    text = await wait_for_log(logfile(mux), r"LOG stats: [1-9]\d* xacts/s", timeout=15)
    assert re.search(
        STAMP + r" LOG stats: \d+ xacts/s, \d+ queries/s, \d+ client parses/s, "
        r"\d+ server parses/s, \d+ binds/s, \d+ client logins/s, in \d+ B/s, out \d+ B/s, "
        r"xact \d+ us, query \d+ us, wait \d+ us$",
        text,
        re.M,
    ), text


@pytest.mark.parametrize("how", ["ini", "cli"])
async def test_verbose_logs_debug_lines(ini_pgmux: IniStarter, how: str) -> None:
    settings, args = ("verbose = 1\n", ()) if how == "ini" else ("", ("-v",))
    mux = ini_pgmux.start(settings, args=args)
    quiet = ini_pgmux.start()
    for each in (mux, quiet):
        await one_session(each)
        each.stop()
    assert re.search(STAMP + r" DEBUG ", logfile(mux).read_text())
    assert not re.search(STAMP + r" DEBUG ", logfile(quiet).read_text())
    # stop() sent SIGTERM: main.c's words for it
    shutdown = " LOG got SIGTERM, shutting down, waiting for all clients disconnect\n"
    assert shutdown in logfile(quiet).read_text()


# -- syslog ------------------------------------------------------------------------


async def test_syslog(ini_pgmux: IniStarter, tmp_path_factory: pytest.TempPathFactory) -> None:
    sock_path = tmp_path_factory.mktemp("syslog") / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    receiver.settimeout(0.2)
    try:
        extra = "syslog = 1\nsyslog_ident = bouncer-test\nsyslog_facility = local3\n"
        mux = ini_pgmux.start(extra, env={"PGMUX_SYSLOG_SOCKET": str(sock_path)})
        await one_session(mux)
        received: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("client close" in m for m in received):
            with contextlib.suppress(TimeoutError):
                received.append(receiver.recv(65536).decode())
            await asyncio.sleep(0)
    finally:
        receiver.close()
    # local3 (19) * 8 + info (6) = 158: ident[pid]: message, no time (syslog adds it)
    attempt = (
        rf"^<158>bouncer-test\[\d+\]: C-{PTR}: appdb/app@127\.0\.0\.1:\d+ login attempt: db=appdb"
    )
    assert any(re.match(attempt, m) for m in received), received
    assert any(re.match(r"^<158>bouncer-test\[\d+\]: process up: pgmux", m) for m in received)
    assert not any("DEBUG" in m or APP_PASSWORD in m for m in received)


# -- the renderer, without a daemon ---------------------------------------------------


@pytest.fixture
def log_to(tmp_path: Path) -> Iterator[Path]:
    """This process's log into a file in the PgBouncer format, for one test."""
    path = tmp_path / "unit.log"
    configure_logging("pgbouncer", "debug", LogOutputs(stderr=False, file=str(path)), LogEvents())
    yield path
    configure_logging("console", "error", LogOutputs(), LogEvents())


def test_secrets_are_masked(log_to: Path) -> None:
    log = get_logger("pgmux.test")
    log.info("console_set", key="auth.query_password", value="s3cr3t-value")
    log.warning("odd_event", password="hunter2-x", user_secret="abc-secret-1", db="appdb")
    text = log_to.read_text()
    for secret in ("s3cr3t-value", "hunter2-x", "abc-secret-1"):
        assert secret not in text
    assert text.count("********") == 3 and "WARNING odd_event:" in text


def test_ipv6_peer_and_multiline_messages(log_to: Path) -> None:
    log = get_logger("pgmux.test")
    fields = {"ptr": "0xabc", "client": "::1:5555", "db": "appdb", "user": "app"}
    log.info("logout", reason="client closed the connection", duration=3.7, **fields)
    log.error("reload_failed", error="line one\nline two\n")
    lines = log_to.read_text().splitlines()
    assert lines[0].endswith(
        " LOG C-0xabc: appdb/app@[::1]:5555 closing because: client unexpected eof (age=3s)"
    )
    assert re.match(STAMP + r" ERROR reload_failed: error=line one$", lines[1])
    assert lines[2] == "\tline two"  # continued, as PgBouncer continues a message


async def test_server_login_failures(
    ini_pgmux: IniStarter, pg: TempPostgres, dead_port: int
) -> None:
    dead = dead_port
    databases = (
        f"nosuchdb = host={pg.host} port={pg.port} dbname=no_such_database_here\n"
        f"deaddb = host=127.0.0.1 port={dead} dbname=appdb\n"
    )
    mux = ini_pgmux.start(databases=databases)
    for dbname in ("nosuchdb", "deaddb"):
        with pytest.raises((asyncpg.PostgresError, OSError)):
            await asyncpg.connect(
                f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{mux.port}/{dbname}", timeout=20
            )
    text = await wait_for_log(logfile(mux), r"deaddb/app@127\.0\.0\.1:\d+ closing because: connect")
    assert re.search(
        STAMP + r' WARNING server login failed: FATAL database "no_such_database_here" '
        r"does not exist$",
        text,
        re.M,
    ), text
    assert re.search(
        rf" LOG S-{PTR}: nosuchdb/app@[^ ]+ closing because: "
        r'database "no_such_database_here" does not exist \(age=\d+s\)$',
        text,
        re.M,
    ), text  # PostgreSQL's words, as PgBouncer closes the server
    assert re.search(
        rf" LOG S-{PTR}: deaddb/app@127\.0\.0\.1:{dead} "
        r"closing because: connect failed \(age=\d+s\)$",
        text,
        re.M,
    ), text


async def test_login_attempt_names_the_tls_protocol_and_cipher(pgmux, tmp_path: Path) -> None:
    import ssl

    from test_tls import OPENSSL, make_ca, make_cert

    if not OPENSSL:
        pytest.skip("openssl not found")
    make_ca(tmp_path)
    cert, key = make_cert(tmp_path, "server")
    path = tmp_path / "tls.log"
    mux = pgmux(
        {
            "tls": {"client": {"mode": "require", "cert": str(cert), "key": str(key)}},
            "logging": {"format": "pgbouncer", "file": str(path)},
        }
    )
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    conn = await asyncpg.connect(mux.dsn(), ssl=context)
    await conn.close()
    text = await wait_for_log(path, "login attempt")
    assert re.search(
        rf" LOG C-{PTR}: appdb/app@127\.0\.0\.1:\d+ login attempt: db=appdb user=app "
        r"tls=TLSv1\.[23]/[A-Z0-9_-]+ replication=no$",
        text,
        re.M,
    ), text


def test_unopenable_logfile_stops_startup(pg: TempPostgres, tmp_path: Path) -> None:
    ini = tmp_path / "pgbouncer.ini"
    text = ini_text(pg, tmp_path, free_port()).replace(
        f"logfile = {tmp_path}/pgbouncer.log", f"logfile = {tmp_path}/missing/dir/pgbouncer.log"
    )
    ini.write_text(text)
    (tmp_path / "userlist.txt").write_text(f'"app" "{APP_PASSWORD}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "pgmux", str(ini)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot open logfile" in result.stderr and "missing/dir" in result.stderr


async def test_console_set_verbose(ini_pgmux: IniStarter) -> None:
    """PgBouncer's test suite raises the level with `SET verbose = 2` on the console."""
    mux = ini_pgmux.start()
    admin = await asyncpg.connect(
        f"postgresql://admin:admin-secret@127.0.0.1:{mux.port}/pgbouncer", statement_cache_size=0
    )
    try:
        await admin.execute("SET verbose = 2")
        rows = await admin.fetch("SHOW CONFIG")
        assert {row["key"]: row["value"] for row in rows}["verbose"] == "1"
    finally:
        await close_quietly(admin)
    await one_session(mux)
    mux.stop()
    assert re.search(STAMP + r" DEBUG ", logfile(mux).read_text())


async def test_reload_applies_new_log_settings(ini_pgmux: IniStarter) -> None:
    mux = ini_pgmux.start()
    path = logfile(mux)
    await one_session(mux)
    await wait_for_log(path, "login attempt")
    ini = Path(mux.config_path)
    ini.write_text(ini.read_text() + "log_connections = 0\n")
    mux.signal(signal.SIGHUP)
    await wait_for_log(path, r" LOG reload: ")
    await one_session(mux)
    text = await wait_until(
        lambda: asyncio.sleep(0, path.read_text()),
        lambda text: text.count("closing because: client close request") == 2,
        timeout=10,
        what="the second session's close",
    )
    assert text.count("login attempt") == 1  # the second login came after the reload

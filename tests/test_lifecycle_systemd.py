"""Acceptance: pgmux as a systemd service (issue 5).

A unix datagram socket made by the test stands in for systemd's
$NOTIFY_SOCKET and must receive READY=1, RELOADING=1 (with MONOTONIC_USEC),
READY=1 again, STOPPING=1 and WATCHDOG=1 at the right moments. Socket
activation: a pre-bound listening socket passed as fd 3 with LISTEN_FDS=1 and
LISTEN_PID set to pgmux's own pid is used instead of the configured port. The
unit passes `systemd-analyze verify` (when installed) and has the required keys.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PgmuxFactory, close_quietly, conftest_attr, connect_asyncpg

from pgmux import __version__
from pgmux.build import build
from pgmux.proxy.daemon.logsetup import log_level
from pgmux.tempgres import TempPostgres, free_port

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "pgmux.service"
SOCKET_UNIT = REPO / "systemd" / "pgmux.socket"

pytestmark = pytest.mark.timeout(90)


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path.startswith("@"):
            self.sock.bind(b"\0" + path[1:].encode())
        else:
            self.sock.bind(path)
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = 15) -> dict[str, str]:
        """The next message carrying KEY (others, e.g. WATCHDOG=1, are kept)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.receive(max(deadline - time.monotonic(), 0.01))
            if fields is not None and key in fields:
                return fields
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages!r}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSystemd]:
    path = str(tmp_path_factory.mktemp("notify") / "notify.sock")
    fake = FakeSystemd(path)
    yield fake
    fake.close()


async def test_notify_ready_reloading_stopping_watchdog(
    pg: TempPostgres, pgmux: PgmuxFactory, fake_systemd: FakeSystemd
) -> None:
    mux = pgmux(
        {"listen": {"workers": 1}},
        env={"NOTIFY_SOCKET": fake_systemd.path, "WATCHDOG_USEC": "400000"},
    )
    ready = fake_systemd.wait_for("READY")
    assert ready["READY"] == "1"
    assert "clients" in ready.get("STATUS", "")
    # READY=1 comes once pgmux accepts clients.
    conn = await connect_asyncpg(mux)
    assert await conn.fetchval("SELECT 1") == 1
    # WATCHDOG=1 every half of WATCHDOG_USEC.
    fake_systemd.wait_for("WATCHDOG", timeout=5)
    fake_systemd.wait_for("WATCHDOG", timeout=5)

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    mux.signal(signal.SIGHUP)
    reloading = fake_systemd.wait_for("RELOADING")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    assert fake_systemd.wait_for("READY")["READY"] == "1"  # reload finished

    mux.signal(signal.SIGTERM)
    stopping = fake_systemd.wait_for("STOPPING")
    assert stopping["STOPPING"] == "1"
    await close_quietly(conn)
    assert await asyncio.to_thread(mux.wait, 20) == 0
    kinds = [next(iter(m)) for m in fake_systemd.messages if "WATCHDOG" not in m]
    assert kinds.index("READY") < kinds.index("RELOADING") < kinds.index("STOPPING")


async def test_notify_abstract_socket_and_failed_reload_status(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    fake = FakeSystemd(f"@pgmux-test-{os.getpid()}-{free_port()}")
    try:
        mux = pgmux({"listen": {"workers": 1}}, env={"NOTIFY_SOCKET": fake.path})
        fake.wait_for("READY")
        mux.config_path.write_text("listen: [broken\n")
        mux.signal(signal.SIGHUP)
        fake.wait_for("RELOADING")
        # READY=1 again (systemd must not wait forever), saying what happened.
        assert "reload failed" in fake.wait_for("READY")["STATUS"]
        assert not any("WATCHDOG" in m for m in fake.messages)  # no WATCHDOG_USEC given
    finally:
        fake.close()


# -- socket activation ---------------------------------------------------------

LAUNCHER = """
import os, sys
os.dup2(int(sys.argv[1]), 3)  # systemd's first socket is always fd 3
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
os.execv(sys.executable, [sys.executable, "-m", "pgmux", *sys.argv[2:]])
"""


def launch(
    pg: TempPostgres,
    workdir: Path,
    request: pytest.FixtureRequest,
    config: dict[str, Any],
    args: list[str],
    sock: socket.socket | None = None,
) -> subprocess.Popen[bytes]:
    """Start pgmux through the launcher (fd 3 = SOCK), with the fixtures' config."""
    attr = lambda name: conftest_attr(request.config, name)  # noqa: E731
    merged = attr("deep_merge")(attr("default_config")(pg, workdir), config)
    path = workdir / "pgmux.yaml"
    attr("write_yaml")(path, merged)
    attr("write_users_file")(workdir / "users.txt", attr("default_users")(pg))
    fds = [sock.fileno()] if sock is not None else []
    if sock is None:
        argv = [sys.executable, "-m", "pgmux"]
    else:
        argv = [sys.executable, "-c", LAUNCHER, str(sock.fileno())]
    with open(workdir / "pgmux.log", "ab") as log:
        return subprocess.Popen(
            [*argv, "-c", str(path), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=fds,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


async def test_socket_activation(
    pg: TempPostgres, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    workdir = tmp_path_factory.mktemp("sockact")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    configured_port = free_port()
    config = {"listen": {"port": configured_port, "workers": 1, "unix_socket_dir": None}}
    proc = launch(pg, workdir, request, config, [], sock=listener)
    listener.close()  # pgmux holds its own copy now, as under systemd
    try:
        endpoint = type("Endpoint", (), {"host": "127.0.0.1", "port": port})()
        conn = None
        deadline = time.monotonic() + 15
        while conn is None:
            assert proc.poll() is None, (workdir / "pgmux.log").read_text()
            try:
                conn = await connect_asyncpg(endpoint, timeout=2)
            except (TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert await conn.fetchval("SELECT 1") == 1
        await close_quietly(conn)
        # The inherited socket replaced the configured address.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", configured_port), timeout=2).close()
        assert "inherited" in (workdir / "pgmux.log").read_text()
    finally:
        assert stop(proc) == 0, (workdir / "pgmux.log").read_text()


def test_listen_pid_of_another_process_is_ignored() -> None:
    """LISTEN_FDS meant for another pid (e.g. a parent): bind as configured."""
    from pgmux.proxy.daemon.listener import inherited_sockets

    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getppid())}
    assert inherited_sockets(env) == []
    assert env["LISTEN_FDS"] == "1"  # left alone: not ours


async def test_cli_pidfile_option_and_version(
    pg: TempPostgres, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "pgmux", "--version"], capture_output=True, text=True, timeout=30
    )
    first = version.stdout.splitlines()[0]
    assert version.returncode == 0 and first.startswith(f"pgmux {__version__} ({build()}")

    workdir = tmp_path_factory.mktemp("cli")
    pidfile = workdir / "run" / "pgmux.pid"
    pidfile.parent.mkdir()
    proc = launch(pg, workdir, request, {"listen": {"workers": 1}}, ["--pidfile", str(pidfile)])
    try:
        deadline = time.monotonic() + 15
        while not pidfile.exists():
            assert proc.poll() is None, (workdir / "pgmux.log").read_text()
            assert time.monotonic() < deadline, "no pidfile"
            await asyncio.sleep(0.05)
        assert pidfile.read_text().strip() == str(proc.pid)
    finally:
        assert stop(proc) == 0
    assert not pidfile.exists()


def test_verbosity_levels() -> None:
    assert log_level("info") == "info"
    assert log_level("info", 1) == "debug"
    assert log_level("warning", 1) == "info"
    assert log_level("error", 2) == "info"
    assert log_level("warning", 5) == "debug"
    assert log_level("debug", 0, quiet=True) == "warning"


# -- the unit files ------------------------------------------------------------


def unit_keys(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_service_unit_has_the_required_keys() -> None:
    service = unit_keys(UNIT)["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Type"] == "notify"
    assert "-HUP $MAINPID" in one["ExecReload"] and "kill" in one["ExecReload"]
    assert one["Restart"] == "on-failure"
    assert int(one["LimitNOFILE"]) >= 4096
    assert one["User"] == "pgmux"
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert one["RuntimeDirectory"] == "pgmux"
    assert one["ConfigurationDirectory"] == "pgmux"
    assert one["WatchdogSec"]
    assert "pgmux -c /etc/pgmux/pgmux.yaml" in one["ExecStart"]
    socket_unit = unit_keys(SOCKET_UNIT)
    assert socket_unit["Socket"]["ListenStream"]
    assert socket_unit["Socket"]["Service"] == ["pgmux.service"]
    tmpfiles = (REPO / "systemd" / "pgmux.tmpfiles.conf").read_text()
    assert any(line.startswith("d /run/pgmux ") for line in tmpfiles.splitlines())
    sysusers = (REPO / "systemd" / "pgmux.sysusers.conf").read_text()
    assert any(line.startswith("u pgmux ") for line in sysusers.splitlines())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's.
    pgmux_bin = shutil.which("pgmux", path=str(Path(sys.executable).parent)) or "/bin/true"
    service = UNIT.read_text().replace("/usr/bin/pgmux", pgmux_bin)
    (tmp_path / "pgmux.service").write_text(service)
    shutil.copy(SOCKET_UNIT, tmp_path / "pgmux.socket")
    result = subprocess.run(
        ["systemd-analyze", "verify", "pgmux.service", "pgmux.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if "pgmux" in line]
    assert not problems, problems

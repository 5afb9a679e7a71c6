"""The supervisor of several workers on one port (`listen.workers`).

It binds the listening sockets once, before any worker exists: per
configured address one TCP socket for each worker, all with SO_REUSEPORT, so
the kernel spreads new connections over the workers; and one unix socket that
every worker accepts on. It then forks the workers, forwards signals to them
and restarts a worker that dies (its TCP socket stays open in the supervisor,
so connections that arrive meanwhile wait in its backlog instead of failing).
It is systemd's main process: READY, STOPPING and the watchdog come from here.
Each worker runs a Daemon of its own; daemon/peers.py is how they talk.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import structlog
import uvloop

from pgmux.proxy.base import ids
from pgmux.proxy.base.ledger import SUPERVISOR, Ledger
from pgmux.proxy.base.log import get_logger, reopen_logs
from pgmux.proxy.base.sdnotify import Notifier
from pgmux.proxy.config import Config, ListenConfig
from pgmux.proxy.core.peers import MAX_WORKERS
from pgmux.proxy.daemon.lifecycle import Daemon
from pgmux.proxy.daemon.listener import inherited_sockets
from pgmux.proxy.daemon.peers import WorkerInfo

log = get_logger("pgmux.supervisor")

# Signals the supervisor handles; the workers get them forwarded.
_FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
_WAITED = (*_FORWARDED, signal.SIGCHLD)

_RESTART_DELAY = 1.0  # a worker that died is restarted no sooner than this after its start
_CRASH_LOOP = 5  # this many deaths in a row within _RESTART_DELAY of starting: give up


# --- the listening sockets ---------------------------------------------------


def bind_tcp(listen: ListenConfig, count: int) -> list[list[socket.socket]]:
    """Per worker, one SO_REUSEPORT socket for each configured address."""
    per_worker: list[list[socket.socket]] = [[] for _ in range(count)]
    for address in listen.addresses:
        host = None if address == "*" else address
        infos = socket.getaddrinfo(
            host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen = set()
        for family, kind, proto, _name, sockaddr in infos:
            if sockaddr in seen:
                continue
            seen.add(sockaddr)
            for sockets in per_worker:
                sock = socket.socket(family, kind, proto)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(listen.backlog)
                sockets.append(sock)
    return per_worker


def bind_unix(listen: ListenConfig) -> tuple[socket.socket | None, str | None]:
    """The unix socket every worker accepts on, named like PostgreSQL's."""
    if not listen.unix_socket_dir:
        return None, None
    path = os.path.join(listen.unix_socket_dir, f".s.PGSQL.{listen.port}")
    os.makedirs(listen.unix_socket_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, listen.unix_socket_mode)
    sock.listen(listen.backlog)
    return sock, path


# --- the worker processes ------------------------------------------------------


@dataclasses.dataclass
class _Child:
    index: int
    pid: int
    started: float


class Supervisor:
    """Forks listen.workers workers, forwards signals, restarts the ones that die.

    It runs no event loop: signals are blocked and taken synchronously with
    sigtimedwait, so forking a new worker at any time is safe.
    """

    def __init__(self, config: Config, worker_main: Callable[[Config, WorkerInfo], int]) -> None:
        self.config = config
        self.count = config.listen.workers
        self.worker_main = worker_main
        self.children: dict[int, _Child] = {}  # pid -> child
        self.restart_at: dict[int, float] = {}  # index -> when
        self.crashes = 0
        self.stopping = False
        self.exit_code = 0
        self.rundir = ""
        self.tcp: list[list[socket.socket]] = []
        self.shared: list[socket.socket] = []
        self.unix_path: str | None = None
        self.notifier = Notifier()  # the supervisor is systemd's main process
        self.ledger: Ledger | None = None
        self.watchdog_at = 0.0

    def run(self) -> int:
        if not 1 <= self.count <= MAX_WORKERS:
            log.error("bad_workers", workers=self.count, maximum=MAX_WORKERS)
            return 1
        self.shared = inherited_sockets()
        if not self.shared:
            try:
                self.tcp = bind_tcp(self.config.listen, self.count)
                unix, self.unix_path = bind_unix(self.config.listen)
            except OSError as exc:
                log.error("listen_failed", port=self.config.listen.port, error=str(exc))
                self._close_sockets()
                return 1
            if unix is not None:
                self.shared.append(unix)
        self.rundir = tempfile.mkdtemp(prefix="pgmux-")
        self.ledger = Ledger(self.count)  # mapped before fork: every worker shares it
        self.ledger.index = SUPERVISOR  # each worker sets its own after the fork
        signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
        try:
            for index in range(self.count):
                self._fork(index)
            log.info(
                "workers_started",
                workers=self.count,
                port=self.config.listen.port,
                pids=sorted(self.children),
            )
            self.notifier.ready(f"{self.count} workers")
            self._loop()
        finally:
            self.notifier.close()
            self._close_sockets()
            shutil.rmtree(self.rundir, ignore_errors=True)
        return self.exit_code

    def _loop(self) -> None:
        while self.children or (not self.stopping and self.restart_at):
            info = signal.sigtimedwait(_WAITED, 0.5)
            if info is not None and info.si_signo != signal.SIGCHLD:
                self._signal(info.si_signo)
            self._reap()
            self._restart_due()
            self._feed_watchdog()

    def _feed_watchdog(self) -> None:
        # From this loop, which also restarts workers: if it hangs, systemd acts.
        interval = self.notifier.watchdog_interval
        if interval and time.monotonic() >= self.watchdog_at:
            self.notifier.notify("WATCHDOG=1")
            self.watchdog_at = time.monotonic() + interval / 2

    def _signal(self, signo: int) -> None:
        if signo == signal.SIGHUP:
            reopen_logs()  # the workers reopen theirs when the signal reaches them
        if signo in _STOPPING and not self.stopping:
            self.stopping = True
            log.info("workers_stopping", signal=signal.Signals(signo).name)
            self.notifier.stopping(f"stopping {len(self.children)} workers")
            self.restart_at.clear()
            self._close_sockets()  # the port refuses new connections at once
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._exited(child, os.waitstatus_to_exitcode(status))

    def _exited(self, child: _Child, code: int) -> None:
        if self.stopping:
            if code != 0:
                self.exit_code = 1
            return
        log.warning("worker_died", worker=child.index, pid=child.pid, exit_code=code)
        if self.ledger is not None:
            self.ledger.clear_worker(child.index)  # its servers and clients died with it
        now = time.monotonic()
        quick = now - child.started < _RESTART_DELAY
        self.crashes = self.crashes + 1 if quick else 0
        if self.crashes >= _CRASH_LOOP:
            log.error("workers_crash_loop", deaths=self.crashes)
            self.exit_code = 1
            self._signal(signal.SIGTERM)
            return
        self.restart_at[child.index] = max(now, child.started + _RESTART_DELAY)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[index]
                self._fork(index)
                log.info("worker_restarted", worker=index)

    def _fork(self, index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self._child(index, parent)  # never returns
        self.children[pid] = _Child(index, pid, time.monotonic())

    def _child(self, index: int, parent: int) -> None:
        code = 1
        try:
            for signo in _WAITED:
                signal.signal(signo, signal.SIG_DFL)
            # Signals stay blocked (pending, not lost) until the daemon's handlers
            # are in place: an early SIGHUP must reload, not kill, the worker.
            signal.pthread_sigmask(signal.SIG_SETMASK, set(_FORWARDED))
            _die_with_parent()
            if os.getppid() != parent:
                os._exit(1)  # the supervisor died before prctl took effect
            sockets = list(self.shared)
            for other, tcp in enumerate(self.tcp):
                if other == index:
                    sockets.extend(tcp)
                else:
                    for sock in tcp:
                        sock.close()  # a dead sibling's queue must not be held here
            os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
            assert self.ledger is not None
            self.ledger.index = index
            self.ledger.clear_worker(index)
            info = WorkerInfo(
                index=index,
                count=self.count,
                rundir=self.rundir,
                sockets=sockets,
                ledger=self.ledger,
            )
            code = self.worker_main(self.config, info)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _close_sockets(self) -> None:
        for sock in [*self.shared, *(s for tcp in self.tcp for s in tcp)]:
            sock.close()
        self.shared = []
        self.tcp = []
        if self.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
            self.unix_path = None


def _die_with_parent() -> None:
    """A worker gets SIGTERM when the supervisor dies, so none is left behind."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_workers(config: Config) -> int:
    """`pgmux -c FILE` with listen.workers > 1: the supervisor's entry point."""
    return Supervisor(config, _worker_main).run()


def _worker_main(config: Config, info: WorkerInfo) -> int:
    """A forked worker's life: its own event loop and Daemon."""
    structlog.contextvars.bind_contextvars(worker=info.index)
    ids.configure(info.index, info.count)  # ids unique across workers (SHOW CLIENTS, KILL_CLIENT)
    return uvloop.run(Daemon(info.shape(config), worker=info).run())

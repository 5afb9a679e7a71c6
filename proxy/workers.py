"""Several worker processes on one port (`listen.workers`).

The supervisor binds the listening sockets once, before any worker exists: per
configured address one TCP socket for each worker, all with SO_REUSEPORT, so
the kernel spreads new connections over the workers; and one unix socket that
every worker accepts on. It then forks the workers, forwards signals to them
and restarts a worker that dies (its TCP socket stays open in the supervisor,
so connections that arrive meanwhile wait in its backlog instead of failing).

Limits are shared, not split: every server-connection and client limit
(pool size, reserve, max_db/user/server connections, max_client_conn and the
per-database and per-user client limits) is counted in the ledger, a table in
memory shared by all workers (ledger.py), so `pool.size: 12` means 12 servers
in all. When a worker's clients wait for a pool that another worker has
servers of, that worker hands a server over as soon as it is free: the socket
itself travels over a unix socket (SCM_RIGHTS) with what pgmux knows about the
backend (its key, parameters, prepared statements), so the same PostgreSQL
session carries on in the other process. Servers move only while the workers'
shares are uneven, so a busy pool settles at an even split and stays there.
Only limits.max_logins_in_progress, a flood guard, is split per worker.

Cancel keys: the low byte of every BackendKeyData pid a worker issues is that
worker's index. A CancelRequest lands on whichever worker the kernel picks;
when the pid names another worker, the raw 16-byte request is forwarded to it
over its internal unix socket in a private run directory.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import os
import pickle
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgmux.protocol import messages
from pgmux.protocol.startup import CANCEL_REQUEST_CODE
from pgmux.proxy.base.ledger import Ledger
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.sdnotify import Notifier
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import Config
from pgmux.proxy.console.gather import local_rows, merge
from pgmux.proxy.console.show import Result

if TYPE_CHECKING:
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.workers")

WORKER_BITS = 8  # low bits of a cancel pid: the issuing worker
MAX_WORKERS = 1 << WORKER_BITS
_WORKER_MASK = MAX_WORKERS - 1
_CANCEL_PACKET = struct.Struct("!III4s")  # length, code, pid, key

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

_SEND_TIMEOUT = 2.0  # a message to another worker's mailbox
_PEER_TIMEOUT = 5.0  # connecting to another worker, or its SHOW / metrics answer
NO_ANSWER = object()  # another worker gave no answer to a request
_MAX_FDS = 4  # descriptors one mailbox message may carry (a server hand-over: 1)
_MAX_MESSAGE = 16 << 20
_RESTART_DELAY = 1.0  # a worker that died is restarted no sooner than this after its start
_CRASH_LOOP = 5  # this many deaths in a row within _RESTART_DELAY of starting: give up


# --- the static split of limits ---------------------------------------------


def share(total: int, count: int, index: int) -> int:
    """Worker INDEX's part of TOTAL over COUNT workers; 0 (unlimited) stays 0."""
    if total <= 0 or count <= 1:
        return total
    part = total // count + (1 if index < total % count else 0)
    return max(part, 1)


def worker_config(config: Config, count: int, index: int) -> Config:
    """The configuration worker INDEX of COUNT runs with: the shared limits stay
    whole (the ledger counts them across workers); the login flood guard is split."""
    if count <= 1:
        return config
    limits = config.limits
    return dataclasses.replace(
        config,
        limits=dataclasses.replace(
            limits,
            max_logins_in_progress=share(limits.max_logins_in_progress, count, index),
        ),
    )


# --- one worker's view ---------------------------------------------------------


def cancel_socket_path(rundir: str, index: int) -> str:
    return os.path.join(rundir, f"cancel.{index}")


def peer_socket_path(rundir: str, index: int) -> str:
    return os.path.join(rundir, f"peer.{index}")


def mailbox_path(rundir: str, index: int) -> str:
    return os.path.join(rundir, f"mail.{index}")


def worker_of(pid: int) -> int:
    """The index of the worker that issued a cancel pid."""
    return pid & _WORKER_MASK


@dataclasses.dataclass
class WorkerInfo:
    """What a worker process knows about itself and its siblings."""

    index: int
    count: int
    rundir: str
    sockets: list[socket.socket] = dataclasses.field(default_factory=list)
    ledger: Ledger | None = None  # the limits all workers share
    # This worker's Prometheus text (set by the metrics module), for worker 0's /metrics.
    local_metrics: Callable[[], bytes] | None = None
    _servers: list[asyncio.AbstractServer] = dataclasses.field(default_factory=list)
    _mailbox: _Mailbox | None = None

    def shape(self, config: Config) -> Config:
        return worker_config(config, self.count, self.index)

    def issue_pid(self, random_bits: int) -> int:
        """A cancel pid whose low byte names this worker."""
        return (random_bits << WORKER_BITS | self.index) & 0x7FFFFFFF

    def forward_cancel(self, pid: int, key: bytes) -> bool:
        """Send a CancelRequest for another worker's client there; False if it is ours."""
        target = worker_of(pid)
        if target == self.index or target >= self.count:
            return False
        log.info("cancel_to_worker", target=target)  # rare: no cost on the data path
        path = cancel_socket_path(self.rundir, target)
        spawn(_forward_cancel(path, messages.cancel_request(pid, key)))
        return True

    async def start(self, registry: Registry) -> None:
        """Accept what the other workers send: forwarded CancelRequests, servers
        and notes (the mailbox), and requests that want an answer (peer socket)."""
        await self._serve(
            cancel_socket_path(self.rundir, self.index), lambda: _ForwardedCancel(registry)
        )
        self._mailbox = _Mailbox(mailbox_path(self.rundir, self.index), registry)
        await self._serve(peer_socket_path(self.rundir, self.index), lambda: _Peer(self, registry))

    async def _ask_others(self, request: tuple, timeout: float | None) -> dict[int, Any]:
        """Every other worker's answer to REQUEST, by index (NO_ANSWER if none came)."""
        others = [index for index in range(self.count) if index != self.index]
        answers = await asyncio.gather(
            *(_ask(peer_socket_path(self.rundir, index), request, timeout) for index in others)
        )
        return dict(zip(others, answers, strict=True))

    async def gather_show(self, view: str, local: Result) -> Result:
        """A SHOW with every worker's rows (admin_gather.py)."""
        answers = await self._ask_others(("show", view), _PEER_TIMEOUT)
        return merge(view, local, [rows for rows in answers.values() if rows is not NO_ANSWER])

    async def run_everywhere(self, query: str) -> list[str | None]:
        """A console command on every other worker: None or an error for each."""
        # No timeout: PAUSE answers once that worker's transactions are done.
        answers = await self._ask_others(("run", query), None)
        return ["no answer" if a is NO_ANSWER else a for a in answers.values()]

    def send(self, index: int, message: tuple, fd: int | None = None) -> bool:
        """A message (and maybe a socket, which is closed here) to worker INDEX.

        Blocking, but only for a local unix socket whose reader is another
        event loop: microseconds, at worst _SEND_TIMEOUT.
        """
        payload = pickle.dumps(message)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd else []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(_SEND_TIMEOUT)
                sock.connect(mailbox_path(self.rundir, index))
                sent = sock.sendmsg([payload], rights)
                sock.sendall(payload[sent:])
            return True
        except OSError as exc:
            log.warning("worker_message_failed", target=index, error=str(exc) or type(exc).__name__)
            return False
        finally:
            if fd is not None:
                os.close(fd)

    def broadcast(self, message: tuple) -> None:
        for index in range(self.count):
            if index != self.index:
                self.send(index, message)

    async def _serve(self, path: str, factory: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        self._servers.append(await loop.create_unix_server(factory, path))
        os.chmod(path, 0o600)

    async def gather_metrics(self, own: bytes) -> bytes:
        """Every worker's Prometheus text in one exposition, labelled worker="N"."""
        answers = await self._ask_others(("metrics", None), _PEER_TIMEOUT)
        texts = {index: text for index, text in answers.items() if text is not NO_ANSWER}
        return merge_metrics({self.index: own, **texts})


class _ForwardedCancel(asyncio.Protocol):
    """The internal socket: one raw CancelRequest per connection, nothing else."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.buffer = b""
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < _CANCEL_PACKET.size:
            return
        length, code, pid, key = _CANCEL_PACKET.unpack_from(self.buffer)
        if length == _CANCEL_PACKET.size and code == CANCEL_REQUEST_CODE:
            self.registry.cancel(pid, key)
        assert self.transport is not None
        self.transport.close()


class _Mailbox:
    """What the other workers send: servers handed over (the socket rides along
    as SCM_RIGHTS) and notes about starving pools. One message per connection."""

    def __init__(self, path: str, registry: Registry) -> None:
        self.registry = registry
        self.loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _address = self.sock.accept()
            except OSError:  # BlockingIOError: none left
                return
            conn.setblocking(False)
            letter = _Letter(conn)
            self.loop.add_reader(conn.fileno(), self._read, letter)

    def _read(self, letter: _Letter) -> None:
        done = letter.read()
        if not done:
            return
        self.loop.remove_reader(letter.conn.fileno())
        letter.conn.close()
        try:
            message = pickle.loads(b"".join(letter.chunks)) if letter.chunks else None
        except (pickle.UnpicklingError, EOFError, ValueError):
            message = None
        self._deliver(message, letter.fds)

    def _deliver(self, message: tuple | None, fds: list[int]) -> None:
        registry = self.registry
        kind = message[0] if message else None
        if kind == "server" and fds:
            _kind, dbname, user, state = message  # type: ignore[misc]
            registry.adopt_server(dbname, user, state, fds.pop(0))
        elif kind == "room":
            _kind, dbname, user, scope = message  # type: ignore[misc]
            registry.room_wanted(dbname, user, scope)
        elif kind == "params":
            _kind, dbname, user, params = message  # type: ignore[misc]
            registry.params_heard(dbname, user, params)
        elif kind == "freed":
            registry.shared_slot_freed()
        for fd in fds:
            os.close(fd)


class _Letter:
    """One incoming message: its bytes and the descriptors that came with them."""

    __slots__ = ("chunks", "conn", "fds", "size")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.chunks: list[bytes] = []
        self.fds: list[int] = []
        self.size = 0

    def read(self) -> bool:
        """Take what arrived; True once the sender has closed (or on error)."""
        try:
            data, ancdata, _flags, _address = self.conn.recvmsg(
                1 << 16, socket.CMSG_SPACE(4 * _MAX_FDS)
            )
        except BlockingIOError:
            return False
        except OSError:
            return True
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            return True
        self.chunks.append(data)
        self.size += len(data)
        return self.size > _MAX_MESSAGE


class _Peer(asyncio.Protocol):
    """The internal peer socket: one pickled request from another worker (its
    console or its /metrics), then this worker's answer."""

    def __init__(self, info: WorkerInfo, registry: Registry) -> None:
        self.info = info
        self.registry = registry
        self.buffer = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data

    def eof_received(self) -> bool:
        spawn(self._answer())
        return True  # keep the socket open for the answer

    async def _answer(self) -> None:
        assert self.transport is not None
        try:
            kind, argument = pickle.loads(self.buffer)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
            self.transport.close()
            return
        answer: Any = None
        if kind == "show":
            answer = local_rows(self.registry, argument, time.monotonic())
        elif kind == "run":
            from pgmux.proxy.console.commands import (
                run_replayed,  # admin imports what imports this module
            )

            answer = await run_replayed(self.registry, argument)
        elif kind == "metrics":
            local = self.info.local_metrics
            answer = local() if local is not None else b""
        if not self.transport.is_closing():
            self.transport.write(pickle.dumps(answer))
            self.transport.close()


async def _ask(path: str, request: tuple, timeout: float | None) -> Any:
    """Another worker's answer to REQUEST (NO_ANSWER when it gives none)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), _PEER_TIMEOUT)
        try:
            writer.write(pickle.dumps(request))
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
        return pickle.loads(data)
    except (OSError, TimeoutError, pickle.UnpicklingError, EOFError) as exc:
        log.warning(
            "worker_request_failed", request=request[0], error=str(exc) or type(exc).__name__
        )
        return NO_ANSWER


def merge_metrics(texts: dict[int, bytes]) -> bytes:
    """Prometheus text of several workers: each family once, every sample labelled."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for index, text in sorted(texts.items()):
        family = ""
        for line in text.decode().splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                lines = headers.setdefault(family, [])
                if line not in lines:
                    lines.append(line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#"):
                samples.setdefault(family, []).append(_with_worker(line, index))
    out = []
    for family, lines in samples.items():
        out += headers.get(family, [])
        out += lines
    return ("\n".join(out) + "\n").encode()


def _with_worker(sample: str, index: int) -> str:
    name_end = min(i for i in (sample.find("{"), sample.find(" ")) if i >= 0)
    if sample[name_end] == "{":
        return f'{sample[:name_end]}{{worker="{index}",{sample[name_end + 1 :]}'
    return f'{sample[:name_end]}{{worker="{index}"}}{sample[name_end:]}'


async def _forward_cancel(path: str, packet: bytes) -> None:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
        writer.write(packet)
        await asyncio.wait_for(writer.drain(), 5)
        writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel_forward_failed", error=str(exc))


# --- the supervisor ----------------------------------------------------------------


def bind_tcp(listen, count: int) -> list[list[socket.socket]]:  # listen: ListenConfig
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


def bind_unix(listen) -> tuple[socket.socket | None, str | None]:  # listen: ListenConfig
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
        from pgmux.proxy.daemon.listener import inherited_sockets

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


def _number_connections_apart(info: WorkerInfo) -> None:
    """Client and server ids unique across workers (the console shows them all,
    KILL_CLIENT takes one): worker i of N numbers i+1, i+1+N, i+1+2N..."""
    from pgmux.proxy.datapath import client, server

    client._client_ids = itertools.count(info.index + 1, info.count)
    server._server_ids = itertools.count(info.index + 1, info.count)


def run_workers(config: Config, level: str = "info") -> int:
    """`pgmux -c FILE` with listen.workers > 1: the supervisor's entry point."""

    def worker_main(config: Config, info: WorkerInfo) -> int:
        import structlog
        import uvloop

        from pgmux.proxy.daemon.lifecycle import Daemon

        structlog.contextvars.bind_contextvars(worker=info.index)
        _number_connections_apart(info)
        return uvloop.run(Daemon(info.shape(config), worker=info).run())

    return Supervisor(config, worker_main).run()

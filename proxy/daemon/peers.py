"""One worker of several on one port (`listen.workers`): what it knows about
itself and how it talks to its siblings (proxy/supervisor.py forks them).

Limits are shared, not split: every server-connection and client limit
(pool size, reserve, max_db/user/server connections, max_client_conn and the
per-database and per-user client limits) is counted in the ledger, a table in
memory shared by all workers (base/ledger.py), so `pool.size: 12` means 12
servers in all. When a worker's clients wait for a pool that another worker
has servers of, that worker hands a server over as soon as it is free: the
socket itself travels over a unix socket (SCM_RIGHTS) with what pgmux knows
about the backend (core/peers.py's ServerSnapshot: its key, parameters,
prepared statements), so the same PostgreSQL session carries on in the other
process. Servers move only while the workers' shares are uneven, so a busy
pool settles at an even split and stays there. Only
limits.max_logins_in_progress, a flood guard, is split per worker.

Three unix sockets per worker, in a private run directory:

* cancel.N: one raw CancelRequest per connection. The low byte of every
  BackendKeyData pid a worker issues is that worker's index; a CancelRequest
  lands on whichever worker the kernel picks, and when the pid names another
  worker it is forwarded there.
* mail.N: one core/peers.py message per connection, no answer (servers handed
  over, starving pools, learned parameters, freed slots).
* peer.N: one request per connection that wants an answer (another worker's
  console SHOW or command, or worker 0's /metrics).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import os
import pickle
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pgmux.protocol import messages
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.startup import CancelRequest, StartupReader
from pgmux.proxy.base.ledger import Ledger
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import Config
from pgmux.proxy.console.commands import run_replayed
from pgmux.proxy.console.gather import local_rows, merge
from pgmux.proxy.console.show import Result
from pgmux.proxy.core.peers import (
    Message,
    ParamsLearned,
    RoomWanted,
    ServerHandedOver,
    SlotFreed,
    pid_of_worker,
    worker_of,
)

if TYPE_CHECKING:
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.peers")

_SEND_TIMEOUT = 2.0  # a message to another worker's mailbox
_PEER_TIMEOUT = 5.0  # connecting to another worker, or its SHOW / metrics answer
NO_ANSWER = object()  # another worker gave no answer to a request
_MAX_FDS = 4  # descriptors one mailbox message may carry (a server hand-over: 1)
_MAX_MESSAGE = 16 << 20


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


# --- the requests of the peer socket ----------------------------------------


@dataclasses.dataclass(frozen=True)
class _ShowRequest:
    """This worker's rows of a SHOW view (console/gather.py)."""

    name: ClassVar[str] = "show"  # in the log
    view: str


@dataclasses.dataclass(frozen=True)
class _RunRequest:
    """A console command run here for another worker's console."""

    name: ClassVar[str] = "run"
    query: str


@dataclasses.dataclass(frozen=True)
class _MetricsRequest:
    """This worker's Prometheus text, for worker 0's /metrics."""

    name: ClassVar[str] = "metrics"


_Request = _ShowRequest | _RunRequest | _MetricsRequest


# --- one worker's view ---------------------------------------------------------


def cancel_socket_path(rundir: str, index: int) -> str:
    return os.path.join(rundir, f"cancel.{index}")


def peer_socket_path(rundir: str, index: int) -> str:
    return os.path.join(rundir, f"peer.{index}")


def mailbox_path(rundir: str, index: int) -> str:
    return os.path.join(rundir, f"mail.{index}")


@dataclasses.dataclass
class WorkerInfo:
    """What a worker process knows about itself and its siblings (core/peers.py's
    Peers, as the registry sees it)."""

    index: int
    count: int
    rundir: str
    sockets: list[socket.socket] = dataclasses.field(default_factory=list)
    ledger: Ledger | None = None  # the limits all workers share
    # This worker's Prometheus text (the daemon sets it), for worker 0's /metrics.
    local_metrics: Callable[[], bytes] | None = None
    _servers: list[asyncio.AbstractServer] = dataclasses.field(default_factory=list)
    _mailbox: _Mailbox | None = None

    def shape(self, config: Config) -> Config:
        return worker_config(config, self.count, self.index)

    def issue_pid(self, random_bits: int) -> int:
        """A cancel pid whose low byte names this worker."""
        return pid_of_worker(random_bits, self.index)

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

    async def _ask_others(self, request: _Request, timeout: float | None) -> dict[int, Any]:
        """Every other worker's answer to REQUEST, by index (NO_ANSWER if none came)."""
        others = [index for index in range(self.count) if index != self.index]
        answers = await asyncio.gather(
            *(_ask(peer_socket_path(self.rundir, index), request, timeout) for index in others)
        )
        return dict(zip(others, answers, strict=True))

    async def gather_show(self, view: str, local: Result) -> Result:
        """A SHOW with every worker's rows (console/gather.py)."""
        answers = await self._ask_others(_ShowRequest(view), _PEER_TIMEOUT)
        return merge(view, local, [rows for rows in answers.values() if rows is not NO_ANSWER])

    async def run_everywhere(self, query: str) -> list[str | None]:
        """A console command on every other worker: None or an error for each."""
        # No timeout: PAUSE answers once that worker's transactions are done.
        answers = await self._ask_others(_RunRequest(query), None)
        return ["no answer" if a is NO_ANSWER else a for a in answers.values()]

    async def metrics_of_others(self) -> dict[int, bytes]:
        """The other workers' Prometheus texts, by index (those that answered)."""
        answers = await self._ask_others(_MetricsRequest(), _PEER_TIMEOUT)
        return {index: text for index, text in answers.items() if text is not NO_ANSWER}

    def send(self, index: int, message: Message, fd: int | None = None) -> bool:
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

    def broadcast(self, message: Message) -> None:
        for index in range(self.count):
            if index != self.index:
                self.send(index, message)

    async def _serve(self, path: str, factory: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        self._servers.append(await loop.create_unix_server(factory, path))
        os.chmod(path, 0o600)


class _ForwardedCancel(asyncio.Protocol):
    """The internal socket: one raw CancelRequest per connection, nothing else."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.reader = StartupReader()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # Keys are 4 bytes (protocol 3.0) or up to 256 (3.2): read the packet whole.
        self.reader.feed(data)
        try:
            event = self.reader.next_event()
        except ProtocolError:
            event = None
        else:
            if event is None and not self.reader.done:
                return
        if isinstance(event, CancelRequest):
            self.registry.cancels.cancel(event.pid, event.key)
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

    def _deliver(self, message: Message | None, fds: list[int]) -> None:
        registry = self.registry
        match message:
            case ServerHandedOver(dbname, user, snapshot) if fds:
                registry.adopt_server(dbname, user, snapshot, fds.pop(0))
            case RoomWanted(dbname, user, scope):
                registry.room_wanted(dbname, user, scope)
            case ParamsLearned(dbname, user, params):
                registry.params_heard(dbname, user, params)
            case SlotFreed():
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
            request = pickle.loads(self.buffer)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
            self.transport.close()
            return
        answer: Any = None
        match request:
            case _ShowRequest(view):
                answer = local_rows(self.registry, view, time.monotonic())
            case _RunRequest(query):
                answer = await run_replayed(self.registry, query)
            case _MetricsRequest():
                local = self.info.local_metrics
                answer = local() if local is not None else b""
        if not self.transport.is_closing():
            self.transport.write(pickle.dumps(answer))
            self.transport.close()


async def _ask(path: str, request: _Request, timeout: float | None) -> Any:
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
            "worker_request_failed",
            request=request.name,
            error=str(exc) or type(exc).__name__,
        )
        return NO_ANSWER


async def _forward_cancel(path: str, packet: bytes) -> None:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
        writer.write(packet)
        await asyncio.wait_for(writer.drain(), 5)
        writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel_forward_failed", error=str(exc))

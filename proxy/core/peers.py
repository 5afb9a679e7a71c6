"""What the worker processes of `listen.workers` say to each other, and the
surface through which the registry and the pools reach them.

The messages travel pickled over a unix socket (proxy/daemon/peers.py); a
server handed over brings its socket along as SCM_RIGHTS, next to the
ServerSnapshot that lets the other process carry on with the same backend.
The cancel pids name their worker in the low byte, so a CancelRequest that
lands on the wrong worker can be forwarded.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pgmux.proxy.console.show import Result

WORKER_BITS = 8  # low bits of a cancel pid: the issuing worker
MAX_WORKERS = 1 << WORKER_BITS
_WORKER_MASK = MAX_WORKERS - 1


def worker_of(pid: int) -> int:
    """The index of the worker that issued a cancel pid."""
    return pid & _WORKER_MASK


def pid_of_worker(random_bits: int, index: int) -> int:
    """A positive cancel pid whose low byte names worker INDEX."""
    return (random_bits << WORKER_BITS | index) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class ServerSnapshot:
    """What another worker needs to carry on with an idle, clean server."""

    backend_pid: int
    backend_key: bytes
    params: dict[str, str]  # ParameterStatus values it reported
    applied: dict[str, str]  # unreported GUCs pgmux set on it
    connected_at: float  # CLOCK_MONOTONIC: one clock for all workers
    last_used: float
    prepared: tuple[bytes, ...]  # its statements' Parse bodies, oldest first


# --- the mailbox messages: one per connection, no answer ---------------------


@dataclasses.dataclass(frozen=True)
class ServerHandedOver:
    """An idle server of pool (dbname, user); its socket rides along."""

    dbname: str
    user: str
    snapshot: ServerSnapshot


@dataclasses.dataclass(frozen=True)
class RoomWanted:
    """The sender's pool starves on a shared limit (SCOPE: pool, servers, db, user)."""

    dbname: str
    user: str
    scope: str


@dataclasses.dataclass(frozen=True)
class ParamsLearned:
    """The sender's pool met its first server; these are its parameters."""

    dbname: str
    user: str
    params: dict[str, str]


@dataclasses.dataclass(frozen=True)
class SlotFreed:
    """A shared slot came free while the receiver's pools starve."""


Message = ServerHandedOver | RoomWanted | ParamsLearned | SlotFreed


class Peers(Protocol):
    """The other workers, as the registry, the pools and the console reach them
    (proxy/daemon/peers.py's WorkerInfo)."""

    def issue_pid(self, random_bits: int) -> int:
        """A cancel pid whose low byte names this worker."""
        ...

    def forward_cancel(self, pid: int, key: bytes) -> bool:
        """Send a CancelRequest for another worker's client there; False if it is ours."""
        ...

    def send(self, index: int, message: Message, fd: int | None = None) -> bool:
        """MESSAGE (and maybe a socket, closed here) to worker INDEX; False if it failed."""
        ...

    def broadcast(self, message: Message) -> None:
        """MESSAGE to every other worker."""
        ...

    async def gather_show(self, view: str, local: Result) -> Result:
        """A SHOW with every worker's rows."""
        ...

    async def run_everywhere(self, query: str) -> list[str | None]:
        """A console command on every other worker: None or an error for each."""
        ...

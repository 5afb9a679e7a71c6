"""Limits shared by the workers of `listen.workers` (the ledger).

One anonymous shared mapping, created by the supervisor before it forks, holds
a table of counters that every worker sees. Each row is one scope a limit
applies to: a pool (database, user), a database, a user, all servers, all
clients. Each row has one column per worker with that worker's server (or
client) count, how many of its clients wait in that pool, and since when the
oldest of them waits. A worker only writes its own column, except under the
lock when a server moves to another worker (`move`).

Taking a slot checks every limit and counts it in one step under a
process-shared lock, so `pool.size: 12` stays 12 across all workers. With
one worker there is no ledger at all: the daemon counts in its own memory.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pgmux.protocol import sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.base.log import get_logger

if TYPE_CHECKING:
    pass

log = get_logger("pgmux.ledger")

SLOTS = 16384  # rows (scopes); 8 * (1 + 3 * workers) bytes each
_EMPTY = 0
_LOCK_TIMEOUT = 2.0  # a worker that died holding the lock must not stop the others
NOT_WAITING = float("inf")
_NOBODY = -1  # in the holder cell: the lock is free
SUPERVISOR = -2  # the index of the process that forks the workers
_MANY = 1 << 62


def scope_key(*parts: str) -> int:
    """The 64-bit row key of a scope such as ("pool", "appdb", "app")."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class LedgerFull(ProtocolError):
    """More distinct pools, databases and users than rows: the login that
    needs a new one is refused (53300), the others carry on."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sqlstate.TOO_MANY_CONNECTIONS)


class Ledger:
    """Per-scope, per-worker counters in memory shared by all workers."""

    def __init__(self, workers: int, slots: int = SLOTS) -> None:
        self.workers = workers
        self.slots = slots
        self.index = 0  # this process's worker index, set after fork
        cells = slots * workers
        # MAP_SHARED | MAP_ANONYMOUS; the last cell names the worker holding the lock
        self._map = mmap.mmap(-1, 8 * (slots + 3 * cells + 1))
        view = memoryview(self._map)
        self._keys = view[: 8 * slots].cast("Q")
        start = 8 * slots
        self._counts = view[start : start + 8 * cells].cast("q")
        start += 8 * cells
        self._waiting = view[start : start + 8 * cells].cast("q")
        start += 8 * cells
        self._oldest = view[start : start + 8 * cells].cast("d")
        start += 8 * cells
        self._holder = view[start : start + 8].cast("q")
        self._holder[0] = _NOBODY
        self._lock = multiprocessing.get_context("fork").Lock()
        self._rows: dict[int, int] = {}  # key -> row, this process's cache

    # --- rows -------------------------------------------------------------

    def row(self, key: int) -> int:
        """The row of a scope key, claimed on first use (by any worker)."""
        row = self._rows.get(key)
        if row is None:
            row = self._find_or_claim(key)
            self._rows[key] = row
        return row

    def _find_or_claim(self, key: int) -> int:
        keys = self._keys
        with self._locked():
            start = key % self.slots
            for step in range(self.slots):
                row = (start + step) % self.slots
                if keys[row] == key:
                    return row
                if keys[row] == _EMPTY:
                    keys[row] = key
                    base = row * self.workers
                    for cell in range(base, base + self.workers):
                        self._counts[cell] = 0
                        self._waiting[cell] = 0
                        self._oldest[cell] = NOT_WAITING
                    return row
        log.error("ledger_full", rows=self.slots)
        raise LedgerFull(f"too many pools, databases and users for listen.workers ({self.slots})")

    # --- counting ---------------------------------------------------------

    def total(self, row: int) -> int:
        base = row * self.workers
        return sum(self._counts[base : base + self.workers])

    def count_of(self, row: int, worker: int) -> int:
        return self._counts[row * self.workers + worker]

    def take(self, limits: Sequence[tuple[int, int]]) -> int | None:
        """Count one more in every (row, limit) if none is at its limit.

        Returns None when counted, else the index in `limits` of the first
        limit reached (a limit of 0 means unlimited).
        """
        counts = self._counts
        own = self.index
        workers = self.workers
        with self._locked():
            for position, (row, limit) in enumerate(limits):
                if limit and self.total(row) >= limit:
                    return position
            for row, _limit in limits:
                counts[row * workers + own] += 1
        return None

    def adjust(self, row: int, delta: int) -> None:
        """Count in this worker's own cell only: no lock, nobody else writes it."""
        self._counts[row * self.workers + self.index] += delta

    def give(self, rows: Iterable[int]) -> None:
        self.give_back(rows, self.index)

    def move(self, rows: Iterable[int], worker: int) -> None:
        """One counted thing (a server) goes from this worker to WORKER."""
        with self._locked():
            for row in rows:
                self._uncount(row * self.workers + self.index)
                self._counts[row * self.workers + worker] += 1

    def give_back(self, rows: Iterable[int], worker: int) -> None:
        """WORKER no longer has one (this worker's own, or a move that did not arrive)."""
        with self._locked():
            for row in rows:
                self._uncount(row * self.workers + worker)

    def _uncount(self, cell: int) -> None:
        self._counts[cell] = max(self._counts[cell] - 1, 0)

    # --- waiting clients ---------------------------------------------------

    def set_waiting(self, row: int, count: int, oldest: float) -> None:
        """This worker's waiting clients in a pool: how many, since when the first."""
        cell = row * self.workers + self.index
        self._waiting[cell] = count
        self._oldest[cell] = oldest if count else NOT_WAITING

    def waiting_of(self, row: int, worker: int) -> int:
        return self._waiting[row * self.workers + worker]

    def waiting_elsewhere(self, row: int) -> bool:
        base = row * self.workers
        return sum(self._waiting[base : base + self.workers]) > self._waiting[base + self.index]

    def taker(self, row: int, own_count: int, own_oldest: float | None) -> int | None:
        """The worker that should get a server of this pool that just came free.

        OWN_COUNT is this worker's servers without that one, OWN_OLDEST since
        when its first client waits (None: nobody waits here, so any waiting
        worker gets it). The worker with fewer servers gets it, and between
        equals the one whose first client waits longest (FIFO across
        workers); None keeps it here. Counting servers first means a busy
        pool is shared out once and then stays put: servers only move while
        the workers' shares are uneven.
        """
        base = row * self.workers
        best = None
        best_rank = (own_count, own_oldest) if own_oldest is not None else (_MANY, NOT_WAITING)
        for worker in range(self.workers):
            cell = base + worker
            if worker == self.index or not self._waiting[cell]:
                continue
            rank = (self._counts[cell], self._oldest[cell])
            if rank < best_rank:
                best, best_rank = worker, rank
        return best

    # --- worker lifecycle ----------------------------------------------------

    def clear_worker(self, worker: int) -> None:
        """A worker died or starts afresh: what it counted is gone with it,
        and so is the lock if it died holding it (a SIGKILL at the wrong moment)."""
        if self._holder[0] == worker:
            self._holder[0] = _NOBODY
            self._lock.release()
        with self._locked():
            for row in range(self.slots):
                if self._keys[row] == _EMPTY:
                    continue
                cell = row * self.workers + worker
                self._counts[cell] = 0
                self._waiting[cell] = 0
                self._oldest[cell] = NOT_WAITING

    def _locked(self) -> _Held:
        return _Held(self)


class _Held:
    """The ledger lock as a context manager, with a timeout: a worker killed
    while holding it (microseconds) must not freeze the others forever."""

    __slots__ = ("_ledger", "_taken")

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._taken = False

    def __enter__(self) -> None:
        ledger = self._ledger
        self._taken = ledger._lock.acquire(timeout=_LOCK_TIMEOUT)
        if self._taken:
            ledger._holder[0] = ledger.index  # so the supervisor can free it if we die
        else:
            log.error("ledger_lock_timeout", timeout=_LOCK_TIMEOUT)

    def __exit__(self, *exc: object) -> None:
        if self._taken:
            ledger = self._ledger
            ledger._holder[0] = _NOBODY
            ledger._lock.release()

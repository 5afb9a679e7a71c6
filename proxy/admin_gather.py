"""The console across workers: SHOW merges every worker's rows, commands run
on every worker.

With `listen.workers > 1` a console connection lands on one worker, but the
pools, clients and servers are spread over all of them. The worker that runs
the console talks to the others over each one's internal `console.N` socket
(one pickled request, then the answer):

* SHOW: each worker's rows, merged view by view: lists of connections are
  concatenated, counters of the same pool / database / user are added up, the
  longest wait wins, and per-event averages are weighted by how many events
  each worker saw. Views of the configuration and of the process itself
  (CONFIG, MEM, STATE, VERSION, HELP) stay local.
* PAUSE, RESUME, SUSPEND, KILL, KILL_CLIENT, RECONNECT, DISABLE, ENABLE,
  WAIT_CLOSE, RELOAD and SET: the same command runs on every worker, and the
  console answers once all of them have (PAUSE: once every worker's servers
  are released).
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable, Sequence
from typing import Any

from .admin_show import SHOW, STATS_AVERAGES_COLUMNS, STATS_COLUMNS, Result
from .log import get_logger
from .tasks import spawn

log = get_logger("pgmux.admin")

_CONNECT_TIMEOUT = 5.0
_SHOW_TIMEOUT = 5.0  # a command may take longer: PAUSE waits for transactions to end
Rows = list[Sequence[Any]]
NO_ANSWER = object()  # the other worker did not answer


async def ask(path: str, request: tuple, timeout: float | None) -> Any:
    """Another worker's answer to REQUEST (NO_ANSWER when it gives none)."""
    try:
        connect = asyncio.open_unix_connection(path)
        reader, writer = await asyncio.wait_for(connect, _CONNECT_TIMEOUT)
        try:
            writer.write(pickle.dumps(request))
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
        return pickle.loads(data)
    except (OSError, TimeoutError, pickle.UnpicklingError, EOFError) as exc:
        log.warning(
            "worker_console_failed", request=request[0], error=str(exc) or type(exc).__name__
        )
        return NO_ANSWER


async def fetch_rows(path: str, view: str) -> Rows | None:
    rows = await ask(path, ("show", view), _SHOW_TIMEOUT)
    return None if rows is NO_ANSWER else rows


async def run_command(path: str, query: str) -> str | None:
    """Run a console command on another worker: None, or why it failed there."""
    answer = await ask(path, ("run", query), None)
    return "no answer" if answer is NO_ANSWER else answer


class PeerConsole(asyncio.Protocol):
    """The internal console.N socket: what another worker's console asks of this one."""

    def __init__(self, registry, clock: Callable[[], float]) -> None:  # registry: Registry
        self.registry = registry
        self.clock = clock
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
        if kind == "show":
            answer: Any = (
                SHOW[argument](self.registry, self.clock()).rows if argument in MERGED else []
            )
        else:
            from .admin import run_replayed  # admin imports this module

            answer = await run_replayed(self.registry, argument)
        if not self.transport.is_closing():
            self.transport.write(pickle.dumps(answer))
            self.transport.close()


# --- merging -----------------------------------------------------------------------


def _concat(parts: list[Rows]) -> Rows:
    return [row for rows in parts for row in rows]


def _keyed(key_columns: int, combine: Callable[[Sequence[Any], Sequence[Any]], Sequence[Any]]):
    """Rows with the same first KEY_COLUMNS values become one, by COMBINE."""

    def merge(parts: list[Rows]) -> Rows:
        merged: dict[tuple, Sequence[Any]] = {}
        for rows in parts:
            for row in rows:
                key = tuple(row[:key_columns])
                merged[key] = combine(merged[key], row) if key in merged else row
        return list(merged.values())

    return merge


def _add_columns(columns: Sequence[int]):
    def combine(a: Sequence[Any], b: Sequence[Any]) -> Sequence[Any]:
        out = list(a)
        for i in columns:
            out[i] = (a[i] or 0) + (b[i] or 0)
        return out

    return combine


def _pools(a: Sequence[Any], b: Sequence[Any]) -> Sequence[Any]:
    out = list(_add_columns(range(2, 13))(a, b))
    wait_a, wait_b = a[13] * 1_000_000 + a[14], b[13] * 1_000_000 + b[14]
    out[13], out[14] = divmod(max(wait_a, wait_b), 1_000_000)
    return out


def _lists(a: Sequence[Any], b: Sequence[Any]) -> Sequence[Any]:
    summed = {"pools", "used_clients", "login_clients", "used_servers"}
    return (a[0], a[1] + b[1] if a[0] in summed else max(a[1], b[1]))


def _stats_like(columns: Sequence[str]):
    """SHOW STATS-like rows: totals and rates add up; average times are
    weighted by the matching event rate of each worker."""
    index = {name: i for i, name in enumerate(columns)}
    weights = {
        "xact_time": "xact_count",
        "query_time": "query_count",
        "wait_time": "server_assignment_count",
    }
    prefix = "avg_" if "avg_xact_time" in index else ""  # SHOW STATS, or STATS_AVERAGES
    averaged = {
        index[prefix + time_name]: index[prefix + count_name]
        for time_name, count_name in weights.items()
    }

    def combine(a: Sequence[Any], b: Sequence[Any]) -> Sequence[Any]:
        out = list(a)
        for i in range(1, len(columns)):
            if i in averaged:
                w = averaged[i]
                total = (a[w] or 0) + (b[w] or 0)
                out[i] = (
                    ((a[i] or 0) * (a[w] or 0) + (b[i] or 0) * (b[w] or 0)) // total if total else 0
                )
            else:
                out[i] = (a[i] or 0) + (b[i] or 0)
        return out

    return combine


def _totals(a: Sequence[Any], b: Sequence[Any]) -> Sequence[Any]:
    # name/value rows; the avg_*_time ones cannot be weighted here, so the larger stands
    if str(a[0]).startswith("avg_") and str(a[0]).endswith("_time"):
        return (a[0], max(a[1], b[1]))
    return (a[0], a[1] + b[1])


MERGED: dict[str, Callable[[list[Rows]], Rows]] = {
    "clients": _concat,
    "servers": _concat,
    "pools": _keyed(2, _pools),
    "databases": _keyed(1, _add_columns((12, 14))),
    "users": _keyed(1, _add_columns((5, 7))),
    "lists": _keyed(1, _lists),
    "stats": _keyed(1, _stats_like(STATS_COLUMNS)),
    "stats_totals": _keyed(1, _add_columns(range(1, 12))),
    "stats_averages": _keyed(1, _stats_like(STATS_AVERAGES_COLUMNS)),
    "totals": _keyed(1, _totals),
}


def merge(view: str, local: Result, others: list[Rows]) -> Result:
    """LOCAL (this worker's answer) with the other workers' rows of VIEW."""
    merged = MERGED[view]([local.rows, *others])
    return Result(local.tag, local.columns, merged, local.notice, local.after)

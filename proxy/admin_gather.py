"""SHOW across workers: every worker's rows of a view, merged into one answer.

With `listen.workers > 1` a console connection lands on one worker, but the
pools, clients and servers are spread over all of them. The worker that runs
the SHOW asks the others for their rows over each one's internal `show.N`
socket and merges them view by view: lists of connections are concatenated,
counters of the same pool / database / user are added up, the longest wait
wins, and per-event averages are weighted by how many events each worker saw.
Views of the configuration and of the process itself (CONFIG, MEM, STATE,
VERSION, HELP) stay local.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable, Sequence
from typing import Any

from .admin_show import SHOW, STATS_AVERAGES_COLUMNS, STATS_COLUMNS, Result
from .log import get_logger

log = get_logger("pgmux.admin")

_TIMEOUT = 5.0
Rows = list[Sequence[Any]]


def local_rows(registry, view: str, now: float) -> Rows:  # registry: Registry
    return SHOW[view](registry, now).rows


async def fetch_rows(path: str, view: str) -> Rows | None:
    """Another worker's rows of VIEW (None when it does not answer)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), _TIMEOUT)
        try:
            writer.write(view.encode() + b"\n")
            data = await asyncio.wait_for(reader.read(), _TIMEOUT)
        finally:
            writer.close()
        return pickle.loads(data)
    except (OSError, TimeoutError, pickle.UnpicklingError, EOFError) as exc:
        log.warning("worker_show_failed", view=view, error=str(exc) or type(exc).__name__)
        return None


class ShowServer(asyncio.Protocol):
    """The internal show.N socket: one view name in, this worker's rows out."""

    def __init__(self, registry, clock: Callable[[], float]) -> None:  # registry: Registry
        self.registry = registry
        self.clock = clock
        self.buffer = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in self.buffer or self.transport is None:
            return
        view = self.buffer.split(b"\n", 1)[0].decode(errors="replace")
        rows = local_rows(self.registry, view, self.clock()) if view in MERGED else []
        self.transport.write(pickle.dumps(rows))
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

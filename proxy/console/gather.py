"""The console across workers: SHOW merges every worker's rows, commands run
on every worker.

With `listen.workers > 1` a console connection lands on one worker, but the
pools, clients and servers are spread over all of them. The worker that runs
the console asks the others over each one's internal peer socket
(proxy/daemon/peers.py):

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

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pgmux.proxy.console.show import SHOW, STATS_AVERAGES_COLUMNS, STATS_COLUMNS, Result
from pgmux.proxy.console.show_listeners import show_listeners

if TYPE_CHECKING:
    from pgmux.proxy.registry import Registry

Rows = list[Sequence[Any]]
Merge = Callable[[list[Rows]], Rows]
Combine = Callable[[Sequence[Any], Sequence[Any]], Sequence[Any]]


def local_rows(registry: Registry, view: str, now: float) -> Rows:
    """This worker's rows of VIEW, for the worker that runs the SHOW."""
    show = _VIEWS.get(view)
    return show(registry, now).rows if show is not None and view in MERGED else []


# --- merging -----------------------------------------------------------------------


def _concat(parts: list[Rows]) -> Rows:
    return [row for rows in parts for row in rows]


def _keyed(key_columns: int, combine: Combine) -> Merge:
    """Rows with the same first KEY_COLUMNS values become one, by COMBINE."""

    def merge(parts: list[Rows]) -> Rows:
        merged: dict[tuple, Sequence[Any]] = {}
        for rows in parts:
            for row in rows:
                key = tuple(row[:key_columns])
                merged[key] = combine(merged[key], row) if key in merged else row
        return list(merged.values())

    return merge


def _add_columns(columns: Sequence[int]) -> Combine:
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


def _stats_like(columns: Sequence[str]) -> Combine:
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


MERGED: dict[str, Merge] = {
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
    "listeners": _concat,  # a row per worker's relay of each pool
}
_VIEWS = {**SHOW, "listeners": show_listeners}


def merge(view: str, local: Result, others: list[Rows]) -> Result:
    """LOCAL (this worker's answer) with the other workers' rows of VIEW."""
    merged = MERGED[view]([local.rows, *others])
    return Result(local.tag, local.columns, merged, local.notice, local.after)

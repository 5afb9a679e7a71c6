"""Observability beside the data path: the stats period, /metrics, /health, /ready.

* Every `admin.stats_period` the pools' counters are snapshotted, so SHOW
  STATS averages cover the last full period (as PgBouncer's stats.c).
* An HTTP endpoint on `admin.http` (off unless a port is set), served by the
  daemon's own event loop with asyncio.start_server and a small request
  parser: GET /metrics (Prometheus text format from prometheus_client),
  /health (the process answers) and /ready (listening, not paused or shutting
  down, every configured database's server reachable) with JSON bodies. It
  keeps answering while a shutdown drains clients, and closes last.

The collector reads the same live objects as the console when scraped;
nothing on the data path touches prometheus_client. Under listen.workers the
first worker serves HTTP, and its /metrics merges every worker's text, each
sample labelled worker="N".
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pgmux import __version__
from pgmux.protocol import messages
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.stats import GLOBAL, LATENCY_BUCKETS
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import FALLBACK_DATABASE
from pgmux.proxy.console.hosts import HOSTS_COLUMNS, host_rows
from pgmux.proxy.console.show import consoles, pool_counts

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.metrics")

MAX_REQUEST = 8192  # bytes of request line and headers we read
REQUEST_TIMEOUT = 5.0
PROBE_TIMEOUT = 2.0


# --- stats period ------------------------------------------------------------------


class StatsPeriod:
    """Snapshots every pool's counters each stats_period (averages, stats log)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._task: asyncio.Task[None] | None = None
        self._logins = (time.monotonic(), GLOBAL.logins)  # for "client logins/s"

    def start(self) -> None:
        self._task = spawn(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.registry.config.admin.stats_period)
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        pools = list(self.registry.pools.values())
        for pool in pools:
            pool.stats.tick(now)
        self.registry.console_stats.tick(now)
        self._log(pools, now)

    def _log(self, pools: list[Pool], now: float) -> None:
        """PgBouncer's stats line (stats.c): totals per second over the period,
        average transaction, query and wait times in microseconds."""
        then, logins = self._logins
        self._logins = (now, GLOBAL.logins)
        rates = dict.fromkeys(("xacts", "queries", "client_parses", "server_parses"), 0.0)
        rates.update(binds=0.0, received=0.0, sent=0.0, assignments=0.0)
        times = {"xact_us": 0.0, "query_us": 0.0, "wait_us": 0.0}
        for pool in pools:
            avg = pool.stats.averages()
            for key, name in _STATS_RATES:
                rates[key] += avg[name]
            # weighted by each pool's count, so the mean is over all transactions
            times["xact_us"] += avg["total_xact_time"] * avg["total_xact_count"]
            times["query_us"] += avg["total_query_time"] * avg["total_query_count"]
            times["wait_us"] += avg["total_wait_time"] * avg["server_assignments"]
        for key, count in (
            ("xact_us", "xacts"),
            ("query_us", "queries"),
            ("wait_us", "assignments"),
        ):
            times[key] = times[key] / rates[count] * 1e6 if rates[count] else 0.0  # s -> us
        rates.pop("assignments")
        login_rate = (GLOBAL.logins - logins) / (now - then) if now > then else 0.0
        log.info(
            "stats",
            **{key: round(value) for key, value in rates.items()},
            logins=round(login_rate),
            **{key: round(value) for key, value in times.items()},
        )


_STATS_RATES = (
    ("xacts", "total_xact_count"),
    ("queries", "total_query_count"),
    ("client_parses", "total_client_parse_count"),
    ("server_parses", "total_server_parse_count"),
    ("binds", "total_bind_count"),
    ("received", "total_received"),
    ("sent", "total_sent"),
    ("assignments", "server_assignments"),
)


# --- the Prometheus collector ------------------------------------------------------

_POOL_GAUGES = (
    ("pgmux_pool_client_active", "cl_active", "Clients linked to a server or idle (cl_active)."),
    ("pgmux_pool_client_waiting", "cl_waiting", "Clients queued for a server (cl_waiting)."),
    ("pgmux_pool_server_active", "sv_active", "Servers linked to a client (sv_active)."),
    ("pgmux_pool_server_idle", "sv_idle", "Servers idle and ready for a client (sv_idle)."),
    ("pgmux_pool_server_used", "sv_used", "Servers waiting for a check (sv_used)."),
    ("pgmux_pool_server_tested", "sv_tested", "Servers being cleaned up (sv_tested)."),
    ("pgmux_pool_server_login", "sv_login", "Servers logging in to PostgreSQL (sv_login)."),
)
_POOL_COUNTERS = (
    ("pgmux_transactions", "total_xact_count", 1, "Transactions pooled."),
    ("pgmux_queries", "total_query_count", 1, "Queries (requests up to ReadyForQuery)."),
    ("pgmux_received_bytes", "total_received", 1, "Bytes received from clients."),
    ("pgmux_sent_bytes", "total_sent", 1, "Bytes sent to clients."),
    ("pgmux_server_assignments", "server_assignments", 1, "Times a server was linked."),
    ("pgmux_servers_opened", "servers_opened", 1, "Server connections opened."),
    ("pgmux_session_resets", "session_resets", 1, "Servers cleaned of session state."),
    ("pgmux_client_wait_seconds", "total_wait_time", 1, "Time clients waited for a server."),
    ("pgmux_transaction_seconds", "total_xact_time", 1, "Time spent in transactions."),
    ("pgmux_query_seconds", "total_query_time", 1, "Time spent in queries."),
)
_HISTOGRAMS = (
    ("pgmux_client_wait_duration_seconds", "wait_hist", "How long a client waited for a server."),
    ("pgmux_transaction_duration_seconds", "xact_hist", "Transaction duration."),
    ("pgmux_query_duration_seconds", "query_hist", "Query duration (request to ReadyForQuery)."),
)
_BOUNDS = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
LABELS = ["database", "user"]


class PgmuxCollector:
    """Reads the registry at scrape time; labels are database and user names only."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        registry = self.registry
        pools = list(registry.pools.values())
        now = time.monotonic()
        yield from self._gauges(pools, now)
        yield from self._counters(pools)
        yield from self._histograms(pools)
        yield from self._process(registry)
        yield from _hosts(registry)
        yield from _listeners(registry)

    def _gauges(self, pools: list[Pool], now: float) -> Iterator[Metric]:
        counts = [(pool, pool_counts(pool, now)) for pool in pools]
        for name, key, help_text in _POOL_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=LABELS)
            for pool, c in counts:
                family.add_metric([pool.dbname, pool.user], c[key])
            yield family
        size = GaugeMetricFamily("pgmux_pool_size", "The pool's server limit.", labels=LABELS)
        maxwait = GaugeMetricFamily(
            "pgmux_pool_max_wait_seconds",
            "How long the oldest waiting client has waited (maxwait).",
            labels=LABELS,
        )
        for pool, c in counts:
            size.add_metric([pool.dbname, pool.user], pool.settings.size)
            maxwait.add_metric([pool.dbname, pool.user], c["maxwait_us_total"] / 1_000_000)
        yield size
        yield maxwait
        pinned = GaugeMetricFamily(
            "pgmux_pool_client_pinned",
            "Clients kept on their server by session state (pool.session_state: pin).",
            labels=LABELS,
        )
        for pool in pools:
            pinned.add_metric([pool.dbname, pool.user], sum(1 for c in pool.clients if c.pinned))
        yield pinned

    def _counters(self, pools: list[Pool]) -> Iterator[Metric]:
        for name, attr, _scale, help_text in _POOL_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=LABELS)
            for pool in pools:
                family.add_metric([pool.dbname, pool.user], getattr(pool.stats, attr))
            yield family
        errors = CounterMetricFamily("pgmux_errors", "Errors by kind.", labels=[*LABELS, "kind"])
        timeouts = CounterMetricFamily(
            "pgmux_timeouts", "Timeouts that fired, by kind.", labels=[*LABELS, "kind"]
        )
        for pool in pools:
            for kind, count in sorted(pool.stats.errors.items()):
                errors.add_metric([pool.dbname, pool.user, kind], count)
            fired = dict(pool.stats.timeouts)
            fired["query_wait"] = fired.get("query_wait", 0) + pool.stats.wait_timeouts
            for kind, count in sorted(fired.items()):
                timeouts.add_metric([pool.dbname, pool.user, kind], count)
        yield errors
        yield timeouts
        failures = CounterMetricFamily(
            "pgmux_client_login_failures",
            "Client logins refused, by SQLSTATE.",
            labels=["sqlstate"],
        )
        for code, count in sorted(GLOBAL.login_failures.items()):
            failures.add_metric([code], count)
        yield failures

    def _histograms(self, pools: list[Pool]) -> Iterator[Metric]:
        for name, attr, help_text in _HISTOGRAMS:
            family = HistogramMetricFamily(name, help_text, labels=LABELS)
            for pool in pools:
                hist = getattr(pool.stats, attr)
                buckets = list(zip(_BOUNDS, hist.cumulative(), strict=True))
                family.add_metric([pool.dbname, pool.user], buckets, hist.sum)
            yield family

    def _process(self, registry: Registry) -> Iterator[Metric]:
        clients = GaugeMetricFamily(
            "pgmux_clients", "Client connections, by state.", labels=["state"]
        )
        console = len(consoles(registry))
        logging_in = len(registry.logging_in)
        clients.add_metric(["login"], logging_in)
        clients.add_metric(["console"], console)
        clients.add_metric(["pooled"], len(registry.clients) - logging_in - console)
        yield clients
        yield GaugeMetricFamily("pgmux_servers", "Server connections.", value=registry.server_count)
        paused = GaugeMetricFamily(
            "pgmux_database_paused",
            "1 while PAUSE (or SUSPEND) holds the database.",
            labels=["database"],
        )
        disabled = GaugeMetricFamily(
            "pgmux_database_disabled", "1 while DISABLE refuses logins.", labels=["database"]
        )
        for name in _database_names(registry):
            paused.add_metric([name], int(registry.is_paused(name)))
            disabled.add_metric([name], int(registry.is_disabled(name)))
        yield paused
        yield disabled
        info = GaugeMetricFamily("pgmux_info", "pgmux version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


_HOST_LABELS = ["database", "host", "port"]
_HOST_GAUGES = (  # (name, help, value from a SHOW HOSTS row as a dict)
    ("pgmux_host_up", "1 if the host answered its last login or probe, 0 if marked down.",
     lambda row: {"up": 1, "down": 0}.get(row["state"])),
    ("pgmux_host_primary", "1 if the host was a primary at its last check, 0 a standby.",
     lambda row: {"primary": 1, "standby": 0}.get(row["role"])),
    ("pgmux_host_replica_lag_bytes", "WAL bytes a standby's replay is behind its primary.",
     lambda row: row["replica_lag_bytes"]),
    ("pgmux_host_replica_lag_seconds", "Seconds a standby's replay is behind (0: caught up).",
     lambda row: None if row["replica_lag_seconds"] is None else float(row["replica_lag_seconds"])),
    ("pgmux_host_in_rotation", "0 while max_replica_lag keeps the standby out of new logins.",
     lambda row: row["in_rotation"]),
)  # fmt: skip


def _hosts(registry: Registry) -> Iterator[Metric]:
    """Each host of the multi-host databases, as SHOW HOSTS lists them (this worker's view)."""
    rows = [dict(zip(HOSTS_COLUMNS, row, strict=True)) for row in host_rows(registry)]
    for name, help_text, value in _HOST_GAUGES:
        family = GaugeMetricFamily(name, help_text, labels=_HOST_LABELS)
        for row in rows:
            number = value(row)
            if number is not None:
                family.add_metric([row["database"], row["host"], str(row["port"])], number)
        yield family


def _listeners(registry: Registry) -> Iterator[Metric]:
    """LISTEN/NOTIFY through each pool's relay (SHOW LISTENERS)."""
    clients = GaugeMetricFamily(
        "pgmux_listen_clients", "Clients listening through the relay.", labels=LABELS
    )
    channels = GaugeMetricFamily(
        "pgmux_listen_channels", "Channels the relay listens on.", labels=LABELS
    )
    relayed = CounterMetricFamily(
        "pgmux_notifications_relayed", "Notifications handed to clients.", labels=LABELS
    )
    dropped = CounterMetricFamily(
        "pgmux_notifications_dropped",
        "Notifications lost with clients disconnected for a full queue (pool.notify_queue).",
        labels=LABELS,
    )
    high_water = GaugeMetricFamily(
        "pgmux_notify_queue_high_water",
        "The longest per-client notification queue seen.",
        labels=LABELS,
    )
    for pool, relay in registry.relays.items():
        labels = [pool.dbname, pool.user]
        clients.add_metric(labels, relay.clients)
        channels.add_metric(labels, len(relay.listeners))
        relayed.add_metric(labels, relay.relayed)
        dropped.add_metric(labels, relay.dropped)
        high_water.add_metric(labels, relay.queue_high_water)
    yield from (clients, channels, relayed, dropped, high_water)


def _database_names(registry: Registry) -> list[str]:
    names = [n for n in registry.config.databases if n != FALLBACK_DATABASE]
    return names + sorted({p.dbname for p in registry.pools.values()} - set(names))


def build_registry(registry: Registry) -> CollectorRegistry:
    """The prometheus_client registry /metrics exposes: pgmux's collector and the process's."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(PgmuxCollector(registry))
    ProcessCollector(registry=collectors)
    PlatformCollector(registry=collectors)
    return collectors


# --- several workers: one exposition -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workers:
    """This process as one of listen.workers, as /metrics sees it (daemon/peers.py)."""

    index: int  # only worker 0 serves HTTP
    others: Callable[[], Awaitable[dict[int, bytes]]]  # the other workers' texts, by index


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


# --- readiness ---------------------------------------------------------------------


async def probe_server(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if a PostgreSQL answers at host:port (an SSLRequest gets S or N), else why not."""
    try:
        if host.startswith("/"):
            connect = asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            connect = asyncio.open_connection(host, port)
        reader, writer = await asyncio.wait_for(connect, timeout)
    except (OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    try:
        writer.write(messages.ssl_request())
        answer = await asyncio.wait_for(reader.read(1), timeout)
    except (OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        writer.close()
    return None if answer in (b"S", b"N") else "not a PostgreSQL server"


async def readiness(registry: Registry, listening: bool) -> tuple[bool, dict[str, Any]]:
    """/ready: listening, not paused or shutting down, every database's server answers."""
    targets: dict[str, tuple[str, int]] = {}
    for name, db in registry.config.databases.items():
        targets[name] = (db.host, db.port)
    distinct = sorted(set(targets.values()))
    results = await asyncio.gather(*(probe_server(h, p) for h, p in distinct))
    by_target = dict(zip(distinct, results, strict=True))
    databases = {
        name: {"reachable": by_target[target] is None, "error": by_target[target]}
        for name, target in targets.items()
    }
    listening = listening and not registry.shutting_down
    paused = registry.paused or registry.suspended
    ready = listening and not paused and all(d["reachable"] for d in databases.values())
    body = {
        "ready": ready,
        "listening": listening,
        "paused": paused,
        "shutting_down": registry.shutting_down,
        "databases": databases,
    }
    return ready, body


# --- the HTTP endpoint -------------------------------------------------------------


class MetricsServer:
    """GET /metrics, /health and /ready on admin.http.

    LISTENING says whether the daemon accepts clients (for /ready); WORKERS is
    set under listen.workers, where worker 0's /metrics gathers every worker's.
    """

    def __init__(
        self, registry: Registry, listening: Callable[[], bool], workers: Workers | None
    ) -> None:
        self.registry = registry
        self.listening = listening
        self.workers = workers
        self.collectors = build_registry(registry)
        self.started = time.monotonic()
        self._server: asyncio.Server | None = None

    def exposition(self) -> bytes:
        """This process's Prometheus text."""
        return generate_latest(self.collectors)

    async def start(self) -> None:
        http = self.registry.config.admin.http
        workers = self.workers
        if http.port is None or (workers is not None and workers.index != 0):
            return  # under listen.workers, the first worker serves HTTP
        self._server = await asyncio.start_server(
            self._handle, http.address, http.port, reuse_address=True
        )
        log.info("http_listening", address=http.address, port=http.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"  # for the answer to a request that could not be read
        try:
            method, path = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
            status, content_type, body = await self.route(method, path)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, content_type, body = 400, "application/json", _json({"error": "bad request"})
        except ConnectionError:
            writer.close()
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass  # the checker (a balancer's health check) hung up before the answer
        finally:
            writer.close()

    async def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "application/json", _json({"error": "method not allowed"})
        path = path.split("?", 1)[0]
        if path == "/metrics":
            body = self.exposition()
            if self.workers is not None:
                others = await self.workers.others()
                body = merge_metrics({self.workers.index: body, **others})
            return 200, CONTENT_TYPE_LATEST, body
        if path == "/health":
            registry = self.registry
            return 200, "application/json", _json({
                "status": "ok",
                "pid": os.getpid(),
                "version": __version__,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "shutting_down": registry.shutting_down,
                "clients": len(registry.clients),
                "servers": registry.server_count,
            })  # fmt: skip
        if path == "/ready":
            ready, report = await readiness(self.registry, self.listening())
            return (200 if ready else 503), "application/json", _json(report)
        return 404, "application/json", _json({"error": "not found", "path": path})


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


def _json(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True) + "\n").encode()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and path of an HTTP/1.x request; headers are read and ignored."""
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_REQUEST:
        raise ValueError("request too large")
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("bad request line")
    return parts[0].upper(), parts[1]


# --- what the daemon starts and stops ---------------------------------------------


class Observer:
    """The stats period and the HTTP endpoint, started and stopped by Daemon.run."""

    def __init__(
        self, registry: Registry, listening: Callable[[], bool], workers: Workers | None = None
    ) -> None:
        self.stats = StatsPeriod(registry)
        self.http = MetricsServer(registry, listening, workers)

    async def start(self) -> None:
        self.stats.start()
        await self.http.start()

    async def stop(self) -> None:
        self.stats.stop()
        await self.http.stop()

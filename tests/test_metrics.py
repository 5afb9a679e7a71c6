"""Acceptance: /metrics, /health, /ready and the structured log.

/metrics must parse with prometheus_client's own parser and carry the
families operators alert on; /ready must follow the backend PostgreSQL (a
cluster of this test's own is stopped and started again); the endpoint must
keep answering while a shutdown drains; a wrong password must be logged as an
event and never as a password, in the log or in /metrics.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from typing import Any

import asyncpg
import pytest
from helpers import PgmuxFactory, close_quietly, connect_asyncpg, connect_psycopg, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_admin_console import console_config

from pgmux.proxy.metrics import merge_metrics
from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

FAMILIES = {
    # per database/user gauges
    "pgmux_pool_client_active": "gauge",
    "pgmux_pool_client_waiting": "gauge",
    "pgmux_pool_server_active": "gauge",
    "pgmux_pool_server_idle": "gauge",
    "pgmux_pool_server_used": "gauge",
    "pgmux_pool_server_login": "gauge",
    "pgmux_pool_size": "gauge",
    "pgmux_pool_max_wait_seconds": "gauge",
    # counters
    "pgmux_transactions": "counter",
    "pgmux_queries": "counter",
    "pgmux_received_bytes": "counter",
    "pgmux_sent_bytes": "counter",
    "pgmux_errors": "counter",
    "pgmux_timeouts": "counter",
    "pgmux_client_login_failures": "counter",
    # histograms
    "pgmux_client_wait_duration_seconds": "histogram",
    "pgmux_transaction_duration_seconds": "histogram",
    "pgmux_query_duration_seconds": "histogram",
    # the process
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
}


def http_get(mux: Any, path: str) -> tuple[int, str]:
    port = mux.config["admin"]["http"]["port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(mux: Any, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, mux, path)


async def test_metrics_parse_and_have_the_families(pgmux: PgmuxFactory) -> None:
    mux = pgmux({**console_config(), "pool": {"size": 1}, "timeouts": {"query_wait": "1s"}})
    holder = await connect_asyncpg(mux)
    waiter = await connect_psycopg(mux)
    try:
        for _ in range(3):
            await holder.execute("SELECT 1")
        tx = holder.transaction()
        await tx.start()
        with pytest.raises(Exception, match="query_wait_timeout"):
            await waiter.execute("SELECT 1")  # a timeout, by kind
        await tx.commit()
        status, text = await get(mux, "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name, kind in FAMILIES.items():
            assert name in families, f"{name} missing from /metrics"
            assert families[name].type == kind, name
        app = {"database": "appdb", "user": "app"}
        timeouts = {
            s.labels["kind"]: s.value for s in families["pgmux_timeouts"].samples
            if s.labels["database"] == "appdb"
        }  # fmt: skip
        assert timeouts["query_wait"] == 1
        size = [s for s in families["pgmux_pool_size"].samples if s.labels == app]
        assert size[0].value == 1
        buckets = [
            s for s in families["pgmux_transaction_duration_seconds"].samples
            if s.name.endswith("_count") and s.labels == app
        ]  # fmt: skip
        assert buckets[0].value == 4  # three autocommit SELECTs and one transaction
        status, body = await get(mux, "/nowhere")
        assert status == 404 and json.loads(body)["error"] == "not found"
    finally:
        await close_quietly(holder, waiter)


def test_merged_metrics_label_every_sample_with_its_worker() -> None:
    worker = (
        "# HELP pgmux_servers Server connections.\n"
        "# TYPE pgmux_servers gauge\n"
        "pgmux_servers {servers}\n"
        "# HELP pgmux_errors_total Errors by kind.\n"
        "# TYPE pgmux_errors_total counter\n"
        'pgmux_errors_total{{database="appdb",kind="io"}} {errors}\n'
    )
    text = merge_metrics({
        1: worker.format(servers=3, errors=1).encode(),
        0: worker.format(servers=2, errors=0).encode(),
    }).decode()  # fmt: skip
    assert text.splitlines() == [
        "# HELP pgmux_servers Server connections.",
        "# TYPE pgmux_servers gauge",
        'pgmux_servers{worker="0"} 2',
        'pgmux_servers{worker="1"} 3',
        "# HELP pgmux_errors_total Errors by kind.",
        "# TYPE pgmux_errors_total counter",
        'pgmux_errors_total{worker="0",database="appdb",kind="io"} 0',
        'pgmux_errors_total{worker="1",database="appdb",kind="io"} 1',
    ]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["worker"] for s in families["pgmux_servers"].samples} == {"0", "1"}


async def test_health_and_ready_follow_the_backend(pgmux: PgmuxFactory) -> None:
    with TempPostgres(max_connections=20) as own:
        own.create_role("app", "app-secret")
        own.create_database("appdb", owner="app")
        config = console_config()
        config["databases"] = {"*": {"host": own.host, "port": own.port}}
        mux = pgmux(config)
        status, body = await get(mux, "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = await get(mux, "/ready")
        assert status == 200 and json.loads(body)["ready"] is True, body

        own.stop()
        status, body = await get(mux, "/ready")
        ready = json.loads(body)
        assert status == 503 and ready["ready"] is False
        assert ready["databases"]["*"]["reachable"] is False
        assert (await get(mux, "/health"))[0] == 200  # alive, just not ready

        own.start()
        await wait_until(
            lambda: get(mux, "/ready"), lambda r: r[0] == 200, timeout=20, what="/ready again"
        )
        conn = await connect_asyncpg(mux)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()


async def test_paused_pooler_is_not_ready(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    console = await connect_asyncpg(mux, dbname="pgmux", user="admin", password="admin-secret")
    try:
        await console.execute("PAUSE")
        status, body = await get(mux, "/ready")
        assert status == 503 and json.loads(body)["paused"] is True
        await console.execute("RESUME")
        assert (await get(mux, "/ready"))[0] == 200
    finally:
        await close_quietly(console)


async def test_http_keeps_answering_during_shutdown(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    conn = await connect_asyncpg(mux)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1")
        mux.signal(signal.SIGTERM)  # drains: the open transaction may finish
        body = await wait_until(
            lambda: get(mux, "/health"),
            lambda r: r[0] == 200 and json.loads(r[1])["shutting_down"],
            timeout=10,
            what="/health during the drain",
        )
        assert json.loads(body[1])["status"] == "ok"
        status, ready = await get(mux, "/ready")
        assert status == 503 and json.loads(ready)["shutting_down"] is True
        assert (await get(mux, "/metrics"))[0] == 200
        await conn.execute("SELECT 2")
        await tx.commit()
        assert await asyncio.to_thread(mux.wait, 20) == 0
    finally:
        await close_quietly(conn)


async def test_wrong_password_is_logged_without_the_password(pgmux: PgmuxFactory) -> None:
    wrong = "Wr0ng-Pa55w0rd-q7Zx"
    mux = pgmux({**console_config(), "logging": {"format": "json", "level": "info"}})
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect_asyncpg(mux, password=wrong)
    events = await wait_until(
        lambda: asyncio.sleep(0, _events(mux)),
        lambda evs: any(e.get("event") == "login_failed" for e in evs),
        timeout=10,
        what="a login_failed event",
    )
    failed = next(e for e in events if e.get("event") == "login_failed")
    assert failed["user"] == "app" and failed["db"] == "appdb" and failed["sqlstate"] == "28P01"
    assert failed["client"].startswith("127.0.0.1:")
    _status, metrics = await get(mux, "/metrics")
    assert 'pgmux_client_login_failures_total{sqlstate="28P01"} 1.0' in metrics
    for secret in (wrong, "app-secret", "admin-secret"):
        assert secret not in mux.logs()
        assert secret not in metrics


def _events(mux: Any) -> list[dict[str, Any]]:
    events = []
    for line in mux.logs().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


async def test_logs_login_logout_waits_and_pool_changes(pgmux: PgmuxFactory) -> None:
    config = {
        **console_config(),
        "pool": {"size": 1},
        "logging": {"format": "json", "level": "info", "wait_threshold": "200ms"},
    }
    mux = pgmux(config)
    holder = await connect_asyncpg(mux, server_settings={"application_name": "holder"})
    waiter = await connect_asyncpg(mux, server_settings={"application_name": "waiter"})
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT 1")
    query = asyncio.create_task(waiter.fetchval("SELECT 7"))
    await asyncio.sleep(0.5)
    await tx.commit()
    assert await asyncio.wait_for(query, 10) == 7
    await close_quietly(holder, waiter)
    events = await wait_until(
        lambda: asyncio.sleep(0, _events(mux)),
        lambda evs: sum(e.get("event") == "logout" for e in evs) >= 2,
        timeout=10,
        what="two logout events",
    )
    names = [e["event"] for e in events]
    assert "login" in names and "pool_grow" in names
    waited = next(e for e in events if e["event"] == "wait_exceeded")
    assert waited["application_name"] == "waiter" and waited["waited"] >= 0.2
    logout = next(e for e in events if e["event"] == "logout")
    assert logout["duration"] > 0 and logout["reason"]

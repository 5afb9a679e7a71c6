"""Acceptance: LISTEN/NOTIFY under transaction pooling (pool.listen_mode: relay).

A client's LISTEN runs on its pooled server, which goes back to the pool; the
pool's relay connection listens for it and delivers every notification of its
channels. Checked with psycopg 3 and asyncpg: delivery in full under load with
pool size 2 (no server pinned, never more than size + the relay), the
transactional semantics (rolled back, rolled back to a savepoint, UNLISTEN),
200 clients on 50 channels, listen_mode pin and error, and a client that stops
reading (disconnected with 53200, the others unaffected, RSS bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psycopg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    direct,
    error_fields,
)
from prometheus_client.parser import text_string_to_metric_families
from test_admin_console import console_config
from test_metrics import get

pytestmark = pytest.mark.timeout(120)

ADMIN = ("admin", "admin-secret")
COUNT = 1000
# what PostgreSQL sees of pgmux: its backends for the pool's database and user
BACKENDS = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND usename = $2"


def config(**pool: Any) -> dict[str, Any]:
    return {
        "pool": {"mode": "transaction", "size": 2, **pool},
        **console_config(),  # admin users, and /metrics on a free port
        "timeouts": {"query_wait": "30s"},
    }


async def until(predicate: Any, timeout: float, what: str = "condition") -> None:
    """Poll a plain condition every 10 ms, at most TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.01)


async def show(mux: Any, what: str) -> list[dict[str, Any]]:
    conn = await connect_psycopg(mux, dbname="pgmux", user=ADMIN[0], password=ADMIN[1])
    try:
        cur = await conn.execute(f"SHOW {what}")
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
    finally:
        await conn.close()


async def notify(pg: Any, channel: str, payloads: list[str]) -> None:
    """Another process's NOTIFYs, straight to PostgreSQL, one transaction each."""
    conn = await direct(pg, APP_DB)
    try:
        for payload in payloads:
            await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
    finally:
        await conn.close()


async def drain_psycopg(conn: psycopg.AsyncConnection[Any], want: int, timeout: float) -> list[str]:
    got: list[str] = []

    async def read() -> None:
        async for note in conn.notifies():
            got.append(note.payload)
            if len(got) >= want:
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), timeout)
    return got


async def transactions(mux: Any, stop: asyncio.Event, done: list[int]) -> None:
    conn = await connect_asyncpg(mux)
    try:
        for _ in range(100_000):
            if stop.is_set():
                return
            async with conn.transaction():
                await conn.fetchval("SELECT 1")
                await conn.fetchval("SELECT pg_backend_pid()")
            done[0] += 1
    finally:
        await conn.close()


async def test_drivers_get_every_notification_under_load(pg: Any, pgmux: Any) -> None:
    mux = pgmux(config())
    ps = await connect_psycopg(mux)
    ap = await connect_asyncpg(mux)
    got_asyncpg: list[str] = []
    await ps.execute("LISTEN relay_psycopg")
    await ap.add_listener("relay_asyncpg", lambda *args: got_asyncpg.append(args[3]))
    stop = asyncio.Event()
    done = [0]
    load = [asyncio.create_task(transactions(mux, stop, done)) for _ in range(50)]
    peak = 0
    try:
        await until(lambda: done[0] > 50, 30, "load running")
        payloads = [str(i) for i in range(COUNT)]
        sending = asyncio.gather(
            notify(pg, "relay_psycopg", payloads), notify(pg, "relay_asyncpg", payloads)
        )
        reading = asyncio.create_task(drain_psycopg(ps, COUNT, 40))
        watcher = await direct(pg, APP_DB)
        while not sending.done():
            servers = await show(mux, "SERVERS")
            pinned = [s for s in servers if s["session_state"] not in ("", "relay")]
            assert not pinned, pinned
            assert sum(s["session_state"] == "relay" for s in servers) == 1
            backends = await watcher.fetchval(BACKENDS, APP_DB, APP_USER)
            peak = max(peak, len(servers), backends)
            await asyncio.sleep(0.05)
        await watcher.close()
        await sending
        got_psycopg = await reading
        await until(lambda: len(got_asyncpg) >= COUNT, 20, "asyncpg's notifications")
    finally:
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)
    assert got_psycopg == payloads
    assert got_asyncpg == payloads
    assert peak <= 2 + 1
    assert done[0] > 100
    listeners = await show(mux, "LISTENERS")
    assert listeners[0]["clients"] == 2 and listeners[0]["channels"] == 2
    assert listeners[0]["notifications_relayed"] == 2 * COUNT
    status, text = await get(mux, "/metrics")
    assert status == 200
    samples = {
        (sample.name, sample.labels.get("database")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("pgmux_notifications_relayed_total", APP_DB)] == 2 * COUNT
    assert samples[("pgmux_listen_clients", APP_DB)] == 2
    assert samples[("pgmux_listen_channels", APP_DB)] == 2
    assert samples[("pgmux_notifications_dropped_total", APP_DB)] == 0
    await close_quietly(ps, ap)


async def next_payloads(conn: psycopg.AsyncConnection[Any], count: int) -> list[str]:
    got = await drain_psycopg(conn, count, 10)
    assert len(got) == count, f"{len(got)} of {count} notifications: {got}"
    return got


async def test_transactional_semantics(pg: Any, pgmux: Any) -> None:
    """What a rolled-back LISTEN, a rolled-back savepoint and UNLISTEN leave:
    checked by a marker notification sent after the one that must not arrive
    (PostgreSQL delivers in commit order, the relay in the order it reads)."""
    mux = pgmux(config())
    conn = await connect_psycopg(mux)
    await conn.execute("LISTEN marker")
    async with conn.transaction():
        await conn.execute("LISTEN rolled_back")
        raise psycopg.Rollback()
    await conn.execute("BEGIN")
    await conn.execute("SAVEPOINT s")
    await conn.execute("LISTEN to_savepoint")
    await conn.execute("ROLLBACK TO SAVEPOINT s")
    await conn.execute('LISTEN "Kept"', prepare=True)  # the extended protocol
    await conn.execute("COMMIT")
    await notify(pg, "rolled_back", ["no"])
    await notify(pg, "to_savepoint", ["no"])
    await notify(pg, "Kept", ["kept"])
    await notify(pg, "marker", ["1"])
    assert await next_payloads(conn, 2) == ["kept", "1"]
    # pg_listening_channels() runs on a pooled server: the relay's LISTENs are not there
    cur = await conn.execute("SELECT count(*) FROM pg_listening_channels()")
    assert (await cur.fetchone()) == (0,)
    await conn.execute('UNLISTEN "Kept"')
    await notify(pg, "Kept", ["gone"])
    await notify(pg, "marker", ["2"])
    assert await next_payloads(conn, 1) == ["2"]
    # queued while the client is inside a transaction block, then UNLISTENed in it
    await conn.execute("LISTEN queued")
    await conn.execute("BEGIN")
    await notify(pg, "queued", ["held back"])
    deadline = time.monotonic() + 10
    while (await show(mux, "LISTENERS"))[0]["queue_high_water"] < 1:
        assert time.monotonic() < deadline, "the notification was never queued"
        await asyncio.sleep(0.02)
    await conn.execute("UNLISTEN queued")
    await conn.execute("COMMIT")
    await notify(pg, "marker", ["after the block"])
    assert await next_payloads(conn, 1) == ["after the block"]
    await conn.execute("UNLISTEN *")
    await conn.execute("LISTEN marker")
    await notify(pg, "marker", ["3"])
    assert await next_payloads(conn, 1) == ["3"]
    # a notification sent by a client through pgmux works unchanged
    other = await connect_asyncpg(mux)
    await other.execute("NOTIFY marker, 'from a client'")
    await other.execute("SELECT pg_notify('marker', 'by pg_notify')")
    assert await next_payloads(conn, 2) == ["from a client", "by pg_notify"]
    # a NOTIFY right after LISTEN returned is delivered: the ReadyForQuery of the
    # LISTEN waited for the relay's own LISTEN on the new channel
    for i in range(20):
        await conn.execute(f"LISTEN fresh_{i}")
        await conn.execute(f"NOTIFY fresh_{i}, '{i}'")
    assert await next_payloads(conn, 20) == [str(i) for i in range(20)]
    servers = await show(mux, "SERVERS")
    assert [s["session_state"] for s in servers if s["session_state"]] == ["relay"]
    await close_quietly(conn, other)


async def test_many_clients_on_many_channels(pg: Any, pgmux: Any) -> None:
    """200 clients on 50 channels each get exactly their channel's notifications."""
    mux = pgmux(config())
    got: dict[int, list[str]] = {i: [] for i in range(200)}
    conns = []
    for i in range(200):
        conn = await connect_asyncpg(mux)
        await conn.add_listener(f"many_{i % 50}", lambda *a, i=i: got[i].append(a[3]))
        conns.append(conn)
    try:
        sender = await direct(pg, APP_DB)
        for round_ in range(3):
            for channel in range(50):
                await sender.execute(
                    "SELECT pg_notify($1, $2)", f"many_{channel}", f"{channel}.{round_}"
                )
        await sender.close()
        await until(lambda: all(len(v) >= 3 for v in got.values()), 30, "every delivery")
        await asyncio.sleep(0.2)  # nothing more arrives
        for i, payloads in got.items():
            assert payloads == [f"{i % 50}.{r}" for r in range(3)], (i, payloads)
        listeners = await show(mux, "LISTENERS")
        assert (listeners[0]["clients"], listeners[0]["channels"]) == (200, 50)
    finally:
        await close_quietly(*conns)


async def test_listen_mode_error_and_pin(pg: Any, pgmux: Any) -> None:
    refused = pgmux(config(listen_mode="error"))
    conn = await connect_psycopg(refused)
    with pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
        await conn.execute("LISTEN refused")
    assert "pool.listen_mode = error" in str(caught.value)
    cur = await conn.execute("SELECT 1")  # the connection stays usable
    assert (await cur.fetchone()) == (1,)
    await conn.close()
    pinning = pgmux(config(listen_mode="pin"))
    conn = await connect_psycopg(pinning)
    await conn.execute("LISTEN pinned")
    servers = await show(pinning, "SERVERS")
    assert [s["session_state"] for s in servers if s["session_state"]] == ["listen"]
    await notify(pg, "pinned", ["on its own server"])
    assert await next_payloads(conn, 1) == ["on its own server"]
    await conn.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_client_that_stops_reading_is_disconnected(pg: Any, pgmux: Any) -> None:
    mux = pgmux(config())  # notify_queue: 1000
    stuck = await RawClient.open(mux)
    await stuck.login(APP_USER, APP_PASSWORD, APP_DB)
    assert (await stuck.query("LISTEN flood")).tags == ["LISTEN"]
    reader = await connect_psycopg(mux)
    await reader.execute("LISTEN flood")
    before = rss_kib(mux.pid)
    # 50 rounds of 200 notifications of 4 kB: 40 MB go past the stuck client. The
    # sender keeps pace with the reading client (each round once it has the last),
    # which so stays well within its own queue, as a client that reads does.
    rounds, per_round = 50, 200
    got: list[str] = []

    async def read() -> None:
        async for note in reader.notifies():
            got.append(note.payload)
            if len(got) >= rounds * per_round:
                return

    reading = asyncio.create_task(read())
    sender = await direct(pg, APP_DB)
    peak = before
    for round_ in range(rounds):
        await sender.execute(
            "SELECT pg_notify('flood', $1 || g || repeat('x', 4000)) FROM generate_series(1, $2) g",
            f"{round_}.",
            per_round,
        )
        await until(lambda r=round_: len(got) >= (r + 1) * per_round, 20, f"round {round_}")
        peak = max(peak, rss_kib(mux.pid))
    await sender.close()
    await asyncio.wait_for(reading, 10)
    assert len(got) == rounds * per_round  # the reading client missed nothing
    peak = max(peak, rss_kib(mux.pid))
    # the stuck client reads at last: what was in flight, then the error, then the end
    messages = await stuck.read_until_closed(30)
    kinds = [kind for kind, _ in messages]
    assert kinds[-1] == b"E", kinds[-3:]
    fields = error_fields(messages[-1][1])
    assert fields["C"] == "53200" and "pool.notify_queue" in fields["M"]
    assert kinds.count(b"A") < rounds * per_round
    listeners = await show(mux, "LISTENERS")
    assert listeners[0]["notifications_dropped"] > 0
    assert listeners[0]["queue_high_water"] == 1001
    print(f"pgmux RSS before {before} kB, peak {peak} kB")
    # what pgmux held for the stuck client stayed bounded (40 MB went past it)
    assert peak - before < 30_000, (before, peak)  # kB
    await reader.close()


async def test_several_statements_and_unreadable_ones(pg: Any, pgmux: Any) -> None:
    """LISTENs among other statements in one Query are relayed too; one whose
    channel cannot be told (a dollar-quoted string in the same Query) pins its
    client as with listen_mode: pin, and gets its notifications from that server;
    under session_state: error such a Query is refused instead."""
    mux = pgmux(config())
    conn = await connect_psycopg(mux)
    await conn.execute("LISTEN multi_a; SELECT 1; LISTEN multi_b")  # no parameters: one Query
    await notify(pg, "multi_b", ["b"])
    await notify(pg, "multi_a", ["a"])
    assert await next_payloads(conn, 2) == ["b", "a"]
    await conn.execute("SELECT 'x;y'; UNLISTEN *")
    await notify(pg, "multi_a", ["gone"])
    assert not await drain_psycopg(conn, 1, 0.5)
    assert not [s for s in await show(mux, "SERVERS") if s["session_state"] == "listen"]
    await conn.execute("LISTEN dollar; SELECT $$;$$")
    servers = await show(mux, "SERVERS")  # (the relay closed with its last channel)
    assert [s["session_state"] for s in servers if s["session_state"]] == ["listen"]
    await notify(pg, "dollar", ["from its own server"])
    assert await next_payloads(conn, 1) == ["from its own server"]
    await conn.close()
    strict = pgmux(config(session_state="error"))
    conn = await connect_psycopg(strict)
    await conn.execute("LISTEN strict_one; SELECT 1")  # relayed: allowed
    with pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
        await conn.execute("LISTEN strict_a; SELECT $$x$$")
    assert "cannot tell the channel" in str(caught.value)
    await notify(pg, "strict_one", ["relayed"])
    assert await next_payloads(conn, 1) == ["relayed"]
    await conn.close()


@pytest.mark.parametrize("pgmux_workers", [2], indirect=True)
async def test_each_worker_has_its_own_relay(pg: Any, pgmux: Any, pgmux_workers: int) -> None:
    """listen.workers: 2: clients on either worker get every notification, each
    worker's relay shows in SHOW LISTENERS and SHOW SERVERS."""
    mux = pgmux(config(size=4))
    conns = [await connect_psycopg(mux) for _ in range(8)]
    try:
        for conn in conns:
            await conn.execute("LISTEN workers")
        payloads = [str(i) for i in range(50)]
        await notify(pg, "workers", payloads)
        for conn in conns:
            assert await next_payloads(conn, 50) == payloads
        rows = await show(mux, "LISTENERS")
        print("SHOW LISTENERS", rows)
        assert sum(row["clients"] for row in rows) == 8 and 1 <= len(rows) <= 2, rows
        servers = await show(mux, "SERVERS")
        assert sum(s["session_state"] == "relay" for s in servers) == len(rows)
    finally:
        await close_quietly(*conns)

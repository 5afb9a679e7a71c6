"""Peering without PostgreSQL: the key layout PgBouncer reads, the one-hop
forwarding rule, the signed 3.2 keys, and the `peers:` / [peers] settings."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from pgmux.protocol import messages
from pgmux.proxy.config import ConfigError, parse_config
from pgmux.proxy.config.ini_translate import load_pgbouncer_ini
from pgmux.proxy.config.model import PeerConfig, PeersConfig
from pgmux.proxy.core import fleetkeys
from pgmux.proxy.core.cancel import CancelKeys


class Worker3:
    """Worker 3 of several (the low byte of its pids)."""

    def issue_pid(self, random_bits: int) -> int:
        return (random_bits << 8 | 3) & 0x7FFFFFFF

    def forward_cancel(self, pid: int, key: bytes) -> bool:
        return False


def client(keys: CancelKeys, protocol_minor: int = 0) -> SimpleNamespace:
    fake = SimpleNamespace(server=None, expect_rfq=0, protocol_minor=protocol_minor)
    fake.cancel_pid, fake.cancel_key = keys.issue(fake)  # type: ignore[arg-type]
    return fake


class Listener:
    """A peer's port: records each CancelRequest and closes."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = int.from_bytes(await reader.readexactly(4), "big")
        self.received.append(await reader.readexactly(length - 4))
        writer.close()


def peered(peer_id: int, port: int = 1, secret: str | None = None) -> CancelKeys:
    keys = CancelKeys()
    members = tuple(PeerConfig(id=i, host="127.0.0.1", port=port) for i in (1, 2, 300))
    keys.fleet = PeersConfig(peer_id=peer_id, members=members, secret=secret)
    return keys


def test_keys_carry_the_peer_id_where_pgbouncer_reads_it() -> None:
    keys = peered(300)
    keys.peers = Worker3()  # type: ignore[assignment]
    clients = [client(keys) for _ in range(2000)]  # more than the pid's random bits
    for fake in clients:
        raw = fake.cancel_pid.to_bytes(4, "big") + fake.cancel_key
        assert raw[1] + (raw[2] << 8) == 300  # PgBouncer: cancel_key[1] + (cancel_key[2] << 8)
        assert raw[7] & 0x03 == 0x03  # the TTL, whole
        assert raw[0] < 0x80 and raw[3] == 3  # sign bit clear; the worker byte kept
        assert keys.owner(fake.cancel_pid, fake.cancel_key) is fake
    assert len({(c.cancel_pid, c.cancel_key) for c in clients}) == 2000
    for fake in clients:
        keys.forget(fake)  # type: ignore[arg-type]
    assert not keys.keys


async def test_another_peers_key_goes_there_once_with_a_lower_ttl() -> None:
    listener = Listener()
    port = await listener.start()
    try:
        issuer, receiver = peered(2, port), peered(1, port)
        fake = client(issuer)
        receiver.cancel(fake.cancel_pid, fake.cancel_key)
        for _ in range(100):
            if listener.received:
                break
            await asyncio.sleep(0.02)
        forwarded = fleetkeys.with_ttl(fake.cancel_key, 2)
        assert listener.received == [messages.cancel_request(fake.cancel_pid, forwarded)[4:]]
        # Already forwarded once and still not ours: dropped, never sent on.
        receiver.cancel(fake.cancel_pid, forwarded)
        # Unknown peer ids (a forged key) go nowhere either.
        receiver.cancel(fleetkeys.with_peer(0x1234, 77), b"\x00\x00\x00\x03")
        await asyncio.sleep(0.2)
        assert len(listener.received) == 1
        # At its owner the lower TTL still matches the stored key.
        assert fleetkeys.with_ttl(forwarded) == fake.cancel_key
    finally:
        assert listener.server is not None
        listener.server.close()


async def test_a_forged_long_key_is_not_forwarded_when_signed() -> None:
    listener = Listener()
    port = await listener.start()
    try:
        issuer, receiver = peered(2, port, "s3cret"), peered(1, port, "s3cret")
        fake = client(issuer, protocol_minor=2)
        assert len(fake.cancel_key) == 32
        assert fleetkeys.signed_by_fleet(fake.cancel_pid, fake.cancel_key, "s3cret")
        forged = bytes(32 - 1) + b"\x03"
        receiver.cancel(fake.cancel_pid, forged)
        await asyncio.sleep(0.2)
        assert listener.received == []
        receiver.cancel(fake.cancel_pid, fake.cancel_key)
        for _ in range(100):
            if listener.received:
                break
            await asyncio.sleep(0.02)
        assert len(listener.received) == 1
    finally:
        assert listener.server is not None
        listener.server.close()


def test_peers_settings() -> None:
    config = parse_config(
        {
            "peers": {
                "peer_id": 2,
                "secret": "x",
                "members": [{"id": 1, "host": "10.0.0.1"}, {"id": 2, "host": "/run/p2", "port": 7}],
            }
        }
    )
    assert config.peers.peer_id == 2
    assert config.peers.peer(1) == PeerConfig(id=1, host="10.0.0.1", port=6432)
    assert config.peers.peer(2) == PeerConfig(id=2, host="/run/p2", port=7)
    assert "x" not in repr(config.peers)
    bad = [
        ({"members": [{"id": 1, "host": "h"}]}, "peers.peer_id"),
        ({"peer_id": 1, "members": [{"id": 1, "host": "h"}, {"id": 1, "host": "g"}]}, "twice"),
        ({"peer_id": 20000}, "peers.peer_id"),
        ({"peer_id": 1, "members": [{"id": 2}]}, "id and a host"),
        ({"peer_id": 1, "members": [{"id": 2, "host": "h", "size": 3}]}, "unknown key"),
    ]
    for peers, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config({"peers": peers})


def test_pgbouncer_ini_peers(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text('"app" "x"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n* = host=127.0.0.1\n"
        "[pgbouncer]\nlisten_port = 6432\nauth_file = users.txt\npeer_id = 2\n"
        "[peers]\n1 = host=10.0.0.1 port=6433\n2 = host=/run/pgb-2 pool_size=5\n"
    )
    config, unsupported = load_pgbouncer_ini(str(ini))
    peers = config.peers
    assert peers.peer_id == 2
    assert peers.members == (
        PeerConfig(id=1, host="10.0.0.1", port=6433),
        PeerConfig(id=2, host="/run/pgb-2", port=6432),
    )
    assert not [item for item in unsupported if "peer" in item.name]
    assert peers.short_keys  # its peers may be PgBouncers


def test_short_keys_give_protocol_32_clients_pgbouncers_key_length() -> None:
    """PgBouncer 1.25 drops a CancelRequest whose key is not 4 bytes (client.c)."""
    keys = peered(1, secret="s")
    assert len(client(keys, protocol_minor=2).cancel_key) == 32
    keys.fleet = PeersConfig(peer_id=1, members=keys.fleet.members, short_keys=True)
    short = client(keys, protocol_minor=2)
    assert len(short.cancel_key) == 4
    assert fleetkeys.ttl_of(short.cancel_key) == fleetkeys.TTL_MASK
    assert keys.owner(short.cancel_pid, short.cancel_key) is short
    config = parse_config({"peers": {"peer_id": 1, "short_keys": True}})
    assert config.peers.short_keys
    with pytest.raises(ConfigError, match=r"peers\.short_keys"):
        parse_config({"peers": {"peer_id": 1, "short_keys": "maybe"}})


async def test_a_peer_on_a_unix_socket(tmp_path: Path) -> None:
    """A member whose host is a directory is reached at DIR/.s.PGSQL.PORT."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(64))
        writer.close()

    server = await asyncio.start_unix_server(serve, str(tmp_path / ".s.PGSQL.7001"))
    try:
        keys = CancelKeys()
        keys.fleet = PeersConfig(
            peer_id=1, members=(PeerConfig(id=2, host=str(tmp_path), port=7001),)
        )
        pid = fleetkeys.with_peer(0x01000042, 2)
        keys.cancel(pid, b"\x10\x20\x30\x43")
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.02)
        assert received == [messages.cancel_request(pid, b"\x10\x20\x30\x42")]
    finally:
        server.close()

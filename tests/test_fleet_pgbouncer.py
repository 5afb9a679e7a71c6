"""pgmux and PgBouncer in one peer group (docs/scaling.md, *Cancel requests*).

One pgmux (peer 1) and one PgBouncer >= 1.25 (peer 2) name each other as
peers. A client on one runs `pg_sleep(30)`; its CancelRequest, the pid and key
of the BackendKeyData it got, goes to the other's port: the other reads the
peer id from the key, forwards it (TTL one lower) and the query stops. Forged
keys sent to either stop nothing. pgmux runs with one worker and with two.
With `peers.short_keys` a protocol 3.2 client on pgmux gets a key PgBouncer
accepts, so its cancel also works through PgBouncer.

Needs a PgBouncer binary: $PGBOUNCER_BIN, or `pgbouncer` on PATH; the test is
skipped without one. PgBouncer refuses to run as root, so under root it runs
as the `postgres` OS user, from a directory that user can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fleet import stop_process
from helpers import APP_DB, APP_PASSWORD, APP_USER, RawClient, error_fields, query_message

from pgmux.protocol import messages
from pgmux.tempgres import TempPostgres, free_port

pytestmark = pytest.mark.timeout(120)

ROUNDS = 5  # cancels in each direction
LIMIT = 1.0  # seconds from the cancel to the query's error
PGMUX_PEER, PGBOUNCER_PEER = 1, 2


def pgbouncer_binary() -> str:
    """The PgBouncer to test with, or a skip saying why there is none."""
    path = os.environ.get("PGBOUNCER_BIN") or shutil.which("pgbouncer")
    if not path or not Path(path).exists():
        pytest.skip("no PgBouncer binary: set PGBOUNCER_BIN to a PgBouncer >= 1.25")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    found = re.search(r"PgBouncer (\d+)\.(\d+)", version.stdout)
    if not found or (int(found[1]), int(found[2])) < (1, 25):
        pytest.skip(f"{path} is not PgBouncer >= 1.25: {version.stdout.strip().splitlines()[:1]!r}")
    return path


@dataclass
class PgBouncer:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    host: str = "127.0.0.1"

    def logs(self) -> str:
        return (self.workdir / "pgbouncer.log").read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def pgbouncer_ini(pg: TempPostgres, workdir: Path, port: int, peers: dict[int, int]) -> str:
    members = "".join(f"{pid} = host=127.0.0.1 port={pport}\n" for pid, pport in peers.items())
    return (
        "[databases]\n"
        f"{APP_DB} = host={pg.host} port={pg.port} dbname={APP_DB}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {workdir / 'users.txt'}\n"
        "pool_mode = transaction\n"
        "default_pool_size = 4\n"
        "verbose = 1\n"
        f"peer_id = {PGBOUNCER_PEER}\n"
        "[peers]\n" + members
    )


def _run_as_postgres() -> dict[str, Any]:
    # PgBouncer refuses to start as root.
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


def start_pgbouncer(binary: str, pg: TempPostgres, port: int, peers: dict[int, int]) -> PgBouncer:
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    workdir.chmod(0o755)  # the postgres OS user reads its files from here
    (workdir / "users.txt").write_text(f'"{APP_USER}" "{APP_PASSWORD}"\n')
    (workdir / "pgbouncer.ini").write_text(pgbouncer_ini(pg, workdir, port, peers))
    for name in ("users.txt", "pgbouncer.ini"):
        (workdir / name).chmod(0o644)
    with open(workdir / "pgbouncer.log", "ab") as log:
        proc = subprocess.Popen(
            [binary, str(workdir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            **_run_as_postgres(),
        )
    bouncer = PgBouncer(proc, port, workdir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(bouncer.logs())
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return bouncer
        time.sleep(0.05)
    bouncer.stop()
    raise RuntimeError(f"pgbouncer did not start: {bouncer.logs()}")


@contextlib.contextmanager
def peered_pair(
    pg: TempPostgres, pgmux: Any, peers_extra: dict[str, Any] | None = None, workers: int = 1
) -> Iterator[tuple[Any, PgBouncer]]:
    """pgmux (peer 1) and PgBouncer (peer 2), each listing both."""
    binary = pgbouncer_binary()
    mux_port, bouncer_port = free_port(), free_port()
    peers = {PGMUX_PEER: mux_port, PGBOUNCER_PEER: bouncer_port}
    members = [{"id": pid, "host": "127.0.0.1", "port": port} for pid, port in peers.items()]
    mux_peers = {"peer_id": PGMUX_PEER, "members": members, **(peers_extra or {})}
    mux = pgmux({"listen": {"port": mux_port, "workers": workers}, "peers": mux_peers})
    bouncer = start_pgbouncer(binary, pg, bouncer_port, peers)
    try:
        yield mux, bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(bouncer.workdir, ignore_errors=True)


@pytest.fixture(params=[1, 2], ids=["pgmux-1-worker", "pgmux-2-workers"])
def pair(
    pg: TempPostgres, pgmux: Any, request: pytest.FixtureRequest
) -> Iterator[tuple[Any, PgBouncer]]:
    """With two workers the pid's low byte names one; a cancel PgBouncer forwards
    lands on either, which passes it on to the worker."""
    with peered_pair(pg, pgmux, workers=request.param) as both:
        yield both


async def login(endpoint: Any) -> RawClient:
    client = await RawClient.open(endpoint)
    await client.login(APP_USER, APP_PASSWORD, APP_DB)
    assert client.backend_key is not None
    return client


def peer_in(pid: int) -> int:
    raw = struct.pack("!I", pid)
    return raw[1] + (raw[2] << 8)


async def send_cancel(target: Any, pid: int, key: bytes) -> None:
    _reader, writer = await asyncio.open_connection(target.host, target.port)
    writer.write(messages.cancel_request(pid, key))
    await writer.drain()
    writer.close()


async def cancelled_within(client: RawClient, since: float, timeout: float) -> float | None:
    """Seconds from SINCE to the query's 57014; None if none came in TIMEOUT."""
    deadline = since + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            msg = await client.read_message(remaining)
        except TimeoutError:
            return None
        assert msg is not None, "the client's connection was closed"
        kind, body = msg
        if kind == b"E":
            assert error_fields(body).get("C") == "57014", error_fields(body)
            elapsed = time.monotonic() - since
            await client.read_until_ready()
            return elapsed
        assert kind != b"Z", "pg_sleep(30) finished without being cancelled"
    return None


async def cancel_across(client: RawClient, other: Any, key: tuple[int, bytes]) -> float | None:
    """pg_sleep(30) on CLIENT's instance; KEY's cancel sent to OTHER."""
    await client.send(query_message("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.3)  # the query is on its server
    start = time.monotonic()
    await send_cancel(other, *key)
    return await cancelled_within(client, start, LIMIT * 3)


async def one_direction(home: Any, other: Any, home_peer: int) -> list[float]:
    client = await login(home)
    try:
        assert client.backend_key is not None
        assert peer_in(client.backend_key[0]) == home_peer
        latencies = []
        for _round in range(ROUNDS):
            latency = await cancel_across(client, other, client.backend_key)
            assert latency is not None, "the cancel sent to the peer stopped nothing"
            latencies.append(latency)
        return latencies
    finally:
        await client.close()


def forged(key: tuple[int, bytes]) -> tuple[int, bytes]:
    pid, real = key
    while (fake := secrets.token_bytes(len(real))) == real:
        pass
    return pid, fake


async def test_cancel_crosses_pgmux_and_pgbouncer(pair: tuple[Any, PgBouncer]) -> None:
    mux, bouncer = pair
    to_bouncer = await one_direction(mux, bouncer, PGMUX_PEER)
    to_mux = await one_direction(bouncer, mux, PGBOUNCER_PEER)
    ms = {name: [round(x * 1000) for x in v] for name, v in (("to", to_bouncer), ("from", to_mux))}
    print(f"cancel of a pgmux client at PgBouncer, ms: {ms['to']}; the reverse: {ms['from']}")
    assert max(to_bouncer) < LIMIT, to_bouncer
    assert max(to_mux) < LIMIT, to_mux
    assert "cancel_to_peer" in mux.logs()  # pgmux forwarded the PgBouncer keys
    assert "forwarding cancellation request to peer 1" in bouncer.logs()


async def test_forged_keys_cancel_nothing_across(pair: tuple[Any, PgBouncer]) -> None:
    mux, bouncer = pair
    for home, other in ((mux, bouncer), (bouncer, mux)):
        client = await login(home)
        try:
            assert client.backend_key is not None
            await client.send(query_message("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.3)
            start = time.monotonic()
            for target in (home, other):
                for _ in range(5):
                    await send_cancel(target, *forged(client.backend_key))
            assert await cancelled_within(client, start, 1.5) is None, "a forged key cancelled"
            # The real key still works afterwards. It goes to pgmux: PgBouncer
            # 1.25 opens one connection to a peer at a time and queues the rest
            # first come first served, so there it would wait behind the forged
            # keys it is still holding for pgmux (docs/scaling.md).
            await send_cancel(mux, *client.backend_key)
            assert await cancelled_within(client, time.monotonic(), LIMIT * 3) is not None
        finally:
            await client.close()


PROTOCOL_V3_2 = 196610


async def test_protocol_32_clients_keep_short_keys_for_pgbouncer(
    pg: TempPostgres, pgmux: Any
) -> None:
    """With `peers.short_keys` a protocol 3.2 client on pgmux gets an 8-byte
    BackendKeyData, so its cancel still works when it lands on PgBouncer
    (PgBouncer 1.25 drops a longer key as a bad cancel request)."""
    with peered_pair(pg, pgmux, {"short_keys": True}) as (mux, bouncer):
        client = await RawClient.open(mux)
        try:
            await client.login(APP_USER, APP_PASSWORD, APP_DB, protocol=PROTOCOL_V3_2)
            assert client.backend_key is not None
            assert len(client.backend_key[1]) == 4
            latencies = [await cancel_across(client, bouncer, client.backend_key) for _ in range(3)]
        finally:
            await client.close()
    assert None not in latencies, "the cancel sent to PgBouncer stopped nothing"
    assert max(x for x in latencies if x is not None) < LIMIT

"""A fleet for the scale-out tests: several pgmux instances behind HAProxy.

HAProxy (Debian's package) runs in TCP mode on a free loopback port, checks
each instance's /ready (admin.http) every 200 ms and retries a refused
connection on another instance (`option redispatch`), as docs/scaling.md and
deploy/haproxy.cfg describe. Every process is started here and killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pgmux.tempgres import free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def need_haproxy() -> None:
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (apt-get install -y haproxy)")


def haproxy_config(port: int, backends: list[tuple[int, int]]) -> str:
    """TCP balancing over BACKENDS (pgmux port, its /ready port)."""
    servers = "".join(
        f"    server pgmux{i} 127.0.0.1:{pg_port} check port {http_port}\n"
        for i, (pg_port, http_port) in enumerate(backends, 1)
    )
    return (
        "global\n"
        "    maxconn 2000\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 1s\n"
        "    timeout check 3s\n"
        "    timeout client 120s\n"
        "    timeout server 120s\n"
        "    retries 5\n"
        "    option redispatch 1\n"
        "listen pgmux\n"
        f"    bind 127.0.0.1:{port}\n"
        "    balance roundrobin\n"
        "    option httpchk GET /ready\n"
        "    http-check expect status 200\n"
        "    default-server inter 200ms fall 1 rise 1\n" + servers
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a child we started (by pid: Popen knows its own child), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Balancer:
    """A running HAProxy: host and port are what clients connect to."""

    proc: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"

    def stop(self) -> None:
        stop_process(self.proc)


def start_haproxy(workdir: Path, backends: list[tuple[int, int]]) -> Balancer:
    port = free_port()
    path = workdir / "haproxy.cfg"
    path.write_text(haproxy_config(port, backends))
    log = open(workdir / "haproxy.log", "ab")  # noqa: SIM115  # the child keeps it
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    log.close()
    balancer = Balancer(proc, port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "haproxy.log").read_text())
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return balancer
        time.sleep(0.05)
    balancer.stop()
    raise RuntimeError("haproxy did not start")


def ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ready", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@dataclass
class Fleet:
    """N pgmux instances on fixed ports (so a restart comes back on the same one)."""

    factory: Any  # the pgmux fixture
    config: dict[str, Any]
    ports: list[int]
    http_ports: list[int]
    peered: bool = True  # give every instance `peers:` naming all of them
    secret: str | None = None  # peers.secret
    workers: int = 1  # listen.workers of each instance
    instances: list[Any] = field(default_factory=list)

    @property
    def backends(self) -> list[tuple[int, int]]:
        return list(zip(self.ports, self.http_ports, strict=True))

    def peers(self) -> list[dict[str, Any]]:
        return [
            {"id": i + 1, "host": "127.0.0.1", "port": port} for i, port in enumerate(self.ports)
        ]

    def instance_config(self, index: int) -> dict[str, Any]:
        config = {
            **self.config,
            "listen": {
                **self.config.get("listen", {}),
                "port": self.ports[index],
                "workers": self.workers,
            },
            "admin": {"http": {"address": "127.0.0.1", "port": self.http_ports[index]}},
        }
        if self.peered:
            peers: dict[str, Any] = {"peer_id": index + 1, "members": self.peers()}
            if self.secret:
                peers["secret"] = self.secret
            config["peers"] = peers
        return config

    def start(self, index: int) -> Any:
        mux = self.factory(self.instance_config(index))
        if index < len(self.instances):
            self.instances[index] = mux
        else:
            self.instances.append(mux)
        return mux

    async def wait_ready(self, index: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(ready, self.http_ports[index]):
            if time.monotonic() > deadline:
                raise AssertionError(f"pgmux {index} not ready in {timeout}s")
            await asyncio.sleep(0.1)


def make_fleet(
    factory: Any,
    count: int,
    config: dict[str, Any],
    peered: bool = True,
    secret: str | None = None,
    workers: int = 1,
) -> Fleet:
    ports = [free_port() for _ in range(count)]
    http_ports = [free_port() for _ in range(count)]
    fleet = Fleet(factory, config, ports, http_ports, peered, secret, workers)
    for index in range(count):
        fleet.start(index)
    return fleet

"""Acceptance: node-postgres (`client.on('notification')`) through pgmux's relay.

The listener runs in node; another process sends 1000 notifications while 50
clients run transactions on the same pool of size 2. node-postgres is
installed from tests/node/package-lock.json (npm ci) once per test session
into a temporary directory; the test is skipped only where node is absent.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import APP_DB, APP_USER, direct
from test_listen_notify import BACKENDS, COUNT, config, notify, show, transactions, until

pytestmark = pytest.mark.timeout(180)

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with tests/node installed (npm ci), for NODE_PATH."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        pytest.skip("node is not installed")
    assert npm is not None, "node without npm"
    where = tmp_path_factory.mktemp("node")
    for name in ("package.json", "package-lock.json"):
        shutil.copy(NODE_DIR / name, where / name)
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr
    yield where / "node_modules"


async def test_node_postgres_gets_every_notification(
    pg: Any, pgmux: Any, node_modules: Path
) -> None:
    mux = pgmux(config())
    listener = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "listen.js"),
        mux.dsn(),
        "relay_node",
        str(COUNT),
        "60000",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"NODE_PATH": str(node_modules), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert listener.stdout is not None
        ready = await asyncio.wait_for(listener.stdout.readline(), 30)
        assert ready == b"ready\n", ready
        stop = asyncio.Event()
        done = [0]
        load = [asyncio.create_task(transactions(mux, stop, done)) for _ in range(50)]
        try:
            await until(lambda: done[0] > 50, 30, "load running")
            payloads = [str(i) for i in range(COUNT)]
            sending = asyncio.create_task(notify(pg, "relay_node", payloads))
            watcher = await direct(pg, APP_DB)
            while not sending.done():
                servers = await show(mux, "SERVERS")
                assert all(s["session_state"] in ("", "relay") for s in servers), servers
                assert len(servers) <= 2 + 1, servers
                assert await watcher.fetchval(BACKENDS, APP_DB, APP_USER) <= 2 + 1
                await asyncio.sleep(0.05)
            await watcher.close()
            await sending
            out, err = await asyncio.wait_for(listener.communicate(), 60)
        finally:
            stop.set()
            await asyncio.gather(*load, return_exceptions=True)
        assert listener.returncode == 0, err.decode()
        assert out.decode().split() == payloads
    finally:
        if listener.returncode is None:
            listener.kill()
            await listener.wait()

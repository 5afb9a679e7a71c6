"""listen.reuse_port (PgBouncer's so_reuseport): several pgmux processes on one
TCP port, each with its own unix socket, as a peer group on one machine runs."""

from __future__ import annotations

import time

import asyncpg
import pytest
from helpers import APP_DB, APP_PASSWORD, APP_USER, PgmuxFactory, close_quietly

pytestmark = pytest.mark.timeout(60)


def wait_for(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def through_unix_socket(mux: object) -> int:
    conn = await asyncpg.connect(
        host=mux.socket_dir,  # type: ignore[attr-defined]
        port=mux.port,  # type: ignore[attr-defined]
        user=APP_USER,
        password=APP_PASSWORD,
        database=APP_DB,
        timeout=15,
    )
    try:
        return await conn.fetchval("SELECT 1")
    finally:
        await close_quietly(conn)


async def test_two_processes_share_one_port(pgmux: PgmuxFactory) -> None:
    first = pgmux({"listen": {"reuse_port": True}})
    second = pgmux({"listen": {"port": first.port, "reuse_port": True}})
    # The factory returns once the port answers, which the first does: wait
    # for the second's own "listening".
    wait_for(lambda: "listening" in second.logs() or second.proc.poll() is not None, "listening")
    assert second.proc.poll() is None, second.logs()
    assert await through_unix_socket(first) == 1
    assert await through_unix_socket(second) == 1


def test_without_reuse_port_the_port_is_taken(pgmux: PgmuxFactory) -> None:
    first = pgmux()
    try:
        second = pgmux({"listen": {"port": first.port}})
    except RuntimeError as exc:  # it died before the first answered the factory's probe
        assert "address already in use" in str(exc).lower(), exc
        return
    wait_for(lambda: second.proc.poll() is not None, "the second process to exit")
    assert second.proc.returncode != 0
    assert "address already in use" in second.logs().lower(), second.logs()

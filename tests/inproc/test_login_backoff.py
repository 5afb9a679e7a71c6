"""Server login retries: soon while PostgreSQL is down, never hammering a refusal.

A pool whose server cannot be reached (here a unix socket path nothing
listens on) retries for its waiting clients after FIRST_DELAY, doubling to
WAITING_CAP; with nobody waiting the delay doubles on to server_login_retry.
Logins failing together count once. A login PostgreSQL refuses (ServerError,
e.g. 28P01) fails the waiters at once and waits the whole server_login_retry;
57P03 (starting up, shutting down) is retried like an unreachable server; a
server whose login replies break the protocol waits server_login_retry.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque

import pytest
from harness import DEFAULT_CONFIG, make_registry, pool_of

from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.core.backoff import FIRST_DELAY, WAITING_CAP, LoginBackoff
from pgmux.proxy.datapath.pool import Pool
from pgmux.proxy.datapath.server import ServerError

RETRY = 2.0  # server_login_retry in these tests


class Waiter:
    """A client in the pool's queue, as far as the pool looks at it."""

    def __init__(self) -> None:
        self.wait_started = time.monotonic()
        self.failed: list[str] = []

    def wait_failed(self, code: str, message: str) -> None:
        self.failed.append(code)


def make_pool() -> Pool:
    config = {**DEFAULT_CONFIG, "timeouts": {"server_login_retry": f"{RETRY}s"}}
    return pool_of(make_registry(config))


def test_delays_double_from_first_delay_to_the_limit() -> None:
    backoff, now, delays = LoginBackoff(), 100.0, []
    for _ in range(12):
        assert backoff.failed(now, RETRY, streak=bool(delays))
        delays.append(backoff.delay)
        assert backoff.waiting_at == now + min(backoff.delay, WAITING_CAP)
        now = backoff.next_at
    assert delays[0] == FIRST_DELAY and delays[1] == 2 * FIRST_DELAY
    assert all(b == min(2 * a, RETRY) for a, b in itertools.pairwise(delays))
    assert delays[-1] == RETRY


def test_siblings_of_a_failed_round_count_once() -> None:
    backoff = LoginBackoff()
    assert backoff.failed(10.0, RETRY, streak=False)
    assert not backoff.failed(10.001, RETRY, streak=True)  # failed together with the first
    assert backoff.delay == FIRST_DELAY
    assert backoff.failed(backoff.next_at, RETRY, streak=True)  # the next round
    assert backoff.delay == 2 * FIRST_DELAY
    assert backoff.failed(50.0, RETRY, streak=False)  # a login succeeded in between
    assert backoff.delay == FIRST_DELAY


async def test_unreachable_server_is_retried_soon_for_waiting_clients() -> None:
    pool = make_pool()
    pool.waiting = deque([Waiter()])  # type: ignore[list-item]
    started = time.monotonic()
    pool.grow()
    while time.monotonic() - started < 1.0:
        await asyncio.sleep(0.01)
    attempts = pool.stats.connect_errors
    # 0, 25, 75, 175, 375, 625, 875 ms: 7 rounds in a second; server_login_retry
    # (2 s) would have allowed one. Generous bounds: the machine may be busy.
    assert 5 <= attempts <= 9, f"{attempts} login attempts in 1 s"
    assert pool.backoff.delay >= WAITING_CAP
    assert pool.backoff.waiting_at - time.monotonic() <= WAITING_CAP
    assert not pool.waiting[0].failed  # type: ignore[attr-defined]
    pool.waiting.clear()


async def test_starting_up_is_retried_like_an_unreachable_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool()
    waiter = Waiter()
    pool.waiting = deque([waiter])  # type: ignore[list-item]
    starting = ServerError({"C": "57P03", "M": "the database system is starting up"})
    monkeypatch.setattr(pool, "_open_server", lambda: pool._connect_failed(starting))
    pool.grow()
    await asyncio.sleep(0.3)
    assert not waiter.failed
    assert pool.stats.connect_errors >= 3
    pool.waiting.clear()


async def test_a_refused_login_fails_the_waiters_and_waits_server_login_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool()
    first = Waiter()
    pool.waiting = deque([first])  # type: ignore[list-item]
    refused = ServerError({"C": "28P01", "M": 'password authentication failed for user "app"'})
    monkeypatch.setattr(pool, "_open_server", lambda: pool._connect_failed(refused))
    pool.grow()
    assert first.failed == ["28P01"] and not pool.waiting
    assert pool.retry_at - time.monotonic() > RETRY - 0.5
    second = Waiter()
    pool.waiting.append(second)  # type: ignore[arg-type]
    pool.grow()
    await asyncio.sleep(0.5)
    assert pool.stats.connect_errors == 1, "a refusing PostgreSQL was asked again"
    assert not second.failed
    pool.waiting.clear()


async def test_a_server_breaking_the_protocol_at_login_is_not_retried_quickly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool()
    waiter = Waiter()
    pool.waiting = deque([waiter])  # type: ignore[list-item]
    garbage = ProtocolError("invalid message length 4294967295 from the server")
    monkeypatch.setattr(pool, "_open_server", lambda: pool._connect_failed(garbage))
    pool.grow()
    await asyncio.sleep(0.5)
    assert pool.stats.connect_errors == 1, "a server speaking garbage was asked again at once"
    assert not waiter.failed  # it still waits (query_wait), as before
    pool.waiting.clear()


def test_a_retry_due_now_is_planned_on_uvloop_too() -> None:
    """uvloop answers call_later(0) with a Handle that has no when(): the pool
    keeps the due time itself, so a later plan keeps the earlier retry."""
    import uvloop

    async def plan() -> None:
        pool = make_pool()
        pool.schedule_retry(0.0)
        first = pool._retry_handle
        pool.schedule_retry(0.5)  # later than the planned retry: kept
        assert pool._retry_handle is first
        pool.schedule_retry(-0.1)  # earlier: replaces it
        assert pool._retry_handle is not first
        pool._retry_handle.cancel()  # type: ignore[union-attr]

    uvloop.run(plan())

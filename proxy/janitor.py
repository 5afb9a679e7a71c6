"""Periodic work in one place (PgBouncer's janitor.c): every timeout and the
pool sizing that does not happen on the data path.

Each tick looks only at what can expire: the head of each wait queue (FIFO, so
the head waited longest), idle servers, and clients still logging in.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from pgmux.protocol import sqlstate

from .log import get_logger

if TYPE_CHECKING:
    from .registry import Registry

log = get_logger("pgmux.janitor")

TICK_SECONDS = 0.25


class Janitor:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                self.tick(time.monotonic())
            except Exception:  # the janitor must outlive any single bad object
                log.exception("janitor_error")
            await asyncio.sleep(TICK_SECONDS)

    def tick(self, now: float) -> None:
        for pool in list(self.registry.pools.values()):
            pool.expire_waiting(now)
            pool.expire_servers(now)
            if pool.waiting:
                pool.grow()  # reserve_size may apply now, or a slot was freed
            pool.ensure_min_size()
        self._expire_logins(now)

    def _expire_logins(self, now: float) -> None:
        limit = self.registry.config.timeouts.client_login
        if not limit:
            return
        for client in list(self.registry.logging_in):
            if now - client.connected_at >= limit:
                log.info("client_login_timeout", **client.log_fields())
                client.fail(sqlstate.PROTOCOL_VIOLATION, "client_login_timeout")

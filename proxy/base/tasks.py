"""Background tasks that are not awaited by anyone (server logins, cleanups).

asyncio keeps only a weak reference to a task; holding them here stops them
from being garbage-collected mid-flight, and a failure is logged, not lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from pgmux.proxy.base.log import get_logger

log = get_logger("pgmux.tasks")

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        name = getattr(task.get_coro(), "__qualname__", task.get_name())
        log.error("task_failed", task=name, error=repr(task.exception()))

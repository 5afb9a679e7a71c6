"""Cleaning a server after its client, before anyone else gets it.

A server comes here in state CLEANING (``Pool.release`` and ``Pool.abandon``
put it there): session state a client left behind is reset
(session_state.py), a transaction a departed client left open is rolled back,
a session-mode server is reset with DISCARD ALL. Then the pool takes it back
(``Pool.release``), or closes it when the cleanup fails. PgBouncer closes such
servers; pgmux reuses them (pool.rollback_abandoned).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pgmux.protocol import messages
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.datapath import pending, rollbacks, session_state
from pgmux.proxy.datapath.server import ServerError, ServerLost

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.server import ServerConnection

_COPY_FAIL = messages.copy_fail("client went away")


async def reset_then_release(pool: Pool, server: ServerConnection) -> None:
    """Reset what a client left behind, then give the server back to the pool."""
    try:
        await reset_session_state(pool, server, pool.timeouts.server_connect or 10.0)
    except (ServerError, ServerLost) as exc:
        pool.close_server(server, f"session state reset failed: {exc}")
        return
    pool.release(server)


async def reset_session_state(pool: Pool, server: ServerConnection, timeout: float) -> None:
    """Undo what a client left behind (session_state.py), so the next one starts clean."""
    if not server.dirty:
        return
    kinds, server.dirty = server.dirty, set()
    for sql in session_state.reset_statements(kinds):
        await server.query(sql, timeout)
    if session_state.PREPARE in kinds:
        rollbacks.deallocated(server)  # DEALLOCATE ALL took pgmux's statements too
    if session_state.SET in kinds:
        server.applied = {}  # RESET ALL undid the GUCs pgmux had applied
    pool.stats.session_resets += 1


async def forget_statements(server: ServerConnection, timeout: float) -> None:
    """Drop every statement pgmux prepared on a server a client left busy.

    PgBouncer closes such a server, so the next client gets a new connection
    with nothing in pg_prepared_statements (test suites of drivers count what
    is there); pgmux keeps the connection and gives it back just as empty.
    """
    await server.query("DEALLOCATE ALL", timeout)
    rollbacks.deallocated(server)


def clean_abandoned(pool: Pool, server: ServerConnection, expect: int, in_batch: bool) -> None:
    """A client left with requests outstanding or a transaction open: wait for
    the replies it is owed, roll back, reset, then give the server back.

    The count of replies owed starts now, not when the task first runs: a
    reply read in the same loop iteration as the client's disconnect counts.
    """
    if expect:
        pool.cancels.cancel_server(server)  # stop whatever it still runs for the client
    # PostgreSQL waiting in COPY FROM STDIN reads no cancel: end the COPY (outside
    # one, a CopyFail is ignored). Sync ends an extended batch.
    payload = _COPY_FAIL if server.copy_in else b""
    if in_batch:
        payload += messages.sync()
    try:
        owed = server.expect_ready_for_query(expect + in_batch, payload)
    except ServerLost as exc:
        pool.close_server(server, f"cleanup after client failed: {exc}")
        return
    busy = bool(expect or in_batch or not server.clean_for_release)
    spawn(_finish_abandoned(pool, server, owed, busy))


async def _finish_abandoned(
    pool: Pool, server: ServerConnection, owed: asyncio.Future[None], busy: bool
) -> None:
    timeout = pool.timeouts.cancel_wait or 10.0
    try:
        await server.await_ready_for_query(owed, timeout)
        rolled_back = not server.clean_for_release
        if rolled_back:
            await server.query("ROLLBACK", timeout)
            rollbacks.rolled_back(server)  # its statements may refer to what is gone
        pending.abandoned(server, rolled_back, pool.settings.session_state)
        await reset_session_state(pool, server, timeout)
        if pool.mode == "session":
            await server.query("DISCARD ALL", timeout)
            server.applied = {}
        elif busy and (server.prepared or server.stale):
            await forget_statements(server, timeout)
    except (ServerError, ServerLost) as exc:
        pool.close_server(server, f"cleanup after client failed: {exc}")
        return
    pool.stats.abandoned_cleaned += 1
    pool.release(server)

"""Statements pgmux runs on a server of its own accord, outside any client.

connect_query runs once on each new server connection, before its first
client (PgBouncer's per-database connect_query); an error in it is logged and
otherwise ignored, as PgBouncer does.

server_check_query runs on a server that has not served a client for
server_check_delay (0: before every client; a server fresh from its login
counts as checked by it), before it is handed out (PgBouncer's launch_recheck).
Meanwhile the server is in state CLEANING (SHOW SERVERS: tested) and its client
waits at the head of the queue; a server that fails the check is closed and
the client gets another. `<empty>` sends an empty query, as in PgBouncer.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.core.states import SERVER_ACTIVE, SERVER_CLEANING
from pgmux.proxy.datapath.server_login import ServerError, ServerLost

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.server import ServerConnection

EMPTY_QUERY = "<empty>"  # PgBouncer's spelling of "send an empty query"

# Servers that passed their check and go to their client now, unchecked again.
_checked: weakref.WeakSet[ServerConnection] = weakref.WeakSet()

log = get_logger("pgmux.server")


async def run_connect_query(pool: Pool, server: ServerConnection) -> None:
    """The database's connect_query on a server fresh from its login
    (ServerLost when the connection breaks: its login then fails)."""
    sql = pool.database.connect_query
    if not sql:
        return
    try:
        await server.query(sql, pool.timeouts.server_connect or None)
    except ServerError as exc:
        log.warning(
            "connect_query_failed",
            sqlstate=exc.sqlstate,
            error=str(exc),
            db=pool.dbname,
            user=pool.user,
            server_id=server.id,
        )


def held(pool: Pool, server: ServerConnection, client: ClientConnection, now: float) -> bool:
    """Hold SERVER back for server_check_query when it is due; True: CLIENT
    waits at the head of the queue until the check has answered."""
    delay = pool.settings.server_check_delay
    active = server.state is SERVER_ACTIVE  # straight from its last client: not idle at all
    if active:
        if delay:
            return False
    elif now - server.last_used < delay or not (delay or server.linked_at):
        return False
    # Due: unless it has just passed its check (a set lookup costs more than
    # the tests above, which decide for nearly every link).
    if server in _checked:
        _checked.discard(server)
        return False
    if active:
        server.unlink(now)
    pool._set_server_state(server, SERVER_CLEANING)  # the pool's one transition function
    if not client.wait_started:
        client.wait_started = now
    pool.waiting.appendleft(client)
    pool.waiting_changed()
    spawn(_check(pool, server))
    return True


async def _check(pool: Pool, server: ServerConnection) -> None:
    query = pool.settings.server_check_query
    sql = "" if query.strip().lower() == EMPTY_QUERY else query
    try:
        await server.query(sql, pool.timeouts.server_connect or 10.0)
    except (ServerError, ServerLost) as exc:
        pool.close_server(server, f"server check failed: {exc}")
        pool.grow()  # another server for the client at the head of the queue
        return
    _checked.add(server)
    pool.release(server)

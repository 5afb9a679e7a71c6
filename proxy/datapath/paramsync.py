"""A client's parameters set on the server it just got, before its first bytes go there.

The varcache (varcache.py) tells which statement brings the server's session
in line with the client's (SET ... for every parameter that differs); it
runs as pgmux's own statement, then the client's held bytes follow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.proxy.base.log import get_logger
from pgmux.proxy.core.states import CLIENT_ACTIVE, CLIENT_IDLE, CLIENT_LINKING
from pgmux.proxy.datapath.server_login import ServerError, ServerLost

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection

log = get_logger("pgmux.client")


async def sync_then_flush(
    client: ClientConnection, server: ServerConnection, statement: str
) -> None:
    """Set the client's parameters on its new server, then send what it waited with."""
    try:
        await server.query(statement, client.pool.timeouts.server_connect)
    except ServerError as exc:
        log.warning("parameter_sync_failed", error=str(exc), **client.log_fields())
        client.server = None
        client._set_state(CLIENT_IDLE)
        client.pool.release(server)
        client.fail(exc.sqlstate, str(exc))
        return
    except ServerLost:
        return  # server_lost already told the client
    server.applied = dict(client.gucs)
    # The server now holds the client's values in PostgreSQL's own spelling.
    for name in client.params:
        if name in server.params:
            client.params[name] = server.params[name]
    if client.server is server and client.state is CLIENT_LINKING:
        client._set_state(CLIENT_ACTIVE)
        server.resume_hot_path()
        if not client._flush_pending(server):
            client.pool.release(server)

"""Statements pgmux runs on a server of its own accord, outside any client.

connect_query runs once on each new server connection, before its first
client (PgBouncer's per-database connect_query); an error in it is logged and
otherwise ignored, as PgBouncer does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.proxy.base.log import get_logger
from pgmux.proxy.datapath.server_login import ServerError

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool
    from pgmux.proxy.datapath.server import ServerConnection

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

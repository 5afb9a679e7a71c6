"""server_fast_close: session-mode servers that must be replaced close now.

RECONNECT, or a reload that changes a database's login, marks its servers
close_when_released; in session mode that waits for the end of each session.
With pool.server_fast_close (PgBouncer's server_fast_close) a marked server
closes as soon as its client is between transactions, and so does that client:
it must notice that its session is gone. A running transaction is never
interrupted; the janitor looks again on its next tick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.protocol import sqlstate

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool

REASON = "database configuration changed"  # PgBouncer's words, for the server and client


def close_marked_sessions(pool: Pool) -> None:
    """Close each marked server of POOL whose client is idle, and that client."""
    for server in [s for s in pool.active if s.close_when_released]:
        client = server.client
        if client is None or client.running or not server.clean_for_release:
            continue
        client.server = None  # the server goes first: no cleanup for a server that closes
        pool.close_server(server, REASON)
        client.fail(sqlstate.ADMIN_SHUTDOWN, REASON)

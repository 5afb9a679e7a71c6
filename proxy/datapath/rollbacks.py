"""Prepared statements that a rollback left pointing at objects that are gone.

PostgreSQL's prepared statements outlive the transaction that prepared them.
A statement Parsed after a `CREATE TYPE` in a transaction (or a savepoint)
that is then rolled back keeps the type's OID as a parameter type, and the
next Bind fails with `XX000 cache lookup failed for type N`. A driver on a
direct connection knows what it prepared and drops it on a rollback (psycopg
sends DEALLOCATE ALL); through pgmux another client, or the same one after
its DEALLOCATE ALL, shares the server-side statement by its text. So pgmux
remembers, per server, the statements it Parsed since the transaction began;
a rollback (a ROLLBACK tag, also of ROLLBACK TO SAVEPOINT; pgmux's own
rollback of an abandoned transaction) makes them stale: no longer counted as
prepared, and closed on the server just before their next Parse, which then
analyses the text afresh.

Not covered: an implicit transaction (no BEGIN) that fails after a Parse of a
statement referring to an object created earlier in the same batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.protocol.extended import build_close_statement
from pgmux.protocol.msgtypes import TX_IDLE
from pgmux.proxy.datapath.replies import CLOSE, Entry

if TYPE_CHECKING:
    from pgmux.proxy.datapath.server import ServerConnection


def parse_sent(server: ServerConnection, name: bytes) -> bytes:
    """The translator sends the Parse of server-side statement NAME: remember it
    for this transaction; return the Close that must go first (a stale one)."""
    parsed = server.parsed_in_xact
    if server.tx_status == TX_IDLE and not server.responses.entries:
        parsed.clear()  # a new batch outside a transaction: the last one was not rolled back
    parsed.add(name)
    if name not in server.stale:
        return b""
    server.stale.discard(name)

    def still_stale() -> None:  # the Close was skipped after an error: still there
        server.stale.add(name)

    server.responses.push(Entry(CLOSE, skip=True, rollback=still_stale))
    return build_close_statement(name)


def rolled_back(server: ServerConnection) -> None:
    """The server's transaction (or a savepoint of it) was rolled back."""
    prepared = server.prepared
    for name in server.parsed_in_xact:
        if prepared.pop(name, None) is not None:
            server.stale.add(name)
    server.parsed_in_xact.clear()


def committed(server: ServerConnection) -> None:
    server.parsed_in_xact.clear()


def deallocated(server: ServerConnection) -> None:
    """DEALLOCATE ALL or DISCARD ALL: the server has no statement left."""
    server.prepared.clear()
    server.parsed_in_xact.clear()
    server.stale.clear()

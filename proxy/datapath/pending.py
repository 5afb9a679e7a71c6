"""Session state made or cleared inside a transaction, held until it ends.

A SET, SET ROLE, LISTEN, a WITH HOLD cursor or a temporary table lasts for
the session only if its transaction commits: a ROLLBACK forgets it, and a
ROLLBACK TO SAVEPOINT forgets what came after that savepoint (RESET ALL and
the other clears alike). So session_state.py does not pin the client or mark
the server dirty when such a statement completes; it notes the change here,
and the notes take effect when the transaction commits: at COMMIT, or at
ReadyForQuery 'I' closing an implicit transaction that saw no error. A
session advisory lock or an SQL PREPARE is not transactional and takes
effect at once.

Where the savepoint a ROLLBACK TO means cannot be told (several statements
in one Query), the notes err on the safe side: what was made is kept (a pin
or reset too many), what was cleared is forgotten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.proxy.datapath import listening

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection

UNKNOWN = b""  # a savepoint name that could not be told from the statement

# Notes of a LISTEN / UNLISTEN the pool's relay takes over start with this.
RELAYED = listening.RELAYED
LISTEN = "listen"  # session_state.LISTEN (which imports this module)

# Kinds that never pin: reset as the kind named here when the server is released.
RESET_ONLY = {"set_config": "set"}


class PendingChanges:
    """The notes of one server's current transaction: (kind, made) in order."""

    __slots__ = ("changes", "failed", "savepoints")

    def __init__(self) -> None:
        self.changes: list[tuple[str, bool]] = []
        self.savepoints: list[tuple[bytes, int]] = []  # (name, len(changes) then)
        self.failed = False  # an ErrorResponse came since the notes began

    def note(self, kind: str, made: bool) -> None:
        self.changes.append((kind, made))

    def savepoint(self, name: bytes) -> None:
        self.savepoints.append((name, len(self.changes)))

    def release(self, name: bytes) -> None:
        """RELEASE SAVEPOINT: what came after it now belongs to the one before."""
        found = self._find(name)
        if found is not None:
            del self.savepoints[found:]

    def rollback_to(self, name: bytes) -> None:
        """ROLLBACK TO SAVEPOINT: forget what came after it; the savepoint stays."""
        found = self._find(name)
        if found is None:  # cannot tell which: keep what was made, drop the clears
            self.changes = [change for change in self.changes if change[1]]
            return
        del self.changes[self.savepoints[found][1] :]
        del self.savepoints[found + 1 :]

    def take(self) -> list[tuple[str, bool]]:
        """The notes of a transaction that committed; the next one starts empty."""
        changes = self.changes
        self.clear()
        return changes

    def clear(self) -> None:
        self.changes = []
        self.savepoints = []
        self.failed = False

    def _find(self, name: bytes) -> int | None:
        if name == UNKNOWN:
            return None
        for index in range(len(self.savepoints) - 1, -1, -1):
            if self.savepoints[index][0] == name:
                return index
        return None


def transaction_ended(client: ClientConnection, server: ServerConnection) -> None:
    """ReadyForQuery 'I' with notes left: an implicit transaction ended (the
    explicit ones settle at their COMMIT or ROLLBACK); it committed unless an
    error ended it."""
    pending = server.pending
    if pending.failed:
        pending.clear()
    else:
        apply(client, server, pending.take())


def abandoned(server: ServerConnection, rolled_back: bool, mode: str) -> None:
    """The client left in a transaction: what it made counts unless the
    transaction is rolled back; the server is reset before the next client."""
    notes = server.pending
    changes = [] if rolled_back or notes.failed else notes.changes
    notes.clear()
    if mode != "ignore":
        server.dirty.update(_reset_as(kind) for kind, made in changes if made)


def _reset_as(kind: str) -> str:
    if kind.startswith(RELAYED):
        return LISTEN  # the server ran the LISTEN itself: UNLISTEN * cleans it
    return RESET_ONLY.get(kind, kind)


def apply(
    client: ClientConnection, server: ServerConnection, changes: list[tuple[str, bool]]
) -> None:
    for kind, made in changes:
        if kind.startswith(RELAYED):
            listening.committed(client, server, kind, made)
        elif made:
            created(client, server, kind)
        else:
            cleared(client, server, kind)


def created(client: ClientConnection, server: ServerConnection, kind: str) -> None:
    pool = client.pool
    mode = pool.settings.session_state if pool is not None else "ignore"
    if mode == "ignore":
        return
    reset_as = RESET_ONLY.get(kind)
    if reset_as is not None:
        server.dirty.add(reset_as)  # cleaned when this transaction's server is released
        return
    if mode == "pin":
        client.pinned.add(kind)
    # Cleaned on release: at once for reset (and whatever slipped past error's
    # refusal), or when a pinned client leaves without clearing it.
    server.dirty.add(kind)


def cleared(client: ClientConnection, server: ServerConnection, kind: str) -> None:
    client.pinned.discard(kind)
    server.dirty.discard(kind)

"""Session state that would leak between clients under transaction pooling.

Detected cheaply, without an SQL parser: the CommandComplete tag says what
ran (SET, LISTEN, PREPARE, DECLARE CURSOR, CREATE TABLE, SELECT ...) and a
regular expression over that statement's text says what the tag cannot
(SET LOCAL or not, WITH HOLD, TEMP, session advisory locks).

`pool.session_state` decides what happens (per database):

* pin    the client keeps its server until the state is gone (DISCARD ALL,
         UNLISTEN *, pg_advisory_unlock_all(), CLOSE ALL, DEALLOCATE ALL,
         DISCARD TEMP, RESET ALL) or it disconnects;
* reset  the state is cleaned when the server is released;
* error  the statement is refused before it reaches the server;
* ignore nothing is done (PgBouncer's behaviour).

A multi-statement simple Query is judged as a whole: a session SET anywhere
in it counts, even next to a SET LOCAL.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pgmux.proxy.datapath import rollbacks

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection

SET = "set"
ADVISORY_LOCK = "advisory_lock"
LISTEN = "listen"
HOLD_CURSOR = "hold_cursor"
TEMP_TABLE = "temp_table"
PREPARE = "prepare"

# What `reset` runs on release for each kind of state.
RESET_SQL = {
    SET: "RESET ALL",
    ADVISORY_LOCK: "SELECT pg_advisory_unlock_all()",
    LISTEN: "UNLISTEN *",
    HOLD_CURSOR: "CLOSE ALL",
    TEMP_TABLE: "DISCARD TEMP",
    PREPARE: "DEALLOCATE ALL",
}

# What `error` tells the client to do instead.
_ADVICE = {
    SET: "use SET LOCAL inside a transaction, or pass it as a startup parameter (options=-c ...)",
    ADVISORY_LOCK: "use pg_advisory_xact_lock() inside a transaction",
    LISTEN: "use a session-mode pool for listeners",
    HOLD_CURSOR: "use a cursor without WITH HOLD inside a transaction",
    TEMP_TABLE: "use CREATE TEMP TABLE ... ON COMMIT DROP inside a transaction",
    PREPARE: "use protocol-level prepared statements (Parse/Bind), which pgmux keeps per client",
}

_F = re.IGNORECASE | re.DOTALL
_SET = re.compile(
    rb"(?:^|;)\s*set\s+(?!local\b)(?:session\s+)?(?!transaction\b|constraints\b)"
    rb"(\"[^\"]+\"|[\w.]+)",
    _F,
)
_ADVISORY_LOCK = re.compile(rb"pg_(?:try_)?advisory_lock(?:_shared)?\s*\(", _F)
_ADVISORY_UNLOCK_ALL = re.compile(rb"pg_advisory_unlock_all\s*\(", _F)
_LISTEN = re.compile(rb"(?:^|;)\s*listen\s", _F)
_WITH_HOLD = re.compile(rb"\bwith\s+hold\b", _F)
_TEMP = re.compile(rb"\bcreate\s+(?:(?:global|local)\s+)?temp(?:orary)?\s", _F)
_ON_COMMIT_DROP = re.compile(rb"\bon\s+commit\s+drop\b", _F)
_PREPARE = re.compile(rb"(?:^|;)\s*prepare\s", _F)
_RESET_ALL = re.compile(rb"\breset\s+all\b", _F)
_DEALLOCATE = re.compile(rb"^\s*deallocate\s+(?:prepare\s+)?(\"[^\"]+\"|\w+)\s*;?\s*$", _F)


# Any statement that can leave state the tag alone does not reveal mentions one
# of these; the others skip the finer checks (most of them: SELECT ... FROM).
# Plain substring search: a case-insensitive regex costs microseconds per query,
# and `in` on bytes pays ~200 ns of buffer set-up per test where str pays ~20.
def needs_text(text: bytes) -> bool:
    """Whether detect() needs this statement's text (a cheap pre-filter)."""
    low = text.lower().decode("latin-1")
    return "set" in low or "temp" in low or "hold" in low or "listen" in low or "advisory" in low


def _session_set(text: bytes, reported: dict[str, str]) -> bool:
    """A SET (not LOCAL) of a parameter the server does not report to pgmux.

    Reported parameters (TimeZone, search_path, ...) already follow each
    client, so setting them is not a leak.
    """
    known = {name.lower() for name in reported}
    for match in _SET.finditer(text):
        name = match.group(1).strip(b'"').decode("utf-8", "replace").lower()
        if name not in known:
            return True
    return False


def detect(tag: bytes, text: bytes, reported: dict[str, str]) -> tuple[str | None, str | None]:
    """(state created, state cleared) by a statement with this tag and text."""
    first = tag[:1]
    if first == b"S":
        if tag.startswith(b"SELECT"):
            if _ADVISORY_UNLOCK_ALL.search(text):
                return None, ADVISORY_LOCK
            if _ADVISORY_LOCK.search(text):
                return ADVISORY_LOCK, None
        elif tag == b"SET" and _session_set(text, reported):
            return SET, None
        return None, None
    if tag == b"LISTEN":
        return LISTEN, None
    if tag == b"UNLISTEN":
        return (None, LISTEN) if b"*" in text else (None, None)
    if tag == b"PREPARE":
        return PREPARE, None
    if tag == b"DEALLOCATE ALL":
        return None, PREPARE
    if tag == b"DECLARE CURSOR":
        return (HOLD_CURSOR, None) if _WITH_HOLD.search(text) else (None, None)
    if tag == b"CLOSE CURSOR ALL":
        return None, HOLD_CURSOR
    if tag.startswith(b"CREATE") and _TEMP.search(text) and not _ON_COMMIT_DROP.search(text):
        return TEMP_TABLE, None
    if tag == b"DISCARD TEMP":
        return None, TEMP_TABLE
    if tag == b"RESET" and _RESET_ALL.search(text):
        return None, SET
    return None, None


def refusal(text: bytes, reported: dict[str, str]) -> str | None:
    """For `session_state: error`: why this statement is refused, or None."""
    kind = None
    if _SET.search(text) and _session_set(text, reported):
        kind = SET
    elif _ADVISORY_LOCK.search(text):
        kind = ADVISORY_LOCK
    elif _LISTEN.search(text):
        kind = LISTEN
    elif _WITH_HOLD.search(text):
        kind = HOLD_CURSOR
    elif _TEMP.search(text) and not _ON_COMMIT_DROP.search(text):
        kind = TEMP_TABLE
    elif _PREPARE.search(text):
        kind = PREPARE
    if kind is None:
        return None
    return (
        f"{_DESCRIPTION[kind]} would outlive the transaction on a shared server connection"
        f" (pool.session_state = error); {_ADVICE[kind]}"
    )


_DESCRIPTION = {
    SET: "a session-level SET",
    ADVISORY_LOCK: "a session-level advisory lock",
    LISTEN: "LISTEN",
    HOLD_CURSOR: "a WITH HOLD cursor",
    TEMP_TABLE: "a temporary table",
    PREPARE: "an SQL PREPARE",
}


def deallocated_name(text: bytes) -> bytes | None:
    """The statement name of a plain `DEALLOCATE name` (not ALL), else None."""
    match = _DEALLOCATE.match(text)
    if match is None:
        return None
    name = match.group(1)
    if name.startswith(b'"'):
        return name[1:-1]
    if name.lower() == b"all":
        return None
    return name.lower()


def observe(client: ClientConnection, server: ServerConnection, tag: bytes, text: bytes) -> None:
    """A statement of the client completed on the server: track what it left behind."""
    if tag == b"DISCARD ALL":
        forget_all(client, server)
        return
    if tag == b"DEALLOCATE ALL":
        server.prepared.clear()
        rollbacks.deallocated(server)
        if client.translator is not None:
            client.translator.statements.clear()
    elif tag == b"ROLLBACK":  # also ROLLBACK TO SAVEPOINT, and COMMIT of a failed transaction
        rollbacks.rolled_back(server)
    elif tag == b"COMMIT":
        rollbacks.committed(server)
    created, cleared = detect(tag, text, server.params)
    if created is not None:
        _created(client, server, created)
    elif cleared is not None:
        client.pinned.discard(cleared)
        server.dirty.discard(cleared)


def _created(client: ClientConnection, server: ServerConnection, kind: str) -> None:
    pool = client.pool
    mode = pool.settings.session_state if pool is not None else "ignore"
    if mode == "ignore":
        return
    if mode == "pin":
        client.pinned.add(kind)
    # Cleaned on release: at once for reset (and whatever slipped past error's
    # refusal), or when a pinned client leaves without clearing it.
    server.dirty.add(kind)


def forget_all(client: ClientConnection, server: ServerConnection) -> None:
    """DISCARD ALL: the session is as new, and so are pgmux's records of it."""
    client.pinned.clear()
    server.dirty.clear()
    server.applied = {}
    server.prepared.clear()
    rollbacks.deallocated(server)
    server.unnamed_owner = None
    if client.translator is not None:
        client.translator.statements.clear()


def reset_statements(kinds: set[str]) -> list[str]:
    return [RESET_SQL[kind] for kind in sorted(kinds)]

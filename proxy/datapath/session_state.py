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

State that PostgreSQL rolls back with its transaction (SET, SET ROLE,
set_config(..., false), LISTEN, WITH HOLD cursors, temporary tables, and the
statements that clear them) counts only once that transaction commits
(pending.py). SET SESSION AUTHORIZATION is seen in the session_authorization
ParameterStatus, which tells the value in force at each ReadyForQuery.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pgmux.proxy.datapath import listening, pending, rollbacks, startup_values

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection

SET = "set"
ADVISORY_LOCK = "advisory_lock"
LISTEN = "listen"
HOLD_CURSOR = "hold_cursor"
TEMP_TABLE = "temp_table"
PREPARE = "prepare"
ROLE = "role"  # SET ROLE (RESET ALL leaves it)
# set_config(name, value, false) from a SELECT: reset when the server is
# released, never pinned (pending.RESET_ONLY): drivers call it for their own
# ends, asyncpg's type introspection turns jit off and back on.
SET_CONFIG = "set_config"
SESSION_AUTHORIZATION = "session_authorization"  # SET SESSION AUTHORIZATION (likewise)

# Kinds whose making and clearing PostgreSQL rolls back with the transaction.
TRANSACTIONAL = frozenset({SET, LISTEN, HOLD_CURSOR, TEMP_TABLE, ROLE, SET_CONFIG})

# What `reset` runs on release for each kind of state; the identity first, so
# the others run as the pool's user.
RESET_SQL = {
    SESSION_AUTHORIZATION: "SET SESSION AUTHORIZATION DEFAULT",
    ROLE: "RESET ROLE",
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
    ROLE: "use SET LOCAL ROLE inside a transaction, or a pool per role",
    SESSION_AUTHORIZATION: "use SET LOCAL SESSION AUTHORIZATION inside a transaction,"
    " or a pool per user",
}

_F = re.IGNORECASE | re.DOTALL
_SET = re.compile(
    rb"(?:^|;)\s*set\s+(?!local\b)(?:session\s+)?"
    rb"(?!transaction\b|constraints\b|role\b|(?:session\s+)?authorization\b)"
    rb"(\"[^\"]+\"|[\w.]+)",
    _F,
)
_SET_ROLE = re.compile(rb"(?:^|;)\s*set\s+(?:session\s+)?role\s+(?!none\b)", _F)
_ROLE_NONE = re.compile(rb"(?:^|;)\s*(?:reset\s+role\b|set\s+(?:session\s+)?role\s+none\b)", _F)
_SET_AUTHORIZATION = re.compile(
    rb"(?:^|;)\s*set\s+(?:session\s+)?session\s+authorization\s+(?!default\b)", _F
)
_SET_CONFIG = re.compile(rb"\bset_config\s*\(", _F)
_ROLLBACK_TO = re.compile(
    rb"\brollback\s+(?:work\s+|transaction\s+)?to\s+(?:savepoint\s+)?(\"[^\"]+\"|\w+)", _F
)
_SAVEPOINT = re.compile(rb"^\s*savepoint\s+(\"[^\"]+\"|\w+)", _F)
_RELEASE = re.compile(rb"^\s*release\s+(?:savepoint\s+)?(\"[^\"]+\"|\w+)", _F)
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
    return (
        "set" in low  # also set_config and RESET
        or "temp" in low
        or "hold" in low
        or "listen" in low
        or "advisory" in low
        or "rollback" in low
        or "release" in low
        or "savepoint" in low
    )


Change = tuple[str, bool]  # (kind, made: True, or cleared: False)
_NONE: list[Change] = []
UNLISTEN_ONE = "unlisten_one"  # UNLISTEN of one channel: other channels may stay
_UNLISTEN_ONE: list[Change] = [(UNLISTEN_ONE, False)]
_TRUE = frozenset({b"true", b"'true'", b"'t'", b"'on'", b"'yes'", b"'1'"})


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


def _call_args(text: bytes, start: int) -> list[bytes]:
    """The top-level arguments of a call whose '(' ends just before START."""
    args: list[bytes] = []
    depth, quote, begin = 0, 0, start
    for index in range(start, len(text)):
        char = text[index]
        if quote:
            quote = 0 if char == quote else quote  # '' reopens at once: still inside
        elif char in b"'\"":
            quote = char
        elif char == 0x28:  # (
            depth += 1
        elif char == 0x29:  # )
            if not depth:
                args.append(text[begin:index].strip())
                return args
            depth -= 1
        elif char == 0x2C and not depth:  # ,
            args.append(text[begin:index].strip())
            begin = index + 1
    return args  # unterminated: as far as it goes


def _set_config_kinds(text: bytes, reported: dict[str, str]) -> list[str]:
    """What set_config(name, value, is_local) calls leave for the session."""
    known = {name.lower() for name in reported}
    kinds = []
    for match in _SET_CONFIG.finditer(text):
        args = _call_args(text, match.end())
        if len(args) == 3 and args[2].lower() in _TRUE:
            continue  # is_local: ends with the transaction
        literal = args[0] if args else b""
        name = literal[1:-1].decode("utf-8", "replace").lower() if literal[:1] == b"'" else ""
        if name == "role":
            kinds.append(ROLE)
        elif name not in known:  # reported ones follow the client; a non-literal may be any
            kinds.append(SET_CONFIG)
    return kinds


def _set_changes(text: bytes, reported: dict[str, str]) -> list[Change]:
    changes: list[Change] = []
    if _SET_ROLE.search(text):
        changes.append((ROLE, True))
    elif _ROLE_NONE.search(text):
        changes.append((ROLE, False))
    if _session_set(text, reported):
        changes.append((SET, True))
    return changes


def detect(tag: bytes, text: bytes, reported: dict[str, str]) -> list[Change]:
    """The session state a statement with this tag and text made or cleared."""
    first = tag[:1]
    if first == b"S":
        if tag.startswith(b"SELECT"):
            changes: list[Change] = []
            if _ADVISORY_UNLOCK_ALL.search(text):
                changes.append((ADVISORY_LOCK, False))
            elif _ADVISORY_LOCK.search(text):
                changes.append((ADVISORY_LOCK, True))
            if _SET_CONFIG.search(text):
                changes += [(kind, True) for kind in _set_config_kinds(text, reported)]
            return changes
        if tag == b"SET":
            return _set_changes(text, reported)
        return _NONE
    if tag == b"LISTEN":
        return [(LISTEN, True)]
    if tag == b"UNLISTEN":
        return [(LISTEN, False)] if b"*" in text else _UNLISTEN_ONE
    if tag == b"PREPARE":
        return [(PREPARE, True)]
    if tag == b"DEALLOCATE ALL":
        return [(PREPARE, False)]
    if tag == b"DECLARE CURSOR":
        return [(HOLD_CURSOR, True)] if _WITH_HOLD.search(text) else _NONE
    if tag == b"CLOSE CURSOR ALL":
        return [(HOLD_CURSOR, False)]
    if tag.startswith(b"CREATE") and _TEMP.search(text) and not _ON_COMMIT_DROP.search(text):
        return [(TEMP_TABLE, True)]
    if tag == b"DISCARD TEMP":
        return [(TEMP_TABLE, False)]
    if tag == b"RESET":
        if _RESET_ALL.search(text):
            return [(SET, False)]  # not the role: RESET ALL leaves it
        if _ROLE_NONE.search(text):
            return [(ROLE, False)]
    return _NONE


def refused_kinds(session_mode: str, listen_mode: str) -> frozenset[str]:
    """The kinds of state a transaction-mode client's statements are refused for."""
    kinds = set(_DESCRIPTION) if session_mode == "error" else set()
    if listen_mode == "relay" and LISTEN in kinds:
        # the pool's relay listens instead (relay.py), where it can tell the channel
        kinds.discard(LISTEN)
        kinds.add(_UNREADABLE_LISTEN)
    elif listen_mode == "error":
        kinds.add(LISTEN)
    return frozenset(kinds)


_UNREADABLE_LISTEN = "unreadable_listen"


def _made_kind(text: bytes, reported: dict[str, str]) -> str | None:
    """The first kind of session state this statement would make, or None."""
    if _SET.search(text) and _session_set(text, reported):
        return SET
    if _SET_ROLE.search(text):
        return ROLE
    if _SET_AUTHORIZATION.search(text):
        return SESSION_AUTHORIZATION
    if _SET_CONFIG.search(text) and ROLE in _set_config_kinds(text, reported):
        return ROLE
    for kind, pattern in _MADE_BY:
        if pattern.search(text) and (kind != TEMP_TABLE or not _ON_COMMIT_DROP.search(text)):
            return kind
    return None


_MADE_BY = (
    (ADVISORY_LOCK, _ADVISORY_LOCK),
    (LISTEN, _LISTEN),
    (HOLD_CURSOR, _WITH_HOLD),
    (TEMP_TABLE, _TEMP),
    (PREPARE, _PREPARE),
)


def refusal(text: bytes, reported: dict[str, str], refused: frozenset[str]) -> str | None:
    """Why this statement is refused (pool.session_state or listen_mode: error), or None."""
    kind = _made_kind(text, reported)
    if kind is not None and kind not in refused:
        kind = None
    if kind is None and _LISTEN.search(text) and _listen_refused(text, refused):
        kind = LISTEN
    if kind is None:
        return None
    if kind == LISTEN and SET not in refused:  # refused by listen_mode alone
        return (
            "LISTEN is not available on this transaction-pooled database"
            " (pool.listen_mode = error); use a session-mode pool for listeners"
        )
    if kind == LISTEN and _UNREADABLE_LISTEN in refused:
        return (
            "pgmux cannot tell the channel of this LISTEN (pool.session_state = error);"
            " name it plainly, in a statement of its own"
        )
    return (
        f"{_DESCRIPTION[kind]} would outlive the transaction on a shared server connection"
        f" (pool.session_state = error); {_ADVICE[kind]}"
    )


def _listen_refused(text: bytes, refused: frozenset[str]) -> bool:
    """LISTEN is refused, or (relayed) its channel cannot be told from the text."""
    if LISTEN in refused:
        return True
    return _UNREADABLE_LISTEN in refused and not listening.channels_named(text)


_DESCRIPTION = {
    SET: "a session-level SET",
    ADVISORY_LOCK: "a session-level advisory lock",
    LISTEN: "LISTEN",
    HOLD_CURSOR: "a WITH HOLD cursor",
    TEMP_TABLE: "a temporary table",
    PREPARE: "an SQL PREPARE",
    ROLE: "SET ROLE",
    SESSION_AUTHORIZATION: "SET SESSION AUTHORIZATION",
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


def _identifier(name: bytes) -> bytes:
    return name[1:-1] if name.startswith(b'"') else name.lower()


def _one_statement(text: bytes) -> bool:
    """Whether TEXT holds a single statement (a ';' inside a literal counts as two)."""
    return b";" not in text.strip().rstrip(b";")


def _savepoint_name(pattern: re.Pattern[bytes], text: bytes) -> bytes:
    """The savepoint a SAVEPOINT, RELEASE or ROLLBACK TO names, when it can be told."""
    match = pattern.search(text) if _one_statement(text) else None
    return _identifier(match.group(1)) if match is not None else pending.UNKNOWN


def _transaction_control(server: ServerConnection, tag: bytes, text: bytes) -> list[Change]:
    """COMMIT, ROLLBACK [TO], SAVEPOINT, RELEASE: what the transaction's notes
    now say for the session (what a COMMIT made final)."""
    notes = server.pending
    if tag == b"COMMIT":
        rollbacks.committed(server)
        return notes.take()
    if tag == b"ROLLBACK":  # also ROLLBACK TO SAVEPOINT, and COMMIT of a failed transaction
        rollbacks.rolled_back(server)
        if _ROLLBACK_TO.search(text):
            notes.rollback_to(_savepoint_name(_ROLLBACK_TO, text))
        else:
            notes.clear()
    elif tag == b"SAVEPOINT":
        notes.savepoint(_savepoint_name(_SAVEPOINT, text))
    elif tag == b"RELEASE":
        notes.release(_savepoint_name(_RELEASE, text))
    return _NONE


_CONTROL_TAGS = frozenset({b"COMMIT", b"ROLLBACK", b"SAVEPOINT", b"RELEASE"})


def observe(client: ClientConnection, server: ServerConnection, tag: bytes, text: bytes) -> None:
    """A statement of the client completed on the server: track what it left behind."""
    if tag == b"DISCARD ALL":
        forget_all(client, server)
        startup_values.arm(client, server)
        return
    if tag in _CONTROL_TAGS:
        pending.apply(client, server, _transaction_control(server, tag, text))
        return
    if tag == b"DEALLOCATE ALL":
        rollbacks.deallocated(server)
        if client.translator is not None:
            client.translator.statements.clear()
    if tag == b"RESET" or (tag == b"SET" and startup_values.to_default(text)):
        startup_values.arm(client, server)  # back to the client's startup values
    for kind, made in detect(tag, text, server.params):
        if kind in (LISTEN, UNLISTEN_ONE) and listening.relayed(client, server, text):
            continue  # noted with its channel, for the pool's relay
        if kind == UNLISTEN_ONE:
            continue
        if kind in TRANSACTIONAL:
            server.pending.note(kind, made)  # counts once its transaction commits
        elif made:
            pending.created(client, server, kind)
        else:
            pending.cleared(client, server, kind)


def identity_reported(client: ClientConnection, server: ServerConnection, value: str) -> None:
    """The server reported session_authorization (at each change, before the
    ReadyForQuery that follows it, also after a rollback undid it): the
    session is someone else's while it is not the user pgmux logged in as."""
    if value == server.credentials.user:
        pending.cleared(client, server, SESSION_AUTHORIZATION)
    else:
        pending.created(client, server, SESSION_AUTHORIZATION)


def forget_all(client: ClientConnection, server: ServerConnection) -> None:
    """DISCARD ALL: the session is as new, and so are pgmux's records of it."""
    client.pinned.clear()
    server.dirty.clear()
    server.pending.clear()
    server.applied = {}
    rollbacks.deallocated(server)
    server.unnamed_owner = None
    if client.translator is not None:
        client.translator.statements.clear()


_RESET_ORDER = list(RESET_SQL)


def reset_statements(kinds: set[str]) -> list[str]:
    return [RESET_SQL[kind] for kind in _RESET_ORDER if kind in kinds]

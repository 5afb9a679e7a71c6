"""RESET, RESET ALL, DISCARD ALL, SET x TO DEFAULT: back to the client's startup values.

On a direct connection the startup packet's values are the session's
defaults: `RESET application_name` goes back to the application_name the
client logged in with. Through pgmux the server's own login values are the
defaults, so such a statement would leave the server at those. When its tag
comes (ResponseFilter, transaction mode), pgmux holds back the
ParameterStatus messages that follow; at its ReadyForQuery, if the client has
nothing else on the way, pgmux sends the server a DO of its own that sets the
client's startup values again where the statement reset them (pg_settings
tells which: a value a SET or pgmux made has source `session`, a reset one
has not). The DO's ReadyForQuery is the one the client gets, after the
ParameterStatus PostgreSQL would have sent: one per parameter whose value the
client saw change, none for one that ends where it was.

Only a statement that is the client's last request waiting for an answer is
followed up so: what a client pipelined after it is already on the server.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pgmux.protocol import messages
from pgmux.protocol.msgtypes import TX_IDLE, TX_IN_BLOCK
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.datapath.varcache import READ_ONLY_REPORTED, quote_literal

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.replies import Entry, ResponseFilter
    from pgmux.proxy.datapath.server import ServerConnection

log = get_logger("pgmux.server")

_TO_DEFAULT = re.compile(
    rb"(?:^|;)\s*set\s+(?:session\s+)?(?!local\b)[\w.\"]+\s*(?:to|=)\s*default\s*(?:;|$)",
    re.IGNORECASE,
)


def to_default(text: bytes) -> bool:
    """Whether a statement whose tag is SET sets something TO DEFAULT."""
    return _TO_DEFAULT.search(text) is not None


def arm(client: ClientConnection, server: ServerConnection) -> None:
    """A statement that resets parameters completed: watch its ParameterStatus."""
    responses = server.responses
    if responses.restore is None and _may_differ(client.startup_gucs, client.pool.server_params):
        responses.restore = dict(client.params)  # what the client has seen so far


def _may_differ(startup: dict[str, str], login: dict[str, str] | None) -> bool:
    """Whether a startup value may differ from the server's own default: a
    reported one the server logged in with (asyncpg's client_encoding UTF8,
    say) comes back by itself, and costs no DO."""
    if login is None:
        return bool(startup)
    return any(login.get(name) != value for name, value in startup.items())


def restore_sql(values: dict[str, str]) -> bytes:
    rows = ", ".join(f"({quote_literal(k)}, {quote_literal(v)})" for k, v in values.items())
    return messages.query(
        "DO $pgmux$BEGIN PERFORM pg_catalog.set_config(s.name, v.value, false)"
        f" FROM pg_catalog.pg_settings s, (VALUES {rows}) AS v(name, value)"
        " WHERE lower(s.name) = lower(v.name) AND s.source <> 'session'; END$pgmux$"
    )


def at_ready(
    responses: ResponseFilter,
    client: ClientConnection,
    server: ServerConnection,
    status: int,
    out: list[bytes],
    restore_entry: Entry,
) -> bool:
    """A ReadyForQuery while watching. True: it is the resetting statement's
    and waits for pgmux's DO (sent now), in place of the entry it ends."""
    entries = responses.entries
    if responses.restore_entry is not None:  # the DO is done: its ReadyForQuery is the client's
        out.append(_changes(responses, client))
        server.applied = dict(client.gucs)  # set again where they were reset
        disarm(responses)
        return False
    if (
        status in (TX_IDLE, TX_IN_BLOCK)
        and client.expect_rfq == 1
        and not client.in_batch
        and len(entries) <= 1  # (none when replies are forwarded unread: session mode)
    ):
        server.tx_status = status
        if entries:
            entries.popleft()  # the statement's Query or Sync: the DO's ReadyForQuery answers it
        responses.restore_entry = restore_entry
        entries.append(restore_entry)
        server.transport.write(restore_sql(client.startup_gucs))
        return True
    out.extend(responses.restore_held)  # others follow on the server: as they came
    disarm(responses)
    return False


def failed(fields: bytes, client: ClientConnection) -> None:
    """The DO failed (its error is not the client's to see): the values stay reset."""
    log.warning("startup_values_restore_failed", error=fields.decode("utf-8", "replace"))
    if client.server is not None:
        client.server.applied = {}  # the next link sets them again


def _changes(responses: ResponseFilter, client: ClientConnection) -> bytes:
    """The ParameterStatus PostgreSQL would have sent: the read-only ones held
    (session_authorization after DISCARD ALL) and each value the client saw change."""
    seen = responses.restore or {}
    out = [
        status
        for status in responses.restore_held
        if messages.parse_parameter_status(status[5:])[0] in READ_ONLY_REPORTED
    ]
    for name, value in client.params.items():
        if seen.get(name) != value:
            out.append(messages.parameter_status(name, value))
    return b"".join(out)


def disarm(responses: ResponseFilter) -> None:
    """No reset of parameters is watched any more."""
    responses.restore = None
    responses.restore_held = []
    responses.restore_entry = None

"""The unnamed statement across clients, and statements a client never had.

A server has one unnamed statement, which the translator (translator.py)
replays for the client whose Bind or Describe needs it; the functions here
take the translator as they would be its methods. Also here: what becomes of
a request naming a statement the client never prepared, and of a chunk the
translator could not rewrite.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from pgmux.protocol import sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.extended import build_close_statement
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.datapath.replies import CLOSE, PARSE, PLAIN, Entry

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection
    from pgmux.proxy.datapath.translator import Translator

log = get_logger("pgmux.client")

# The owner of a server's unnamed statement when it is no client of this
# worker's: a server handed over by another worker may hold one of its
# clients' (never a Translator, so nobody here takes it for theirs).
FOREIGN = cast("Translator", object())

_CLOSE_UNNAMED = build_close_statement(b"")


def ensure(self: Translator, server: ServerConnection) -> bytes | None:
    """The Parse to replay before a Bind/Describe of the unnamed statement.

    b"" when the server has this client's unnamed statement (or none at
    all, so PostgreSQL reports the error), None when the server holds
    another client's unnamed statement and this client has none.
    """
    if server.unnamed_owner is self and server.unnamed_gen == self.unnamed_gen:
        return b""
    if self.unnamed_parse is None:
        return None if server.unnamed_owner is not None else b""
    owner, gen = server.unnamed_owner, server.unnamed_gen

    def restore() -> None:  # the replay was skipped: the server has what it had
        server.unnamed_owner, server.unnamed_gen = owner, gen

    def gone() -> None:  # the replay failed (a failed transaction): none is left
        server.unnamed_owner = None

    server.unnamed_owner = self
    server.unnamed_gen = self.unnamed_gen
    server.responses.push(Entry(PARSE, skip=True, rollback=restore, failed=gone))
    return self.unnamed_parse


def restorer(self: Translator, server: ServerConnection) -> Callable[[], None]:
    """Undo for a skipped Parse/Close of the unnamed statement: back to how it was."""
    mine = (self.unnamed_parse, self.unnamed_text, self.unnamed_gen)
    owner, gen = server.unnamed_owner, server.unnamed_gen

    def restore() -> None:
        self.unnamed_parse, self.unnamed_text, self.unnamed_gen = mine
        server.unnamed_owner, server.unnamed_gen = owner, gen

    return restore


def dropper(self: Translator, server: ServerConnection) -> Callable[[], None]:
    """A failing unnamed Parse: PostgreSQL dropped the old unnamed statement first."""

    def drop() -> None:
        self.unnamed_parse = None
        server.unnamed_owner = None

    return drop


def unknown_statement(server: ServerConnection, op: int, name: bytes, message: bytes) -> bytes:
    """A Bind/Describe of a statement the client never prepared: PostgreSQL
    is asked and writes its own 26000. The server has none of the client's
    names (the statements it has are under pgmux's); its unnamed statement,
    another client's, is closed first."""
    responses = server.responses
    if name:
        responses.push(PLAIN[op])
        return message
    # The server's unnamed statement is gone with it, unless PostgreSQL skips
    # the Close (an error before it): then it is still its owner's.
    owner, gen = server.unnamed_owner, server.unnamed_gen

    def restore() -> None:
        server.unnamed_owner, server.unnamed_gen = owner, gen

    server.unnamed_owner = None
    responses.push(Entry(CLOSE, skip=True, rollback=restore))
    responses.push(PLAIN[op])
    return _CLOSE_UNNAMED + message


def untranslatable(client: ClientConnection, server: ServerConnection, exc: Exception) -> None:
    """Translator.translate raised (it turns malformed bodies into PostgreSQL's
    errors itself, so this is a bug): nothing of the chunk was written, but what
    the translator expects of the server may be off, so the server is closed at
    once rather than waited for, and only this client ends."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f"{frame.filename}:{frame.lineno}"
    log.error("translate_failed", error=repr(exc), where=where, **client.log_fields())
    client.server = None
    pool = client.pool
    pool.close_server(server, "the client's messages could not be rewritten")
    if pool.waiting:
        pool.grow()  # a replacement for whoever waited for this server
    if isinstance(exc, ProtocolError):
        client.fail(exc.sqlstate, exc.message)
    else:
        client.fail(sqlstate.INTERNAL_ERROR, "internal error while rewriting the request")

"""Requests pipelined past a Sync that an error may yet undo.

When PostgreSQL finds an error it skips every request up to the next Sync,
so a Parse before an unanswered Sync may never register its statement; a
request after that Sync going by the same statement name or query text must
wait for the Sync's ReadyForQuery, or pgmux would send it by a server-side
name PostgreSQL does not have (Translator.held).

Knowing what a request goes by costs a scan of every Parse / Bind /
Describe / Close, and only a client that sends more before a Sync is
answered needs it. So the Translator, in its usual state, only notes where
the requests before each Sync lie (`spans`: the chunk and the offsets); the
names are read from there (`replay`) only when the client's next chunk
arrives while such a Sync is still unanswered. From then until that Sync is
answered, each request's names are read as it is translated (`names_of`),
and a request going by a name registered before the Sync waits
(`depends`).

Reading later instead of at once is exact because, within the spans, only a
Close changes what a statement name stands for (a second Parse of a taken
name is refused by PostgreSQL and changes nothing); where a Close follows a
use of the same name, what it stood for before is gone, and every named
request waits instead (`unsure_all`).
"""

from __future__ import annotations

from struct import Struct
from typing import TYPE_CHECKING

from pgmux.protocol import msgtypes

if TYPE_CHECKING:
    from pgmux.proxy.datapath.replies import ResponseFilter
    from pgmux.proxy.datapath.translator import Translator

_LENGTH = Struct("!I").unpack_from
_PARSE, _BIND, _DESCRIBE, _CLOSE = msgtypes.PARSE, msgtypes.BIND, msgtypes.DESCRIBE, msgtypes.CLOSE
_NAME, _TEXT = 0, 1  # what a request goes by: a client statement name, a query text

Name = tuple[int, bytes]
Span = tuple[bytes, int, int]  # a chunk and the offsets of whole requests in it


def checking(translator: Translator, responses: ResponseFilter) -> bool:
    """Whether this chunk's requests must be read by name: a Sync before them
    with named requests is still unanswered (what was only noted is read now)."""
    if translator.wait_for is not None and (
        not responses.entries or translator.wait_for not in responses.entries
    ):
        forget(translator)  # that Sync is answered: nothing before it is unsure
    if translator.spans:
        known, closed_after_use = replay(translator, translator.spans)
        translator.unsure |= known
        translator.unsure_all |= closed_after_use
        translator.spans.clear()
    if translator.open_spans:
        known, closed_after_use = replay(translator, translator.open_spans)
        translator.unsure_now |= known
        translator.unsure_all |= closed_after_use
        translator.open_spans.clear()
    return bool(translator.unsure or translator.unsure_now or translator.unsure_all)


def forget(translator: Translator) -> None:
    translator.wait_for = None
    translator.unsure.clear()
    translator.unsure_all = False
    translator.spans.clear()


def must_wait(translator: Translator, responses: ResponseFilter) -> bool:
    """Whether the Sync waited for is still to be answered (else forget it)."""
    if translator.wait_for in responses.entries:
        return True
    forget(translator)
    return False


def depends(
    translator: Translator, names: tuple[Name, ...], kind: int, responses: ResponseFilter
) -> bool:
    """Whether a request goes by names registered before a Sync still
    unanswered (and not since): then it waits for that Sync's answer.
    An unnamed Parse only replaces what came before: it never waits."""
    if kind == _PARSE and not names[0][1]:
        return False
    if not translator.unsure_all:
        unsure, now = translator.unsure, translator.unsure_now
        if not any(name in unsure and name not in now for name in names):
            return False
    return must_wait(translator, responses)


def names_of(
    translator: Translator, kind: int, data: bytes, start: int, end: int
) -> tuple[Name, ...]:
    """What a Parse/Bind/Describe/Close goes by: (_NAME, client name) and
    (_TEXT, query text and types) of the statement. Unchecked: a malformed
    body is the handler's to refuse."""
    if kind == _PARSE:
        split = data.find(b"\0", start, end)
        return ((_NAME, data[start:split]), (_TEXT, data[split + 1 : end]))
    name = _statement_name(kind, data, start, end)
    if name is None:
        return ()  # a portal: nothing registered by name
    statement = translator.statements.get(name)
    if statement is None or kind == _CLOSE:
        return ((_NAME, name),)
    return ((_NAME, name), (_TEXT, statement.rest))


def replay(translator: Translator, spans: list[Span]) -> tuple[set[Name], bool]:
    """The names the requests of `spans` went by, read after their translation,
    and whether a Close in them hid what a name stood for when it was used."""
    known: set[Name] = set()
    meant: dict[bytes, bytes | None] = {}  # name -> text, as the spans left it
    used: set[bytes] = set()  # names whose meaning came from before the spans
    registers = translator.limit > 0  # else names pass through, unregistered
    for data, pos, stop in spans:
        while pos < stop:
            kind = data[pos]
            end = pos + 1 + _LENGTH(data, pos + 1)[0]
            if kind == _PARSE:
                split = data.find(b"\0", pos + 5, end)
                name, rest = data[pos + 5 : split], data[split + 1 : end]
                known.add((_NAME, name))
                known.add((_TEXT, rest))
                if name and registers:
                    _parsed(translator, meant, used, name, rest)
            elif kind in (_BIND, _DESCRIBE, _CLOSE):
                target = _statement_name(kind, data, pos + 5, end)
                if target is not None:
                    known.add((_NAME, target))
                    if kind == _CLOSE:
                        if target in used:
                            return known, True
                        meant[target] = None
                    else:
                        _add_text(translator, known, meant, used, target)
            pos = end
    return known, False


def _parsed(
    translator: Translator,
    meant: dict[bytes, bytes | None],
    used: set[bytes],
    name: bytes,
    rest: bytes,
) -> None:
    """A named Parse: it registers `rest` unless the name is taken (then it
    changes nothing)."""
    if name not in meant:
        used.add(name)  # taken before the spans, or registered by this Parse
        statement = translator.statements.get(name)
        meant[name] = statement.rest if statement is not None else rest
    elif meant[name] is None:  # closed earlier in the spans
        meant[name] = rest


def _add_text(
    translator: Translator,
    known: set[Name],
    meant: dict[bytes, bytes | None],
    used: set[bytes],
    name: bytes,
) -> None:
    if name in meant:
        text = meant[name]
    else:
        used.add(name)
        statement = translator.statements.get(name)
        text = statement.rest if statement is not None else None
    if text is not None:
        known.add((_TEXT, text))


def _statement_name(kind: int, data: bytes, start: int, end: int) -> bytes | None:
    """The statement a Bind, Describe or Close names (None for a portal)."""
    if kind == _BIND:
        split = data.find(b"\0", start, end) + 1
        return data[split : data.find(b"\0", split, end)]
    if data[start : start + 1] == b"S":
        return data[start + 1 : end - 1]
    return None

"""The channel a LISTEN or UNLISTEN statement names (sans-IO).

pgmux relays notifications for its clients (proxy/datapath/relay.py) and so
must know which channel each LISTEN / UNLISTEN that completed was about. The
text is read the way PostgreSQL's scanner reads an identifier: unquoted it
folds to lower case (ASCII letters only, as for a multibyte encoding),
"quoted" it keeps its case with "" for a quote, and either way it is cut to
NAMEDATALEN - 1 = 63 bytes at a character boundary. Comments and white space
may come anywhere between the words, and one trailing ';'.

parse_all reads every LISTEN / UNLISTEN of a text of several statements.
Anything else (U&"..." identifiers, dollar quotes, a keyword this reader
does not know) gives None: the caller then falls back to pinning the client
to its server, which is always correct.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_IDENTIFIER = 63  # NAMEDATALEN - 1

_SPACE = b" \t\n\r\f\v"
_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_") | frozenset(
    range(0x80, 0x100)
)
_PART = _START | frozenset(b"0123456789$")


class Target(NamedTuple):
    listen: bool  # LISTEN (True) or UNLISTEN (False)
    # the channel's name as PostgreSQL stores it; None: UNLISTEN * (every
    # channel, where a quoted "*" is the channel named *)
    channel: bytes | None


def _skip_blank(text: bytes, pos: int) -> int:
    """Past white space and comments; -1 for an unterminated /* comment."""
    n = len(text)
    while pos < n:
        char = text[pos]
        if char in _SPACE:
            pos += 1
        elif text.startswith(b"--", pos):
            newline = text.find(b"\n", pos)
            pos = n if newline < 0 else newline + 1
        elif text.startswith(b"/*", pos):
            pos = _skip_comment(text, pos)
            if pos < 0:
                return -1
        else:
            break
    return pos


def _skip_comment(text: bytes, pos: int) -> int:
    """Past a /* comment */, which nests in PostgreSQL; -1 when unterminated."""
    depth = 0
    n = len(text)
    while pos < n:
        if text.startswith(b"/*", pos):
            depth += 1
            pos += 2
        elif text.startswith(b"*/", pos):
            depth -= 1
            pos += 2
            if not depth:
                return pos
        else:
            pos += 1
    return -1


def _word(text: bytes, pos: int) -> tuple[bytes, int]:
    """An unquoted identifier or keyword at POS (b"" if none) and the end."""
    if pos >= len(text) or text[pos] not in _START:
        return b"", pos
    end = pos + 1
    while end < len(text) and text[end] in _PART:
        end += 1
    return text[pos:end], end


def _quoted(text: bytes, pos: int) -> tuple[bytes | None, int]:
    """A "quoted identifier" starting at POS: its name and end, None if unterminated."""
    out = bytearray()
    pos += 1
    while True:
        close = text.find(b'"', pos)
        if close < 0:
            return None, pos
        out += text[pos:close]
        if text.startswith(b'""', close):
            out += b'"'
            pos = close + 2
            continue
        return bytes(out), close + 1


def truncate(name: bytes) -> bytes:
    """Cut to 63 bytes without splitting a UTF-8 character (pg_mbcliplen)."""
    if len(name) <= MAX_IDENTIFIER:
        return name
    cut = MAX_IDENTIFIER
    while cut > 0 and name[cut] & 0xC0 == 0x80:  # a continuation byte: back to its start
        cut -= 1
    return name[:cut]


def _fold(word: bytes) -> bytes:
    return word.translate(_LOWER)


_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def parse(text: bytes) -> Target | None:
    """The LISTEN / UNLISTEN statement that TEXT holds alone, or None."""
    pos = _skip_blank(text, 0)
    if pos < 0:
        return None
    keyword, pos = _word(text, pos)
    keyword = _fold(keyword)
    if keyword not in (b"listen", b"unlisten"):
        return None
    listen = keyword == b"listen"
    pos = _skip_blank(text, pos)
    if pos < 0 or pos >= len(text):
        return None
    channel: bytes | None
    if text[pos] == 0x22:  # "
        channel, pos = _quoted(text, pos)
        if not channel:  # unterminated, or "" (PostgreSQL refuses a zero-length name)
            return None
        channel = truncate(channel)
    elif text[pos] == 0x2A and not listen:  # *
        channel, pos = None, pos + 1
    else:
        word, pos = _word(text, pos)
        if not word or (word[:1] in b"uU" and text.startswith(b'&"', pos)):
            return None
        channel = truncate(_fold(word))
    return Target(listen, channel) if _at_end(text, pos) else None


def parse_all(text: bytes) -> list[Target] | None:
    """Every LISTEN / UNLISTEN of a (multi-statement) text, in order, or None.

    The statements are split at the semicolons outside quotes and comments.
    A text with a dollar sign or an E'' string outside quotes (whose ends
    this reader does not follow) or a LISTEN / UNLISTEN it cannot read gives
    None.
    """
    statements = _split(text)
    if statements is None:
        return None
    targets = []
    for statement in statements:
        start = _skip_blank(statement, 0)
        if start < 0:
            return None
        word, _ = _word(statement, start)
        if _fold(word) not in (b"listen", b"unlisten"):
            continue
        target = parse(statement)
        if target is None:
            return None
        targets.append(target)
    return targets


def _split(text: bytes) -> list[bytes] | None:
    """TEXT cut at its top-level semicolons, or None where the ends of a quote are unsure."""
    parts, start, pos, n = [], 0, 0, len(text)
    while pos < n:
        char = text[pos]
        if char == 0x27 or char == 0x22:  # ' or "
            if char == 0x27 and pos and text[pos - 1] in b"eE" and _ends_word(text, pos - 1):
                return None  # E'...' takes backslash escapes
            close = pos
            while True:
                close = text.find(bytes((char,)), close + 1)
                if close < 0:
                    return None
                if not text.startswith(bytes((char, char)), close):
                    break
                close += 1  # a doubled quote stays inside
            pos = close + 1
        elif char == 0x24:  # $: dollar quoting, or a parameter
            return None
        elif text.startswith(b"--", pos) or text.startswith(b"/*", pos):
            pos = _skip_blank(text, pos)
            if pos < 0:
                return None
        elif char == 0x3B:  # ;
            parts.append(text[start:pos])
            start = pos = pos + 1
        else:
            pos += 1
    parts.append(text[start:])
    return parts


def _ends_word(text: bytes, pos: int) -> bool:
    """Whether the byte at POS starts a word (E of E'...', not the end of NAME')."""
    return pos == 0 or text[pos - 1] not in _PART


def _at_end(text: bytes, pos: int) -> bool:
    """Only blanks, at most one ';', and blanks again are left."""
    pos = _skip_blank(text, pos)
    if pos < 0:
        return False
    if pos < len(text) and text[pos] == 0x3B:  # ;
        pos = _skip_blank(text, pos + 1)
    return pos == len(text)


def quote(channel: bytes) -> bytes:
    """The channel as a quoted identifier, for the relay's own LISTEN."""
    return b'"' + channel.replace(b'"', b'""') + b'"'

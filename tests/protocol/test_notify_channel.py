"""The channel a LISTEN / UNLISTEN names (protocol.notify_channel), as PostgreSQL reads it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgmux.protocol.notify_channel import Target, parse, parse_all, quote, truncate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"LISTEN foo", Target(True, b"foo")),
        (b"listen Foo_Bar$1", Target(True, b"foo_bar$1")),
        (b'LISTEN "Foo"', Target(True, b"Foo")),
        (b'LISTEN "a""b"', Target(True, b'a"b')),
        (b'LISTEN "*"', Target(True, b"*")),
        (b"  unlisten\n\tbar ;  ", Target(False, b"bar")),
        (b"UNLISTEN *", Target(False, None)),
        (b"UNLISTEN *;", Target(False, None)),
        (b'UNLISTEN "*"', Target(False, b"*")),
        (b"/* a /* nested */ comment */ LISTEN -- line\n x", Target(True, b"x")),
        (b"LISTEN \xc3\x89t\xc3\xa9", Target(True, b"\xc3\x89t\xc3\xa9")),  # only ASCII folds
        (b"LISTEN " + b"A" * 70, Target(True, b"a" * 63)),
    ],
)
def test_parse(text: bytes, expected: Target) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        b"LISTEN",
        b"LISTEN *",
        b"LISTEN a; LISTEN b",
        b"LISTEN a b",
        b'LISTEN "unterminated',
        b'LISTEN ""',
        b'LISTEN U&"d\\0061t"',
        b"LISTEN 1abc",
        b"NOTIFY a",
        b"LISTEN a /* unterminated",
        b"SELECT 1",
        b"",
    ],
)
def test_unreadable_text_is_left_to_pinning(text: bytes) -> None:
    assert parse(text) is None


def test_truncate_keeps_whole_characters() -> None:
    name = b"a" * 62 + "é".encode()  # 64 bytes: the 2-byte character would be split
    assert truncate(name) == b"a" * 62
    assert truncate(b"b" * 63) == b"b" * 63


_NAME = st.binary(min_size=1, max_size=80).filter(lambda b: b"\0" not in b)


@given(_NAME)
def test_quoted_names_round_trip(name: bytes) -> None:
    target = parse(b"LISTEN " + quote(name))
    assert target == Target(True, truncate(name))


@given(st.from_regex(rb"\A[a-zA-Z_][a-zA-Z0-9_$]{0,70}\Z"), st.sampled_from([b"", b";", b" ; "]))
def test_unquoted_names_fold_and_truncate(word: bytes, tail: bytes) -> None:
    assert parse(b"UNLISTEN " + word + tail) == Target(False, word.lower()[:63])


@given(st.binary(max_size=60))
def test_any_bytes_never_raise(text: bytes) -> None:
    target = parse(b"LISTEN " + text)
    assert target is None or target.listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"LISTEN a", [Target(True, b"a")]),
        (b"LISTEN a; SELECT 1; UNLISTEN *", [Target(True, b"a"), Target(False, None)]),
        (b"SELECT ';LISTEN x'; LISTEN \"b;\"", [Target(True, b"b;")]),
        (b"SELECT 'it''s'; -- LISTEN c;\nUNLISTEN d", [Target(False, b"d")]),
        (b"/* ; */ LISTEN e;", [Target(True, b"e")]),
        (b"SELECT 1; SELECT 2", []),
    ],
)
def test_parse_all(text: bytes, expected: list[Target]) -> None:
    assert parse_all(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        b"LISTEN a; SELECT $$;$$",  # dollar quoting
        b"LISTEN a; SELECT E'\\';'",  # E'' strings take backslash escapes
        b'LISTEN a; LISTEN U&"x"',
        b"LISTEN a; SELECT 'unterminated",
    ],
)
def test_parse_all_unsure(text: bytes) -> None:
    assert parse_all(text) is None


@given(st.lists(st.from_regex(rb"\A[a-z_][a-z0-9_]{0,20}\Z"), min_size=1, max_size=5))
def test_parse_all_finds_each_listen(names: list[bytes]) -> None:
    text = b"; SELECT 'a;b'; ".join(b"LISTEN " + name for name in names)
    assert parse_all(text) == [Target(True, name) for name in names]

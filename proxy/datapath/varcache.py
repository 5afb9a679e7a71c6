"""Session parameters that follow a client from server to server.

PgBouncer's varcache tracks a handful of parameters; pgmux tracks every
parameter the server reports with ParameterStatus (except the read-only ones)
plus any other GUC the client gave in its startup packet. Before a client's
transaction runs on a server, `sync_statement` yields the one statement that
makes the server's session look like the client's (or None: the hot case).
"""

from __future__ import annotations

import re
import sys

from pgmux.protocol import messages, sqlstate

# Reported by PostgreSQL but not settable by a client session.
READ_ONLY_REPORTED = frozenset(
    {
        "server_version",
        "server_encoding",
        "integer_datetimes",
        "is_superuser",
        "session_authorization",
        "in_hot_standby",
        "scram_iterations",
    }
)

# GUC_REPORT parameters, by lower-case name, so "datestyle" in a startup
# packet is matched against the "DateStyle" the server reports.
REPORTED_NAMES = {
    name.lower(): name
    for name in (
        "client_encoding",
        "DateStyle",
        "IntervalStyle",
        "TimeZone",
        "application_name",
        "standard_conforming_strings",
        "default_transaction_read_only",
        "search_path",
    )
}

# Startup packet keys that are not session parameters.
NOT_GUCS = frozenset({"user", "database", "options", "replication"})

# PgBouncer's words for an options value that is not a list of settings
OPTIONS_REFUSED = (
    "unsupported options startup parameter: only '-c config=val' and '--config=val' are allowed"
)

_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def _encoding_aliases() -> dict[str, str]:
    """PostgreSQL's encoding names (encnames.c): each alias, lower case and
    alphanumeric only, to the name the server reports ('euc-jp' -> 'EUC_JP')."""
    official = (
        "SQL_ASCII EUC_JP EUC_CN EUC_KR EUC_TW EUC_JIS_2004 UTF8 MULE_INTERNAL LATIN1 LATIN2"
        " LATIN3 LATIN4 LATIN5 LATIN6 LATIN7 LATIN8 LATIN9 LATIN10 WIN1256 WIN1258 WIN866"
        " WIN874 KOI8R WIN1251 WIN1252 ISO_8859_5 ISO_8859_6 ISO_8859_7 ISO_8859_8 WIN1250"
        " WIN1253 WIN1254 WIN1255 WIN1257 KOI8U SJIS BIG5 GBK UHC GB18030 JOHAB SHIFT_JIS_2004"
    )
    aliases = {name.replace("_", "").lower(): name for name in official.split()}
    for number, latin in (("1", 1), ("2", 2), ("3", 3), ("4", 4), ("9", 5), ("10", 6)):
        aliases[f"iso8859{number}"] = f"LATIN{latin}"
    for number, latin in (("13", 7), ("14", 8), ("15", 9), ("16", 10)):
        aliases[f"iso8859{number}"] = f"LATIN{latin}"
    for codepage in ("1250", "1251", "1252", "1253", "1254", "1255", "1256", "1257", "1258"):
        aliases[f"windows{codepage}"] = f"WIN{codepage}"
    others = {
        "abc": "WIN1258", "tcvn": "WIN1258", "tcvn5712": "WIN1258", "vscii": "WIN1258",
        "alt": "WIN866", "windows866": "WIN866", "windows874": "WIN874", "win": "WIN1251",
        "koi8": "KOI8R", "mskanji": "SJIS", "shiftjis": "SJIS", "win932": "SJIS",
        "windows932": "SJIS", "win936": "GBK", "windows936": "GBK", "win949": "UHC",
        "windows949": "UHC", "win950": "BIG5", "windows950": "BIG5", "unicode": "UTF8",
    }  # fmt: skip
    aliases.update(others)
    return aliases


_ENCODING_ALIASES = _encoding_aliases()


class StartupParameterError(ValueError):
    """A startup parameter that cannot be honoured."""


def canonical_name(name: str) -> str:
    return REPORTED_NAMES.get(name.lower(), name.lower())


def canonical_encoding(value: str) -> str:
    """PostgreSQL's spelling of an encoding name ('utf-8' -> 'UTF8'), as the
    server reports it; an unknown name is left for the server to refuse."""
    key = re.sub(r"[^0-9a-z]", "", value.lower())
    return _ENCODING_ALIASES.get(key, value.upper())


def parse_options(options: str) -> dict[str, str]:
    """GUCs from the startup `options` value: `-c name=value` and `--name=value`.

    Backslash escapes a space, as in libpq's PGOPTIONS.
    """
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    gucs: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            _add_assignment(gucs, words[i + 1])
            i += 2
        elif (word.startswith("-c") and len(word) > 2) or word.startswith("--"):
            _add_assignment(gucs, word[2:])
            i += 1
        else:
            raise StartupParameterError(OPTIONS_REFUSED)  # another switch (-d, -B 8, ...)
    return gucs


def _add_assignment(gucs: dict[str, str], assignment: str) -> None:
    name, sep, value = assignment.partition("=")
    if not sep:
        raise StartupParameterError(OPTIONS_REFUSED)  # `-c name` without `=value`
    gucs[name.replace("-", "_")] = value


def startup_gucs(params: dict[str, str], ignore: frozenset[str]) -> dict[str, str]:
    """The session parameters of a startup packet, by canonical name.

    Plain keys and `options` switches both count; names in `ignore`
    (ignore_startup_parameters) are dropped silently.
    """
    raw = {k: v for k, v in params.items() if k not in NOT_GUCS}
    if params.get("options"):
        raw.update(parse_options(params["options"]))
    gucs: dict[str, str] = {}
    for key, value in raw.items():
        if key.lower() in ignore:
            continue
        if not _GUC_NAME.match(key):
            raise StartupParameterError(f"invalid startup parameter name: {key!r}")
        name = canonical_name(key)
        if name in READ_ONLY_REPORTED:
            raise StartupParameterError(f'parameter "{name}" cannot be set')
        gucs[name] = canonical_encoding(value) if name == "client_encoding" else value
    return gucs


def split_by_reported(
    gucs: dict[str, str], server_params: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(reported, unreported): what the client wants, split by what the server reports.

    Reported ones start from the server's defaults so every tracked parameter
    has a wanted value; the server tells us when a client changes one.
    """
    reported = tracked(server_params)
    unreported: dict[str, str] = {}
    for name, value in gucs.items():
        if name in reported:
            reported[name] = value
        else:
            unreported[name] = value
    return reported, unreported


def welcome_messages(
    server_params: dict[str, str],
    params: dict[str, str],
    pid: int,
    key: bytes,
    notice: str | None = None,
) -> bytes:
    """What a client gets after AuthenticationOk: ParameterStatus in the order
    the server reported them (PostgreSQL's own, which drivers and tests may
    rely on), the client's values in place of the server's; its
    BackendKeyData, the login_notify_message NOTICE if any (where PgBouncer
    puts it), ReadyForQuery."""
    out = [messages.parameter_status(k, params.get(k, v)) for k, v in server_params.items()]
    out += [messages.parameter_status(k, v) for k, v in params.items() if k not in server_params]
    out.append(messages.backend_key_data(pid, key))
    if notice:
        out.append(messages.notice_response(sqlstate.SUCCESSFUL_COMPLETION, notice))
    out.append(messages.ready_for_query("I"))
    return b"".join(out)


def tracked(reported: dict[str, str]) -> dict[str, str]:
    """The settable subset of a server's reported parameters."""
    return {k: v for k, v in reported.items() if k not in READ_ONLY_REPORTED}


def quote_literal(value: str) -> str:
    # E'' form: correct whatever standard_conforming_strings is on the server.
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def interned(params: dict[str, str]) -> dict[str, str]:
    """The same parameters with one shared string per name and value: clients
    and servers holding the same objects make sync_statement's comparison,
    run at every link, an identity check that touches no string."""
    return {sys.intern(name): sys.intern(value) for name, value in params.items()}


def sync_statement(
    want_reported: dict[str, str],
    want_unreported: dict[str, str],
    have_reported: dict[str, str],
    have_unreported: dict[str, str],
) -> str | None:
    """SQL that turns the server's session parameters into the client's.

    set_config() is used rather than SET because it parses a value the way the
    startup packet and postgresql.conf do (search_path lists, for instance).
    Unreported GUCs the server has but the client did not ask for are RESET.
    """
    if want_reported.items() <= have_reported.items() and want_unreported == have_unreported:
        return None  # the common case, checked in C
    sets = [
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in want_reported.items()
        if have_reported.get(name) != value
    ]
    sets += [
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in want_unreported.items()
        if have_unreported.get(name) != value
    ]
    resets = [
        f"RESET {_quote_guc(name)}" for name in have_unreported if name not in want_unreported
    ]
    if not sets and not resets:
        return None
    statements = (["SELECT " + ", ".join(sets)] if sets else []) + resets
    return "; ".join(statements)


def _quote_guc(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))

"""PgBouncer's log line format, for pgmux started from a pgbouncer.ini.

    2026-12-03 05:40:01.123 UTC [4711] LOG C-0x7f3a...: db/user@127.0.0.1:5555 login attempt: ...

The texts are PgBouncer's (src/client.c, objects.c, server.c, stats.c), so
log parsers, alert rules and PgBouncer's own test suite keep matching. The
`C-0x...` / `S-0x...` id is the one SHOW CLIENTS / SHOW SERVERS print as `ptr`.
Events without a PgBouncer counterpart come out as `LOG event: key=value ...`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

TAGS = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "LOG",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "FATAL",
}


@dataclass(frozen=True, slots=True)
class LogEvents:
    """PgBouncer's log_connections, log_disconnections, log_pooler_errors, log_stats."""

    connections: bool = True
    disconnections: bool = True
    pooler_errors: bool = True
    stats: bool = True


# pgmux's close reasons, spelled as PgBouncer's disconnect_client() spells them
CLIENT_REASONS = {
    "client sent Terminate": "client close request",
    "client closed the connection": "client unexpected eof",
    "terminating connection due to client_idle_timeout": "client_idle_timeout",
    "terminating connection due to idle_transaction timeout": "idle transaction timeout",
    "canceling statement due to query timeout": "query timeout",
    "terminating connection due to transaction timeout": "transaction timeout",
    "terminating connection due to administrator command": "server shutting down",
}

SERVER_REASONS = {
    "server_idle": "server idle timeout",
    "server_lifetime": "server lifetime over",
    "lifetime or reconnect": "obsolete connection",
    "RECONNECT": "obsolete connection",
    "tls.server changed": "obsolete connection",
    "reload": "database configuration changed",
    "shutdown": "server shutting down",
    "client left mid-transaction": "client disconnect while server was not ready",
    "client left mid-message": "client disconnect while server was not ready",
}

Line = tuple[int, str]  # (level, message without time, pid and tag)
_CLIENT_KEYS = ("ptr", "client", "db", "user", "application_name", "age", "duration")
_SERVER_KEYS = ("ptr", "server", "local", "db", "user", "age", "server_id")


def timestamp(now: float | None = None) -> str:
    """PgBouncer's format_time_ms: local time, milliseconds, zone name."""
    now = time.time() if now is None else now
    local = time.localtime(now)
    millis = int(now * 1000) % 1000
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', local)}.{millis:03d} {time.strftime('%Z', local)}"


def format_line(level: int, message: str, now: float | None = None) -> str:
    """`time [pid] TAG message`; a multi-line message continues on tab-indented lines."""
    if "\n" in message:
        message = message.rstrip().replace("\n", "\n\t")
    return f"{timestamp(now)} [{os.getpid()}] {TAGS.get(level, 'LOG')} {message}"


def _address(text: str) -> str:
    """host:port with IPv6 hosts in brackets, as PgBouncer prints them."""
    host, sep, port = text.rpartition(":")
    if sep and ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return text


def client_prefix(fields: Mapping[str, Any]) -> str:
    db = fields.get("db") or "(nodb)"
    user = fields.get("user") or "(nouser)"
    return f"C-{fields.get('ptr', '0x0')}: {db}/{user}@{_address(str(fields.get('client', '')))} "


def server_prefix(fields: Mapping[str, Any]) -> str:
    where = _address(str(fields.get("server", "")))
    return f"S-{fields.get('ptr', '0x0')}: {fields.get('db')}/{fields.get('user')}@{where} "


def _age(fields: Mapping[str, Any]) -> int:
    return int(float(fields.get("age", fields.get("duration", 0)) or 0))


def _login_attempt(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    if not events.connections:
        return []
    text = (
        f"login attempt: db={f.get('db')} user={f.get('user')} "
        f"tls={f.get('tls') or 'no'} replication={f.get('replication') or 'no'}"
    )
    return [(logging.INFO, client_prefix(f) + text)]


def _client_closing(reason: str, f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    if not events.disconnections:
        return []
    reason = CLIENT_REASONS.get(reason, reason)
    return [(logging.INFO, client_prefix(f) + f"closing because: {reason} (age={_age(f)}s)")]


def _login_failed(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    error = str(f.get("error", ""))
    out = _pooler_error(f, events)
    return out + _client_closing(error, f, events)


def _pooler_error(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    if not events.pooler_errors:
        return []
    return [(logging.WARNING, client_prefix(f) + f"pooler error: {f.get('error', '')}")]


def _logout(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return _client_closing(str(f.get("reason", "")), f, events)


def _server_new(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    if not events.connections:
        return []
    local = f.get("local")
    text = "new connection to server" + (f" (from {_address(str(local))})" if local else "")
    return [(logging.INFO, server_prefix(f) + text)]


def _server_closing(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    if not events.disconnections:
        return []
    reason = str(f.get("reason", ""))
    text = f"closing because: {SERVER_REASONS.get(reason, reason)} (age={_age(f)}s)"
    return [(logging.INFO, server_prefix(f) + text)]


_SQLSTATE = re.compile(r"^[0-9A-Z]{5} ")


def _server_login_failed(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    """PostgreSQL refused the login, or could not be reached (server.c, objects.c)."""
    error = str(f.get("error", ""))
    if "severity" in f:  # PostgreSQL said why
        message = _SQLSTATE.sub("", error)
        out = [(logging.WARNING, f"server login failed: {f['severity']} {message}")]
        reason = message  # PgBouncer closes the server with PostgreSQL's words
    elif "timeout" in error:
        out, reason = [], "connect timeout"
    else:  # PgBouncer's words in the closing line, the socket's error before it
        out = [(logging.WARNING, server_prefix(f) + f"connect failed: {error}")]
        reason = "connect failed"
    if events.disconnections and "ptr" in f:
        text = f"closing because: {reason} (age={_age(f)}s)"
        out.append((logging.INFO, server_prefix(f) + text))
    return out


def _stats(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    if not events.stats:
        return []

    def n(key: str) -> int:
        return int(f.get(key, 0) or 0)

    text = (
        f"stats: {n('xacts')} xacts/s, {n('queries')} queries/s, "
        f"{n('client_parses')} client parses/s, {n('server_parses')} server parses/s, "
        f"{n('binds')} binds/s, {n('logins')} client logins/s, "
        f"in {n('received')} B/s, out {n('sent')} B/s, "
        f"xact {n('xact_us')} us, query {n('query_us')} us, wait {n('wait_us')} us"
    )
    return [(logging.INFO, text)]


def _process_up(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return [
        (logging.INFO, f"process up: {f.get('version')}, {f.get('runtime')}, tls: {f.get('tls')}")
    ]


def _login_config_error(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return [(logging.ERROR, client_prefix(f) + str(f.get("detail", "")))]


def _tls_setup_failed(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return [(logging.ERROR, f"TLS setup failed: {f.get('error')}")]


def _unsupported(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return [(logging.WARNING, f"{f.get('config')}: {f.get('detail')}")]


Renderer = Callable[[Mapping[str, Any], LogEvents], list[Line]]

_SIGNALS = {
    (
        "shutdown_started",
        "SIGTERM",
    ): "got SIGTERM, shutting down, waiting for all clients disconnect",
    ("shutdown_started", "SIGINT"): (
        "got SIGINT, shutting down, waiting for all servers connections to be released"
    ),
    ("shutdown_immediate", "SIGTERM"): "got SIGTERM while shutting down, fast exit",
    ("shutdown_immediate", "SIGINT"): "got SIGINT while shutting down, fast exit",
    ("pause", "SIGUSR1"): "got SIGUSR1, pausing all activity",
    ("resume", "SIGUSR2"): "got SIGUSR2, continuing from PAUSE",
    ("resume_ignored", "SIGUSR2"): "got SIGUSR2 while shutting down, ignoring",
}


def _signal(event: str) -> Renderer:
    """main.c's "got SIGxxx, ..." lines for the signals pgmux handles alike."""

    def lines(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
        text = _SIGNALS.get((event, str(f.get("signal"))))
        return [(logging.INFO, text if text is not None else _generic(event, f))]

    return lines


def _query_timeout(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return [
        (
            logging.INFO,
            client_prefix(f) + f"query timeout: canceling the statement (after={f.get('after')}s)",
        )
    ]


def _pool_idle_removed(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return [
        (
            logging.INFO,
            f"cleaning up idle pool for user {f.get('user')} on db {f.get('db')} "
            f"because: pool idle timeout (age= {f.get('age')}s)",
        )
    ]


def _reserve_pool_taken(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return [(logging.WARNING, client_prefix(f) + "taking connection from reserve_pool")]


def _auto_database(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return [(logging.INFO, client_prefix(f) + f"registered new auto-database: {f.get('db')}")]


def _drop(f: Mapping[str, Any], events: LogEvents) -> list[Line]:
    return []


EVENTS: dict[str, Renderer] = {
    **{event: _signal(event) for event, _ in _SIGNALS},
    "login_attempt": _login_attempt,
    "login_failed": _login_failed,
    "login": _drop,  # PgBouncer logs the attempt, not the success
    "logout": _logout,
    "wait_failed": _pooler_error,
    "pool_grow": _server_new,
    "pool_shrink": _server_closing,
    "server_connect_failed": _server_login_failed,
    "stats": _stats,
    "reserve_pool_taken": _reserve_pool_taken,
    "query_timeout": _query_timeout,
    "pool_idle_removed": _pool_idle_removed,
    "auto_database_registered": _auto_database,
    "process_up": _process_up,
    "unsupported_settings": _unsupported,
    "login_config_error": _login_config_error,
    "tls_setup_failed": _tls_setup_failed,
}


def render(event: str, level: int, fields: Mapping[str, Any], events: LogEvents) -> list[Line]:
    """The PgBouncer-format messages for one pgmux event (none when filtered out)."""
    special = EVENTS.get(event)
    if special is not None:
        return special(fields, events)
    return [(level, _generic(event, fields))]


def _generic(event: str, fields: Mapping[str, Any]) -> str:
    skip: tuple[str, ...]
    if "client" in fields and "db" in fields:
        prefix, skip = client_prefix(fields), _CLIENT_KEYS
    elif "server" in fields and "ptr" in fields:
        prefix, skip = server_prefix(fields), _SERVER_KEYS
    else:
        prefix, skip = "", ()
    rest = " ".join(f"{k}={_value(v)}" for k, v in fields.items() if k not in skip)
    return f"{prefix}{event}: {rest}" if rest else f"{prefix}{event}"


def _value(value: Any) -> str:
    text = str(value)
    if "\n" in text:
        return text  # a traceback: continued on tab-indented lines, as PgBouncer does
    return repr(text) if (" " in text or not text) else text

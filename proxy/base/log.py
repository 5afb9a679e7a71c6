"""structlog setup: one line per event, as JSON, console text or PgBouncer's format.

Events carry the client address, database, user and application_name; no
secret is ever passed to a logger (callers log names, never passwords), and
fields whose name says "password" or "secret" are masked here all the same.
Lines go to stderr, and to a log file and syslog when configured (logsink.py);
`format: pgbouncer` (the default when started from a pgbouncer.ini) writes
PgBouncer's lines (pgblog.py).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

from pgmux.proxy.base.logsink import LogFileError, LogOutputs, LogSink
from pgmux.proxy.base.pgblog import LogEvents, format_line, render

__all__ = [
    "LogEvents",
    "LogFileError",
    "LogOutputs",
    "configure_logging",
    "current_outputs",
    "get_logger",
    "reopen_logs",
    "update_logging",
]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_MASK = "********"


class _State:
    sink: LogSink = LogSink(LogOutputs())
    events: LogEvents = LogEvents()


def configure_logging(
    fmt: str = "json",
    level: str = "info",
    outputs: LogOutputs | None = None,
    events: LogEvents | None = None,
) -> None:
    """Set format and level; OUTPUTS and EVENTS, when given, replace the
    destinations and the PgBouncer event switches (LogFileError when the log
    file cannot be opened)."""
    if outputs is not None:
        sink = LogSink(outputs)
        old, _State.sink = _State.sink, sink
        old.close()
    if events is not None:
        _State.events = events
    renderer: structlog.typing.Processor
    if fmt == "pgbouncer":
        renderer = _render_pgbouncer
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    stamps: list[structlog.typing.Processor] = []
    if fmt != "pgbouncer":
        stamps = [structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *stamps,
            structlog.processors.format_exc_info,
            _mask_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=_SinkLogger,
        cache_logger_on_first_use=False,
    )


def update_logging(outputs: LogOutputs, events: LogEvents) -> None:
    """New destinations (only if they changed: the file stays open otherwise)
    and event switches; format and level stay (LogFileError)."""
    if outputs != _State.sink.outputs:
        sink = LogSink(outputs)
        old, _State.sink = _State.sink, sink
        old.close()
    _State.events = events


def current_outputs() -> LogOutputs:
    return _State.sink.outputs


def reopen_logs() -> None:
    """SIGHUP: open the log file again (after logrotate moved it away)."""
    _State.sink.reopen()


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)


def _mask_secrets(
    logger: object, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in event_dict:
        lowered = key.lower()
        if "password" in lowered or "secret" in lowered or lowered == "passwd":
            event_dict[key] = _MASK
    if "value" in event_dict and "password" in str(event_dict.get("key", "")).lower():
        event_dict["value"] = _MASK  # console SET of a password setting
    return event_dict


def _render_pgbouncer(
    logger: object, method: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[object, ...], dict[str, Any]]:
    event = str(event_dict.pop("event", ""))
    level = _LEVELS.get(str(event_dict.pop("level", "info")), logging.INFO)
    return (render(event, level, event_dict, _State.events),), {}


class _SinkLogger:
    """structlog's logger: hands rendered lines to the current LogSink."""

    def __init__(self, *args: object) -> None:
        pass

    def _write(self, level: int, rendered: object) -> None:
        sink = _State.sink
        if isinstance(rendered, list):  # PgBouncer format: (level, message) pairs
            for line_level, message in rendered:
                sink.write(format_line(line_level, message), line_level, message)
        else:
            text = str(rendered)
            sink.write(text, level, text)

    def debug(self, rendered: object) -> None:
        self._write(logging.DEBUG, rendered)

    def info(self, rendered: object) -> None:
        self._write(logging.INFO, rendered)

    msg = info

    def warning(self, rendered: object) -> None:
        self._write(logging.WARNING, rendered)

    def error(self, rendered: object) -> None:
        self._write(logging.ERROR, rendered)

    exception = error
    err = error

    def critical(self, rendered: object) -> None:
        self._write(logging.CRITICAL, rendered)

    fatal = critical

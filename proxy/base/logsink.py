"""Where log lines go: stderr, a log file (PgBouncer's `logfile`), syslog.

The file is opened with O_APPEND and each line is one write(2), so the
workers of `listen.workers`, which all inherit it, never interleave within
a line. `reopen()` (SIGHUP) opens the path again: after logrotate renamed
the file, new lines go to a fresh file at the configured path.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from dataclasses import dataclass

SYSLOG_SOCKET = "/dev/log"
SYSLOG_SOCKET_ENV = "PGMUX_SYSLOG_SOCKET"  # another syslog socket (a container's, a test's)
_FILE_MODE = 0o640
_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True, slots=True)
class LogOutputs:
    """The destinations of the log (PgBouncer's logfile, syslog and -q)."""

    stderr: bool = True
    file: str | None = None
    syslog: bool = False
    syslog_ident: str = "pgmux"
    syslog_facility: str = "daemon"


class LogFileError(Exception):
    """The log file cannot be opened (PgBouncer exits then too)."""


class LogSink:
    """Writes whole lines to every destination in OUTPUTS."""

    def __init__(self, outputs: LogOutputs) -> None:
        self.outputs = outputs
        self._fd = -1
        self._syslog: logging.handlers.SysLogHandler | None = None
        if outputs.file:
            self._fd = _open(outputs.file)
        if outputs.syslog:
            self._syslog = _syslog_handler(outputs.syslog_ident, outputs.syslog_facility)

    def write(self, line: str, level: int, message: str) -> None:
        """LINE goes to stderr and the file; MESSAGE (no time, no pid: syslog
        adds its own) to syslog with LEVEL's priority."""
        if self.outputs.stderr:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._fd, (line + "\n").encode("utf-8", "replace"))
        if self._syslog is not None and level >= logging.INFO:  # as PgBouncer: no debug
            self._syslog.emit(
                logging.makeLogRecord(
                    {"msg": message, "levelno": level, "levelname": logging.getLevelName(level)}
                )
            )

    def reopen(self) -> None:
        """Open the log file again at its path (logrotate renamed the old one)."""
        path = self.outputs.file
        if not path:
            return
        try:
            fd = _open(path)
        except LogFileError as exc:
            self.write(f"pgmux: {exc}", logging.ERROR, str(exc))
            return  # keep writing to the old file rather than nowhere
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None


def _open(path: str) -> int:
    try:
        return os.open(path, _FILE_FLAGS, _FILE_MODE)
    except OSError as exc:
        raise LogFileError(f"cannot open logfile {path!r}: {exc.strerror}") from None


_FACILITIES = {
    name: getattr(logging.handlers.SysLogHandler, f"LOG_{name.upper()}")
    for name in ("auth", "authpriv", "daemon", "user", *(f"local{i}" for i in range(8)))
}


def syslog_facility(name: str) -> int:
    """PgBouncer's facility names; an unknown one is daemon, as in PgBouncer."""
    return _FACILITIES.get(name.strip().lower(), logging.handlers.SysLogHandler.LOG_DAEMON)


class _IdentFormatter(logging.Formatter):
    """`ident[pid]: message`, the pid read per line (workers are forked)."""

    def __init__(self, ident: str) -> None:
        super().__init__()
        self.ident = ident

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.ident}[{os.getpid()}]: {record.getMessage()}"


class _SysLog(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        pass  # syslog gone: the line still reached stderr and the file


def _syslog_handler(ident: str, facility: str) -> logging.handlers.SysLogHandler | None:
    """A handler to /dev/log, or None when there is no syslog daemon to talk to."""
    path = os.environ.get(SYSLOG_SOCKET_ENV) or SYSLOG_SOCKET
    if not os.path.exists(path):
        return None
    try:
        handler = _SysLog(path, syslog_facility(facility))
    except OSError:
        return None
    handler.setFormatter(_IdentFormatter(ident))
    handler.append_nul = False
    return handler

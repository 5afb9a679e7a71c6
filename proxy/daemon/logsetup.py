"""The logging section of a Config applied to the log (proxy/base/log.py):
at startup with the command line's -v / -q, and again on every reload, so a
changed logfile, syslog or log_* setting takes effect as with PgBouncer."""

from __future__ import annotations

from pgmux.proxy.base.log import (
    LogEvents,
    LogFileError,
    LogOutputs,
    configure_logging,
    current_outputs,
    get_logger,
    update_logging,
)
from pgmux.proxy.config import Config
from pgmux.proxy.config.model import LoggingConfig

_LEVELS = ("error", "warning", "info", "debug")


def log_level(
    configured: str, verbosity: int = 0, quiet: bool = False, elsewhere: bool = False
) -> str:
    """logging.level, raised one step per -v, or warning with -q when stderr
    is the only destination (ELSEWHERE: a log file or syslog gets every line)."""
    if quiet and not elsewhere:
        return "warning"
    index = _LEVELS.index(configured) if configured in _LEVELS else 2
    return _LEVELS[min(index + verbosity, len(_LEVELS) - 1)]


def setup_logging(config: Config, verbosity: int = 0, quiet: bool = False) -> None:
    """Format, level, destinations and event switches at startup (LogFileError)."""
    settings = config.logging
    elsewhere = bool(settings.file) or settings.syslog
    outputs = _outputs(settings, stderr=not (quiet and elsewhere))
    level = log_level(settings.level, verbosity, quiet, elsewhere)
    configure_logging(settings.format, level, outputs, _events(settings))


def refresh_logging(config: Config) -> None:
    """A reload: the new destinations and switches (stderr and the level as
    they were: the command line chose them). A log file that cannot be
    opened is logged, and the old destinations stay."""
    stderr = current_outputs().stderr
    try:
        update_logging(_outputs(config.logging, stderr), _events(config.logging))
    except LogFileError as exc:
        get_logger("pgmux.lifecycle").error("logfile_failed", error=str(exc))


def _outputs(settings: LoggingConfig, stderr: bool) -> LogOutputs:
    return LogOutputs(
        stderr=stderr,
        file=settings.file,
        syslog=settings.syslog,
        syslog_ident=settings.syslog_ident,
        syslog_facility=settings.syslog_facility,
    )


def _events(settings: LoggingConfig) -> LogEvents:
    return LogEvents(
        connections=settings.connections,
        disconnections=settings.disconnections,
        pooler_errors=settings.pooler_errors,
        stats=settings.stats,
    )

"""What the console may ask of the running daemon: RELOAD, SHUTDOWN, the config.

The daemon (proxy/daemon/lifecycle.py) is the implementation; the registry
holds it as a Control so that the console, which sits below the daemon,
reaches it without importing it. PgBouncer's admin.c calls the same
functions directly (load_config, the shutdown paths of main.c).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pgmux.proxy.config import Config


class Control(Protocol):
    config: Config  # the daemon's running configuration; a console SET swaps it
    # "WAIT_FOR_CLIENTS" / "WAIT_FOR_SERVERS" while PgBouncer's shutdown runs
    # (shutdown: pgbouncer): only console logins are taken, RESUME is refused.
    pgbouncer_shutdown: str | None

    def reload(self) -> None:
        """Read the configuration file again and apply it (RELOAD, SIGHUP)."""

    def shutdown(self, signame: str = "SIGTERM") -> None:
        """Stop accepting, drain, then stop: SIGTERM's way (WAIT_FOR_CLIENTS)
        or SIGINT's (WAIT_FOR_SERVERS), as SIGNAME says."""

    def stop_now(self) -> None:
        """Close every client and server at once (SIGQUIT, plain SHUTDOWN)."""


def pgbouncer_shutdown(control: Control | None) -> str | None:
    """PgBouncer's shutdown under way (its mode), else None; also without a daemon."""
    return None if control is None else control.pgbouncer_shutdown

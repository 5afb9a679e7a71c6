"""systemd's notification protocol, spoken directly (no libsystemd).

With `Type=notify`, systemd passes the path of a unix datagram socket in
$NOTIFY_SOCKET; each datagram is newline-separated KEY=VALUE lines (READY=1,
RELOADING=1, STOPPING=1, STATUS=..., WATCHDOG=1). A path starting with "@" is
in the abstract namespace. Without $NOTIFY_SOCKET every call does nothing, so
pgmux runs the same in a terminal, a container or under systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from pgmux.proxy.base.log import get_logger

log = get_logger("pgmux.sdnotify")


def _address(path: str) -> str | bytes:
    if path.startswith("@"):
        return b"\0" + path[1:].encode()  # abstract namespace
    return path


class Notifier:
    """Sends state changes to systemd and feeds its watchdog."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.path = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False (logged once per failure) if it could not go."""
        if self.path is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode() + b"\n", _address(self.path))
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc), message=lines[0] if lines else "")
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *_status(status))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd match this RELOADING=1 to the ExecReload it ran.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self, status: str = "") -> None:
        self.notify("STOPPING=1", *_status(status))

    def status(self, status: str) -> None:
        self.notify(*_status(status))

    # --- watchdog -----------------------------------------------------

    def start_watchdog(self) -> None:
        """Send WATCHDOG=1 at half of WATCHDOG_USEC while the event loop runs."""
        if self.path is None or not self.watchdog_interval or self._watchdog is not None:
            return
        self._watchdog = asyncio.ensure_future(self._feed_watchdog(self.watchdog_interval / 2))

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _feed_watchdog(self, every: float) -> None:
        # Sent from the event loop itself: a stuck loop stops the pings, and
        # systemd restarts the service.
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(every)

    def close(self) -> None:
        self.stop_watchdog()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> tuple[str, ...]:
    return (f"STATUS={text}",) if text else ()


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float:
    """WATCHDOG_USEC in seconds, if it is meant for this process (WATCHDOG_PID)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0.0
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0.0
    return usec / 1_000_000 if usec > 0 else 0.0

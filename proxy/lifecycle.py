"""The daemon's life: start, signals, reload, shutdown.

SIGTERM: stop accepting, let running transactions finish (up to
timeouts.shutdown_grace), then exit 0; a second SIGTERM exits at once.
SIGINT: the same, waiting for every server to be released. SIGQUIT: now.
SIGHUP: reload the configuration and the users file; a bad file is logged and
the running configuration stays.
"""

from __future__ import annotations

import asyncio
import signal
import time

from .config import Config, ConfigError, load_config
from .janitor import Janitor
from .listener import Listener
from .log import get_logger
from .tasks import spawn
from .registry import Registry
from .userlist import load_users_file

log = get_logger("pgmux.lifecycle")


def load_users(config: Config) -> dict[str, str]:
    return load_users_file(config.auth.users_file) if config.auth.users_file else {}


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = Registry(config, load_users(config))
        self.listener = Listener(self.registry)
        self.janitor = Janitor(self.registry)
        self._stopped: asyncio.Future[int] | None = None
        self._stopping = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        await self.listener.start()
        self.registry.create_configured_pools()
        self.janitor.start()
        self._install_signals(loop)
        log.info("ready", config=self.config.path)
        code = await self._stopped
        self.janitor.stop()
        return code

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.shutdown, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.shutdown, "SIGINT")
        loop.add_signal_handler(signal.SIGQUIT, self.stop_now)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    # --- shutdown ---------------------------------------------------------

    def shutdown(self, signame: str = "SIGTERM") -> None:
        if self._stopping:
            log.info("shutdown_immediate", signal=signame)
            self.stop_now()
            return
        self._stopping = True
        log.info("shutdown_started", signal=signame)
        self.listener.close()
        self.registry.shutting_down = True
        spawn(self._drain())

    async def _drain(self) -> None:
        grace = self.config.timeouts.shutdown_grace
        deadline = time.monotonic() + grace if grace else float("inf")
        while time.monotonic() < deadline and self._busy():
            self._close_idle_clients()
            await asyncio.sleep(0.05)
        self.stop_now()

    def _busy(self) -> bool:
        return any(pool.active or pool.waiting for pool in self.registry.pools.values())

    def _close_idle_clients(self) -> None:
        for client in list(self.registry.clients):
            if client.server is None and not client.wait_started:
                client.fail("57P01", "terminating connection due to administrator command")

    def stop_now(self) -> None:
        self.listener.close()
        for client in list(self.registry.clients):
            client.fail("57P01", "terminating connection due to administrator command")
        for pool in self.registry.pools.values():
            pool.close()
            for server in list(pool.servers):
                pool.close_server(server, "shutdown")
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(0)

    # --- reload -----------------------------------------------------------

    def reload(self) -> None:
        path = self.config.path
        try:
            config = load_config(path) if path else self.config
            users = load_users(config)
        except (ConfigError, OSError) as exc:
            log.error("reload_failed", error=str(exc), keeping="running configuration")
            return
        self.apply(config, users)
        log.info("reload", config=path)

    def apply(self, config: Config, users: dict[str, str]) -> None:
        """Swap in a new configuration; pools whose database changed drain."""
        registry = self.registry
        registry.users = users
        for (dbname, _user), pool in list(registry.pools.items()):
            database = config.database(dbname)
            if database != pool.database:
                # Changed or removed: its servers finish their transactions and
                # close; clients that log in later get a fresh pool.
                pool.close()
                for server in pool.active:
                    server.close_when_released = True
                del registry.pools[(dbname, _user)]
        self.config = config
        registry.config = config
        registry.create_configured_pools()

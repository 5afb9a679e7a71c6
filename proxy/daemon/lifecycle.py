"""The daemon's life: start, signals, reload, shutdown.

SIGTERM: stop accepting, let running and queued transactions finish (up to
timeouts.shutdown_grace), close each client with 57P01 at its transaction
boundary, then exit 0; a second SIGTERM exits at once. That is a rolling
restart behind a load balancer (docs/scaling.md): /ready turns false at once.
SIGINT: stop accepting, refuse queued requests, wait (up to the same grace)
for every server to be released. Under `shutdown: pgbouncer` (a pgbouncer.ini)
both are PgBouncer's instead: only the TCP listeners close, the unix socket
takes console logins (and refuses others, proxy/login.py) until the end;
SIGTERM serves every connected client until the last one leaves, SIGINT lets
a client holding a server go on, closes one that asks for a server, and exits
once no server is in use; a second signal drops every socket at once, without
a message. SIGQUIT: now. SIGUSR1 / SIGUSR2: PAUSE /
RESUME. SIGHUP: reload the configuration and the users file; a bad file is
logged and the running configuration stays. Each step is told to systemd
(proxy/base/sdnotify.py) when it runs pgmux as a Type=notify service.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable

from pgmux.proxy.base.log import get_logger, reopen_logs
from pgmux.proxy.base.sdnotify import Notifier
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import Config, ConfigError, load_config
from pgmux.proxy.config.hba import Hba
from pgmux.proxy.config.tls import TlsContexts, TlsSetupError, load_security
from pgmux.proxy.config.userlist import load_users
from pgmux.proxy.daemon import budget
from pgmux.proxy.daemon.janitor import Janitor
from pgmux.proxy.daemon.listener import Listener
from pgmux.proxy.daemon.logsetup import refresh_logging
from pgmux.proxy.daemon.peers import WorkerInfo
from pgmux.proxy.datapath.client import ClientConnection
from pgmux.proxy.metrics import Observer, Workers
from pgmux.proxy.registry import Registry

log = get_logger("pgmux.lifecycle")


class PidfileError(Exception):
    pass


# The signals the daemon handles (see the module docstring).
CONTROL_SIGNALS = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)


def write_pidfile(path: str) -> None:
    """Write our pid; refuse if the file names another pgmux still running."""
    try:
        with open(path) as file:
            other = int(file.read().strip() or 0)
    except (OSError, ValueError):
        other = 0
    if other and other != os.getpid() and _alive(other):
        raise PidfileError(f"{path}: pgmux is already running (pid {other})")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as file:
            file.write(f"{os.getpid()}\n")
        os.replace(tmp, path)  # never a half-written file
    except OSError as exc:
        raise PidfileError(f"{path}: cannot write the pidfile: {exc.strerror}") from None


def remove_pidfile(path: str) -> None:
    """Remove the pidfile if it is still ours."""
    try:
        with open(path) as file:
            if file.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass


def _unexpected(exc: BaseException) -> str:
    return f"unexpected {type(exc).__name__}: {exc}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _drop(client: ClientConnection) -> None:
    """Close a client without a word, as PgBouncer's exit does."""
    if client.transport is not None:
        client.transport.close()
    client.closed("terminating connection due to administrator command")


class Daemon:
    after_bind: Callable[[], None] | None = None  # run once listening (cli's -u drops root)

    def __init__(self, config: Config, worker: WorkerInfo | None = None) -> None:
        self.config = config
        self.worker = worker  # one of listen.workers processes (daemon/peers.py)
        self.registry = Registry(config, load_users(config))
        self.registry.tls, self.registry.hba = load_security(config)
        self.registry.worker = worker
        self.registry.ledger = worker.ledger if worker is not None else None
        self.registry.control = self  # the console's RELOAD / SHUTDOWN
        self.registry.cancels.fleet = config.peers  # peering: keys name this instance
        # stats period, /metrics /health /ready
        self.observer = Observer(
            self.registry,
            listening=lambda: bool(self.listener.servers) and not self._stopping,
            workers=Workers(worker.index, worker.metrics_of_others) if worker else None,
        )
        if worker is not None:  # worker 0's /metrics asks this worker for its text
            worker.local_metrics = self.observer.http.exposition
        self.listener = Listener(self.registry)
        self.janitor = Janitor(self.registry)
        # Under listen.workers > 1 the supervisor is systemd's main process.
        self.notifier = Notifier({} if worker is not None else None)
        self._stopped: asyncio.Future[int] | None = None
        self._stopping = False
        self._refuse_waiting = False
        # PgBouncer's WAIT_FOR_CLIENTS / WAIT_FOR_SERVERS under way (shutdown: pgbouncer)
        self.pgbouncer_shutdown: str | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        # Before listening: a client may connect (and a supervisor signal) at once.
        self._install_signals(loop)
        await self.listener.start(self.worker.sockets if self.worker else None)
        if self.after_bind is not None:
            self.after_bind()
        if self.worker is not None:
            await self.worker.start(self.registry)
        self.registry.create_configured_pools()
        self.janitor.start()
        await self.observer.start()
        log.info("ready", config=self.config.path)
        # Only a fleet asks PostgreSQL at startup: one instance opens no
        # connection before a client needs one (its budget is --check's to tell).
        first_worker = self.worker is None or self.worker.index == 0
        if first_worker and self.config.peers.members:
            spawn(self._report_budget())
        self.notifier.ready(self.status())
        self.notifier.start_watchdog()
        try:
            return await self._stopped
        finally:
            self.janitor.stop()
            await self.observer.stop()  # last: /health answered through the drain
            self.notifier.close()

    async def _report_budget(self) -> None:
        """The fleet's server budget against PostgreSQL's max_connections, logged."""
        lines, warnings = await budget.report(self.config, self.registry.users)
        log.info("server_budget", detail="; ".join(lines))
        for warning in warnings:
            log.warning("server_budget_exceeded", detail=warning)

    def status(self) -> str:
        """One line for systemctl status (STATUS=...)."""
        registry = self.registry
        servers = sum(len(pool.servers) for pool in registry.pools.values())
        return f"{len(registry.clients)} clients, {servers} servers, {len(registry.pools)} pools"

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.shutdown, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.shutdown, "SIGINT")
        loop.add_signal_handler(signal.SIGQUIT, self.stop_now)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.pause)
        loop.add_signal_handler(signal.SIGUSR2, self.resume)
        # pgmux starts with these blocked (cli.py, supervisor.py); now they can arrive.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)

    def pause(self) -> None:
        log.info("pause", signal="SIGUSR1")
        self.registry.pause()

    def resume(self) -> None:
        if self.pgbouncer_shutdown is not None:
            log.info("resume_ignored", signal="SIGUSR2", reason="shutting down")
            return
        log.info("resume", signal="SIGUSR2")
        self.registry.resume()

    # --- shutdown ---------------------------------------------------------

    def shutdown(self, signame: str = "SIGTERM") -> None:
        if self._stopping:
            log.info("shutdown_immediate", signal=signame)
            self.stop_now()
            return
        if self.config.shutdown == "pgbouncer":
            self._shutdown_pgbouncer(signame)
            return
        self._stopping = True
        # SIGINT waits only for the servers in use; SIGTERM also lets queued
        # requests run (PgBouncer's WAIT_FOR_SERVERS / WAIT_FOR_CLIENTS).
        self._refuse_waiting = signame == "SIGINT"
        log.info("shutdown_started", signal=signame, grace=self.config.timeouts.shutdown_grace)
        self.notifier.stopping(f"shutting down ({signame}): {self.status()}")
        # In one step of the loop: the listening sockets close (the balancer or
        # SO_REUSEPORT sends new connections elsewhere), /ready turns false, and
        # every client between transactions gets 57P01; the rest go at their
        # transaction boundary (ClientConnection.transaction_done).
        self.listener.close()
        self.registry.shutting_down = True
        self._close_idle_clients()
        spawn(self._drain())

    async def _drain(self) -> None:
        grace = self.config.timeouts.shutdown_grace
        deadline = time.monotonic() + grace if grace else float("inf")
        while time.monotonic() < deadline and self._busy():
            self._close_idle_clients()
            await asyncio.sleep(0.05)
        self.stop_now()

    def _shutdown_pgbouncer(self, signame: str) -> None:
        """PgBouncer's shutdown (main.c handle_sigterm / handle_sigint, the
        janitor's exit checks): TCP stops, connected clients are served."""
        self._stopping = True
        mode = "WAIT_FOR_SERVERS" if signame == "SIGINT" else "WAIT_FOR_CLIENTS"
        self.pgbouncer_shutdown = mode
        log.info(
            "shutdown_started", signal=signame, mode=mode, grace=self.config.timeouts.shutdown_grace
        )
        self.notifier.stopping(f"shutting down ({signame}): {self.status()}")
        self._close_tcp_listeners()
        if mode == "WAIT_FOR_SERVERS":
            self.registry.pause()  # new transactions queue, and are closed there
        spawn(self._wait_pgbouncer(mode))

    def _close_tcp_listeners(self) -> None:
        """Stop accepting on TCP; the unix socket stays for the console."""
        kept = []
        for server in self.listener.servers:
            if any(sock.family == socket.AF_UNIX for sock in server.sockets):
                kept.append(server)
            else:
                server.close()
        self.listener.servers[:] = kept

    async def _wait_pgbouncer(self, mode: str) -> None:
        grace = self.config.timeouts.shutdown_grace
        deadline = time.monotonic() + grace if grace else float("inf")
        while time.monotonic() < deadline:
            if mode == "WAIT_FOR_CLIENTS":
                if not self.registry.clients:
                    log.info("shutdown_done", reason="client connections dropped")
                    break
            else:
                self._close_waiting_clients()
                if not any(pool.active or pool.being_canceled for pool in self._pools()):
                    log.info("shutdown_done", reason="server connections dropped")
                    break
            await asyncio.sleep(0.05)
        self.stop_now()

    def _close_waiting_clients(self) -> None:
        """WAIT_FOR_SERVERS: a client that asked for a server gets none
        (PgBouncer's pause_client: "server shutting down")."""
        for pool in self._pools():
            for client in list(pool.waiting):
                client.fail("57P01", "terminating connection due to administrator command")

    def _pools(self) -> list:  # list[Pool], the draining ones included
        return [*self.registry.pools.values(), *self.janitor.draining]

    def _busy(self) -> bool:
        return any(pool.active or pool.waiting for pool in self._pools())

    def _close_idle_clients(self) -> None:
        """57P01 for every client between transactions: without a server, or
        keeping one (session mode, pinned session state) outside a transaction
        with nothing asked of it; the pool takes that server back clean.
        Console sessions stay to watch the drain (the one that ran SHUTDOWN
        gets its answer) and go at the end."""
        for client in list(self.registry.clients):
            if client.console is not None:
                continue
            server = client.server
            if server is None:
                idle = self._refuse_waiting or not client.running
            else:
                idle = server.clean_for_release and not client.running and not client.mid_message
            if idle:
                client.fail("57P01", "terminating connection due to administrator command")

    def stop_now(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.notifier.stopping("stopping now")
        log.info("shutdown_now", clients=len(self.registry.clients))
        self.listener.close()
        quiet = self.pgbouncer_shutdown is not None  # PgBouncer exits: sockets just drop
        for client in list(self.registry.clients):
            if quiet:
                _drop(client)
            else:
                client.fail("57P01", "terminating connection due to administrator command")
        for pool in self._pools():
            pool.close()
            for server in list(pool.servers):
                pool.close_server(server, "shutdown")
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(0)

    # --- reload -----------------------------------------------------------

    def reload(self) -> None:
        """Re-read the configuration; whatever goes wrong keeps the running one,
        and systemd always hears READY=1 again (else it stays "reloading")."""
        path = self.config.path
        reopen_logs()  # after logrotate renamed the log file, as PgBouncer does
        self.notifier.reloading()  # systemd: reloading until the next READY=1
        try:
            config, users, security = self._read_new_config(path)
        except TlsSetupError as exc:
            log.error("tls_setup_failed", error=str(exc))
            self._reload_failed(str(exc), "running configuration kept")
            return
        except (ConfigError, OSError) as exc:
            self._reload_failed(str(exc), "running configuration kept")
            return
        except Exception as exc:  # a bug must not leave systemd "reloading" either
            self._reload_failed(
                _unexpected(exc), "running configuration kept", traceback.format_exc()
            )
            return
        if self.config.databases and not config.databases:
            # Valid (a console-only pgmux), but more often a file cut short.
            log.warning("reload_without_databases", config=path, before=len(self.config.databases))
        try:
            self.apply(config, users)
            self.registry.tls, self.registry.hba = security
            refresh_logging(config)  # logfile, syslog, log_* as the new file says
        except Exception as exc:
            self._reload_failed(
                _unexpected(exc), "new configuration partly applied", traceback.format_exc()
            )
            return
        log.info("reload", config=path)
        self.notifier.ready(self.status())

    def _read_new_config(
        self, path: str | None
    ) -> tuple[Config, dict[str, str], tuple[TlsContexts, Hba | None]]:
        """The new configuration, users and TLS/hba; only reads, changes nothing."""
        config = load_config(path) if path else self.config
        if self.worker is not None:
            config = self.worker.shape(config)  # this worker's share of the login guard
        return config, load_users(config), load_security(config)

    def _reload_failed(self, reason: str, keeping: str, trace: str | None = None) -> None:
        if trace is None:
            log.error("reload_failed", error=reason, keeping=keeping)
        else:
            log.error("reload_failed", error=reason, keeping=keeping, traceback=trace)
        self.notifier.ready(f"reload failed, {keeping}: {self.status()}")

    def apply(self, config: Config, users: dict[str, str]) -> None:
        """Swap in a new configuration without dropping connected clients.

        A pool whose database is gone (or now logs in as another forced user)
        drains: its clients finish their transactions, then it closes. A pool
        whose database changed is reconfigured in place (Pool.reconfigure).
        New databases need nothing: pools appear as clients ask for them.
        """
        registry = self.registry
        if config.listen != self.config.listen:
            log.warning("reload_listen_ignored", reason="listen settings need a restart")
        registry.users = users
        self.config = config
        registry.config = config
        registry.cancels.fleet = config.peers  # keys issued so far keep their peer id
        for key, pool in list(registry.pools.items()):
            dbname = key[0]
            database = config.database(dbname)
            if database is None or database.user != pool.database.user:
                del registry.pools[key]
                log.info("pool_draining", db=dbname, user=pool.user)
                self.janitor.drain(pool)
                continue
            settings, credentials = registry.pool_setup(dbname, database, pool.user)
            current = (pool.database, pool.settings, pool.credentials)
            if (database, settings, credentials) != current:
                pool.reconfigure(database, credentials, settings)
            pool.timeouts = registry.pool_timeouts(database, pool.user)  # [users] timeouts
        registry.create_configured_pools()

"""The console's commands (PgBouncer's admin.c): SHOW, PAUSE ... SHUTDOWN, SET.

A Commands object runs the statements of one console connection, or one
statement another worker's console passed on (run_replayed). Users in
admin.users may run everything, admin.stats_users only SHOW. With
listen.workers > 1 the commands that change state run on every worker
(the ones in ON_EVERY_WORKER, and SET); SHOW merges every worker's rows
(gather.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pgmux.protocol import sqlstate
from pgmux.protocol.rows import TEXT
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.config import ADMIN_DATABASES
from pgmux.proxy.console.errors import ConsoleError, syntax_error
from pgmux.proxy.console.gather import MERGED
from pgmux.proxy.console.settings import FAKE_PARAMS, TLS_NOT_APPLIED, TlsNotApplied, set_setting
from pgmux.proxy.console.show import SHOW, Result
from pgmux.proxy.console.show_sockets import MORE_SHOW
from pgmux.proxy.core.control import pgbouncer_shutdown

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.admin")

WAIT_POLL = 0.05  # seconds between checks while PAUSE / WAIT_CLOSE wait

_WORD = r"""("(?:[^"]|"")+"|[^\s;'"=]+)"""
_COMMAND = re.compile(rf"^\s*{_WORD}(?:\s+{_WORD})?\s*$", re.IGNORECASE)
_SET = re.compile(
    rf"""^\s*set\s+{_WORD}\s*(?:=|\s+to\s+|\s+to$)\s*({_WORD}|'(?:[^']|'')*')\s*$""",
    re.IGNORECASE,
)

# Commands that act on every worker (the others run them via run_replayed).
ON_EVERY_WORKER = {
    "disable", "enable", "kill", "pause", "reconnect", "reload", "resume", "suspend", "wait_close",
}  # fmt: skip


def _bare(query: str) -> str:
    """The statement without surrounding blanks and its final semicolon."""
    return query.strip().rstrip(";").strip()


def _unquote(word: str, quote: str) -> str:
    if len(word) >= 2 and word[0] == quote and word[-1] == quote:
        return word[1:-1].replace(quote * 2, quote)
    return word


def show_argument(query: str) -> str | None:
    """What a SHOW statement shows, or None for any other statement."""
    match = _COMMAND.match(_bare(query))
    if match is None or _unquote(match.group(1), '"').lower() != "show":
        return None
    return _unquote(match.group(2), '"') if match.group(2) else ""


class Commands:
    """Runs console statements for CLIENT (None: one passed on by another worker)."""

    def __init__(
        self, registry: Registry, is_admin: bool, client: ClientConnection | None = None
    ) -> None:
        self.registry = registry
        self.is_admin = is_admin
        self.client = client

    @property
    def closed(self) -> bool:
        """The console connection went away (a waiting PAUSE stops waiting)."""
        if self.client is None:
            return False
        transport = self.client.transport
        return transport is None or transport.is_closing()

    async def execute(self, query: str) -> Result:
        if self.client is not None:  # not one passed on: that counted where it ran
            stats = self.registry.console_stats
            stats.total_xact_count += 1  # a console command is a transaction, as in PgBouncer
            stats.total_query_count += 1
        text = _bare(query)
        match = _COMMAND.match(text)
        if match is not None:
            word = _unquote(match.group(1), '"').lower()
            arg = _unquote(match.group(2), '"') if match.group(2) else ""
            handler = _COMMANDS.get(word)
            if handler is None:
                raise syntax_error(query)
            if word != "show":
                log.info("console_command", command=word.upper(), arg=arg, **self._who())
            if word in ON_EVERY_WORKER:
                return await self._everywhere(handler(self, arg), text)
            return await handler(self, arg)
        match = _SET.match(text)
        if match is not None:
            key = _unquote(match.group(1), '"')
            value = match.group(2)
            value = _unquote(value, "'") if value.startswith("'") else _unquote(value, '"')
            result = self._set(key, value)
            if result.notice is None:  # a real setting, not one of the ignored ones
                await self._on_other_workers(text)
            return result
        raise syntax_error(query)

    def preview(self, query: str) -> Result | None:
        """The columns a statement will return, without running a command."""
        arg = show_argument(query)
        if arg is None:
            return None
        try:
            return self._show(arg)
        except ConsoleError:
            return None

    # --- on every worker ---------------------------------------------------------

    async def _everywhere(self, here: Awaitable[Result], text: str) -> Result:
        """Run a command here and on every other worker (listen.workers > 1),
        at the same time, so PAUSE waits for all workers' servers at once."""
        local = asyncio.ensure_future(here)
        await self._on_other_workers(text)
        return await local

    async def _on_other_workers(self, text: str) -> None:
        worker = self.registry.worker
        if worker is None or self.client is None or not self.is_admin:
            return  # alone, passed on from another worker, or refused here
        for error in await worker.run_everywhere(text):
            if error is not None:
                log.warning("console_command_on_worker_failed", error=error, **self._who())

    def _who(self) -> dict[str, str]:
        if self.client is None:
            return {"client": "another worker's console", "user": ""}
        return {"client": self.client.peer, "user": self.client.user}

    # --- checks ------------------------------------------------------------------

    def _need_admin(self) -> None:
        if not self.is_admin:
            raise ConsoleError(sqlstate.INSUFFICIENT_PRIVILEGE, "admin access needed")

    def _database(self, name: str, verb: str) -> str:
        if name in ADMIN_DATABASES:
            raise ConsoleError(
                sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, f"cannot {verb} admin db: {name}"
            )
        if self.registry.config.database(name) is None:
            raise ConsoleError(sqlstate.INVALID_CATALOG_NAME, f"no such database: {name}")
        return name

    def _not_paused(self) -> None:
        if self.registry.paused or self.registry.suspended:
            raise ConsoleError(
                sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, "already suspended/paused"
            )

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done() and not self.closed:
            await asyncio.sleep(WAIT_POLL)

    # --- the commands ------------------------------------------------------------

    def _show(self, arg: str) -> Result:
        name = arg.lower()
        if name in FAKE_PARAMS:
            return Result("SHOW", [(name, TEXT)], [(FAKE_PARAMS[name],)])
        show = SHOW.get(name) or MORE_SHOW.get(name)
        if show is None:
            raise syntax_error(f"SHOW {arg}".strip())
        return show(self.registry, time.monotonic())

    async def cmd_show(self, arg: str) -> Result:
        result = self._show(arg)
        worker = self.registry.worker
        if worker is not None and arg.lower() in MERGED:
            result = await worker.gather_show(arg.lower(), result)  # every worker's rows
        return result

    async def cmd_pause(self, arg: str) -> Result:
        self._need_admin()
        self._not_paused()
        db = self._database(arg, "pause") if arg else None
        self.registry.pause(db)
        await self._wait(lambda: self.registry.pause_done(db))
        return Result("PAUSE")

    async def cmd_resume(self, arg: str) -> Result:
        self._need_admin()
        registry = self.registry
        if arg:
            if arg not in registry.paused_databases:
                raise ConsoleError(
                    sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, f"database {arg} is not paused"
                )
        elif registry.shutting_down or pgbouncer_shutdown(registry.control):
            raise ConsoleError(sqlstate.ADMIN_SHUTDOWN, "pooler is shutting down")
        elif not (registry.paused or registry.suspended):
            raise ConsoleError(
                sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, "pooler is not paused/suspended"
            )
        registry.resume(arg or None)
        return Result("RESUME")

    async def cmd_suspend(self, arg: str) -> Result:
        self._need_admin()
        if arg:
            raise syntax_error(f"SUSPEND {arg}")
        self._not_paused()
        if self.registry.paused_databases:
            raise ConsoleError(
                sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE, "cannot suspend with paused databases"
            )
        self.registry.suspend()
        return Result("SUSPEND")

    async def cmd_kill(self, arg: str) -> Result:
        self._need_admin()
        self._not_paused()
        self.registry.kill(self._database(arg, "kill") if arg else None)
        return Result("KILL")

    async def cmd_kill_client(self, arg: str) -> Result:
        self._need_admin()
        if not arg.isdigit():
            raise ConsoleError(
                sqlstate.INVALID_PARAMETER_VALUE,
                "invalid client id supplied",
                "invalid client pointer supplied",
            )
        target = int(arg)
        for client in list(self.registry.clients):
            if client.id == target and client.console is None and client.pool is not None:
                log.info("client_killed", id=target, **client.log_fields())
                client.fail(sqlstate.ADMIN_SHUTDOWN, "admin forced disconnect")
                return Result("KILL_CLIENT")
        # SHOW CLIENTS lists every worker's clients: the id may be another's.
        worker = self.registry.worker
        if (
            worker is not None
            and self.client is not None  # not passed on: ask the others
            and None in await worker.run_everywhere(f"KILL_CLIENT {target}")
        ):
            return Result("KILL_CLIENT")
        raise ConsoleError(sqlstate.UNDEFINED_OBJECT, "client not found")

    async def cmd_reconnect(self, arg: str) -> Result:
        self._need_admin()
        self.registry.reconnect(self._database(arg, "reconnect") if arg else None)
        return Result("RECONNECT")

    async def cmd_disable(self, arg: str) -> Result:
        self._need_admin()
        if not arg:
            raise ConsoleError(sqlstate.SYNTAX_ERROR, "a database is required")
        self.registry.disable(self._database(arg, "disable"))
        return Result("DISABLE")

    async def cmd_enable(self, arg: str) -> Result:
        self._need_admin()
        if not arg:
            raise ConsoleError(sqlstate.SYNTAX_ERROR, "a database is required")
        self.registry.enable(self._database(arg, "enable"))
        return Result("ENABLE")

    async def cmd_wait_close(self, arg: str) -> Result:
        self._need_admin()
        db = self._database(arg, "wait in") if arg else None
        await self._wait(lambda: not self.registry.closing_servers(db))
        return Result("WAIT_CLOSE")

    async def cmd_reload(self, arg: str) -> Result:
        self._need_admin()
        if arg:
            raise syntax_error(f"RELOAD {arg}")
        control = self.registry.control
        if control is None:
            raise ConsoleError(sqlstate.FEATURE_NOT_SUPPORTED, "RELOAD is not available")
        before = self.registry.config
        control.reload()
        if self.registry.config is before and before.path is not None:
            raise ConsoleError(
                sqlstate.CONFIG_FILE_ERROR, "RELOAD failed, see logs for additional details"
            )
        return Result("RELOAD")

    async def cmd_shutdown(self, arg: str) -> Result:
        self._need_admin()
        mode = arg.upper()
        if mode not in ("", "WAIT_FOR_CLIENTS", "WAIT_FOR_SERVERS"):
            raise syntax_error(f"SHUTDOWN {arg}")
        control = self.registry.control
        if control is None:
            raise ConsoleError(sqlstate.FEATURE_NOT_SUPPORTED, "SHUTDOWN is not available")
        # WAIT_FOR_CLIENTS is SIGTERM's shutdown, WAIT_FOR_SERVERS SIGINT's, plain SIGQUIT's.
        signo = {"": signal.SIGQUIT, "WAIT_FOR_CLIENTS": signal.SIGTERM}.get(mode, signal.SIGINT)
        if self.registry.worker is not None:
            # The supervisor passes the signal to every worker, as from systemd.
            return Result("SHUTDOWN", after=lambda: os.kill(os.getppid(), signo))
        if not mode:
            return Result("SHUTDOWN", after=control.stop_now)
        return Result("SHUTDOWN", after=lambda: control.shutdown(signo.name))

    def _set(self, key: str, value: str) -> Result:
        if key.lower() in FAKE_PARAMS:
            return Result("SET", notice=("SET ignored", ""))
        self._need_admin()
        try:
            pgmux_name = set_setting(self.registry, key, value)
        except TlsNotApplied as exc:
            log.info("console_set", key=str(exc), value=value, **self._who())
            return Result(f"SET {key}={value}", notice=(TLS_NOT_APPLIED, ""))
        log.info("console_set", key=pgmux_name, value=value, **self._who())
        return Result(f"SET {key}={value}")  # the name as given, as PgBouncer answers


_COMMANDS: dict[str, Callable[[Commands, str], Awaitable[Result]]] = {
    "disable": Commands.cmd_disable,
    "enable": Commands.cmd_enable,
    "kill": Commands.cmd_kill,
    "kill_client": Commands.cmd_kill_client,
    "pause": Commands.cmd_pause,
    "reconnect": Commands.cmd_reconnect,
    "reload": Commands.cmd_reload,
    "resume": Commands.cmd_resume,
    "show": Commands.cmd_show,
    "shutdown": Commands.cmd_shutdown,
    "suspend": Commands.cmd_suspend,
    "wait_close": Commands.cmd_wait_close,
}


async def run_replayed(registry: Registry, query: str) -> str | None:
    """A command another worker's console ran there: run it here too (as the
    admin it came from); None when done, else why it failed here."""
    try:
        result = await Commands(registry, is_admin=True).execute(query)
    except ConsoleError as exc:
        return str(exc)
    if result.after is not None:
        result.after()
    return None

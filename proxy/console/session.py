"""The admin console (PgBouncer's admin.c): database `pgmux`, alias `pgbouncer`.

A client that logs in to one of those names gets an AdminSession instead of
a pool. It speaks the simple protocol (psql) and the extended one (psycopg 3,
asyncpg: Parse/Bind/Describe/Execute/Sync, named statements, binary result
formats), answers SHOW with PgBouncer's tables (admin_show.py) and runs the
commands. Users in admin.users may do everything, admin.stats_users only
SHOW; anyone else is refused with 28000. A bad command gets an ErrorResponse
and the console stays usable.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import time
from collections.abc import Awaitable
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pgmux import __version__
from pgmux.protocol import messages, sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.proxy.base.log import configure_logging, get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config import ADMIN_DATABASES, RUNTIME_SETTINGS, ConfigError
from pgmux.proxy.console import show as admin_show
from pgmux.proxy.console.gather import MERGED
from pgmux.proxy.console.show import INT4, INT8, NUMERIC, SHOW, TEXT, TYPLEN, Result

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.admin")

WAIT_POLL = 0.05  # seconds between checks while PAUSE / WAIT_CLOSE wait

# Settings some drivers SET or SHOW on connect; PgBouncer fakes them too.
FAKE_PARAMS = {
    "client_encoding": "UTF8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
}

_WORD = r"""("(?:[^"]|"")+"|[^\s;'"=]+)"""
_COMMAND = re.compile(rf"^\s*{_WORD}(?:\s+{_WORD})?\s*$", re.IGNORECASE)
_SET = re.compile(
    rf"""^\s*set\s+{_WORD}\s*(?:=|\s+to\s+|\s+to$)\s*({_WORD}|'(?:[^']|'')*')\s*$""",
    re.IGNORECASE,
)


class ConsoleError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _syntax_error(query: str) -> ConsoleError:
    return ConsoleError(sqlstate.SYNTAX_ERROR, f"invalid command '{query}', use SHOW HELP;")


# --- login ---------------------------------------------------------------------------


def open_console(client: ClientConnection, leftover: bytes = b"") -> None:
    """The client authenticated to the console database: check its user, welcome it."""

    admin_config = client.registry.config.admin
    is_admin = client.user in admin_config.users
    if not is_admin and client.user not in admin_config.stats_users:
        # Raised inside the client's login handling, which logs and closes.
        raise ProtocolError(
            f'not allowed: user "{client.user}" may not use the admin console',
            sqlstate.INVALID_AUTHORIZATION,
        )
    session = AdminSession(client, is_admin)
    client.become_console(session)
    client.cancel_pid, client.cancel_key = client.registry.issue_cancel_key(client)
    params = {
        "server_version": f"{__version__}/pgmux",
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO",
        "TimeZone": "GMT",
        "IntervalStyle": "postgres",
        "integer_datetimes": "on",
        "standard_conforming_strings": "on",
        "is_superuser": "on" if is_admin else "off",
        "application_name": client.application_name,
    }
    out = [messages.parameter_status(k, v) for k, v in params.items()]
    out.append(messages.backend_key_data(client.cancel_pid, client.cancel_key))
    out.append(messages.ready_for_query("I"))
    client.send(b"".join(out))
    log.info("console_login", admin=is_admin, **client.log_fields())
    if leftover:
        session.data_received(leftover)


# --- the session -------------------------------------------------------------------


class _Portal:
    __slots__ = ("formats", "query", "result")

    def __init__(self, query: str, formats: list[int]) -> None:
        self.query = query
        self.formats = formats
        self.result: Result | None = None


class AdminSession:
    """One console connection: reads messages in order, answers each."""

    def __init__(
        self, client: ClientConnection | None, is_admin: bool, registry: Registry | None = None
    ) -> None:
        # client None: a command another worker's console passed on (run_replayed)
        self.client = client
        self.registry: Registry = client.registry if client is not None else registry  # type: ignore[assignment]
        self.is_admin = is_admin
        self._reader = MessageReader(max_size=self.registry.config.limits.max_packet_size)
        self._task: asyncio.Task[None] | None = None
        self._statements: dict[str, tuple[str, list[int]]] = {}
        self._portals: dict[str, _Portal] = {}
        self._skip_to_sync = False  # an extended-protocol error: ignore until Sync

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        if self._task is None:
            self._task = spawn(self._run())

    async def _run(self) -> None:
        try:
            while (message := self._reader.next_message()) is not None:
                if self.closed:
                    return
                await self._message(message[0], message[1])
        except ProtocolError as exc:
            self.client.fail(exc.sqlstate, exc.message)
        finally:
            # Bytes that arrive from now on start a new run (no await in between).
            self._task = None

    @property
    def closed(self) -> bool:
        if self.client is None:
            return False
        transport = self.client.transport
        return transport is None or transport.is_closing()

    def send(self, *parts: bytes) -> None:
        assert self.client is not None
        self.client.send(b"".join(parts))

    # --- messages ----------------------------------------------------------------

    async def _message(self, kind: int, body: bytes) -> None:
        tag = chr(kind)
        if tag == "X":
            self.client.transport.close()  # type: ignore[union-attr]
            self.client.connection_lost(None)
            return
        if tag == "S":
            self._skip_to_sync = False
            self._portals.pop("", None)
            self.send(messages.ready_for_query("I"))
            return
        if self._skip_to_sync or tag == "H":
            return  # after an error PostgreSQL ignores all until Sync; Flush: nothing held
        if tag == "Q":
            await self._simple_query(messages.parse_query(body))
            return
        try:
            await self._extended(tag, body)
        except ConsoleError as exc:
            self._skip_to_sync = True
            self.send(messages.error_response(exc.code, exc.message))

    async def _simple_query(self, text: str) -> None:
        statements = [s for s in _split_statements(text) if s.strip()]
        if not statements:
            self.send(messages.empty_query_response(), messages.ready_for_query("I"))
            return
        out: list[bytes] = []
        for statement in statements:
            try:
                result = await self.execute(statement)
            except ConsoleError as exc:
                out.append(messages.error_response(exc.code, exc.message))
                break
            out.append(_encode_result(result, [], describe=True))
            if result.after is not None:
                self.send(*out)
                out = []
                result.after()
        out.append(messages.ready_for_query("I"))
        self.send(*out)

    async def _extended(self, tag: str, body: bytes) -> None:
        if tag == "P":
            name, query, oids = messages.parse_parse(body)
            if name and name in self._statements:
                raise ConsoleError(
                    sqlstate.DUPLICATE_PREPARED_STATEMENT,
                    f'prepared statement "{name}" already exists',
                )
            self._statements[name] = (query, oids)
            self.send(messages.parse_complete())
        elif tag == "B":
            portal, statement, formats = _parse_bind(body)
            query, _oids = self._statement(statement)
            self._portals[portal] = _Portal(query, formats)
            self.send(messages.bind_complete())
        elif tag == "D":
            await self._describe(body[:1], _cstring(body, 1)[0])
        elif tag == "E":
            await self._execute(_cstring(body, 0)[0])
        elif tag == "C":
            name = _cstring(body, 1)[0]
            (self._statements if body[:1] == b"S" else self._portals).pop(name, None)
            self.send(messages.close_complete())
        else:
            raise ConsoleError(
                sqlstate.PROTOCOL_VIOLATION,
                f"unsupported message type {tag!r} for the admin console",
            )

    def _statement(self, name: str) -> tuple[str, list[int]]:
        try:
            return self._statements[name]
        except KeyError:
            raise ConsoleError(
                sqlstate.INVALID_SQL_STATEMENT_NAME, f'prepared statement "{name}" does not exist'
            ) from None

    async def _describe(self, kind: bytes, name: str) -> None:
        if kind == b"S":
            query, oids = self._statement(name)
            result = self._preview(query)
            self.send(messages.parameter_description(oids), _row_description(result, []))
            return
        portal = self._portals.get(name)
        if portal is None:
            raise ConsoleError(sqlstate.PROTOCOL_VIOLATION, f'portal "{name}" does not exist')
        if portal.result is None and _show_argument(portal.query) is not None:
            portal.result = await self.execute(portal.query)
        self.send(_row_description(portal.result, portal.formats))

    async def _execute(self, name: str) -> None:
        portal = self._portals.get(name)
        if portal is None:
            raise ConsoleError(sqlstate.PROTOCOL_VIOLATION, f'portal "{name}" does not exist')
        if not portal.query.strip().rstrip(";").strip():
            self.send(messages.empty_query_response())
            return
        result = portal.result
        portal.result = None  # a second Execute of the portal runs it again
        if result is None:
            result = await self.execute(portal.query)
        self.send(_encode_result(result, portal.formats, describe=False))
        if result.after is not None:
            result.after()

    def _preview(self, query: str) -> Result | None:
        """The columns a statement will return, without running a command."""
        arg = _show_argument(query)
        if arg is None:
            return None
        try:
            return self._show(arg)
        except ConsoleError:
            return None

    # --- commands ----------------------------------------------------------------

    async def execute(self, query: str) -> Result:
        text = query.strip().rstrip(";").strip()
        match = _COMMAND.match(text)
        if match is not None:
            word = _unquote(match.group(1), '"').lower()
            arg = _unquote(match.group(2), '"') if match.group(2) else ""
            handler = _COMMANDS.get(word)
            if handler is None:
                raise _syntax_error(query)
            if word != "show":
                log.info("console_command", command=word.upper(), arg=arg, **self._who())
            if word in _ON_EVERY_WORKER:
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
        raise _syntax_error(query)

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

    async def _wait(self, done: Any) -> None:
        while not done() and not self.closed:
            await asyncio.sleep(WAIT_POLL)

    def _show(self, arg: str) -> Result:
        name = arg.lower()
        if name in FAKE_PARAMS:
            return Result("SHOW", [(name, TEXT)], [(FAKE_PARAMS[name],)])
        show = SHOW.get(name)
        if show is None:
            raise _syntax_error(f"SHOW {arg}".strip())
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
        elif registry.shutting_down:
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
            raise _syntax_error(f"SUSPEND {arg}")
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
            raise ConsoleError(sqlstate.INVALID_PARAMETER_VALUE, "invalid client id supplied")
        target = int(arg)
        for client in list(self.registry.clients):
            if client.id == target and client.console is None and client.pool is not None:
                log.info("client_killed", id=target, **client.log_fields())
                client.fail(sqlstate.ADMIN_SHUTDOWN, "admin forced disconnect")
                return Result("KILL_CLIENT")
        # SHOW CLIENTS lists every worker's clients: the id may be another's.
        worker = self.registry.worker
        passed_on = worker is not None and self.client is not None
        if passed_on and None in await worker.run_everywhere(f"KILL_CLIENT {target}"):  # type: ignore[union-attr]
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
            raise _syntax_error(f"RELOAD {arg}")
        daemon = self.registry.daemon
        if daemon is None:
            raise ConsoleError(sqlstate.FEATURE_NOT_SUPPORTED, "RELOAD is not available")
        before = self.registry.config
        daemon.reload()
        if self.registry.config is before and before.path is not None:
            raise ConsoleError(
                sqlstate.CONFIG_FILE_ERROR, "RELOAD failed, see logs for additional details"
            )
        return Result("RELOAD")

    async def cmd_shutdown(self, arg: str) -> Result:
        self._need_admin()
        mode = arg.upper()
        if mode not in ("", "WAIT_FOR_CLIENTS", "WAIT_FOR_SERVERS"):
            raise _syntax_error(f"SHUTDOWN {arg}")
        daemon = self.registry.daemon
        if daemon is None:
            raise ConsoleError(sqlstate.FEATURE_NOT_SUPPORTED, "SHUTDOWN is not available")
        # WAIT_FOR_CLIENTS is SIGTERM's shutdown, WAIT_FOR_SERVERS SIGINT's, plain SIGQUIT's.
        signo = {"": signal.SIGQUIT, "WAIT_FOR_CLIENTS": signal.SIGTERM}.get(mode, signal.SIGINT)
        if self.registry.worker is not None:
            # The supervisor passes the signal to every worker, as from systemd.
            return Result("SHUTDOWN", after=lambda: os.kill(os.getppid(), signo))
        if not mode:
            return Result("SHUTDOWN", after=daemon.stop_now)
        return Result("SHUTDOWN", after=lambda: daemon.shutdown(signal.Signals(signo).name))

    def _set(self, key: str, value: str) -> Result:
        if key.lower() in FAKE_PARAMS:
            return Result("SET", notice=("SET ignored", ""))
        self._need_admin()
        from pgmux.proxy.config.ini import pgmux_key

        key = pgmux_key(key) or key  # PgBouncer's names work too: SET default_pool_size=5
        convert = RUNTIME_SETTINGS.get(key)
        if convert is None:
            raise ConsoleError(
                sqlstate.UNDEFINED_OBJECT,
                f'unknown setting "{key}" or it cannot change at run time (see SHOW CONFIG)',
            )
        try:
            parsed = convert(_yaml_scalar(value), key)
        except ConfigError as exc:
            raise ConsoleError(sqlstate.INVALID_PARAMETER_VALUE, str(exc)) from None
        apply_setting(self.registry, key, parsed)
        log.info("console_set", key=key, value=value, **self._who())
        return Result(f"SET {key}={value}")


# Commands that act on every worker (the others run them via run_replayed).
_ON_EVERY_WORKER = {
    "disable", "enable", "kill", "pause", "reconnect", "reload", "resume", "suspend", "wait_close",
}  # fmt: skip


async def run_replayed(registry: Registry, query: str) -> str | None:
    """A command another worker's console ran there: run it here too (as the
    admin it came from); None when done, else why it failed here."""
    session = AdminSession(None, is_admin=True, registry=registry)
    try:
        result = await session.execute(query)
    except ConsoleError as exc:
        return str(exc)
    if result.after is not None:
        result.after()
    return None


_COMMANDS = {
    "disable": AdminSession.cmd_disable,
    "enable": AdminSession.cmd_enable,
    "kill": AdminSession.cmd_kill,
    "kill_client": AdminSession.cmd_kill_client,
    "pause": AdminSession.cmd_pause,
    "reconnect": AdminSession.cmd_reconnect,
    "reload": AdminSession.cmd_reload,
    "resume": AdminSession.cmd_resume,
    "show": AdminSession.cmd_show,
    "shutdown": AdminSession.cmd_shutdown,
    "suspend": AdminSession.cmd_suspend,
    "wait_close": AdminSession.cmd_wait_close,
}


# --- SET ---------------------------------------------------------------------------


def _yaml_scalar(text: str) -> Any:
    """A console value as YAML would read it: 5 is an int, 5s a string."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?\d*\.\d+", text):
        return float(text)
    return text


def apply_setting(registry: Registry, key: str, value: Any) -> None:
    """Swap in a config with KEY set; pools and databases that inherit it follow."""
    config = registry.config
    section, name = key.split(".", 1)
    if section in ("timeouts", "pool"):
        config = _set_inherited(registry, section, name, value)
    else:
        part = getattr(config, section)
        config = replace(config, **{section: replace(part, **{name: value})})
        if key == "logging.level":
            configure_logging(config.logging.format, value)
    registry.config = config
    if registry.daemon is not None:
        registry.daemon.config = config


def _set_inherited(registry: Registry, section: str, name: str, value: Any) -> Any:
    # Databases and pools that carry the old global value did not override it.
    config = registry.config
    old = getattr(getattr(config, section), name)
    databases = {}
    for db_name, db in config.databases.items():
        part = getattr(db, section)
        if getattr(part, name) == old:
            db = replace(db, **{section: replace(part, **{name: value})})
        databases[db_name] = db
    for pool in registry.pools.values():
        attr = "timeouts" if section == "timeouts" else "settings"
        part = getattr(pool, attr)
        if getattr(part, name) == old:
            setattr(pool, attr, replace(part, **{name: value}))
            database_part = getattr(pool.database, section)
            if getattr(database_part, name) == old:
                pool.database = replace(
                    pool.database, **{section: replace(database_part, **{name: value})}
                )
        if section == "pool" and pool.waiting:
            pool.grow()  # a bigger pool serves its queue now
    global_part = replace(getattr(config, section), **{name: value})
    return replace(config, **{section: global_part, "databases": MappingProxyType(databases)})


# --- wire encoding -----------------------------------------------------------------


def _show_argument(query: str) -> str | None:
    """What a SHOW statement shows, or None for any other statement."""
    match = _COMMAND.match(query.strip().rstrip(";").strip())
    if match is None or _unquote(match.group(1), '"').lower() != "show":
        return None
    return _unquote(match.group(2), '"') if match.group(2) else ""


def _split_statements(text: str) -> list[str]:
    """Split on semicolons outside quotes (psql may send several commands)."""
    return [m.group(0) for m in re.finditer(r"""(?:'(?:[^']|'')*'|"(?:[^"]|"")*"|[^;'"])+""", text)]


def _unquote(word: str, quote: str) -> str:
    if len(word) >= 2 and word[0] == quote and word[-1] == quote:
        return word[1:-1].replace(quote * 2, quote)
    return word


def _cstring(body: bytes, start: int) -> tuple[str, int]:
    end = body.index(b"\0", start)
    return body[start:end].decode(), end + 1


def _parse_bind(body: bytes) -> tuple[str, str, list[int]]:
    """Bind: (portal, statement, result format codes); parameters are not used."""
    try:
        portal, pos = _cstring(body, 0)
        statement, pos = _cstring(body, pos)
        (count,) = struct.unpack_from("!H", body, pos)
        pos += 2 + 2 * count
        (count,) = struct.unpack_from("!H", body, pos)
        pos += 2
        for _ in range(count):
            (length,) = struct.unpack_from("!i", body, pos)
            pos += 4 + max(length, 0)
        (count,) = struct.unpack_from("!H", body, pos)
        formats = list(struct.unpack_from(f"!{count}h", body, pos + 2))
    except (ValueError, struct.error):
        raise ConsoleError(sqlstate.PROTOCOL_VIOLATION, "invalid Bind message") from None
    return portal, statement, formats


def _format(formats: list[int], index: int) -> int:
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else formats[index]


def _row_description(result: Result | None, formats: list[int]) -> bytes:
    if result is None or not result.columns:
        return messages.no_data()
    parts = [struct.pack("!H", len(result.columns))]
    for i, (name, oid) in enumerate(result.columns):
        parts.append(name.encode() + b"\0")
        parts.append(struct.pack("!IhIhih", 0, 0, oid, TYPLEN[oid], -1, _format(formats, i)))
    body = b"".join(parts)
    return b"T" + struct.pack("!I", len(body) + 4) + body


def _encode_result(result: Result, formats: list[int], describe: bool) -> bytes:
    out: list[bytes] = []
    if result.notice is not None:
        message, detail = result.notice
        out.append(
            messages.notice_response(sqlstate.SUCCESSFUL_COMPLETION, message, detail=detail or None)
        )
    if result.columns:
        if describe:
            out.append(_row_description(result, formats))
        oids = [oid for _name, oid in result.columns]
        for row in result.rows:
            values = [
                _value(value, oid, _format(formats, i))
                for i, (value, oid) in enumerate(zip(row, oids, strict=True))
            ]
            out.append(messages.data_row(values))
    tag = result.tag
    if result.columns and tag == "SHOW":
        tag = "SHOW"  # PgBouncer's tag for every SHOW, whatever the row count
    out.append(messages.command_complete(tag))
    return b"".join(out)


def _value(value: Any, oid: int, fmt: int) -> bytes | None:
    if value is None:
        return None
    if fmt == 0:
        return str(value).encode()
    if oid == INT4:
        return struct.pack("!i", int(value))
    if oid == INT8:
        return struct.pack("!q", int(value))
    if oid == NUMERIC:
        return _numeric_binary(int(value))
    return str(value).encode()


def _numeric_binary(number: int) -> bytes:
    """An integer in PostgreSQL's binary numeric format (base-10000 digits)."""
    sign = 0x4000 if number < 0 else 0
    number = abs(number)
    digits: list[int] = []
    while number:
        number, digit = divmod(number, 10000)
        digits.insert(0, digit)
    weight = len(digits) - 1 if digits else 0
    while digits and digits[-1] == 0:
        digits.pop()  # trailing zero groups are implied by the weight
    header = struct.pack("!hhHh", len(digits), weight, sign, 0)
    return header + b"".join(struct.pack("!h", d) for d in digits)


__all__ = ["AdminSession", "ConsoleError", "admin_show", "open_console"]

"""The admin console (PgBouncer's admin.c): database `pgmux`, alias `pgbouncer`.

A client that logs in to one of those names gets an AdminSession instead of
a pool. It speaks the simple protocol (psql) and the extended one (psycopg 3,
asyncpg: Parse/Bind/Describe/Execute/Sync, named statements, binary result
formats), answers SHOW with PgBouncer's tables (show.py) and runs the
commands (commands.py). Users in admin.users may do everything,
admin.stats_users only SHOW; anyone else is refused with 28000. A bad
command gets an ErrorResponse and the console stays usable.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from pgmux import __version__
from pgmux.protocol import messages, rows, sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.parsers import parse_bind, parse_execute, parse_target
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.console.commands import Commands, show_argument
from pgmux.proxy.console.errors import ConsoleError
from pgmux.proxy.console.show import Result

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection

log = get_logger("pgmux.admin")

_STATEMENT = re.compile(r"""(?:'(?:[^']|'')*'|"(?:[^"]|"")*"|[^;'"])+""")


# --- login ---------------------------------------------------------------------------


def open_console(client: ClientConnection, leftover: bytes = b"", own_user: bool = False) -> None:
    """The client authenticated to the console database: check its user, welcome it.

    OWN_USER: the daemon's own OS user over the unix socket (login.py checked
    its SO_PEERCRED), an admin as in PgBouncer, whatever admin.users says."""
    admin_config = client.registry.config.admin
    is_admin = own_user or client.user in admin_config.users
    if not is_admin and client.user not in admin_config.stats_users:
        # Raised inside the client's login handling, which logs and closes.
        raise ProtocolError(
            f'not allowed: user "{client.user}" may not use the admin console',
            sqlstate.INVALID_AUTHORIZATION,
        )
    client.registry.console_stats.total_client_login_count += 1
    session = AdminSession(client, is_admin)
    client.become_console(session)
    client.cancel_pid, client.cancel_key = client.registry.cancels.issue(client)
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
        self.formats = formats  # Bind's result format codes
        self.result: Result | None = None  # run early by a Describe, sent by Execute


class AdminSession:
    """One console connection: reads messages in order, answers each."""

    def __init__(self, client: ClientConnection, is_admin: bool) -> None:
        self.client = client
        self.commands = Commands(client.registry, is_admin, client)
        self._reader = MessageReader(max_size=client.registry.config.limits.max_packet_size)
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
                if self.commands.closed:
                    return
                await self._message(message[0], message[1])
        except ProtocolError as exc:
            self.client.fail(exc.sqlstate, exc.message)
        finally:
            # Bytes that arrive from now on start a new run (no await in between).
            self._task = None

    def send(self, *parts: bytes) -> None:
        self.client.send(b"".join(parts))

    # --- messages ----------------------------------------------------------------

    async def _message(self, kind: int, body: bytes) -> None:
        tag = chr(kind)
        if tag == "X":
            self._terminate()
            return
        if tag == "S":
            self._skip_to_sync = False
            self._portals.pop("", None)
            self.send(messages.ready_for_query("I"))
            return
        if self._skip_to_sync or tag == "H":
            return  # after an error PostgreSQL ignores all until Sync; Flush: nothing held
        if tag == "Q":
            try:
                text = messages.parse_query(body)
            except ProtocolError as exc:  # an ERROR of this query, as in PostgreSQL
                self.send(_error(exc), messages.ready_for_query("I"))
                return
            await self._simple_query(text)
            return
        try:
            await self._extended(tag, body)
        except ConsoleError as exc:
            self._skip_to_sync = True
            self.send(self._error(exc))

    def _error(self, exc: ConsoleError) -> bytes:
        """PgBouncer sends 08P01 for every console error but a failed RELOAD's
        F0000 (error_codes: pgbouncer)."""
        pgbouncer = self.client.registry.config.error_codes == "pgbouncer"
        if pgbouncer and exc.code != sqlstate.CONFIG_FILE_ERROR:
            return messages.error_response(sqlstate.PROTOCOL_VIOLATION, exc.pgbouncer_message)
        return messages.error_response(exc.code, exc.message)

    def _terminate(self) -> None:
        transport = self.client.transport
        if transport is not None:  # _run saw it open
            transport.close()
        self.client.connection_lost(None)

    async def _simple_query(self, text: str) -> None:
        statements = [s for s in _split_statements(text) if s.strip()]
        if not statements:
            self.send(messages.empty_query_response(), messages.ready_for_query("I"))
            return
        out: list[bytes] = []
        for statement in statements:
            try:
                result = await self.commands.execute(statement)
            except ConsoleError as exc:
                out.append(self._error(exc))
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
            try:
                name, query, oids = messages.parse_parse(body)
            except ProtocolError as exc:
                raise ConsoleError(exc.sqlstate, exc.message) from None
            if name and name in self._statements:
                raise ConsoleError(
                    sqlstate.DUPLICATE_PREPARED_STATEMENT,
                    f'prepared statement "{name}" already exists',
                )
            self._statements[name] = (query, oids)
            self.send(messages.parse_complete())
        elif tag == "B":
            self._bind(body)
        elif tag == "D":
            await self._describe(*_target(body, "Describe"))
        elif tag == "E":
            await self._execute(_portal_name(body))
        elif tag == "C":
            kind, name = _target(body, "Close")
            (self._statements if kind == "S" else self._portals).pop(name, None)
            self.send(messages.close_complete())
        else:
            raise ConsoleError(
                sqlstate.PROTOCOL_VIOLATION,
                f"unsupported message type {tag!r} for the admin console",
            )

    def _bind(self, body: bytes) -> None:
        try:
            bind = parse_bind(body)
        except ProtocolError:
            # An error of this Bind only: the console stays usable after Sync.
            raise ConsoleError(sqlstate.PROTOCOL_VIOLATION, "invalid Bind message") from None
        query, _oids = self._statement(bind.statement)
        self._portals[bind.portal] = _Portal(query, bind.result_formats)
        self.send(messages.bind_complete())

    def _statement(self, name: str) -> tuple[str, list[int]]:
        try:
            return self._statements[name]
        except KeyError:
            raise ConsoleError(
                sqlstate.INVALID_SQL_STATEMENT_NAME, f'prepared statement "{name}" does not exist'
            ) from None

    def _portal(self, name: str) -> _Portal:
        portal = self._portals.get(name)
        if portal is None:
            raise ConsoleError(sqlstate.PROTOCOL_VIOLATION, f'portal "{name}" does not exist')
        return portal

    async def _describe(self, kind: str, name: str) -> None:
        if kind == "S":
            query, oids = self._statement(name)
            result = self.commands.preview(query)
            self.send(messages.parameter_description(oids), _row_description(result, []))
            return
        portal = self._portal(name)
        if portal.result is None and show_argument(portal.query) is not None:
            portal.result = await self.commands.execute(portal.query)
            _check_formats(portal.result, portal.formats)
        self.send(_row_description(portal.result, portal.formats))

    async def _execute(self, name: str) -> None:
        portal = self._portal(name)
        if not portal.query.strip().rstrip(";").strip():
            self.send(messages.empty_query_response())
            return
        result = portal.result
        portal.result = None  # a second Execute of the portal runs it again
        if result is None:
            result = await self.commands.execute(portal.query)
        _check_formats(result, portal.formats)
        self.send(_encode_result(result, portal.formats, describe=False))
        if result.after is not None:
            result.after()


# --- messages in, answers out -------------------------------------------------------


# A Describe, Execute or Close the console cannot read is that batch's error,
# as in PostgreSQL: the console answers the next Sync and stays usable.


def _error(exc: ProtocolError) -> bytes:
    return messages.error_response(exc.sqlstate, exc.message)


def _target(body: bytes, what: str) -> tuple[str, str]:
    try:
        return parse_target(body, what)
    except ProtocolError as exc:
        raise ConsoleError(sqlstate.PROTOCOL_VIOLATION, exc.message) from None


def _portal_name(body: bytes) -> str:
    try:
        return parse_execute(body)[0]
    except ProtocolError as exc:
        raise ConsoleError(sqlstate.PROTOCOL_VIOLATION, exc.message) from None


def _check_formats(result: Result, formats: list[int]) -> None:
    """Bind's result formats: none, one for all columns, or one per column."""
    if result.columns and len(formats) > 1 and len(formats) != len(result.columns):
        raise ConsoleError(
            sqlstate.PROTOCOL_VIOLATION,
            f"bind message has {len(formats)} result formats but query has "
            f"{len(result.columns)} columns",
        )


def _split_statements(text: str) -> list[str]:
    """Split on semicolons outside quotes (psql may send several commands)."""
    return [m.group(0) for m in _STATEMENT.finditer(text)]


def _row_description(result: Result | None, formats: list[int]) -> bytes:
    if result is None or not result.columns:
        return messages.no_data()
    return rows.row_description(result.columns, formats)


def _encode_result(result: Result, formats: list[int], describe: bool) -> bytes:
    out: list[bytes] = []
    if result.notice is not None:
        message, detail = result.notice
        out.append(
            messages.notice_response(sqlstate.SUCCESSFUL_COMPLETION, message, detail=detail or None)
        )
    if result.columns:
        if describe:
            out.append(rows.row_description(result.columns, formats))
        oids = [oid for _name, oid in result.columns]
        out += [rows.data_row(row, oids, formats) for row in result.rows]
    out.append(messages.command_complete(result.tag))
    return b"".join(out)


__all__ = ["AdminSession", "open_console"]

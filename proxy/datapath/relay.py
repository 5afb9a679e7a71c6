"""The notification relay of a pool (pool.listen_mode: relay).

Under transaction pooling a client's LISTEN runs on whichever server it has
for that transaction, and that server goes back to the pool (cleaned with
UNLISTEN *). What keeps listening is one connection per pool, the relay: it
runs LISTEN for the first client of a channel and UNLISTEN after the last one
left, reads every NotificationResponse and hands it to each client listening
on that channel (listening.py queues and writes it).

The relay's server counts against max_server_connections, max_db_connections
and max_user_connections like any server of the pool, but not against the
pool's size; when a limit is reached it takes the slot of one of the pool's
idle servers. It opens when the pool's first client listens and closes after
its last channel. When it is lost (PostgreSQL restarts), it reconnects with a
backoff, listens again for every channel, and tells each listening client
with a NOTICE that notifications may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from struct import Struct
from typing import TYPE_CHECKING

from pgmux.protocol.backend import UNASKED
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.msgtypes import NOTIFICATION_RESPONSE
from pgmux.protocol.notify_channel import quote
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.datapath import listening, server_login
from pgmux.proxy.datapath.server import ServerConnection
from pgmux.proxy.datapath.server_login import ServerError, ServerLost

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.pool import Pool

log = get_logger("pgmux.relay")

_PACK_LENGTH = Struct("!I").pack
APPLICATION_NAME = "pgmux notification relay"
_MAX_BACKOFF = 5.0
GAP_NOTICE = (
    "the notification relay lost its server connection and is back:"
    " notifications sent meanwhile may have been missed"
)


class RelayServer(ServerConnection):
    """The relay's own PostgreSQL connection: never lent to a client."""

    def __init__(self, relay: Relay) -> None:
        pool = relay.pool
        credentials = pool.hosts.attempts(pool.database, pool.credentials)[0].credentials
        super().__init__(pool, replace(credentials, application_name=APPLICATION_NAME))
        self.relay = relay

    def _slow_message(self, kind: int, body: bytes) -> None:
        if kind == NOTIFICATION_RESPONSE and self._logged_in:
            self._check_slow(kind, body, UNASKED)
            self.relay.notified(body)
            return
        super()._slow_message(kind, body)

    async def run(self, sql: bytes, timeout: float) -> None:
        """Run the relay's own statements (ServerError, ServerLost)."""
        self._query_error = None
        await self.wait_ready_for_query(1, b"Q" + _PACK_LENGTH(len(sql) + 5) + sql + b"\0", timeout)
        if self._query_error is not None:
            raise self._query_error

    def connection_lost(self, exc: Exception | None) -> None:
        lost = ServerLost(str(exc) if exc else "server closed the connection")
        if not self._login.done():
            self._login.set_exception(lost)
        self._wake_rfq_waiter(lost)
        self.relay.lost(self, str(lost))


class Relay:
    """One pool's listening connection and who listens on which channel."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        # channel -> its listening clients (a dict: delivered in the order they joined)
        self.listeners: dict[bytes, dict[ClientConnection, None]] = {}
        self.listened: set[bytes] = set()  # channels the relay's server listens on
        self.waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self.server: RelayServer | None = None
        self.counted = False  # its slot is taken in the server limits
        self.gap = False  # lost while listening: the clients hear of it once back
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # SHOW LISTENERS / metrics
        self.relayed = 0  # notifications handed to clients
        self.dropped = 0  # notifications lost with a client whose queue overflowed
        self.queue_high_water = 0
        self.reconnects = 0

    # --- clients ------------------------------------------------------------

    def subscribe(self, client: ClientConnection, channel: bytes) -> asyncio.Future[None] | None:
        """CLIENT listens on CHANNEL from now on; a future when the relay must LISTEN first."""
        self.listeners.setdefault(channel, {})[client] = None
        if channel in self.listened and self.server is not None:
            return None
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(channel, []).append(waiter)
        self._kick()
        return waiter

    def unsubscribe(self, client: ClientConnection, channel: bytes) -> None:
        members = self.listeners.get(channel)
        if members is None:
            return
        members.pop(client, None)
        if not members:
            del self.listeners[channel]
            self._kick()  # UNLISTEN, or close after the last channel

    @property
    def clients(self) -> int:
        return len({client for members in self.listeners.values() for client in members})

    # --- the relay's server ---------------------------------------------------

    def notified(self, body: bytes) -> None:
        """A NotificationResponse: to every client on its channel, in order."""
        end = body.find(b"\0", 4)
        if end < 0:
            raise ProtocolError("malformed NotificationResponse")
        members = self.listeners.get(body[4:end])
        if not members:
            return
        message = b"A" + _PACK_LENGTH(len(body) + 4) + body
        for client in list(members):
            listening.deliver(client, message, self)

    def lost(self, server: RelayServer, reason: str) -> None:
        if server is not self.server:
            return
        self.server = None
        self.listened.clear()
        self._free_slot()
        if self.listeners:
            self.gap = True
            log.warning("relay_lost", error=reason, **self._log_fields())
        self._kick()

    def _kick(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = spawn(self._run())

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            if not self.listeners:
                self._close()
                self._wake_waiters()
                return
            if self.server is None:
                try:
                    await self._connect()
                except (OSError, TimeoutError, ServerLost, ServerError, ProtocolError) as exc:
                    failures += 1
                    self._connect_failed(exc, failures)
                    await asyncio.sleep(min(0.05 * 2**failures, _MAX_BACKOFF))
                    continue
                failures = 0
            try:
                await self._listen_as_wanted()
            except ServerLost:
                continue  # lost() cleared what the server listened on
            except ServerError as exc:
                log.warning("relay_listen_failed", error=str(exc), **self._log_fields())
                self._close()  # a fresh connection tries again
                await asyncio.sleep(min(0.05 * 2 ** (failures + 1), _MAX_BACKOFF))
                continue
            self._wake_waiters()
            if self.gap:
                self.gap = False
                listening.tell_gap(self, GAP_NOTICE)
            await self._wake.wait()

    async def _connect(self) -> None:
        pool = self.pool
        if not self._take_slot():
            raise ServerLost("no server slot free for the notification relay")
        server = RelayServer(self)
        self.server = server
        timeout = pool.timeouts.server_connect
        try:
            await server_login.connect(server, server.credentials, timeout)
            await server.wait_login(timeout)
        except BaseException:
            self.server = None
            server.abort()
            self._free_slot()
            raise
        if self.server is not server:  # lost during the login
            raise ServerLost("relay connection lost")
        if self.reconnects or self.gap:
            log.info("relay_reconnected", **self._log_fields())
        self.reconnects += 1 if self.gap else 0
        log.info("relay_open", backend_pid=server.backend_pid, **self._log_fields())

    async def _listen_as_wanted(self) -> None:
        server = self.server
        assert server is not None
        wanted = set(self.listeners)
        start = [channel for channel in wanted if channel not in self.listened]
        stop = [channel for channel in self.listened if channel not in wanted]
        if not start and not stop:
            return
        sql = b"".join(b"LISTEN " + quote(channel) + b";" for channel in start)
        sql += b"".join(b"UNLISTEN " + quote(channel) + b";" for channel in stop)
        await server.run(sql, self.pool.timeouts.server_connect or 10.0)
        self.listened.update(start)
        self.listened.difference_update(stop)

    def _wake_waiters(self) -> None:
        """Waiters whose channel the relay listens on now (or that nobody wants any more)."""
        for channel in list(self.waiters):
            if channel in self.listened or channel not in self.listeners:
                for waiter in self.waiters.pop(channel):
                    if not waiter.done():
                        waiter.set_result(None)

    def _take_slot(self) -> bool:
        """A slot under the server limits; an idle server of the pool gives up its own."""
        pool = self.pool
        slots = pool.slots
        if not slots.may_open(pool, register_starving=False):
            if not pool.idle:
                return False
            pool.close_server(pool.idle[0], "slot for the notification relay")
            if not slots.may_open(pool, register_starving=False):
                return False
        slots.taken(pool)
        self.counted = True
        return True

    def _free_slot(self) -> None:
        if self.counted:
            self.counted = False
            self.pool.slots.freed(self.pool)

    def _close(self) -> None:
        server, self.server = self.server, None
        self.listened.clear()
        if server is not None:
            server.close("no channel left")
            log.info("relay_close", **self._log_fields())
        self._free_slot()

    def _connect_failed(self, exc: BaseException, failures: int) -> None:
        if failures == 1 or failures % 20 == 0:
            error = server_login.describe(exc)
            log.warning("relay_connect_failed", error=error, **self._log_fields())

    def _log_fields(self) -> dict[str, object]:
        server = self.server
        return {
            "db": self.pool.dbname,
            "user": self.pool.user,
            "server_id": server.id if server is not None else 0,
            "channels": len(self.listeners),
        }

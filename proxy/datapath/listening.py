"""LISTEN / UNLISTEN of a transaction-pooled client, and its notifications.

The client's LISTEN runs on its server as any statement (PostgreSQL judges
the syntax, reports the errors and rolls it back with its transaction); the
note session_state.py makes of it carries the channel (protocol.notify_channel)
and waits in pending.py for the transaction to commit. Then `committed` moves
the client's channels and the pool's relay (relay.py) listens for it, while
the server that ran the LISTEN goes back to the pool and is cleaned there
with UNLISTEN *. A LISTEN whose channel cannot be told from its text (a
U&"" name, a dollar quote in the same Query) is left to session_state: the
client is pinned as before.

The ReadyForQuery of a commit that makes the relay LISTEN on a new channel
is held back (the client's writes wait behind a gate) until the relay's
LISTEN is done: a NOTIFY committed after the client saw it is delivered.

Notifications are written when the client is between transactions with
nothing outstanding (as PostgreSQL sends them), else queued and written at
its next idle ReadyForQuery. The queue holds what its socket does not take
(the transport paused writing); past pool.notify_queue the client gets an
ErrorResponse and is disconnected, and nobody else notices.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from pgmux.protocol import messages, notify_channel
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.core.states import CLIENT_ACTIVE, CLIENT_IDLE

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.relay import Relay
    from pgmux.proxy.datapath.server import ServerConnection

log = get_logger("pgmux.client")

RELAYED = "notify"  # the kind of a relayed note; ":channel" or "*" (UNLISTEN *) follows
_ALL = RELAYED + "*"
_ONE = RELAYED + ":"
QUEUE_FULL = "53200"  # out_of_memory, as PostgreSQL's own notification queue when full
_NOTIFICATION = ord("A")
_GATE_TIMEOUT = 10.0  # at most this long a ReadyForQuery waits for the relay


class Listening:
    """One client's channels, and the notifications it has not taken yet."""

    __slots__ = ("channels", "gate", "queue")

    def __init__(self) -> None:
        self.channels: dict[bytes, None] = {}  # in the order it listened
        self.queue: deque[bytes] = deque()
        self.gate: Gate | None = None


class Gate:
    """Stands in for a client's transport while a ReadyForQuery waits for the relay."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.held: list[bytes] = []
        self.waiters: list[asyncio.Future[None]] = []

    def write(self, data: bytes) -> None:
        self.held.append(data)

    def open(self) -> None:
        held, self.held = self.held, []
        if held and not self.transport.is_closing():
            self.transport.write(b"".join(held))

    def close(self) -> None:
        self.open()  # an error written just before the close still goes out
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def relayed(client: ClientConnection, server: ServerConnection, text: bytes) -> bool:
    """A LISTEN or UNLISTEN completed: note it with its channel when the relay takes it."""
    pool = client.pool
    if pool is None or pool.settings.listen_mode != "relay" or not client.release_on_idle:
        return False
    targets = channels_named(text)
    if not targets:
        return False
    # Several statements in one Query: each LISTEN / UNLISTEN tag of it notes
    # them all, which comes to the same (a sequence of adds and removes
    # applied twice ends where it ended once), and an error drops the notes.
    for target in targets:
        if target.channel is None:
            server.pending.note(_ALL, False)
        else:
            server.pending.note(_ONE + target.channel.decode("latin-1"), target.listen)
    return True


def channels_named(text: bytes) -> list[notify_channel.Target] | None:
    """The LISTEN / UNLISTEN statements of TEXT, or None where they cannot be told."""
    target = notify_channel.parse(text)
    return [target] if target is not None else notify_channel.parse_all(text)


def committed(client: ClientConnection, server: ServerConnection, kind: str, made: bool) -> None:
    """The transaction of a relayed note committed: the client's channels change."""
    relay = client.registry.relay_for(client.pool)
    state = client.listener
    if made:
        server.dirty.add("listen")  # the server ran LISTEN: UNLISTEN * when it is released
        if state is None:
            state = client.listener = Listening()
        channel = kind[len(_ONE) :].encode("latin-1")
        if channel in state.channels:
            return
        state.channels[channel] = None
        waiter = relay.subscribe(client, channel)
        if waiter is not None:
            _hold(client, state, waiter)
        return
    if state is None:
        return
    if kind == _ALL:
        channels = list(state.channels)
        state.channels.clear()
    else:
        channel = kind[len(_ONE) :].encode("latin-1")
        channels = [channel] if channel in state.channels else []
        state.channels.pop(channel, None)
    for channel in channels:
        relay.unsubscribe(client, channel)
    if state.queue and channels:
        # PostgreSQL checks the channels when it sends: none of these comes any more
        gone = set(channels)
        kept = [message for message in state.queue if channel_of(message) not in gone]
        state.queue = deque(kept)


def channel_of(message: bytes) -> bytes | None:
    """The channel of a NotificationResponse (None for the NOTICE of a gap)."""
    if message[0] != _NOTIFICATION:
        return None
    return message[9 : message.index(b"\0", 9)]  # after type, length and pid


def left(client: ClientConnection) -> None:
    """The client is gone: it listens no more."""
    state = client.listener
    if state is None or client.pool is None:
        return
    relay = client.registry.relay_for(client.pool)
    for channel in state.channels:
        relay.unsubscribe(client, channel)
    state.channels.clear()
    state.queue.clear()


def _hold(client: ClientConnection, state: Listening, waiter: asyncio.Future[None]) -> None:
    """What the client is sent from now on waits until the relay listens."""
    gate = state.gate
    if gate is None:
        gate = state.gate = Gate(client.transport)
        client.transport = gate  # type: ignore[assignment]  # writes only, the rest passes
        spawn(_open_when_listening(client, state, gate))
    gate.waiters.append(waiter)


async def _open_when_listening(client: ClientConnection, state: Listening, gate: Gate) -> None:
    try:
        while gate.waiters:
            waiter = gate.waiters.pop()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), _GATE_TIMEOUT)
            except TimeoutError:
                log.warning("relay_listen_slow", **client.log_fields())
    finally:
        if client.transport is gate:  # type: ignore[comparison-overlap]
            client.transport = gate.transport
        state.gate = None
        gate.open()
        flush(client)


def _between_transactions(client: ClientConnection) -> bool:
    """Where PostgreSQL may send a notification: idle, nothing owed, no block open."""
    if client.expect_rfq > 0 or client.in_batch:
        return False
    if client.state is CLIENT_IDLE:
        return not client.running
    server = client.server
    return client.state is CLIENT_ACTIVE and server is not None and server.clean_for_release


def deliver(client: ClientConnection, message: bytes, relay: Relay) -> None:
    """A notification for CLIENT: written now when it may be, else queued."""
    state = client.listener
    if state is None or client.transport is None or client.transport.is_closing():
        return
    queue = state.queue
    idle = not queue and state.gate is None and not client.writing_paused
    if idle and _between_transactions(client):
        client.transport.write(message)
        relay.relayed += message[0] == _NOTIFICATION
        return
    queue.append(message)
    if len(queue) > relay.queue_high_water:
        relay.queue_high_water = len(queue)
    limit = client.pool.settings.notify_queue
    if len(queue) > limit:
        relay.dropped += len(queue)
        queue.clear()
        left(client)
        client.fail(
            QUEUE_FULL,
            f"too many notifications waiting for this client (pool.notify_queue = {limit}):"
            " it does not read them fast enough",
        )
        return
    if not client.writing_paused and state.gate is None:
        flush(client)


def flush(client: ClientConnection) -> None:
    """Write the queued notifications while the client may get them and takes them."""
    state = client.listener
    if state is None or not state.queue or state.gate is not None:
        return
    if not _between_transactions(client):
        return
    relay = client.registry.relay_for(client.pool)
    queue = state.queue
    transport = client.transport
    while queue and not client.writing_paused:
        message = queue.popleft()
        transport.write(message)
        relay.relayed += message[0] == _NOTIFICATION  # not the NOTICE of a gap


def tell_gap(relay: Relay, text: str) -> None:
    """The relay is back after a loss: every listening client hears of the gap."""
    notice = messages.notice_response("01000", text, severity="WARNING")
    clients = {client for members in relay.listeners.values() for client in members}
    for client in clients:
        deliver(client, notice, relay)

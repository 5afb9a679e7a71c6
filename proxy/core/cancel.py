"""Cancel keys and CancelRequests: PgBouncer's cancel handling (objects.c, client.c).

Every client gets a (pid, key) pair of its own in BackendKeyData. A
CancelRequest naming it is forwarded, as a CancelRequest with the server's
own key on a new connection, to the PostgreSQL backend running that client's
query. Until PostgreSQL has taken the request the server is held back from
its next client, so a late cancel never lands on someone else's query. With
several workers the pid's low byte names the worker that issued it, and a
request for another worker's client is passed on to that worker. With
`peers:` the key also names the instance (core/fleetkeys.py, PgBouncer's
layout), and a request for another instance's client is sent to it, once.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from typing import TYPE_CHECKING, Protocol

from pgmux.protocol import messages
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.base.tasks import spawn
from pgmux.proxy.config.model import PeersConfig
from pgmux.proxy.core import fleetkeys

if TYPE_CHECKING:
    from pgmux.proxy.core.peers import Peers
    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection

_PEER_TIMEOUT = 5.0  # connecting to another instance and handing it a cancel


class Address(Protocol):
    """Where a CancelRequest goes: a PostgreSQL's credentials or a peer."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


log = get_logger("pgmux.cancel")


class CancelKeys:
    """The cancel keys of this process's clients, and the cancels they send."""

    def __init__(self) -> None:
        # By pid; a peered instance has few random pid bits (the peer id and the
        # worker take three bytes), so clients may share a pid, never a key.
        self.keys: dict[int, list[ClientConnection]] = {}
        self.peers: Peers | None = None  # set when running as one of listen.workers
        self.fleet = PeersConfig()  # `peers:`: the daemon keeps it current

    def issue(self, client: ClientConnection) -> tuple[int, bytes]:
        """A fresh (pid, key) for CLIENT's BackendKeyData; the pid is unique here
        unless peering leaves too few random bits for that."""
        peer_id = self.fleet.peer_id
        for _attempt in range(16):
            pid = secrets.randbits(31) or 1
            if self.peers is not None:
                pid = self.peers.issue_pid(pid)  # the low byte names this worker
            if peer_id:
                pid = fleetkeys.with_peer(pid, peer_id)  # bytes 1-2 name the instance
            if pid and pid not in self.keys:
                break
        length = self._key_length(client)
        if peer_id:
            key = fleetkeys.new_key(length, pid, self.fleet.secret)
        else:
            key = secrets.token_bytes(length)
        self.keys.setdefault(pid, []).append(client)
        return pid, key

    def _key_length(self, client: ClientConnection) -> int:
        """Protocol 3.2 allows 4 to 256 bytes; 32 is what PostgreSQL 18 hands out.
        With a PgBouncer among the peers, every key keeps PgBouncer's 4 bytes."""
        if client.protocol_minor >= 2 and not (self.fleet.peer_id and self.fleet.short_keys):
            return 32
        return 4

    def owner(self, pid: int, key: bytes) -> ClientConnection | None:
        """The client this (pid, key) was issued to; None if unknown or forged."""
        for client in self.keys.get(pid, ()):
            if hmac.compare_digest(client.cancel_key, key):
                return client
        return None

    def forget(self, client: ClientConnection) -> None:
        """CLIENT is gone: its pid may be issued again."""
        pid = client.cancel_pid
        owners = self.keys.get(pid)
        if owners and client in owners:
            owners.remove(client)
            if not owners:
                del self.keys[pid]

    def cancel(self, pid: int, key: bytes) -> None:
        """A CancelRequest: forward it to the server running that client's query."""
        peer_id = self.fleet.peer_id
        if peer_id:
            target = fleetkeys.peer_of(pid)
            if target != peer_id:
                self._to_peer(target, pid, key)
                return
            key = fleetkeys.with_ttl(key)  # issued with the TTL whole
        if self.peers is not None and self.peers.forward_cancel(pid, key):
            return  # another worker's client: that worker cancels
        client = self.owner(pid, key)
        if client is None:
            return  # unknown or forged key: silently nothing, as PostgreSQL does
        # Only while the client is linked and has a request on its server: the
        # key names the client, so a server it gave back is never cancelled.
        server = client.server
        if server is not None and client.expect_rfq > 0:
            log.info("cancel_forwarded", server_id=server.id, **client.log_fields())
            self.cancel_server(server)

    def _to_peer(self, target: int, pid: int, key: bytes) -> None:
        """Another instance's key: send the request there, with the TTL one lower.
        Only a request straight from a client travels (one hop, never a loop)."""
        peer = self.fleet.peer(target)
        if fleetkeys.ttl_of(key) != fleetkeys.TTL_MASK:
            reason = "already forwarded"
        elif peer is None:
            reason = "no such peer"
        elif not fleetkeys.signed_by_fleet(pid, key, self.fleet.secret):
            reason = "not signed by the fleet"
        else:
            log.info("cancel_to_peer", peer_id=target)
            ttl = fleetkeys.TTL_MASK - 1
            spawn(send_cancel(peer, pid, fleetkeys.with_ttl(key, ttl), _PEER_TIMEOUT))
            return
        log.info("cancel_dropped", peer_id=target, reason=reason)

    def cancel_server(self, server: ServerConnection) -> None:
        """Ask PostgreSQL to cancel what this backend runs (a new connection, its key).

        Until PostgreSQL has taken the request, the pool holds the server back
        (Pool.release), so the cancel cannot land on the next client's query.
        """
        if server.backend_pid:
            server.cancels_in_flight += 1
            # Stop reading the backend until the cancel has reached it. One that
            # streams rows (COPY TO STDOUT, a big result) keeps this process busy
            # passing them on, and the cancel's own connection would get its turns
            # so late that the backend finishes first: the cancel would seem lost.
            # Paused, it blocks on its socket, and the cancel stops it at its next row.
            server.pause_reading()
            spawn(_cancel_then_release(server))


async def _cancel_then_release(server: ServerConnection) -> None:
    """Send the cancel; the last one in flight lets a held-back server go."""
    try:
        timeout = server.pool.timeouts.cancel_wait or 10.0
        await send_cancel(server.credentials, server.backend_pid, server.backend_key, timeout)
    finally:
        server.cancels_in_flight -= 1
        client = server.client
        if not server.cancels_in_flight and (client is None or not client.writing_paused):
            server.resume_reading()  # unless its client is still behind (pause_writing)
        server.pool.cancel_finished(server)


async def send_cancel(creds: Address, pid: int, key: bytes, timeout: float) -> None:
    """A CancelRequest for PID to the PostgreSQL (or peer) at CREDS; failures are logged."""
    try:
        if creds.host.startswith("/"):
            path = f"{creds.host}/.s.PGSQL.{creds.port}"
            connect = asyncio.open_unix_connection(path)
        else:
            connect = asyncio.open_connection(creds.host, creds.port)
        reader, writer = await asyncio.wait_for(connect, timeout)
        try:
            writer.write(messages.cancel_request(pid, key))
            await writer.drain()
            await asyncio.wait_for(reader.read(1), timeout)  # PostgreSQL closes when done
        finally:
            writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel_forward_failed", error=str(exc) or type(exc).__name__)

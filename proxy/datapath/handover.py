"""Servers moving between workers (listen.workers > 1).

A server that comes free in one worker goes to another whose clients have
waited longer for the same pool (the ledger's `taker`), as a socket passed over
the workers' mailbox (SCM_RIGHTS); the receiving worker adopts it. Only a plain
socket can change process: a TLS session is closed instead and the taker opens
a server of its own. The pool's transitions (`Pool.forget`, `Pool.add_server`,
`Pool.release`) do the bookkeeping on each side.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

from pgmux.proxy.base.log import get_logger
from pgmux.proxy.core.peers import ServerHandedOver, ServerSnapshot
from pgmux.proxy.datapath import unnamed
from pgmux.proxy.datapath.server import ServerConnection

if TYPE_CHECKING:
    from pgmux.proxy.datapath.pool import Pool

log = get_logger("pgmux.pool")


def hand_over_to_taker(pool: Pool, server: ServerConnection) -> bool:
    """Give a server that came free to another worker if its clients deserve
    it more (ledger.taker); True when it went."""
    ledger = pool.slots.ledger
    assert ledger is not None and pool.shared_rows is not None
    row = pool.shared_rows[0]
    if not ledger.waiting_elsewhere(row):
        return False
    oldest = pool.waiting[0].wait_started if pool.waiting else None
    taker = ledger.taker(row, len(pool.servers) - 1, oldest)
    if taker is None:
        return False
    hand_over(pool, server, taker)
    return True


def offer_idle(pool: Pool) -> None:
    """Another worker's clients wait for this pool: hand over idle servers."""
    ledger = pool.slots.ledger
    assert ledger is not None and pool.shared_rows is not None
    while pool.idle and not pool.waiting:
        taker = ledger.taker(pool.shared_rows[0], len(pool.servers) - 1, None)
        if taker is None:
            return
        hand_over(pool, pool.idle[-1], taker)


def hand_over(pool: Pool, server: ServerConnection, worker: int) -> None:
    """Pass an idle, clean server's socket to WORKER; this side forgets it."""
    registry = pool.registry
    assert registry.ledger is not None and registry.worker is not None
    assert pool.shared_rows is not None
    if not movable(server):
        # A TLS session cannot change process: close it, the taker opens one.
        pool.close_server(server, "slot handed to another worker")
        return
    state = server.export_state()
    fd = detach(server)
    registry.ledger.move(pool.shared_rows, worker)
    pool.forget(server, shared=False)
    log.debug("server_handed_over", db=pool.dbname, user=pool.user, to_worker=worker)
    if not registry.worker.send(worker, ServerHandedOver(pool.dbname, pool.user, state), fd):
        registry.ledger.give_back(pool.shared_rows, worker)


def movable(server: ServerConnection) -> bool:
    """Only a plain socket can change process; a TLS session lives in this one."""
    transport = server.transport
    return (
        transport is not None
        and not transport.is_closing()
        and not server.stale  # another worker would not know to close them first
        and transport.get_extra_info("ssl_object") is None
        and transport.get_extra_info("socket") is not None
    )


def detach(server: ServerConnection) -> int:
    """A duplicate of the socket's descriptor for another process; this side
    lets go of it without a word to PostgreSQL (the backend lives on)."""
    assert server.transport is not None
    fd = os.dup(server.transport.get_extra_info("socket").fileno())
    server.moved = True
    server.transport.abort()
    return fd


async def adopt(pool: Pool, state: ServerSnapshot, fd: int) -> None:
    """A server handed over by another worker joins this pool."""
    server = ServerConnection.adopted(pool, pool.credentials, state)
    server.unnamed_owner = unnamed.FOREIGN  # whatever it holds is a client's elsewhere
    pool.add_server(server)
    loop = asyncio.get_running_loop()
    try:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: server, sock)
    except OSError as exc:
        log.warning("server_adopt_failed", db=pool.dbname, user=pool.user, error=str(exc))
        pool.forget(server)
        return
    log.debug("server_adopted", db=pool.dbname, user=pool.user, server_id=server.id)
    pool.learn_params(server)
    pool.release(server)

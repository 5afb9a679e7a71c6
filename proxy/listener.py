"""Listening sockets (PgBouncer's pooler.c): TCP addresses and the unix socket.

The unix socket is named like PostgreSQL's (`.s.PGSQL.<port>` in
unix_socket_dir), so `psql -h /run/pgmux -p 6432` finds it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

from .client import ClientConnection
from .log import get_logger

if TYPE_CHECKING:
    from .registry import Registry

log = get_logger("pgmux.listener")


class Listener:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.servers: list[asyncio.Server] = []
        self.unix_path: str | None = None

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen on the configured addresses, or on inherited sockets."""
        loop = asyncio.get_running_loop()
        listen = self.registry.config.listen

        def factory() -> ClientConnection:
            return ClientConnection(self.registry)

        if sockets:
            for sock in sockets:
                self.servers.append(await loop.create_server(factory, sock=sock))
            return
        for address in listen.addresses:
            host = None if address == "*" else address
            server = await loop.create_server(
                factory, host, listen.port, reuse_address=True, backlog=listen.backlog
            )
            self.servers.append(server)
        if listen.unix_socket_dir:
            self.unix_path = os.path.join(listen.unix_socket_dir, f".s.PGSQL.{listen.port}")
            os.makedirs(listen.unix_socket_dir, exist_ok=True)
            if os.path.exists(self.unix_path):
                os.unlink(self.unix_path)  # left by a previous run
            server = await loop.create_unix_server(factory, self.unix_path, backlog=listen.backlog)
            os.chmod(self.unix_path, listen.unix_socket_mode)
            self.servers.append(server)
        log.info("listening", addresses=list(listen.addresses), port=listen.port,
                 unix_socket=self.unix_path)

    def close(self) -> None:
        """Stop accepting; connected clients stay."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        if self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)

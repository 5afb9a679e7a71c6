"""Listening sockets (PgBouncer's pooler.c): TCP addresses and the unix socket.

The unix socket is named like PostgreSQL's (`.s.PGSQL.<port>` in
unix_socket_dir), so `psql -h /run/pgmux -p 6432` finds it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

from pgmux.proxy.base.log import get_logger
from pgmux.proxy.console.session import open_console
from pgmux.proxy.datapath.client import ClientConnection
from pgmux.proxy.login import new_client

if TYPE_CHECKING:
    from pgmux.proxy.registry import Registry

log = get_logger("pgmux.listener")


class Listener:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.servers: list[asyncio.Server] = []
        self.unix_path: str | None = None

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen on the configured addresses, or on inherited sockets.

        Sockets handed over by systemd (LISTEN_FDS) replace the configured
        addresses: the socket unit owns them, and they survive a restart.
        """
        loop = asyncio.get_running_loop()
        listen = self.registry.config.listen

        def factory() -> ClientConnection:
            return new_client(self.registry, open_console)

        if sockets is None:
            sockets = inherited_sockets()
        if sockets:
            for sock in sockets:
                sock.setblocking(False)
                if sock.family == socket.AF_UNIX:
                    server = await loop.create_unix_server(factory, sock=sock)
                else:
                    server = await loop.create_server(factory, sock=sock)
                self.servers.append(server)
            log.info("listening", inherited=[_name(sock) for sock in sockets])
            return
        for address in listen.addresses:
            host = None if address == "*" else address
            server = await loop.create_server(
                factory,
                host,
                listen.port,
                reuse_address=True,
                reuse_port=listen.reuse_port or None,
                backlog=listen.backlog,
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
        log.info(
            "listening",
            addresses=list(listen.addresses),
            port=listen.port,
            unix_socket=self.unix_path,
        )

    def close(self) -> None:
        """Stop accepting; connected clients stay."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        if self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)


SD_LISTEN_FDS_START = 3  # systemd passes sockets from this descriptor on


def inherited_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (sd_listen_fds).

    Taken only when LISTEN_PID names this process, so a child never takes
    sockets meant for its parent; the variables are then removed so they do
    not leak to anything pgmux starts.
    """
    env = os.environ if environ is None else environ
    try:
        count = int(env.get("LISTEN_FDS", "0"))
        pid = int(env.get("LISTEN_PID", "0"))
    except ValueError:
        return []
    if count <= 0 or pid != os.getpid():
        return []
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def _name(sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return address.decode(errors="replace") if isinstance(address, bytes) else str(address)

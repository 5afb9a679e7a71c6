"""The fields a client's and a server's log events carry: what PgBouncer's
`C-0x...:` / `S-0x...:` prefixes name (pool, addresses) and what its lines say
(local address, age)."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

    from pgmux.proxy.datapath.client import ClientConnection
    from pgmux.proxy.datapath.server import ServerConnection


def client_log_fields(client: ClientConnection) -> dict[str, str]:
    return {
        "ptr": f"{id(client):#x}",  # SHOW CLIENTS' ptr, PgBouncer's C-0x... in the log
        "client": client.peer,
        "db": client.dbname,
        "user": client.user,
        "application_name": client.application_name,
    }


def server_log_fields(server: ServerConnection) -> dict[str, object]:
    creds = server.credentials
    host = "unix" if creds.host.startswith("/") else creds.host
    fields: dict[str, object] = {
        "ptr": f"{id(server):#x}",  # SHOW SERVERS' ptr
        "server": f"{host}:{creds.port}",
        "age": round(time.monotonic() - server.connected_at, 3),
    }
    sock = None
    with contextlib.suppress(Exception):  # a transport already closed knows nothing
        sock = server.transport.get_extra_info("sockname")
    if isinstance(sock, tuple):
        fields["local"] = f"{sock[0]}:{sock[1]}"
    return fields


def tls_description(ssl_object: ssl.SSLObject | None) -> str:
    """PgBouncer's tls= of a login attempt: "no", or protocol/cipher."""
    if ssl_object is None:
        return "no"
    cipher = ssl_object.cipher()
    return f"{ssl_object.version() or '-'}/{cipher[0] if cipher else '-'}"


_REPLICATION_ON = frozenset({"1", "true", "yes", "on"})


def replication_kind(value: str | None) -> str:
    """PgBouncer's replication= of a login attempt: no, yes (physical) or database."""
    if value is None:
        return "no"
    lowered = value.strip().lower()
    if lowered == "database":
        return "database"
    return "yes" if lowered in _REPLICATION_ON else "no"

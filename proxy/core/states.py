"""The states of a client and of a server connection (PgBouncer's CL_* / SV_*).

A server's state says which of its pool's lists holds it; only the pool's
transition methods (``Pool._set_server_state`` and ``Pool._link``) change it, so
the lists, the counters and SHOW SERVERS cannot drift apart. A client's state
changes only through ``ClientConnection._set_state``.
"""

from __future__ import annotations

import enum


class ServerState(enum.IntEnum):
    """An int so a pool can index its per-state lists with it (Pool._set_server_state)."""

    LOGIN = 0  # connecting, TLS, startup, authentication (SHOW SERVERS: new)
    ACTIVE = 1  # linked to a client
    CLEANING = 2  # pgmux's own statements after a client: reset, rollback (tested)
    CANCEL_WAIT = 3  # released while a cancel is on its way (being_canceled)
    IDLE = 4  # in the pool's idle stack, ready for the next client
    CLOSED = 5  # gone from the pool


class ClientState(enum.Enum):
    LOGIN = "login"  # startup packet, TLS, authentication
    WELCOME = "welcome"  # authenticated; queued until the pool knows a server's parameters
    IDLE = "idle"  # logged in, between transactions, no server
    WAITING = "waiting"  # queued for a server (cl_waiting)
    LINKING = "linking"  # a server is assigned; pgmux brings its parameters in line first
    ACTIVE = "active"  # linked to a server, bytes flow both ways
    CONSOLE = "console"  # an admin console session owns the connection
    CLOSED = "closed"


# The members as module globals, for the data path: a global of the module that
# imports them reads faster than an Enum attribute.
SERVER_LOGIN = ServerState.LOGIN
SERVER_ACTIVE = ServerState.ACTIVE
SERVER_CLEANING = ServerState.CLEANING
SERVER_CANCEL_WAIT = ServerState.CANCEL_WAIT
SERVER_IDLE = ServerState.IDLE
SERVER_CLOSED = ServerState.CLOSED
CLIENT_WELCOME = ClientState.WELCOME
CLIENT_IDLE = ClientState.IDLE
CLIENT_WAITING = ClientState.WAITING
CLIENT_LINKING = ClientState.LINKING
CLIENT_ACTIVE = ClientState.ACTIVE
CLIENT_CLOSED = ClientState.CLOSED

# A logged-in client of a pool: the states the janitor's client timeouts watch.
READY = frozenset((ClientState.IDLE, ClientState.WAITING, ClientState.LINKING, ClientState.ACTIVE))

# What SHOW SERVERS / SHOW CLIENTS print, in PgBouncer's words.
SERVER_SHOWN = {
    ServerState.LOGIN: "new",
    ServerState.IDLE: "idle",
    ServerState.ACTIVE: "active",
    ServerState.CLEANING: "tested",
    ServerState.CANCEL_WAIT: "being_canceled",
    ServerState.CLOSED: "closed",
}
CLIENT_SHOWN = {
    ClientState.LOGIN: "login",
    ClientState.WELCOME: "waiting",
    ClientState.IDLE: "idle",
    ClientState.WAITING: "waiting",
    ClientState.LINKING: "active",
    ClientState.ACTIVE: "active",
    ClientState.CONSOLE: "active",
    ClientState.CLOSED: "closed",
}

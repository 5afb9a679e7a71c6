"""The states of a client and of a server connection (PgBouncer's CL_* / SV_*).

A server's state says which of its pool's lists holds it; only the pool's
transition methods (``Pool._set_server_state`` and the hand-off) change it, so
the lists, the counters and SHOW SERVERS cannot drift apart. A client's state
changes only through ``ClientConnection._set_state``.
"""

from __future__ import annotations

import enum


class ServerState(enum.Enum):
    LOGIN = "login"  # connecting, TLS, startup, authentication (SHOW SERVERS: new)
    IDLE = "idle"  # in the pool's idle stack, ready for the next client
    ACTIVE = "active"  # linked to a client
    CLEANING = "cleaning"  # pgmux's own statements after a client: reset, rollback (tested)
    CANCEL_WAIT = "cancel_wait"  # released while a cancel is on its way (being_canceled)
    CLOSED = "closed"  # gone from the pool


class ClientState(enum.Enum):
    LOGIN = "login"  # startup packet, TLS, authentication
    WELCOME = "welcome"  # authenticated; queued until the pool knows a server's parameters
    IDLE = "idle"  # logged in, between transactions, no server
    WAITING = "waiting"  # queued for a server (cl_waiting)
    LINKING = "linking"  # a server is assigned; pgmux brings its parameters in line first
    ACTIVE = "active"  # linked to a server, bytes flow both ways
    CONSOLE = "console"  # an admin console session owns the connection
    CLOSED = "closed"


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

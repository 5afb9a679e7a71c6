"""`pgmux -u USER`: bind as root, then run as USER (PgBouncer's -u / `user`).

Ports below 1024 and root-owned socket directories need root only while the
listening sockets are made; everything after runs as USER. Without root,
-u USER is accepted only when we already are USER, as in PgBouncer.
"""

from __future__ import annotations

import os
import pwd


class PrivilegeError(Exception):
    pass


def check_user(name: str) -> pwd.struct_passwd:
    """The passwd entry of NAME, or PrivilegeError saying why we cannot become it."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"-u {name}: no such user") from None
    if os.geteuid() != 0 and os.geteuid() != entry.pw_uid:
        raise PrivilegeError(f"-u {name}: only root can switch to another user")
    return entry


def drop_privileges(name: str, unix_socket: str | None = None) -> None:
    """Become NAME (groups, gid, then uid) if we are root; a no-op otherwise."""
    entry = check_user(name)
    if os.geteuid() != 0:
        return
    if unix_socket and os.path.exists(unix_socket):
        # so that USER can remove its socket at shutdown, even in a sticky /tmp
        os.chown(unix_socket, entry.pw_uid, entry.pw_gid)
    os.initgroups(name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)

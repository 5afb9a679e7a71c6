"""When a pool tries its next server login after one failed.

A PostgreSQL that is down (connection refused, a timeout, the connection lost
during the login) or not accepting connections yet (57P03: starting up,
shutting down) is usually back within a second, as after `pg_ctl restart`:
waiting clients should not sit out the whole `timeouts.server_login_retry`.
So the delay starts at FIRST_DELAY and doubles with each failed round, up to
server_login_retry; while clients wait it is capped at WAITING_CAP, so the
first commit after a restart comes within about that much of PostgreSQL
accepting connections. Logins that fail together (the round's siblings) count
once. A login PostgreSQL itself refuses (bad password, no such database) is
another matter: the pool fails its waiters and waits the full
server_login_retry (`refused`), so a wrong password is not hammered; so does
a server whose login replies break the protocol (no waiting cures that).
"""

from __future__ import annotations

FIRST_DELAY = 0.025  # seconds before the first retry of a streak of failures
WAITING_CAP = 0.25  # the longest delay while clients wait for a server


class LoginBackoff:
    """The delay of the current streak of failed logins and when it ends."""

    __slots__ = ("delay", "next_at", "waiting_at")

    def __init__(self) -> None:
        self.delay = 0.0  # 0: no transient failure in the current streak
        self.next_at = 0.0  # the next attempt when nobody waits
        self.waiting_at = 0.0  # the next attempt for waiting clients

    def failed(self, now: float, limit: float, streak: bool) -> bool:
        """A transient failure at NOW; STREAK: the previous login failed too.

        False for a sibling of a login that already failed this round (the
        next round is planned); else the delay grows and True is returned.
        """
        if streak and self.delay and now < self.next_at:
            return False
        growing = streak and self.delay
        self.delay = min(self.delay * 2 if growing else FIRST_DELAY, limit)
        self.next_at = now + self.delay
        self.waiting_at = now + min(self.delay, WAITING_CAP)
        return True

    def refused(self, until: float) -> None:
        """PostgreSQL refused the login: nobody tries again before UNTIL."""
        self.delay = 0.0
        self.next_at = self.waiting_at = until

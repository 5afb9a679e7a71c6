"""PAUSE, SUSPEND and DISABLE as flags: what new work may start.

PgBouncer's pause state (admin.c's cf_pause_mode and the per-database
db->db_paused, db->db_disabled). The console and SIGUSR1/SIGUSR2 set them;
the pools ask is_paused before starting a transaction and the login asks
is_disabled. Acting on a change (closing idle servers, stopping reads) is the
registry's part.
"""

from __future__ import annotations


class Flags:
    """PAUSE (all or per database), SUSPEND, and the DISABLEd databases."""

    def __init__(self) -> None:
        self.paused = False
        self.suspended = False
        self.paused_databases: set[str] = set()
        self.disabled_databases: set[str] = set()

    def is_paused(self, dbname: str) -> bool:
        """Whether new transactions on DBNAME wait (PAUSE or SUSPEND)."""
        return self.paused or self.suspended or dbname in self.paused_databases

    def is_disabled(self, dbname: str) -> bool:
        """Whether new logins to DBNAME are refused (DISABLE)."""
        return dbname in self.disabled_databases

    def pause(self, dbname: str | None = None) -> None:
        """PAUSE everything, or only DBNAME."""
        if dbname is None:
            self.paused = True
        else:
            self.paused_databases.add(dbname)

    def resume(self, dbname: str | None = None) -> bool:
        """Lift PAUSE and SUSPEND (DBNAME None), or DBNAME's PAUSE; True when
        a SUSPEND was lifted, so clients are read from again."""
        if dbname is not None:
            self.paused_databases.discard(dbname)
            return False
        self.paused = False
        was_suspended, self.suspended = self.suspended, False
        return was_suspended

    def suspend(self) -> None:
        self.suspended = True

    def disable(self, dbname: str) -> None:
        self.disabled_databases.add(dbname)

    def enable(self, dbname: str) -> None:
        self.disabled_databases.discard(dbname)

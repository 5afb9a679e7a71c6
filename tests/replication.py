"""A real streaming-replication pair for the high-availability tests.

The primary is a TempPostgres; the standby is made from it with
`pg_basebackup -R` into a data directory of its own and started as another
TempPostgres on its own free port (as the postgres OS user when we are root,
as tempgres does). The test can stop either with `-m immediate` and promote
the standby with `pg_ctl promote`.

With `synchronous=True` the primary waits for the standby to flush each
commit (synchronous_standby_names = '*'), so an acknowledged commit survives
losing the primary; the standby itself has no synchronous standby, so it
commits alone once promoted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator

from pgmux.tempgres import TempPostgres, TempPostgresError

STANDBY_NAME = "standby1"
CATCH_UP_TIMEOUT = 30.0


class ReplicationPair:
    def __init__(self, primary: TempPostgres, standby: TempPostgres) -> None:
        self.primary = primary
        self.standby = standby

    def promote(self) -> None:
        """pg_ctl promote -w: returns once the standby accepts writes."""
        argv = [self.standby._bin("pg_ctl"), "promote", "-w", "-t", "60"]
        result = self.standby._run_as_pg([*argv, "-D", self.standby.data_dir])
        if result.returncode != 0:
            raise TempPostgresError(f"pg_ctl promote failed: {result.stdout}{result.stderr}")

    def wait_streaming(self) -> None:
        """Until the primary sees the standby streaming (and, if configured, in sync)."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while time.monotonic() < deadline:
            state = self.primary.sql("SELECT state FROM pg_stat_replication")
            if state == "streaming":
                return
            time.sleep(0.05)
        raise TempPostgresError("the standby did not start streaming")

    def wait_replayed(self) -> None:
        """Until the standby replayed everything the primary wrote so far."""
        target = self.primary.sql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        query = f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
        while time.monotonic() < deadline:
            if self.standby.sql(query) == "t":
                return
            time.sleep(0.05)
        raise TempPostgresError("the standby did not catch up")


def server_pids(cluster: TempPostgres) -> list[int]:
    """The postmaster of CLUSTER and its children (from /proc), the postmaster first."""
    postmaster = cluster.pid
    if postmaster is None:
        return []
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            children.append(int(entry))
    return [postmaster, *children]


def freeze(cluster: TempPostgres) -> list[int]:
    """SIGSTOP the whole server: it keeps its sockets but answers nothing (a hung host)."""
    pids = server_pids(cluster)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _allow_replication(primary: TempPostgres) -> None:
    """pg_basebackup and the standby connect as the superuser over the unix socket."""
    path = os.path.join(primary.data_dir, "pg_hba.conf")
    with open(path) as f:
        text = f.read()
    primary._write_data_file("pg_hba.conf", "local replication all trust\n" + text)
    primary.sql("SELECT pg_reload_conf()")


def _base_backup(primary: TempPostgres, standby: TempPostgres) -> None:
    os.makedirs(standby.socket_dir, exist_ok=True)
    standby._hand_over_to_postgres_user()
    argv = [
        *(primary._bin("pg_basebackup"), "-D", standby.data_dir, "-R", "-X", "stream"),
        *("-h", primary.socket_dir, "-p", str(primary.port), "-U", primary.superuser),
        *("--no-sync", "-c", "fast", "-d", f"application_name={STANDBY_NAME}"),
    ]
    result = standby._run_as_pg(argv)
    if result.returncode != 0:
        raise TempPostgresError(f"pg_basebackup failed: {result.stdout}{result.stderr}")


@contextlib.contextmanager
def replication_pair(
    *, synchronous: bool = True, max_connections: int = 40
) -> Iterator[ReplicationPair]:
    """A primary with role `app` and database `appdb`, and its streaming standby."""
    settings = {"synchronous_commit": "on"}
    primary = TempPostgres(max_connections=max_connections, settings=settings)
    standby = TempPostgres(max_connections=max_connections, settings={"synchronous_commit": "on"})
    try:
        primary.start()  # synchronous only once the standby streams: no commit waits forever
        primary.create_role("app", "app-secret")
        primary.create_database("appdb", owner="app")
        _allow_replication(primary)
        _base_backup(primary, standby)
        standby.start()
        standby._passwords["app"] = "app-secret"
        pair = ReplicationPair(primary, standby)
        pair.wait_streaming()
        if synchronous:
            primary.settings["synchronous_standby_names"] = "*"
            primary._write_settings()
            primary.sql("SELECT pg_reload_conf()")
        yield pair
    finally:
        for cluster in (standby, primary):
            with contextlib.suppress(Exception):
                cluster.stop("immediate")
        for cluster in (standby, primary):
            shutil.rmtree(cluster.base_dir, ignore_errors=True)

"""Fault suite: PostgreSQL goes away under transfer load and comes back.

24 clients move money between accounts through pgmux (transaction pooling,
pool size 4) while PostgreSQL is stopped and started again, restarted with
`pg_ctl restart -m fast` and with `-m immediate`. A poller connects straight
to PostgreSQL every 20 ms to see when the new postmaster accepts connections.
Afterwards: every commit a client saw acknowledged is in the database, the
sum of all balances is unchanged and every balance is explained by the stored
transfers; no transaction hung (each is bounded by a timeout); the first
commit through pgmux came within 1 s of PostgreSQL accepting (pgmux retries
failed server logins for waiting clients after tens of milliseconds, not
after server_login_retry); and every client committed again.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from faultload import SETUP_SQL, check_books, start_load, stop_load
from helpers import APP_DB, PgmuxFactory, close_quietly

from pgmux.tempgres import TempPostgres

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

CLIENTS = 24
POLL_INTERVAL = 0.02
FIRST_COMMIT_WITHIN = 1.0  # the acceptance bound, seconds after PostgreSQL accepts
EVERY_CLIENT_WITHIN = 10.0  # generous: 24 clients through 4 servers on a shared machine
RESTART_TIMEOUT = 60.0
DOWN_FOR = 1.0  # stop+start: how long PostgreSQL stays stopped

# A poll that meets the shutting-down postmaster can also get its FATAL while
# asyncpg is mid-operation, which asyncpg reports as InternalClientError.
POLL_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


async def postmaster_started(pg: TempPostgres) -> float | None:
    """pg_postmaster_start_time() as epoch seconds, or None if PostgreSQL does not answer."""
    try:
        conn = await asyncpg.connect(
            host=pg.host,
            port=pg.port,
            user=pg.superuser,
            password=pg.password,
            database="postgres",
            timeout=1,
        )
    except (*POLL_ERRORS, TimeoutError):
        return None
    try:
        return float(await conn.fetchval("SELECT extract(epoch FROM pg_postmaster_start_time())"))
    except POLL_ERRORS:
        return None
    finally:
        await close_quietly(conn)


async def accepting_again(pg: TempPostgres, old_start: float, deadline: float) -> float:
    """The monotonic time of the first poll the new postmaster answered (taken
    when that connection attempt began: the stricter measure for pgmux)."""
    while time.monotonic() < deadline:
        began = time.monotonic()
        started = await postmaster_started(pg)
        if started is not None and started != old_start:
            return began
        await asyncio.sleep(max(0.0, POLL_INTERVAL - (time.monotonic() - began)))
    raise AssertionError("PostgreSQL did not accept connections after the fault")


def pg_ctl_restart(pg: TempPostgres, mode: str) -> None:
    # pg_ctl restart keeps the postmaster's options; -l keeps its output off our pipe.
    result = pg._run_as_pg(
        [
            *(pg._bin("pg_ctl"), "restart", "-w", "-t", str(int(RESTART_TIMEOUT))),
            *("-m", mode, "-D", pg.data_dir, "-l", pg.log_path),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def stop_then_start(pg: TempPostgres) -> None:
    pg.stop("fast")
    time.sleep(DOWN_FOR)
    pg.start()


FAULTS = {
    "stop_start": stop_then_start,
    "restart_fast": lambda pg: pg_ctl_restart(pg, "fast"),
    "restart_immediate": lambda pg: pg_ctl_restart(pg, "immediate"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_postgres_fault_under_transfer_load(
    own_pg: TempPostgres, pgmux: PgmuxFactory, fault: str
) -> None:
    own_pg.sql(SETUP_SQL, APP_DB)
    mux = pgmux(
        {
            "databases": {APP_DB: {"host": own_pg.host, "port": own_pg.port}},
            "pool": {"mode": "transaction", "size": 4},
            "timeouts": {"query_wait": "30s", "server_connect": "2s"},
        }
    )
    old_start = await postmaster_started(own_pg)
    assert old_start is not None
    load, stop, tasks = start_load(mux, CLIENTS)
    try:
        await asyncio.sleep(0.5)
        before = len(load.acknowledged)
        assert before, f"no commit before the fault ({load.errors} errors)"
        struck = time.monotonic()
        faulting = asyncio.create_task(asyncio.to_thread(FAULTS[fault], own_pg))
        accepted = await accepting_again(own_pg, old_start, time.monotonic() + RESTART_TIMEOUT)
        deadline = accepted + EVERY_CLIENT_WITHIN
        while time.monotonic() < deadline and load.all_committed_after(accepted) is None:
            await asyncio.sleep(0.005)
        await faulting
        await asyncio.sleep(0.3)  # the load runs on against the new server
    finally:
        await stop_load(stop, tasks)
    first = load.first_commit_after(accepted)
    every = load.all_committed_after(accepted)
    assert first is not None, "no commit through pgmux after PostgreSQL accepted again"
    print(
        f"{fault}: PostgreSQL accepted {accepted - struck:.2f} s after the fault began; "
        f"first commit {(first - accepted) * 1000:.0f} ms later, every one of {CLIENTS} "
        f"clients {'never' if every is None else f'{(every - accepted) * 1000:.0f} ms'} later; "
        f"{len(load.acknowledged)} commits acknowledged ({before} before), {load.errors} errors"
    )
    assert load.hangs == 0, f"{load.hangs} transactions hung"
    check_books(load, lambda query: own_pg.sql(query, APP_DB))
    assert first - accepted < FIRST_COMMIT_WITHIN, (
        f"first commit {first - accepted:.3f} s after PostgreSQL accepted connections (bound 1 s)"
    )
    stuck = [c.number for c in load.clients if not any(t > accepted for t in c.commits)]
    assert not stuck, f"clients that never committed again: {stuck}"

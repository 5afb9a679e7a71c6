"""Acceptance: after `pg_ctl restart` under load the first commit comes within 1 s.

Eight clients run short transactions through pgmux (transaction pooling,
pool size 4, the default server_login_retry of 5 s) while PostgreSQL is
restarted with `pg_ctl restart -m fast` and `-m immediate`. A poller connects
straight to PostgreSQL every 20 ms to see when the new postmaster accepts
connections; the first commit through pgmux after that must follow within
1 s (pgmux retries failed server logins for waiting clients after tens of
milliseconds, not after server_login_retry). Every commit pgmux acknowledged
is in the table afterwards, and no client hangs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import pytest
from helpers import APP_DB, APP_PASSWORD, APP_USER, PgmuxFactory, close_quietly, connect_asyncpg

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(150)

CLIENTS = 8
POLL_INTERVAL = 0.02
FIRST_COMMIT_WITHIN = 1.0  # the acceptance bound, seconds after PostgreSQL accepts
TRANSACTION_TIMEOUT = 15.0  # far above query_wait's retries: a wait this long is a hang
RESTART_TIMEOUT = 60.0


@pytest.fixture
def own_pg() -> Iterator[TempPostgres]:
    """A PostgreSQL of this test's own: restarting it disturbs no other test.
    synchronous_commit on: an acknowledged commit survives an immediate stop."""
    with TempPostgres(max_connections=30, settings={"synchronous_commit": "on"}) as cluster:
        cluster.create_role(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        cluster.sql("CREATE TABLE ledger (client int, seq int, PRIMARY KEY (client, seq))", APP_DB)
        cluster.sql(f"GRANT ALL ON ledger TO {APP_USER}", APP_DB)
        yield cluster


@dataclass
class Load:
    """What the clients did: the time of every commit and every (client, seq) acknowledged."""

    commits: list[float] = field(default_factory=list)
    acknowledged: set[tuple[int, int]] = field(default_factory=set)
    errors: int = 0
    hangs: int = 0


async def client(mux: object, number: int, load: Load, stop: asyncio.Event) -> None:
    """Short transactions until STOP; on an error, reconnect if needed and go on."""
    conn: asyncpg.Connection | None = None
    seq = 0
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncio.wait_for(connect_asyncpg(mux), TRANSACTION_TIMEOUT)
            seq += 1
            await asyncio.wait_for(transaction(conn, number, seq), TRANSACTION_TIMEOUT)
            load.commits.append(time.monotonic())
            load.acknowledged.add((number, seq))
        except TimeoutError:
            load.hangs += 1
            await close_quietly(conn)
            conn = None
        except asyncpg.InternalClientError:
            # PostgreSQL's FATAL (57P01) reached the client idle in a transaction;
            # asyncpg's connection is unusable after that, as it is without pgmux.
            load.errors += 1
            await close_quietly(conn)
            conn = None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            load.errors += 1
            await asyncio.sleep(0.01)
    await close_quietly(conn)


async def transaction(conn: asyncpg.Connection, number: int, seq: int) -> None:
    async with conn.transaction():
        await conn.execute("INSERT INTO ledger VALUES ($1, $2)", number, seq)


# A poll that meets the shutting-down postmaster can also get its FATAL while
# asyncpg is mid-operation, which asyncpg reports as InternalClientError.
POLL_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


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
    """The monotonic time of the first poll the restarted postmaster answered
    (taken when that connection attempt began: the later PostgreSQL accepted
    within one poll of it, the stricter the measure for pgmux)."""
    while time.monotonic() < deadline:
        began = time.monotonic()
        started = await postmaster_started(pg)
        if started is not None and started != old_start:
            return began
        await asyncio.sleep(max(0.0, POLL_INTERVAL - (time.monotonic() - began)))
    raise AssertionError("PostgreSQL did not accept connections after the restart")


def pg_ctl_restart(pg: TempPostgres, mode: str) -> None:
    # pg_ctl restart keeps the postmaster's options; -l keeps its output off our pipe.
    result = pg._run_as_pg(
        [
            *(pg._bin("pg_ctl"), "restart", "-w", "-t", str(int(RESTART_TIMEOUT))),
            *("-m", mode, "-D", pg.data_dir, "-l", pg.log_path),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_first_commit_within_1s_of_postgres_accepting(
    own_pg: TempPostgres, pgmux: PgmuxFactory, mode: str
) -> None:
    mux = pgmux(
        {
            "databases": {APP_DB: {"host": own_pg.host, "port": own_pg.port}},
            "pool": {"mode": "transaction", "size": 4},
            "timeouts": {"query_wait": "30s", "server_connect": "2s"},
        }
    )
    old_start = await postmaster_started(own_pg)
    assert old_start is not None
    load, stop = Load(), asyncio.Event()
    clients = [asyncio.create_task(client(mux, n, load, stop)) for n in range(CLIENTS)]
    try:
        await asyncio.sleep(0.5)
        assert load.commits, f"no commit before the restart ({load.errors} errors)"
        restart = asyncio.create_task(asyncio.to_thread(pg_ctl_restart, own_pg, mode))
        deadline = time.monotonic() + RESTART_TIMEOUT
        accepted = await accepting_again(own_pg, old_start, deadline)
        while time.monotonic() < accepted + 10 and not any(t > accepted for t in load.commits):
            await asyncio.sleep(0.005)
        first = min((t for t in load.commits if t > accepted), default=None)
        await restart
        await asyncio.sleep(0.3)  # the load runs on against the restarted server
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert first is not None, "no commit through pgmux within 10 s of PostgreSQL accepting"
    gap = first - accepted
    print(f"pg_ctl restart -m {mode}: first commit {gap * 1000:.0f} ms after PostgreSQL accepted")
    assert gap < FIRST_COMMIT_WITHIN, (
        f"first commit {gap:.3f} s after PostgreSQL accepted connections (bound 1 s)"
    )
    assert load.hangs == 0, f"{load.hangs} transactions hung"
    stored = own_pg.sql("SELECT client || ':' || seq FROM ledger", APP_DB).split()
    lost = {f"{c}:{s}" for c, s in load.acknowledged} - set(stored)
    assert not lost, f"{len(lost)} acknowledged commits lost of {len(load.acknowledged)}"

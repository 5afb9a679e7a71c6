"""The fault suite's load: clients moving money between accounts through pgmux.

Each client runs transfers (two UPDATEs in account order and a row in
`transfers`, inside one transaction) until told to stop, each one bounded by
TRANSACTION_TIMEOUT. Every commit the client saw acknowledged goes into the
client-side ledger; `check_books` then proves that none was lost, that the
sum of all balances is unchanged and that every balance is what the stored
transfers say (no half transaction survived).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
from helpers import APP_DB, close_quietly, connect_asyncpg

from pgmux.proxy.core.peers import worker_of

ACCOUNTS = 48
START_BALANCE = 1000
TRANSACTION_TIMEOUT = 15.0  # far above any retry or wait pgmux makes: longer is a hang
MAX_TRANSFERS = 100_000  # per client: every load loop is bounded in count as in time

SETUP_SQL = f"""
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO accounts SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;
CREATE TABLE transfers (client int, seq int, src int, dst int, amount int,
                        PRIMARY KEY (client, seq));
GRANT ALL ON accounts, transfers TO app;
"""

# What a client may see while PostgreSQL or its pgmux worker goes away. asyncpg
# reports a FATAL that reaches an idle connection as InternalClientError.
DISTURBANCES = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


@dataclass
class ClientLog:
    """One client's view: its commits (monotonic times) and its errors."""

    number: int
    commits: list[float] = field(default_factory=list)
    # (monotonic time, worker of the connection or -1 before one, error)
    errors: list[tuple[float, int, str]] = field(default_factory=list)
    hangs: int = 0
    worker: int = -1  # of its current connection (listen.workers)


@dataclass
class Load:
    clients: list[ClientLog]
    acknowledged: set[tuple[int, int]] = field(default_factory=set)

    @property
    def hangs(self) -> int:
        return sum(c.hangs for c in self.clients)

    @property
    def errors(self) -> int:
        return sum(len(c.errors) for c in self.clients)

    def first_commit_after(self, moment: float) -> float | None:
        return min((t for c in self.clients for t in c.commits if t > moment), default=None)

    def all_committed_after(self, moment: float) -> float | None:
        """When the last client had committed again after MOMENT (None: not all yet)."""
        firsts = [min((t for t in c.commits if t > moment), default=None) for c in self.clients]
        return None if None in firsts else max(f for f in firsts if f is not None)


async def transfer(conn: asyncpg.Connection, number: int, seq: int, rng: random.Random) -> None:
    src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
    amount = rng.randint(1, 50)
    async with conn.transaction():
        for account, delta in sorted([(src, -amount), (dst, amount)]):  # lock in id order
            await conn.execute(
                "UPDATE accounts SET balance = balance + $2 WHERE id = $1", account, delta
            )
        await conn.execute(
            "INSERT INTO transfers VALUES ($1, $2, $3, $4, $5)", number, seq, src, dst, amount
        )


async def run_client(
    mux: object, log: ClientLog, load: Load, stop: asyncio.Event, dbname: str
) -> None:
    """Transfers until STOP; on an error reconnect if needed and go on."""
    rng = random.Random(log.number)
    conn: asyncpg.Connection | None = None
    for seq in range(1, MAX_TRANSFERS + 1):
        if stop.is_set():
            break
        try:
            if conn is None or conn.is_closed():
                log.worker = -1
                conn = await asyncio.wait_for(connect_asyncpg(mux, dbname), TRANSACTION_TIMEOUT)
                log.worker = worker_of(conn.get_server_pid())
            await asyncio.wait_for(transfer(conn, log.number, seq, rng), TRANSACTION_TIMEOUT)
        except TimeoutError:
            log.hangs += 1
            log.errors.append((time.monotonic(), log.worker, "timeout"))
            await close_quietly(conn)
            conn = None
            continue
        except DISTURBANCES as exc:
            log.errors.append((time.monotonic(), log.worker, f"{type(exc).__name__}: {exc}"))
            if isinstance(exc, asyncpg.InternalClientError):
                await close_quietly(conn)  # asyncpg's connection is unusable after it
                conn = None
            await asyncio.sleep(0.01)
            continue
        log.commits.append(time.monotonic())
        load.acknowledged.add((log.number, seq))
    await close_quietly(conn)


def start_load(
    mux: object, clients: int, dbname: str = APP_DB
) -> tuple[Load, asyncio.Event, list[asyncio.Task[None]]]:
    load = Load([ClientLog(n) for n in range(clients)])
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_client(mux, c, load, stop, dbname)) for c in load.clients]
    return load, stop, tasks


async def stop_load(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2 * TRANSACTION_TIMEOUT + 10)


def check_books(load: Load, sql: Callable[[str], str]) -> None:
    """No acknowledged commit lost, the money all there, every balance explained.

    SQL runs a query as the superuser in the test's database and returns its
    output (psql -At), e.g. `lambda q: pg.sql(q, dbname)`.
    """
    stored = {
        tuple(map(int, row.split("|"))) for row in sql("SELECT client, seq FROM transfers").split()
    }
    lost = load.acknowledged - stored
    assert not lost, f"{len(lost)} acknowledged commits lost of {len(load.acknowledged)}"
    total = int(sql("SELECT sum(balance) FROM accounts"))
    assert total == ACCOUNTS * START_BALANCE, f"the sum of balances moved to {total}"
    unexplained = sql(
        f"""SELECT a.id FROM accounts a
        LEFT JOIN (SELECT src AS id, -amount AS d FROM transfers
                   UNION ALL SELECT dst, amount FROM transfers) t ON t.id = a.id
        GROUP BY a.id, a.balance HAVING a.balance <> {START_BALANCE} + coalesce(sum(t.d), 0)"""
    ).split()
    assert not unexplained, f"balances that the stored transfers do not explain: {unexplained}"

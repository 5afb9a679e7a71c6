"""The four-hub workload from DESIGN.md, shared by tools/demo.py and tests/test_core_hubs.py.

Four services share one PostgreSQL (max_connections 100) and open 151 client
connections between them: WBHubManager (20) and WBSalesHub (50) use node-postgres
`pg.Pool` (simulated with asyncpg), WBFinHub (9) and WBOnboardingHub (72) use
Prisma (simulated with psycopg 3). Each hub has its own database and its own
login role (role name = database name, password "<name>-secret"), so every hub
gets its own pool in pgmux, as it would in production.

Each client runs short read/write transactions: bump the hub's counter, insert
an event row, and read back its own event count and the current database. A
transaction is correct when it ran in the hub's database and saw exactly its own
earlier commits plus this one; at the end the hub's counter and event table must
equal the number of transactions the clients saw committed.

Named prepared statements are a later pgmux feature, so asyncpg runs with
statement_cache_size=0 and psycopg with prepare_threshold=None (unnamed
statements only, still the extended protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import psycopg

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS counters (id int PRIMARY KEY, n bigint NOT NULL);
CREATE TABLE IF NOT EXISTS events (id bigserial PRIMARY KEY, client int NOT NULL,
                                   at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS events_client ON events (client);
TRUNCATE counters, events;
INSERT INTO counters VALUES (1, 0);
"""

UPDATE_SQL = "UPDATE counters SET n = n + 1 WHERE id = 1 RETURNING n"
INSERT_SQL = "INSERT INTO events (client) VALUES ($1)"
CHECK_SQL = "SELECT current_database(), count(*) FROM events WHERE client = $1"


@dataclass(frozen=True, slots=True)
class Hub:
    name: str  # the service, e.g. "WBHubManager"
    database: str
    driver: str  # "asyncpg" (node-postgres pg.Pool) or "psycopg" (Prisma)
    connections: int

    @property
    def user(self) -> str:
        return self.database

    @property
    def password(self) -> str:
        return f"{self.database}-secret"


HUBS: tuple[Hub, ...] = (
    Hub("WBHubManager", "hubmanager", "asyncpg", 20),
    Hub("WBSalesHub", "saleshub", "asyncpg", 50),
    Hub("WBFinHub", "finhub", "psycopg", 9),
    Hub("WBOnboardingHub", "onboardinghub", "psycopg", 72),
)


@dataclass
class HubResult:
    hub: Hub
    committed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    per_client: dict[int, int] = field(default_factory=dict)

    def record_error(self, exc: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class HubCheck:
    hub: Hub
    committed: int  # what the clients saw committed
    counter: int  # counters.n in the hub's database
    events: int  # rows in events
    clients_ok: bool  # per-client event counts equal per-client commits

    @property
    def ok(self) -> bool:
        return self.committed == self.counter == self.events and self.clients_ok


class _Cluster(Protocol):
    def create_role(
        self, name: str, password: str, *, superuser: bool = ..., login: bool = ...
    ) -> Any: ...
    def create_database(self, name: str, owner: str = ...) -> Any: ...
    def sql(self, query: str, dbname: str = ...) -> str: ...


def prepare_cluster(cluster: _Cluster, hubs: Sequence[Hub] = HUBS) -> None:
    """Create each hub's role and database (owned by the role) and reset its tables."""
    for hub in hubs:
        if not cluster.sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{hub.user}'").strip():
            cluster.create_role(hub.user, hub.password)
        if not cluster.sql(f"SELECT 1 FROM pg_database WHERE datname = '{hub.database}'").strip():
            cluster.create_database(hub.database, owner=hub.user)
        cluster.sql(f"SET ROLE {hub.user}; {SCHEMA_SQL}", dbname=hub.database)


class WrongResult(AssertionError):
    """A transaction returned something it could not have returned if pooling were correct."""


# One transaction: run it on an open connection for `client`, given how many
# transactions that client has committed so far; raise on anything wrong.
Transaction = Callable[[Any, int, int], Awaitable[None]]


def _check(hub: Hub, client: int, done: int, dbname: str, own: int) -> None:
    if dbname != hub.database or own != done + 1:
        raise WrongResult(
            f"{hub.name} client {client}: saw db={dbname!r} own_events={own}, "
            f"expected db={hub.database!r} own_events={done + 1}"
        )


async def _asyncpg_connect(hub: Hub, host: str, port: int, timeout: float) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=host,
        port=port,
        user=hub.user,
        password=hub.password,
        database=hub.database,
        statement_cache_size=0,
        timeout=timeout,
    )


async def _psycopg_connect(hub: Hub, host: str, port: int, timeout: float) -> Any:
    return await psycopg.AsyncConnection.connect(
        host=host,
        port=port,
        user=hub.user,
        password=hub.password,
        dbname=hub.database,
        autocommit=True,
        prepare_threshold=None,
        connect_timeout=max(1, int(timeout)),
    )


def _asyncpg_transaction(hub: Hub) -> Transaction:
    async def run(conn: asyncpg.Connection, client: int, done: int) -> None:
        async with conn.transaction():
            await conn.fetchval(UPDATE_SQL)
            await conn.execute(INSERT_SQL, client)
            dbname, own = await conn.fetchrow(CHECK_SQL, client)
        _check(hub, client, done, dbname, own)

    return run


def _psycopg_transaction(hub: Hub) -> Transaction:
    insert = INSERT_SQL.replace("$1", "%s")
    check = CHECK_SQL.replace("$1", "%s")

    async def run(conn: Any, client: int, done: int) -> None:
        async with conn.transaction():
            await conn.execute(UPDATE_SQL)
            await conn.execute(insert, (client,))
            cur = await conn.execute(check, (client,))
            dbname, own = await cur.fetchone()
        _check(hub, client, done, dbname, own)

    return run


async def _close(conn: Any) -> None:
    # Best effort: the server side may be gone already.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 5)


async def run_hubs(
    host: str,
    port: int,
    seconds: float,
    hubs: Sequence[Hub] = HUBS,
    *,
    connect_timeout: float = 30.0,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, HubResult]:
    """Open every hub's connections at once, then run transactions on all for `seconds`.

    All connections stay open for the whole run (that is the point: 151 clients).
    `on_ready` is called once every client is connected, before the load starts.
    """
    results = {hub.name: HubResult(hub) for hub in hubs}
    conns: list[tuple[Hub, int, Any]] = []

    async def open_one(hub: Hub, client: int) -> None:
        connect = _asyncpg_connect if hub.driver == "asyncpg" else _psycopg_connect
        try:
            conn = await asyncio.wait_for(
                connect(hub, host, port, connect_timeout), connect_timeout
            )
        except Exception as exc:  # reported per hub
            results[hub.name].record_error(exc)
            return
        conns.append((hub, client, conn))

    await asyncio.gather(
        *(open_one(hub, client) for hub in hubs for client in range(hub.connections))
    )
    try:
        if on_ready is not None:
            on_ready()
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_client_loop(h, c, conn, deadline, results) for h, c, conn in conns))
    finally:
        await asyncio.gather(*(_close(conn) for _, _, conn in conns))
    return results


async def _client_loop(
    hub: Hub, client: int, conn: Any, deadline: float, results: dict[str, HubResult]
) -> None:
    run = _asyncpg_transaction(hub) if hub.driver == "asyncpg" else _psycopg_transaction(hub)
    result = results[hub.name]
    done = 0
    try:
        while time.monotonic() < deadline:
            try:
                await run(conn, client, done)
            except WrongResult as exc:
                result.record_error(exc)
                return  # its later results would all be off by one; one report is enough
            except Exception as exc:  # counted and reported
                result.record_error(exc)
                if _is_closed(conn):
                    return
                continue
            done += 1
            result.committed += 1
    finally:
        result.per_client[client] = done


def _is_closed(conn: Any) -> bool:
    if isinstance(conn, asyncpg.Connection):
        return conn.is_closed()
    return bool(conn.closed)


async def check_hubs(
    connect: Callable[[str], Awaitable[asyncpg.Connection]],
    results: dict[str, HubResult],
) -> list[HubCheck]:
    """Compare what the clients saw committed with what each hub's database holds.

    `connect(dbname)` opens a direct (not pooled) connection to PostgreSQL.
    """
    checks = []
    for result in results.values():
        hub = result.hub
        conn = await connect(hub.database)
        try:
            counter = await conn.fetchval("SELECT n FROM counters WHERE id = 1")
            rows = await conn.fetch("SELECT client, count(*) AS n FROM events GROUP BY client")
        finally:
            await conn.close()
        stored = {r["client"]: r["n"] for r in rows}
        seen = {c: n for c, n in result.per_client.items() if n}
        checks.append(
            HubCheck(hub, result.committed, counter, sum(stored.values()), stored == seen)
        )
    return checks


SERVER_CONNECTIONS_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = ANY($1::text[])
"""


class PeakSampler:
    """Samples pg_stat_activity over a direct connection while a workload runs.

    async with PeakSampler(conn, ["hubmanager", ...]) as s: ...; s.peak
    """

    def __init__(self, conn: asyncpg.Connection, datnames: Sequence[str], interval: float = 0.05):
        self.conn = conn
        self.datnames = list(datnames)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> int:
        count = int(await self.conn.fetchval(SERVER_CONNECTIONS_SQL, self.datnames))
        self.peak = max(self.peak, count)
        self.samples += 1
        return count

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> PeakSampler:
        await self.sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.sample()

"""Acceptance: named prepared statements under transaction pooling (issue 9, 1-3).

Few servers, many clients, real drivers that prepare: asyncpg (statement
cache), psycopg 3 (prepare_threshold=0), pg8000 (unnamed statements split
across Syncs) and pgbench -M prepared. A pooler that forwards statement names
as they are fails here with "prepared statement ... does not exist" or
"already exists".
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest
from helpers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    fresh_database,
    message,
)

from pgmux.protocol import messages
from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

TWO_SERVERS = {"pool": {"size": 2}, "timeouts": {"query_wait": "30s"}}
CLIENTS = 40


async def open_raw(mux: Any) -> RawClient:
    raw = await RawClient.open(mux)
    await raw.login(APP_USER, APP_PASSWORD, APP_DB)
    return raw


def make_counters(pg: TempPostgres, dbname: str) -> None:
    pg.sql(
        "CREATE TABLE hits (client int PRIMARY KEY, n int NOT NULL);"
        f"INSERT INTO hits SELECT g, 0 FROM generate_series(0, {CLIENTS - 1}) g;"
        "ALTER TABLE hits OWNER TO app",
        dbname,
    )


async def asyncpg_worker(mux: Any, dbname: str, client: int, rounds: int) -> None:
    conn = await connect_asyncpg(mux, dbname, statement_cache_size=100)
    try:
        for i in range(rounds):
            async with conn.transaction():
                n = await conn.fetchval(
                    "UPDATE hits SET n = n + 1 WHERE client = $1 RETURNING n", client
                )
                assert n == i + 1
            assert await conn.fetchval("SELECT $1::int * 2", client) == client * 2
    finally:
        await conn.close()


async def psycopg_worker(mux: Any, dbname: str, client: int, rounds: int) -> None:
    conn = await connect_psycopg(mux, dbname, prepare_threshold=0)
    try:
        for i in range(rounds):
            async with conn.transaction():
                cur = await conn.execute(
                    "UPDATE hits SET n = n + 1 WHERE client = %s RETURNING n", (client,)
                )
                assert await cur.fetchone() == (i + 1,)
            cur = await conn.execute("SELECT %s::int * 3", (client,))
            assert await cur.fetchone() == (client * 3,)
    finally:
        await conn.close()


def pg8000_worker(mux: Any, dbname: str, client: int, rounds: int) -> None:
    conn = pg8000.native.Connection(
        APP_USER, host=mux.host, port=mux.port, database=dbname, password=APP_PASSWORD, timeout=30
    )
    try:
        for i in range(rounds):
            rows = conn.run("UPDATE hits SET n = n + 1 WHERE client = :c RETURNING n", c=client)
            assert rows == [[i + 1]]
            assert conn.run("SELECT CAST(:v AS int) * 4", v=client) == [[client * 4]]
    finally:
        conn.close()


async def test_forty_preparing_clients_on_two_servers(
    pg: TempPostgres, pgmux: PgmuxFactory
) -> None:
    dbname = fresh_database(pg)
    make_counters(pg, dbname)
    mux = pgmux(TWO_SERVERS)
    rounds = 15
    jobs = []
    for client in range(CLIENTS):
        kind = client % 3
        if kind == 0:
            jobs.append(asyncpg_worker(mux, dbname, client, rounds))
        elif kind == 1:
            jobs.append(psycopg_worker(mux, dbname, client, rounds))
        else:
            jobs.append(asyncio.to_thread(pg8000_worker, mux, dbname, client, rounds))
    results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 90)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    total = pg.sql("SELECT sum(n) FROM hits", dbname).strip()
    assert int(total) == CLIENTS * rounds

    # The same text was prepared at most once per server: no backend holds two
    # of pgmux's statements with one text.
    probe = await connect_asyncpg(mux, dbname)
    try:
        seen: dict[int, list[str]] = {}
        for _ in range(20):
            async with probe.transaction():
                pid = await probe.fetchval("SELECT pg_backend_pid()")
                seen[pid] = [
                    r["stmt"]
                    for r in await probe.fetch(
                        "SELECT statement || ' ' || parameter_types::text AS stmt"
                        " FROM pg_prepared_statements WHERE name LIKE 'pgmux_%'"
                    )
                ]
        assert seen, "no server reached"
        for pid, texts in seen.items():
            assert texts, f"server {pid} holds no statement of pgmux's"
            assert len(texts) == len(set(texts)), f"server {pid} prepared a text twice: {texts}"
    finally:
        await probe.close()


def run_pgbench(pg: TempPostgres, mux: Any, dbname: str, *args: str) -> str:
    cmd = [
        f"{pg.bindir}/pgbench",
        "-h",
        mux.host,
        "-p",
        str(mux.port),
        "-U",
        APP_USER,
        "-n",
        "-M",
        "prepared",
        "-T",
        "5",
        *args,
        dbname,
    ]
    env = {"PGPASSWORD": APP_PASSWORD, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("-S", "-c", "20", "-j", "2"), id="select-only"),
        # pgbench prepares with a blocking call per thread: TPC-B needs -j = -c.
        pytest.param(("-c", "20", "-j", "20"), id="tpcb"),
    ],
)
def test_pgbench_prepared(pg: TempPostgres, pgmux: PgmuxFactory, args: tuple[str, ...]) -> None:
    dbname = fresh_database(pg)
    init = subprocess.run(
        [
            f"{pg.bindir}/pgbench",
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            pg.host,
            "-p",
            str(pg.port),
            "-U",
            APP_USER,
            dbname,
        ],
        capture_output=True,
        text=True,
        env={"PGPASSWORD": APP_PASSWORD},
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    mux = pgmux(TWO_SERVERS)
    out = run_pgbench(pg, mux, dbname, *args)
    assert "number of failed transactions: 0" in out, out
    processed = int(out.split("number of transactions actually processed: ")[1].split()[0])
    assert processed > 0, out


async def test_a_rollback_leaves_statements_of_committed_work_alone(pgmux: PgmuxFactory) -> None:
    """A statement Parsed in a batch that ended (ReadyForQuery idle) is not
    undone by a later ROLLBACK on the same server: it is not Parsed again."""
    mux = pgmux({"pool": {"size": 1}})
    client = await connect_asyncpg(mux, statement_cache_size=100)
    other = await connect_asyncpg(mux)
    try:
        stmt = await client.prepare("SELECT $1::int + 7")
        assert await stmt.fetchval(1) == 8
        when = (
            "SELECT prepare_time FROM pg_prepared_statements WHERE statement = 'SELECT $1::int + 7'"
        )
        prepared_at = await other.fetchval(when)
        assert prepared_at is not None
        tx = other.transaction()  # the same server (pool size 1), another client
        await tx.start()
        await other.fetchval("SELECT 2")
        await tx.rollback()
        assert await stmt.fetchval(2) == 9
        assert await other.fetchval(when) == prepared_at, "Parsed again after a ROLLBACK"
    finally:
        await close_quietly(client, other)


async def read_batch(raw: RawClient) -> list[bytes]:
    """The message types of one reply, up to its ReadyForQuery."""
    kinds = []
    while (message := await raw.read_message()) is not None:
        kinds.append(message[0])
        if message[0] == b"Z":
            break
    return kinds


async def test_unnamed_statement_closed_by_another_client_is_replayed(
    pgmux: PgmuxFactory,
) -> None:
    """A client without an unnamed statement that describes one on the server
    holding another's gets 26000, for which pgmux first closes the server's:
    the owner's next Describe of its unnamed statement finds it replayed."""
    mux = pgmux({"pool": {"size": 1}})
    owner, other = await open_raw(mux), await open_raw(mux)
    try:
        describe = messages.describe("S", "") + messages.sync()
        await owner.send(messages.parse("", "SELECT $1::int + 1 AS n") + describe)
        assert await read_batch(owner) == [b"1", b"t", b"T", b"Z"]
        await other.send(describe)
        assert await read_batch(other) == [b"E", b"Z"]  # PostgreSQL's 26000
        await owner.send(describe)
        assert await read_batch(owner) == [b"t", b"T", b"Z"]
    finally:
        await owner.close()
        await other.close()


async def test_statement_survives_moving_between_servers(pgmux: PgmuxFactory) -> None:
    """One client, named statements, and a server that changes under it."""
    mux = pgmux(TWO_SERVERS)
    client = await connect_asyncpg(mux, statement_cache_size=100)
    blockers = [await connect_asyncpg(mux) for _ in range(2)]
    try:
        stmt = await client.prepare("SELECT $1::int + 100, pg_backend_pid()")
        # asyncpg ends prepare() with Flush, not Sync: the server stays with the
        # client until the statement first runs (as with any pooler).
        assert (await stmt.fetchrow(0))[0] == 100
        pids = set()
        for i in range(10):
            # Both servers taken, then the one the client gets is chosen by turns.
            txs = [b.transaction() for b in blockers]
            for b, tx in zip(blockers, txs, strict=True):
                await tx.start()
                await b.fetchval("SELECT 1")
            await txs[i % 2].rollback()
            value, pid = await stmt.fetchrow(i)
            assert value == i + 100
            pids.add(pid)
            await txs[1 - i % 2].rollback()
        assert len(pids) == 2, "the client never moved between the two servers"
    finally:
        await close_quietly(client, *blockers)


async def test_lru_eviction_keeps_every_statement_working(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"pool": {"size": 1, "max_prepared_statements": 3}})
    conn = await connect_psycopg(mux, prepare_threshold=0)
    other = await connect_asyncpg(mux, statement_cache_size=100)
    try:
        for rnd in range(3):
            for i in range(10):
                cur = await conn.execute(f"SELECT %s::int + {i}", (rnd,))
                assert await cur.fetchone() == (rnd + i,)
                assert await other.fetchval(f"SELECT $1::int * {i + 1}", rnd) == rnd * (i + 1)
        count = await other.fetchval(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgmux_%'"
        )
        # The cap holds between transactions (+1: this very statement).
        assert count <= 3 + 1
    finally:
        await close_quietly(conn, other)


async def test_describe_prepared_statement(pgmux: PgmuxFactory) -> None:
    """Parse on one server, Describe after moving: ParameterDescription and RowDescription."""
    mux = pgmux(TWO_SERVERS)
    raw = await open_raw(mux)
    holder = await connect_asyncpg(mux)
    try:
        parse = messages.parse("s1", "SELECT $1::int AS a, $2::text AS b", [23, 25])
        await raw.send(parse + messages.sync())
        kinds = [kind for kind, _ in await raw.read_until_ready()]
        assert kinds == [b"1", b"Z"]
        tx = holder.transaction()
        await tx.start()
        await holder.fetchval("SELECT 1")  # pins one server, maybe the one s1 was parsed on
        await raw.send(message(b"D", b"Ss1\0") + messages.sync())
        replies = await raw.read_until_ready()
        kinds = [kind for kind, _ in replies]
        assert kinds == [b"t", b"T", b"Z"]
        params = replies[0][1]
        assert int.from_bytes(params[:2], "big") == 2
        assert params[2:] == (23).to_bytes(4, "big") + (25).to_bytes(4, "big")
        assert b"a\0" in replies[1][1] and b"b\0" in replies[1][1]
        await tx.rollback()
    finally:
        await raw.close()
        await close_quietly(holder)


async def test_misuse_gets_postgres_errors_and_the_connection_stays(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"pool": {"size": 1}})
    raw = await open_raw(mux)
    try:
        await raw.send(messages.parse("dup", "SELECT 1") + messages.sync())
        assert [k for k, _ in await raw.read_until_ready()] == [b"1", b"Z"]
        # Duplicate name: 42P05, and the rest up to Sync is skipped, as in PostgreSQL.
        await raw.send(
            messages.parse("dup", "SELECT 2")
            + messages.bind("", "dup", [])
            + messages.execute("")
            + messages.sync()
        )
        replies = await raw.read_until_ready()
        assert [k for k, _ in replies] == [b"E", b"Z"]
        assert b"C42P05\0" in replies[0][1]
        assert b'prepared statement "dup" already exists' in replies[0][1]
        # Unknown name: 26000.
        await raw.send(messages.bind("", "nope", []) + messages.execute("") + messages.sync())
        replies = await raw.read_until_ready()
        assert [k for k, _ in replies] == [b"E", b"Z"]
        assert b"C26000\0" in replies[0][1]
        assert b'prepared statement "nope" does not exist' in replies[0][1]
        # Describe of an unknown name, inside a transaction: the transaction fails like PG's.
        await raw.send(messages.query("BEGIN"))
        await raw.read_until_ready()
        await raw.send(message(b"D", b"Snope\0") + messages.sync())
        replies = await raw.read_until_ready()
        assert [k for k, _ in replies] == [b"E", b"Z"]
        assert replies[-1][1] == b"E"  # in a failed transaction block
        await raw.send(messages.query("ROLLBACK"))
        await raw.read_until_ready()
        # Close of an unknown name is fine in PostgreSQL, and here.
        await raw.send(messages.close("S", "nope") + messages.sync())
        assert [k for k, _ in await raw.read_until_ready()] == [b"3", b"Z"]
        # The original statement still works; after Close the name is free again.
        await raw.send(
            messages.bind("", "dup", [])
            + messages.execute("")
            + messages.close("S", "dup")
            + messages.parse("dup", "SELECT 3")
            + messages.bind("", "dup", [])
            + messages.execute("")
            + messages.sync()
        )
        replies = await raw.read_until_ready()
        assert [k for k, _ in replies] == [b"2", b"D", b"C", b"3", b"1", b"2", b"D", b"C", b"Z"]
        rows = [body for kind, body in replies if kind == b"D"]
        assert rows[0].endswith(b"1") and rows[1].endswith(b"3")
    finally:
        await raw.close()


async def test_drivers_see_postgres_errors_for_misuse(pgmux: PgmuxFactory) -> None:
    """SQL-level DEALLOCATE of a protocol statement, then a driver re-preparing: no breakage."""
    mux = pgmux({"pool": {"size": 1}})
    conn = await connect_psycopg(mux, prepare_threshold=0)
    try:
        cur = await conn.execute("SELECT %s::int", (5,))
        assert await cur.fetchone() == (5,)
        await conn.execute("DEALLOCATE ALL")
        cur = await conn.execute("SELECT %s::int", (6,))
        assert await cur.fetchone() == (6,)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            await conn.execute("DEALLOCATE no_such_statement")
        cur = await conn.execute("SELECT %s::int", (7,))
        assert await cur.fetchone() == (7,)
    finally:
        await conn.close()


async def test_deallocate_name_and_discard_all(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"pool": {"size": 1}})
    raw = await open_raw(mux)
    try:
        await raw.send(messages.parse("s1", "SELECT 11") + messages.sync())
        await raw.read_until_ready()
        await raw.send(messages.query("DEALLOCATE s1"))
        replies = await raw.read_until_ready()
        assert [k for k, _ in replies] == [b"C", b"Z"]
        assert replies[0][1] == b"DEALLOCATE\0"
        await raw.send(messages.bind("", "s1", []) + messages.execute("") + messages.sync())
        replies = await raw.read_until_ready()
        assert b"C26000\0" in replies[0][1]
        await raw.send(messages.parse("s1", "SELECT 12") + messages.sync())
        assert [k for k, _ in await raw.read_until_ready()] == [b"1", b"Z"]
        await raw.send(messages.query("DISCARD ALL"))
        await raw.read_until_ready()
        await raw.send(messages.bind("", "s1", []) + messages.execute("") + messages.sync())
        replies = await raw.read_until_ready()
        assert b"C26000\0" in replies[0][1]
    finally:
        await raw.close()


async def test_asyncpg_statement_cache_with_many_clients(pgmux: PgmuxFactory) -> None:
    """asyncpg's default cache: prepared once per connection, run everywhere."""
    mux = pgmux({"pool": {"size": 2}})
    conns = [await connect_asyncpg(mux, statement_cache_size=100) for _ in range(10)]
    try:

        async def work(conn: asyncpg.Connection, k: int) -> None:
            for i in range(20):
                assert await conn.fetchval("SELECT $1::int + $2::int", k, i) == k + i
                row = await conn.fetchrow("SELECT $1::text AS t, $2::int AS n", str(k), i)
                assert (row["t"], row["n"]) == (str(k), i)

        await asyncio.gather(*(work(c, k) for k, c in enumerate(conns)))
    finally:
        await close_quietly(*conns)


async def test_show_stats_counts_prepared_statements(pgmux: PgmuxFactory) -> None:
    """SHOW STATS' parse and bind counters come from the real traffic."""
    mux = pgmux({"pool": {"size": 1}, "admin": {"users": ["admin"], "stats_period": "1s"}})
    a = await open_raw(mux)
    b = await open_raw(mux)
    console = await asyncpg.connect(
        host=mux.host, port=mux.port, user="admin", password="admin-secret", database="pgmux"
    )
    try:
        for raw in (a, b):  # the same text twice: parsed once on the only server
            await raw.send(messages.parse("s", "SELECT 41 + 1") + messages.sync())
            await raw.read_until_ready()
        for _ in range(3):
            await a.send(messages.bind("", "s", []) + messages.execute("") + messages.sync())
            await a.read_until_ready()
        row = next(r for r in await console.fetch("SHOW STATS") if r["database"] == APP_DB)
        assert row["total_client_parse_count"] == 2
        assert row["total_server_parse_count"] == 1
        assert row["total_bind_count"] == 3
        # The per-second averages cover a whole stats period (1 s here).
        await asyncio.sleep(2.2)
        row = next(r for r in await console.fetch("SHOW STATS") if r["database"] == APP_DB)
        assert row["avg_client_parse_count"] == 0  # nothing in the last period
        for _ in range(25):  # about 10 binds a second for 2.5 s
            await a.send(messages.bind("", "s", []) + messages.execute("") + messages.sync())
            await a.read_until_ready()
            await asyncio.sleep(0.1)
        row = next(r for r in await console.fetch("SHOW STATS") if r["database"] == APP_DB)
        assert row["total_bind_count"] == 28
        assert 3 <= row["avg_bind_count"] <= 11
    finally:
        await a.close()
        await b.close()
        await console.close()


async def test_console_set_of_the_cap_reaches_connected_clients(pgmux: PgmuxFactory) -> None:
    """SET max_prepared_statements on the console applies to a client already
    connected, at its next statement, as in PgBouncer: a smaller cap evicts at
    the next Sync past it, a larger one keeps more, 0 passes names through
    (the client's own name is unknown to PostgreSQL) without closing anything."""
    mux = pgmux({"pool": {"size": 1}, "admin": {"users": ["admin"]}})
    admin = await connect_psycopg(mux, dbname="pgmux", user="admin", password="admin-secret")
    conn = await connect_psycopg(mux, prepare_threshold=5)  # psycopg's default

    async def count() -> int:
        cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
        return (await cur.fetchone())[0]

    async def prepare(numbers: range) -> None:
        for i in numbers:
            cur = await conn.execute(f"SELECT '{i}'".encode(), prepare=True)
            assert (await cur.fetchone())[0] == str(i)

    try:
        await admin.execute("SET max_prepared_statements = 1")
        await prepare(range(5))
        assert await count() == 1
        await admin.execute("SET max_prepared_statements = 5")
        await prepare(range(5, 10))
        assert await count() == 5
        await admin.execute("SET max_prepared_statements = 2")
        assert await count() == 5  # evicted only when a statement is added
        await prepare(range(10, 11))
        assert await count() == 2
        await admin.execute("SET max_prepared_statements = 0")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            await conn.execute(b"SELECT '10'", prepare=True)
        assert await count() == 2
    finally:
        await close_quietly(conn, admin)

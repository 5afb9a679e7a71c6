"""Property: extended-protocol traffic through pgmux gets PostgreSQL's own replies.

Hypothesis writes a program for each of three clients: batches of Parse /
Bind / Describe / Execute / Close / Flush ending in a Sync (or only in a Flush,
so the next batch continues the same pipeline), and a few simple Queries, over
the statement names "", a, b, c, the portals "" and p and a handful of query
texts, misuse included
(duplicate names, unknown names, wrong parameter counts, division by zero
mid-batch, a syntax error, an unnamed statement Bound after a Sync, a
statement Closed then used, explicit BEGIN / COMMIT through Parse/Bind/Execute).

Each program runs first straight against PostgreSQL, one connection per client,
one client after the other; the replies are recorded in a normalized form
(message types, tags, rows, descriptions, SQLSTATE and message of errors,
transaction status). Then the three run at the same time through pgmux, whose
pool has fewer servers than clients, so statements move between servers and
are injected, cached and evicted; each client must get exactly what it got
from PostgreSQL (but for one documented limit in failed transactions, see
same_replies).
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import APP_DB, APP_PASSWORD, APP_USER, RawClient, conftest_attr, error_fields
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgmux.protocol import messages
from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(600)

CLIENTS = 3
NAMES = ("", "a", "b", "c")
PORTALS = ("", "", "p")
# (query text, number of parameters)
QUERIES = (
    ("SELECT 1", 0),
    ("SELECT $1::int + 1", 1),
    # A parameter of 0: division by zero at Execute. (random() keeps it out of the
    # plan: a custom plan would fold the constant and fail at Bind, a generic one
    # at Execute, and a statement shared through pgmux turns generic sooner.)
    ("SELECT 10 / ($1::int + (random() * 0)::int)", 1),
    ("SELECT $1::text || 'x', 2 AS two", 1),
    ("SELECT generate_series(1, 3) AS n", 0),  # Execute with a row limit: PortalSuspended
    ("BEGIN", 0),
    ("COMMIT", 0),
    ("SELEC 1", 0),  # a syntax error at Parse
)
PARAMS = ("0", "1", "7")
SIMPLE = (
    "SELECT 2",
    "BEGIN",
    "COMMIT",
    "DEALLOCATE a",
    "DEALLOCATE ALL",
    "DISCARD ALL",
)

Op = tuple[Any, ...]


@dataclass(frozen=True)
class Batch:
    """Messages sent in one write; `sync` False means it ends in a Flush only."""

    ops: tuple[Op, ...]
    sync: bool = True
    query: str | None = None  # a simple Query on its own


# -- programs --------------------------------------------------------------------------


@st.composite
def extended_op(draw: st.DrawFn, believed: dict[str, int]) -> Op:
    """One message; `believed` is the client's idea of its statements (name -> params)."""
    kind = draw(
        st.sampled_from(["parse", "parse", "bind", "bind", "execute", "describe", "close", "flush"])
    )
    name = draw(st.sampled_from(NAMES))
    portal = draw(st.sampled_from(PORTALS))
    if kind == "parse":
        index = draw(st.integers(0, len(QUERIES) - 1))
        believed[name] = QUERIES[index][1]
        return ("parse", name, index)
    if kind == "bind":
        count = believed.get(name, 0)
        if draw(st.integers(0, 9)) == 0:
            count = 1 - min(count, 1)  # the wrong number of parameters
        params = tuple(draw(st.sampled_from(PARAMS)) for _ in range(count))
        return ("bind", portal, name, params)
    if kind == "execute":
        return ("execute", portal, draw(st.sampled_from([0, 0, 2])))
    if kind == "describe":
        if draw(st.integers(0, 2)) == 0:
            return ("describe", "P", portal)
        return ("describe", "S", name)
    if kind == "close":
        if draw(st.integers(0, 4)) == 0:
            return ("close", "P", portal)
        believed.pop(name, None)
        return ("close", "S", name)
    return ("flush",)


@st.composite
def programs(draw: st.DrawFn) -> list[Batch]:
    believed: dict[str, int] = {}
    batches = []
    for _ in range(draw(st.integers(1, 6))):
        after_sync = not batches or batches[-1].sync
        # (after an error PostgreSQL ignores everything up to a Sync, a Query too)
        if after_sync and draw(st.integers(0, 7)) == 0:
            batches.append(Batch((), query=draw(st.sampled_from(SIMPLE))))
            continue
        if draw(st.booleans()):
            # The common driver shape: Parse, Bind, Describe portal, Execute.
            name = draw(st.sampled_from(NAMES))
            index = draw(st.integers(0, 4))
            believed[name] = QUERIES[index][1]
            params = tuple(draw(st.sampled_from(PARAMS)) for _ in range(QUERIES[index][1]))
            ops: list[Op] = [("parse", name, index)] if draw(st.booleans()) else []
            portal = draw(st.sampled_from(PORTALS))
            ops += [
                ("bind", portal, name, params),
                ("describe", "P", portal),
                ("execute", portal, 0),
            ]
        else:
            ops = [draw(extended_op(believed)) for _ in range(draw(st.integers(1, 5)))]
        batches.append(Batch(tuple(ops), sync=draw(st.integers(0, 4)) > 0))
    if not batches[-1].sync:
        batches.append(Batch((), sync=True))
    return batches


def encode(op: Op) -> bytes:
    kind = op[0]
    if kind == "parse":
        return messages.parse(op[1], QUERIES[op[2]][0])
    if kind == "bind":
        return messages.bind(op[1], op[2], [p.encode() for p in op[3]])
    if kind == "execute":
        return messages.execute(op[1], op[2])
    if kind == "describe":
        return messages.describe(op[1], op[2])
    if kind == "close":
        return messages.close(op[1], op[2])
    return messages.flush()


def batch_bytes(batch: Batch) -> bytes:
    if batch.query is not None:
        return messages.query(batch.query)
    end = messages.sync() if batch.sync else messages.flush()
    return b"".join(encode(op) for op in batch.ops) + end


# -- replies ---------------------------------------------------------------------------

Reply = tuple[Any, ...]


def normalize(kind: bytes, body: bytes) -> Reply | None:
    """What must match between PostgreSQL and pgmux (None: not compared)."""
    if kind in (b"S", b"N", b"A", b"K"):
        return None  # ParameterStatus, notices, notifications
    if kind == b"E":
        fields = error_fields(body)
        return ("E", fields.get("S"), fields.get("C"), fields.get("M"))
    if kind == b"C":
        return ("C", body.rstrip(b"\0").decode())
    if kind == b"Z":
        return ("Z", body.decode())
    if kind == b"D":
        return ("D", *_values(body))
    if kind == b"t":
        (count,) = struct.unpack_from("!H", body)
        return ("t", *struct.unpack_from(f"!{count}I", body, 2))
    if kind == b"T":
        return ("T", *_columns(body))
    return (kind.decode(),)  # 1 2 3 n s I: no body worth comparing


def _values(body: bytes) -> Iterator[str | None]:
    (count,) = struct.unpack_from("!H", body)
    pos = 2
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            yield None
        else:
            yield body[pos : pos + length].decode()
            pos += length


def _columns(body: bytes) -> Iterator[tuple[str, int, int, int, int, int, int]]:
    (count,) = struct.unpack_from("!H", body)
    pos = 2
    for _ in range(count):
        end = body.index(b"\0", pos)
        name = body[pos:end].decode()
        fields = struct.unpack_from("!IhIhih", body, end + 1)
        pos = end + 1 + 18
        yield (name, *fields)


async def run_program(client: RawClient, program: list[Batch]) -> list[Reply]:
    """Send each batch; at each Sync or Query read up to its ReadyForQuery."""
    replies: list[Reply] = []
    owed = 0
    for batch in program:
        await client.send(batch_bytes(batch))
        if batch.query is None and not batch.sync:
            await asyncio.sleep(0)  # a Flush only: the pipeline goes on
            continue
        owed += 1
        while owed:
            msg = await client.read_message(timeout=10)
            if msg is None:
                replies.append(("closed",))
                return replies
            if msg[0] == b"Z":
                owed -= 1
            reply = normalize(*msg)
            if reply is not None:
                replies.append(reply)
    return replies


async def open_client(host: str, port: int) -> RawClient:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    client = RawClient(reader, writer)
    await client.login(APP_USER, APP_PASSWORD, APP_DB)
    return client


async def run_direct(pg: TempPostgres, programs_: list[list[Batch]]) -> list[list[Reply]]:
    results = []
    for program in programs_:
        client = await open_client(pg.host, pg.port)
        try:
            results.append(await run_program(client, program))
        finally:
            await client.close()
    return results


async def run_through(mux: Any, programs_: list[list[Batch]]) -> list[list[Reply]]:
    clients = [await open_client(mux.host, mux.port) for _ in programs_]

    async def run_then_leave(client: RawClient, program: list[Batch]) -> list[Reply]:
        # A client may end inside a transaction: it must leave for the others to go on.
        try:
            return await run_program(client, program)
        finally:
            await client.close()

    runs = (run_then_leave(c, p) for c, p in zip(clients, programs_, strict=True))
    try:
        return list(await asyncio.wait_for(asyncio.gather(*runs), 60))
    finally:
        for client in clients:
            await client.close()


def check(pg: TempPostgres, mux: Any, programs_: list[list[Batch]]) -> None:
    loop = asyncio.new_event_loop()
    try:
        expected = loop.run_until_complete(run_direct(pg, programs_))
        got = loop.run_until_complete(run_through(mux, programs_))
    finally:
        loop.close()
    for n, (program, want, have) in enumerate(zip(programs_, expected, got, strict=True)):
        assert same_replies(want, have), _explain(n, program, want, have)


def same_replies(want: list[Reply], have: list[Reply]) -> bool:
    """Equal, but for the one documented difference (docs/prepared-statements.md):
    in a failed transaction PostgreSQL refuses to prepare anything, so a request
    for a statement the server lacks gets 25P02 where PostgreSQL, which had it,
    could answer otherwise (a Describe of BEGIN, a Bind with a wrong count)."""
    if want == have:
        return True
    wanted, got = _by_sync(want), _by_sync(have)
    if len(wanted) != len(got):
        return False
    status = "I"
    for w, h in zip(wanted, got, strict=True):
        if w != h and not (status == "E" and _refused_in_failed_transaction(w, h)):
            return False
        status = w[-1][1] if w[-1][0] == "Z" else status
    return True


def _by_sync(replies: list[Reply]) -> list[list[Reply]]:
    """Replies cut after each ReadyForQuery."""
    cut: list[list[Reply]] = [[]]
    for reply in replies:
        cut[-1].append(reply)
        if reply[0] == "Z":
            cut.append([])
    return [c for c in cut if c]


def _refused_in_failed_transaction(want: list[Reply], have: list[Reply]) -> bool:
    first = next((i for i, (w, h) in enumerate(zip(want, have, strict=False)) if w != h), None)
    if first is None:
        return False  # one is a prefix of the other
    aborted = have[first][:3] == ("E", "ERROR", "25P02")
    return aborted and have[first + 1 :] == [("Z", "E")] and want[-1] == ("Z", "E")


def _explain(n: int, program: list[Batch], want: list[Reply], have: list[Reply]) -> str:
    first = next(
        (i for i, (w, h) in enumerate(zip(want, have, strict=False)) if w != h),
        min(len(want), len(have)),
    )
    return (
        f"client {n} differs at reply {first}:\n"
        f"  program: {program}\n"
        f"  postgres: {want[max(0, first - 3) : first + 3]}\n"
        f"  pgmux:    {have[max(0, first - 3) : first + 3]}"
    )


# -- pgmux, one per module -------------------------------------------------------------


def start_pgmux(
    request: pytest.FixtureRequest, pg: TempPostgres, workdir: Path, pool: dict[str, Any]
) -> Any:
    """pgmux for a whole module, started as conftest's `pgmux` fixture does (that one
    lives for one test, and hypothesis runs many examples in one test)."""

    def attr(name: str) -> Any:
        return conftest_attr(request.config, name)

    defaults = attr("default_config")(pg, workdir)
    config = attr("deep_merge")(defaults, {"pool": pool, "timeouts": {"query_wait": "20s"}})
    config_path = workdir / "pgmux.yaml"
    log_path = workdir / "pgmux.log"
    attr("write_yaml")(config_path, config)
    attr("write_users_file")(workdir / "users.txt", attr("default_users")(pg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = attr("_start_daemon")(config_path, log_path, env)
    handle = attr("PgmuxProcess")(
        proc, config=config, config_path=config_path, log_path=log_path, defaults=defaults
    )
    attr("_wait_until_accepting")(handle)
    return handle


@pytest.fixture(scope="module")
def mux_two_servers(
    request: pytest.FixtureRequest, pg: TempPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    handle = start_pgmux(request, pg, tmp_path_factory.mktemp("pgmux"), {"size": 2})
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def mux_evicting(
    request: pytest.FixtureRequest, pg: TempPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    pool = {"size": 1, "max_prepared_statements": 2}
    handle = start_pgmux(request, pg, tmp_path_factory.mktemp("pgmux"), pool)
    yield handle
    handle.stop()


FUZZ = settings(
    # PGMUX_FUZZ_EXAMPLES=500 for a longer hunt.
    max_examples=int(os.environ.get("PGMUX_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.lists(programs(), min_size=CLIENTS, max_size=CLIENTS))
def test_replies_match_postgres(
    pg: TempPostgres, mux_two_servers: Any, programs_: list[list[Batch]]
) -> None:
    check(pg, mux_two_servers, programs_)


@FUZZ
@given(st.lists(programs(), min_size=CLIENTS, max_size=CLIENTS))
def test_replies_match_postgres_with_eviction(
    pg: TempPostgres, mux_evicting: Any, programs_: list[list[Batch]]
) -> None:
    check(pg, mux_evicting, programs_)

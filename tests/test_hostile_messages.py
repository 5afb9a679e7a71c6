"""Acceptance: a malformed extended-protocol body costs its sender one ERROR, nothing more.

Parse, Bind, Describe, Close and Execute bodies whose names lack their NUL,
whose counts do not fit, or whose statement names are not valid UTF-8, sent by
hand (RawClient) through pgmux in transaction mode with a pool of one server.
PostgreSQL answers such a body with an ERROR of that request (08P01 "invalid
string in message", 22021 "invalid byte sequence for encoding"), skips to
Sync and keeps the connection; pgmux must answer the same, at once, and the
single server must be free for the next client at once, not after
cancel_wait. Each case is first sent straight to the test PostgreSQL, and
pgmux's answer is compared with PostgreSQL's own.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    APP_PASSWORD,
    APP_USER,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    direct,
    error_fields,
    fresh_database,
    message,
    startup_packet,
    wait_until,
)

from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

# One server, and a cancel_wait long enough that a server held until it would show.
CONFIG = {"pool": {"size": 1}, "timeouts": {"cancel_wait": "10s", "query_wait": "15s"}}
SYNC = message(b"S")

MALFORMED = {
    "parse-name-unterminated": message(b"P", b"stmt_1"),
    "parse-query-unterminated": message(b"P", b"stmt_1\0select 1"),
    "parse-types-truncated": message(b"P", b"stmt_1\0select $1\0\0\x02\0\0\0\x17"),
    "parse-trailing-bytes": message(b"P", b"stmt_1\0select 1\0\0\0zz"),
    "bind-portal-unterminated": message(b"B", b"portal"),
    "bind-statement-unterminated": message(b"B", b"\0stmt_1"),
    "describe-unterminated": message(b"D", b"Sstmt_abc"),
    "describe-empty": message(b"D", b""),
    "describe-trailing-bytes": message(b"D", b"Sstmt_1\0zz"),
    "close-unterminated": message(b"C", b"Sstmt_abc"),
    "execute-unterminated": message(b"E", b"portal"),
    "execute-empty": message(b"E", b""),
}

BAD_UTF8 = {
    "parse-name": message(b"P", b"st\xffmt\0select 1\0\0\0"),
    "bind-statement-name": message(b"B", b"\0st\xe4\xb8mt\0\0\0\0\0\0\0"),
    "describe-statement-name": message(b"D", b"Sst\xe4\xb8\0"),
    "close-statement-name": message(b"C", b"Sst\xc3\0"),
    "bind-portal-name": message(b"B", b"p\xff\0\0\0\0\0\0\0\0"),
}


@dataclass
class Answer:
    """What a connection said to one malformed request and its Sync."""

    errors: list[tuple[str, str, str]]  # (severity, SQLSTATE, message)
    status: str  # ReadyForQuery's transaction status
    kinds: str  # every reply type, in order
    seconds: float  # from the send to the ReadyForQuery


class PgEndpoint:
    def __init__(self, pg: TempPostgres) -> None:
        self.host, self.port = pg.host, pg.port


async def login(endpoint: Any, dbname: str) -> RawClient:
    raw = await RawClient.open(endpoint)
    await raw.login(APP_USER, APP_PASSWORD, dbname)
    return raw


async def answer_to(raw: RawClient, payload: bytes) -> Answer:
    started = time.monotonic()
    # A simple Query has its own ReadyForQuery; anything else is answered at Sync.
    await raw.send(payload if payload[:1] == b"Q" else payload + SYNC)
    replies = await raw.read_until_ready(timeout=15)
    seconds = time.monotonic() - started
    errors = []
    for kind, body in replies:
        if kind == b"E":
            fields = error_fields(body)
            errors.append((fields.get("S", ""), fields.get("C", ""), fields.get("M", "")))
    kinds = "".join(kind.decode() for kind, _ in replies)
    return Answer(errors, replies[-1][1].decode(), kinds, seconds)


async def postgres_answer(pg: TempPostgres, dbname: str, payload: bytes, begin: bool) -> Answer:
    """The reference: the same bytes straight to PostgreSQL."""
    raw = await login(PgEndpoint(pg), dbname)
    try:
        if begin:
            await raw.query("BEGIN")
        return await answer_to(raw, payload)
    finally:
        await raw.close()


def assert_same_answer(got: Answer, expected: Answer, case: str) -> None:
    assert got.errors, f"{case}: no ErrorResponse from pgmux (PostgreSQL: {expected.errors})"
    assert got.errors == expected.errors, (
        f"{case}: pgmux {got.errors}, PostgreSQL {expected.errors}"
    )
    assert (got.kinds, got.status) == (expected.kinds, expected.status), case


def assert_clean_log(log: str) -> None:
    for bad in ("Traceback", "Fatal error on transport", "translate_failed"):
        assert bad not in log, f"{bad!r} in pgmux's log:\n{log[-3000:]}"


async def assert_served_at_once(mux: Any, dbname: str, limit: float = 2.0) -> float:
    """A good client's transaction on the (single) server completes well before cancel_wait."""
    started = time.monotonic()
    conn = await connect_asyncpg(mux, dbname)
    try:
        async with conn.transaction():
            assert await conn.fetchval("select 41 + 1") == 42
    finally:
        await close_quietly(conn)
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"the next client waited {elapsed:.3f}s (cancel_wait is 10s)"
    return elapsed


async def backends_in_transaction(pg: TempPostgres, dbname: str) -> list[str]:
    conn = await direct(pg)
    try:
        rows = await conn.fetch(
            "SELECT state FROM pg_stat_activity WHERE datname = $1 AND backend_type = "
            "'client backend' AND state LIKE 'idle in transaction%'",
            dbname,
        )
    finally:
        await close_quietly(conn)
    return [row["state"] for row in rows]


@pytest.mark.parametrize("begin", [False, True], ids=["autocommit", "in-transaction"])
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_body_gets_postgres_error_and_frees_the_server(
    pgmux: PgmuxFactory, pg: TempPostgres, case: str, begin: bool
) -> None:
    dbname = fresh_database(pg)
    payload = MALFORMED[case]
    expected = await postgres_answer(pg, dbname, payload, begin)
    assert expected.errors and expected.errors[0][1] == "08P01", expected
    mux = pgmux(CONFIG)
    attacker = await login(mux, dbname)
    try:
        if begin:
            assert (await attacker.query("BEGIN")).status == "T"
        got = await answer_to(attacker, payload)
        assert_same_answer(got, expected, case)
        assert got.seconds < 1.0, f"{case}: the error took {got.seconds * 1000:.1f} ms"
        if begin:
            # The attacker leaves inside its failed transaction: the server is
            # rolled back and handed on at once.
            await attacker.close()
        else:
            # The connection goes on, as PostgreSQL's does, and holds no server.
            assert (await attacker.query("select 1")).rows == [["1"]]
        await assert_served_at_once(mux, dbname)
        assert await backends_in_transaction(pg, dbname) == []
    finally:
        await attacker.close()
    assert_clean_log(mux.logs())


@pytest.mark.parametrize("case", ["describe-unterminated", "bind-statement-unterminated"])
async def test_malformed_body_queued_for_a_server(
    pgmux: PgmuxFactory, pg: TempPostgres, case: str
) -> None:
    """Sent while the only server is busy: translated when the pool hands the
    server over (ClientConnection._flush_pending), with the same answer."""
    dbname = fresh_database(pg)
    payload = MALFORMED[case]
    expected = await postgres_answer(pg, dbname, payload, begin=False)
    mux = pgmux(CONFIG)
    holder = await connect_asyncpg(mux, dbname)
    attacker = await login(mux, dbname)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.fetchval("select 1")
        await attacker.send(payload + SYNC)
        await asyncio.sleep(0.2)  # queued behind the holder's transaction
        await transaction.commit()
        replies = await attacker.read_until_ready(timeout=15)
        errors = [error_fields(body) for kind, body in replies if kind == b"E"]
        got = [(f.get("S", ""), f.get("C", ""), f.get("M", "")) for f in errors]
        assert got == expected.errors, (case, replies)
        assert (await attacker.query("select 1")).rows == [["1"]]
        await assert_served_at_once(mux, dbname)
    finally:
        await attacker.close()
        await close_quietly(holder)
    assert_clean_log(mux.logs())


async def test_plain_forwarding_leaves_malformed_bodies_to_postgres(
    pgmux: PgmuxFactory, pg: TempPostgres
) -> None:
    """Without the translator (no prepared statements, session state ignored)
    every body reaches PostgreSQL as sent, and PostgreSQL's answer the client."""
    dbname = fresh_database(pg)
    config = {
        "pool": {"size": 1, "max_prepared_statements": 0, "session_state": "ignore"},
        "timeouts": CONFIG["timeouts"],
    }
    mux = pgmux(config)
    raw = await login(mux, dbname)
    try:
        for case, payload in {**MALFORMED, **BAD_UTF8}.items():
            expected = await postgres_answer(pg, dbname, payload, begin=False)
            assert_same_answer(await answer_to(raw, payload), expected, case)
    finally:
        await raw.close()
    await assert_served_at_once(mux, dbname)
    assert_clean_log(mux.logs())


async def test_malformed_body_inside_a_pipeline_keeps_the_rest_in_step(
    pgmux: PgmuxFactory, pg: TempPostgres
) -> None:
    """Valid requests before the bad one run, those after it are skipped to Sync,
    and the next batch on the same connection works: as in PostgreSQL."""
    dbname = fresh_database(pg)
    named = message(b"P", b"good\0select 7\0\0\0")
    bind_good = message(b"B", b"\0good\0\0\0\0\0\0\0")
    execute = message(b"E", b"\0\0\0\0\0")
    payload = named + MALFORMED["describe-unterminated"] + bind_good + execute
    expected = await postgres_answer(pg, dbname, payload, begin=False)
    mux = pgmux(CONFIG)
    raw = await login(mux, dbname)
    try:
        got = await answer_to(raw, payload)
        assert_same_answer(got, expected, "pipeline")
        # The statement prepared before the error exists, on whichever server.
        after = await answer_to(raw, bind_good + execute)
        assert after.errors == [] and "D" in after.kinds, after
    finally:
        await raw.close()
    assert_clean_log(mux.logs())


async def test_invalid_utf8_statement_names_get_postgres_error(
    pgmux: PgmuxFactory, pg: TempPostgres
) -> None:
    """pgmux renames statements, so PostgreSQL never sees the client's names:
    pgmux checks them as PostgreSQL would (22021, the same message)."""
    dbname = fresh_database(pg)
    mux = pgmux(CONFIG)
    raw = await login(mux, dbname)
    try:
        for case, payload in BAD_UTF8.items():
            expected = await postgres_answer(pg, dbname, payload, begin=False)
            assert expected.errors and expected.errors[0][1] == "22021", expected
            got = await answer_to(raw, payload)
            assert_same_answer(got, expected, case)
        assert (await raw.query("select 1")).rows == [["1"]]
    finally:
        await raw.close()
    await assert_served_at_once(mux, dbname)
    assert_clean_log(mux.logs())


# --- the reported attack, rerun ------------------------------------------------------

# Describe of a statement whose 8-byte name has no NUL (14 bytes), then Sync: 19 bytes.
ATTACK = message(b"D", b"Sabcdefgh") + SYNC
ATTACKERS = 4
ATTACKS_EACH = 16
GOOD_CLIENTS = 3


def rss_mb(pid: int) -> float:
    """VmRSS of a process and its children (the workers, if any), in MB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    for one in pids:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


async def test_reported_attack_rerun(pgmux: PgmuxFactory, pg: TempPostgres) -> None:
    """Four attackers, 16 malformed 19-byte requests each over ~4 s (half of them
    inside a transaction), against a pool of 4 while good clients run short
    transactions: every attacker gets an SQLSTATE (target: within 100 ms), the
    good clients' p99 stays low (target: under 50 ms; the asserted bounds leave a
    margin for a loaded CI machine, the report gives the measured values), pgmux
    stays under 80 MB."""
    dbname = fresh_database(pg)
    mux = pgmux({"pool": {"size": 4}, "timeouts": {"cancel_wait": "10s"}})
    attack_latencies: list[float] = []
    sqlstates: list[str] = []
    good_latencies: list[float] = []
    done = asyncio.Event()

    async def attacker(index: int) -> None:
        for attack in range(ATTACKS_EACH):
            raw = await login(mux, dbname)
            try:
                if (index + attack) % 2:
                    await raw.query("BEGIN")
                started = time.monotonic()
                await raw.send(ATTACK)
                replies = await raw.read_until_ready(timeout=15)
                attack_latencies.append(time.monotonic() - started)
                codes = [error_fields(body).get("C", "") for kind, body in replies if kind == b"E"]
                sqlstates.append(codes[0] if codes else "")
            finally:
                await raw.close()  # then leave, as the reported attacker did
            await asyncio.sleep(0.25)

    async def good_client() -> None:
        conn = await connect_asyncpg(mux, dbname)
        try:
            while not done.is_set():
                started = time.monotonic()
                async with conn.transaction():
                    await conn.fetchval("select 1")
                good_latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.01)
        finally:
            await close_quietly(conn)

    goods = [asyncio.create_task(good_client()) for _ in range(GOOD_CLIENTS)]
    try:
        await asyncio.wait_for(asyncio.gather(*(attacker(i) for i in range(ATTACKERS))), 60)
        rss = rss_mb(mux.pid)
    finally:
        done.set()
        await asyncio.gather(*goods)
    assert len(sqlstates) == ATTACKERS * ATTACKS_EACH
    assert set(sqlstates) == {"08P01"}, sqlstates
    slowest_attack = max(attack_latencies) * 1000
    p99 = statistics.quantiles(good_latencies, n=100)[98] * 1000
    report = (
        f"attackers' slowest error {slowest_attack:.1f} ms, good clients p99 {p99:.1f} ms "
        f"over {len(good_latencies)} transactions, pgmux RSS {rss:.1f} MB"
    )
    print(report)
    assert slowest_attack < 1000, report  # the target is 100 ms; the margin is for a busy CI
    assert p99 < 250, report  # the target is 50 ms; the margin is for a busy CI
    assert rss < 80, report
    await wait_until(
        lambda: backends_in_transaction(pg, dbname),
        lambda states: states == [],
        timeout=5,
        what="no backend idle in transaction",
    )
    assert_clean_log(mux.logs())
    assert os.path.exists(f"/proc/{mux.pid}"), "pgmux died"


# --- the console and the login ---------------------------------------------------------

CONSOLE = {"admin": {"users": ["admin"]}}
CONSOLE_MALFORMED = {
    "parse-name-unterminated": message(b"P", b"stmt_1"),
    "parse-query-unterminated": message(b"P", b"stmt_1\0SHOW VERSION"),
    "parse-types-truncated": message(b"P", b"stmt_1\0SHOW VERSION\0\0\x01"),
    "parse-name-invalid-utf8": message(b"P", b"st\xff\0SHOW VERSION\0\0\0"),
    "close-unterminated": message(b"C", b"Sstmt_abc"),
    "execute-unterminated": message(b"E", b"portal"),
    "query-unterminated": message(b"Q", b"SHOW VERSION"),
}


async def test_console_answers_malformed_bodies_with_an_error_and_stays_usable(
    pgmux: PgmuxFactory,
) -> None:
    mux = pgmux(CONSOLE)
    raw = await RawClient.open(mux)
    try:
        await raw.login("admin", "admin-secret", "pgmux")
        for case, payload in CONSOLE_MALFORMED.items():
            got = await answer_to(raw, payload)
            assert got.errors and got.errors[0][1] in ("08P01", "22021"), (case, got)
            assert got.errors[0][0] == "ERROR", (case, got)
            assert (await raw.query("SHOW VERSION")).rows, case
    finally:
        await raw.close()
    assert_clean_log(mux.logs())


def _sasl_initial(mechanism: bytes, length: int, data: bytes) -> bytes:
    return message(b"p", mechanism + length.to_bytes(4, "big", signed=True) + data)


MALFORMED_PASSWORDS = {
    "password": {
        "unterminated": message(b"p", b"app-secret"),
        "two-strings": message(b"p", b"app\0secret\0"),
        "invalid-utf8": message(b"p", b"\xff\xfe\0"),
        "empty": message(b"p"),
    },
    "md5": {
        "unterminated": message(b"p", b"md5abc"),
        "invalid-utf8": message(b"p", b"md5\xff\0"),
    },
    "scram-sha-256": {
        "mechanism-unterminated": message(b"p", b"SCRAM-SHA-256"),
        "length-past-the-end": _sasl_initial(b"SCRAM-SHA-256\0", 1000, b"n,,n=,r=abc"),
        "negative-length": _sasl_initial(b"SCRAM-SHA-256\0", -5, b""),
        "invalid-utf8": _sasl_initial(b"SCRAM-SHA-256\0", 11, b"n,,n=,r=\xff\xfe\xfd"),
        "not-scram": _sasl_initial(b"SCRAM-SHA-256\0", 7, b"garbage"),
        "unknown-mechanism": _sasl_initial(b"PLAIN\0", 3, b"abc"),
    },
}


@pytest.mark.parametrize("method", sorted(MALFORMED_PASSWORDS))
async def test_malformed_password_messages_get_an_error(pgmux: PgmuxFactory, method: str) -> None:
    """Each malformed PasswordMessage / SASL response: an ErrorResponse with an
    SQLSTATE, then the close; no traceback; good logins unaffected."""
    mux = pgmux({"auth": {"type": method}})
    for case, payload in MALFORMED_PASSWORDS[method].items():
        raw = await RawClient.open(mux)
        try:
            await raw.send(startup_packet({"user": APP_USER, "database": "appdb"}))
            request = await raw.read_message()
            assert request is not None and request[0] == b"R", (case, request)
            await raw.send(payload)
            replies = await raw.read_until_closed(timeout=10)
        finally:
            await raw.close()
        errors = [error_fields(body) for kind, body in replies if kind == b"E"]
        assert errors and errors[0].get("C", "")[:2] in ("08", "28"), (case, replies)
        assert errors[0]["S"] == "FATAL", (case, errors)
    good = await login(mux, "appdb")
    assert (await good.query("select 1")).rows == [["1"]]
    await good.close()
    assert_clean_log(mux.logs())


def _startup(body: bytes) -> bytes:
    return (len(body) + 8).to_bytes(4, "big") + (196608).to_bytes(4, "big") + body


MALFORMED_STARTUPS = {
    "value-missing": _startup(b"user\0app\0database\0"),
    "no-final-nul": _startup(b"user\0app\0database\0appdb\0x"),
    "invalid-utf8-value": _startup(b"user\0\xff\xfe\0database\0appdb\0\0"),
    "invalid-utf8-name": _startup(b"us\xffer\0app\0\0"),
    "bad-options": _startup(b"user\0app\0database\0appdb\0options\0-c\0\0"),
    "empty-user": _startup(b"user\0\0database\0appdb\0\0"),
}


async def test_malformed_startup_packets_get_an_error(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"timeouts": {"client_login": "3s"}})
    for case, packet in MALFORMED_STARTUPS.items():
        raw = await RawClient.open(mux)
        try:
            await raw.send(packet)
            replies = await raw.read_until_closed(timeout=10)
        finally:
            await raw.close()
        kinds = {kind for kind, _ in replies}
        assert kinds <= {b"E", b"N", b"R"}, (case, replies)
        errors = [error_fields(body) for kind, body in replies if kind == b"E"]
        assert errors and errors[0].get("C"), (case, replies)
    assert_clean_log(mux.logs())

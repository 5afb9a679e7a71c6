"""What the evil-server suites share: pgmux's config, the checks every case makes.

Every case runs through a real pgmux process with two databases on the evil
server, `evil` (transaction mode: replies go through the ResponseFilter) and
`evil_plain` (session mode: the plain header scan), and the `*` fallback on
the real PostgreSQL, where a bystander keeps querying throughout.
"""

from __future__ import annotations

import re
from typing import Any

from evilserver import EvilConn, EvilServer, Script
from helpers import APP_PASSWORD, APP_USER, Mux, RawClient, ServerError, error_fields, query_message

DATABASES = ("evil", "evil_plain")
# What must never appear in pgmux's log, whatever a server sends.
CRASH = re.compile(r"Traceback|Fatal error|Exception in callback|internal error on a server reply")


def config(evil: EvilServer, **timeouts: str) -> dict[str, Any]:
    return {
        "databases": {
            "evil": evil.database(pool_size=1),
            "evil_plain": evil.database(pool_size=1, pool_mode="session"),
        },
        "timeouts": {
            "server_login_retry": "200ms",
            "query_wait": "4s",
            "server_connect": "4s",
            **timeouts,
        },
        "tls": {"server": {"mode": "disable"}},
    }


def on_request(evil: bytes, *, close: bool = False, answer_first: bool = False) -> Script:
    """Log in properly, then meet the first request with EVIL (after the proper
    answer with ANSWER_FIRST); then close, or wait for pgmux to close."""

    async def script(conn: EvilConn) -> None:
        if not await conn.login():
            return
        request = await conn.read_request()
        if request is None:
            return
        if answer_first:
            conn.answer(request)
        conn.send(evil)
        if close:
            await conn.close()
        else:
            conn.closed_by_pgmux = await conn.wait_closed_by_peer()  # type: ignore[attr-defined]

    return script


async def query_until_closed(
    mux: Mux, dbname: str, sql: str = "select 1"
) -> list[tuple[bytes, bytes]]:
    """Log in to DBNAME through pgmux, send SQL, read every reply until pgmux closes."""
    client = await RawClient.open(mux)
    try:
        await client.login(APP_USER, APP_PASSWORD, dbname)
        await client.send(query_message(sql))
        return await client.read_until_closed(15)
    finally:
        await client.close()


def crashed_error(replies: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The last reply must be pgmux's ErrorResponse for a lost server: 08006."""
    assert replies, "pgmux closed the client without an ErrorResponse"
    kind, body = replies[-1]
    assert kind == b"E", f"expected an ErrorResponse last, got {replies[-3:]!r}"
    fields = error_fields(body)
    assert fields["C"] == "08006", fields
    return fields


def refusals(mux: Mux, reason: str, event: str = "server_protocol_error") -> list[str]:
    """Log lines of EVENT that name a server and contain REASON."""
    return [
        line
        for line in mux.logs().splitlines()
        if event in line and reason in line and "server_id=" in line
    ]


def assert_healthy(mux: Mux, evil: EvilServer) -> None:
    """pgmux is alive and logged no crash; the evil script itself did not break."""
    assert mux.proc.poll() is None, "pgmux exited"  # type: ignore[attr-defined]
    crash = [line for line in mux.logs().splitlines() if CRASH.search(line)]
    assert not crash, crash
    assert not evil.errors, evil.errors


def closed_by_pgmux(evil: EvilServer) -> list[bool]:
    return [getattr(conn, "closed_by_pgmux", False) for conn in evil.conns]


async def login_outcome(mux: Mux, dbname: str) -> str:
    """'ok' when a client logs in and its query works, else 'SQLSTATE message'."""
    client = await RawClient.open(mux)
    try:
        await client.login(APP_USER, APP_PASSWORD, dbname)
        result = await client.query("select 1", timeout=15)
    except ServerError as exc:
        return f"{exc.sqlstate} {exc.message}"
    finally:
        await client.close()
    if result.errors:
        return f"{result.errors[0]['C']} {result.errors[0]['M']}"
    assert result.rows == [["ok"]], result
    return "ok"

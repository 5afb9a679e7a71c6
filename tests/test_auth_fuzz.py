"""Fuzzing the authentication exchange (issue 8, acceptance 5).

Hypothesis feeds hostile bytes to the SCRAM exchange with and without channel
binding, to ScramClient (a hostile server), and to the proxy's ClientAuth for
every method: nothing but the protocol's own ProtocolError may come out.
Then a fuzzing client over TCP: the daemon stays up and keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
from helpers import PgmuxFactory, connect_asyncpg, startup_packet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgmux.protocol.auth import ScramClient, ScramServer, make_scram_secret, parse_scram_secret
from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.config import Config
from pgmux.proxy.core.authstate import AuthState
from pgmux.proxy.datapath.auth import ClientAuth

# The startup phase, the framing and the auth exchange get 10 000 examples each;
# the rest 2 000 to keep the suite short. PGMUX_FUZZ_DEEP=N raises both.
_DEEP = int(os.environ.get("PGMUX_FUZZ_DEEP", "0"))
FUZZ = settings(
    max_examples=max(2_000, _DEEP),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ_10K = settings(FUZZ, max_examples=max(10_000, _DEEP))
SECRET = parse_scram_secret(make_scram_secret("pw", salt=b"0123456789abcdef", iterations=16))
BINDING = b"\x11" * 32
MOCK_KEY = b"fuzz"

scram_pieces = st.sampled_from(
    [b"n", b"y", b"p=tls-server-end-point", b"p=x", b"a=u", b"n=", b"r=abc", b"c=", b"biws",
     b"cD10bHMtc2VydmVyLWVuZC1wb2ludCws", b"p=", b"s=", b"i=4096", b"v=", b"e=x", b"m=",
     b",", b",,", b"=", b"\0", b"\xff"]
)  # fmt: skip
scram_messages = st.one_of(
    st.binary(max_size=120), st.lists(scram_pieces, max_size=14).map(b"".join)
)


@FUZZ
@given(first=scram_messages, final=scram_messages, plus=st.booleans(), known=st.booleans())
def test_scram_server_with_channel_binding(first, final, plus, known):
    server = ScramServer(
        SECRET if known else None,
        username="fuzz",
        mock_key=MOCK_KEY,
        channel_binding=BINDING,
        plus=plus,
    )
    try:
        server.handle_client_first(first)
        server.handle_client_final(final)
    except ProtocolError:
        return
    raise AssertionError("a fuzzed exchange cannot succeed")


@FUZZ
@given(server_first=scram_messages, server_final=scram_messages, keys=st.booleans())
def test_scram_client_against_a_hostile_server(server_first, server_final, keys):
    if keys:
        client = ScramClient(client_key=b"k" * 32, server_key=b"s" * 32, salt=b"x", iterations=1)
    else:
        client = ScramClient("pw")
    client.client_first()
    try:
        client.handle_server_first(server_first)
        client.verify_server_final(server_final)
    except ProtocolError:
        return
    raise AssertionError("a fuzzed server cannot prove itself")


def auth_state() -> AuthState:
    state = AuthState(Config(), users={})
    state.mock_key = MOCK_KEY
    return state


password_bodies = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from([b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS", b"X"]),
              st.integers(-2, 300), scram_messages).map(
        lambda t: t[0] + b"\0" + struct.pack("!i", t[1]) + t[2]
    ),
)  # fmt: skip


@FUZZ_10K
@given(
    method=st.sampled_from(["password", "md5", "scram-sha-256"]),
    secret=st.sampled_from([None, "pw", "md5" + "0" * 32, str(SECRET)]),
    bodies=st.lists(password_bodies, min_size=1, max_size=3),
    tls=st.booleans(),
)
def test_client_auth_exchange(method, secret, bodies, tls):
    auth = ClientAuth(
        method, "fuzz", secret, auth_state(), channel_binding=BINDING if tls else None
    )
    auth.start()
    try:
        for body in bodies:
            _, finished = auth.handle(body)
            if finished:
                return  # a random body can be the right plain password only by luck
    except ProtocolError:
        return


# -- over TCP -------------------------------------------------------------------------

tcp_payloads = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.tuples(st.just(startup_packet({"user": "app", "database": "appdb"})),
              password_bodies).map(
        lambda t: t[0] + b"p" + struct.pack("!I", len(t[1]) + 4) + t[1]
    ),
)  # fmt: skip


@pytest.mark.timeout(300)
async def test_fuzzing_client_over_tcp(pgmux: PgmuxFactory) -> None:
    mux = pgmux({"timeouts": {"client_login": "2s"}})
    payloads = []

    @settings(max_examples=300, deadline=None, database=None)
    @given(tcp_payloads)
    def collect(payload: bytes) -> None:
        payloads.append(payload)

    collect()

    async def send(payload: bytes) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(mux.host, mux.port), 10)
        except (OSError, TimeoutError):
            return
        try:
            writer.write(payload)
            await asyncio.wait_for(reader.read(65536), 5)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    for start in range(0, len(payloads), 50):
        await asyncio.gather(*(send(p) for p in payloads[start : start + 50]))
    assert mux.proc.poll() is None
    conn = await connect_asyncpg(mux)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()

"""A raw wire-protocol client for the equivalence tests (tests/test_equivalence.py).

It speaks to PostgreSQL or to pgmux the same way: a startup packet, SCRAM or
cleartext/md5 authentication as pg_hba.conf or pgmux's auth asks, then
whole batches of frontend messages, each read back up to the number of
ReadyForQuery it must produce. Messages are built with pgmux's own protocol
helpers (protocol/messages.py) and read with its framing (protocol/framing.py).

What a pooler must change is normalised before comparing (`normalised`):
BackendKeyData (pgmux hands out cancel keys of its own). Everything else,
ErrorResponse's file/line/routine fields included (the same server writes
them), must be equal byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from scramp import ScramClient

from pgmux.protocol import messages
from pgmux.protocol.framing import MessageReader

Message = tuple[str, bytes]  # (type letter, body)

READ_TIMEOUT = 10.0
_AUTH_OK = struct.pack("!I", 0)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


class WireError(Exception):
    """The peer closed, timed out, or refused the login."""


class WireClient:
    """One connection: login, then batches of messages in, messages out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = MessageReader()

    @classmethod
    async def open(cls, where: Endpoint) -> WireClient:
        opened = asyncio.open_connection(where.host, where.port)
        reader, writer = await asyncio.wait_for(opened, READ_TIMEOUT)
        return cls(reader, writer)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.write(messages.terminate())
            self._writer.close()
            await asyncio.wait_for(self._writer.wait_closed(), 5)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def read(self, timeout: float = READ_TIMEOUT) -> Message:
        """The next backend message; WireError if the peer closes or stays silent."""
        async with asyncio.timeout(timeout):
            while True:
                got = self._frames.next_message()
                if got is not None:
                    return chr(got[0]), got[1]
                data = await self._reader.read(65536)
                if not data:
                    raise WireError("the peer closed the connection")
                self._frames.feed(data)

    async def login(
        self, user: str, password: str, database: str, extra: dict[str, str] | None = None
    ) -> list[Message]:
        """Startup and authentication; returns what follows AuthenticationOk up to
        the first ReadyForQuery (the authentication exchange itself carries nonces)."""
        await self.send(
            messages.startup_message({"user": user, "database": database, **(extra or {})})
        )
        scram: ScramClient | None = None
        while True:
            kind, body = await self.read()
            if kind == "E":
                raise WireError(f"login refused: {body!r}")
            if kind == "R" and body == _AUTH_OK:
                break
            if kind != "R":
                raise WireError(f"unexpected {kind!r} before AuthenticationOk")
            scram = await self._auth_step(body, user, password, scram)
        return await self.read_ready(1)

    async def _auth_step(
        self, body: bytes, user: str, password: str, scram: ScramClient | None
    ) -> ScramClient | None:
        (code,) = struct.unpack("!I", body[:4])
        data = body[4:]
        if code == messages.AUTH_CLEARTEXT_PASSWORD:
            await self.send(messages.password_message(password))
        elif code == messages.AUTH_MD5_PASSWORD:
            inner = hashlib.md5((password + user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + data).hexdigest()
            await self.send(messages.password_message("md5" + outer))
        elif code == messages.AUTH_SASL:
            scram = ScramClient([m.decode() for m in data.split(b"\0") if m], user, password)
            first = scram.get_client_first().encode()
            await self.send(messages.sasl_initial_response(scram.mechanism_name, first))
        elif code == messages.AUTH_SASL_CONTINUE and scram is not None:
            scram.set_server_first(data.decode())
            await self.send(messages.sasl_response(scram.get_client_final().encode()))
        elif code == messages.AUTH_SASL_FINAL and scram is not None:
            scram.set_server_final(data.decode())
        else:
            raise WireError(f"unsupported authentication request {code}")
        return scram

    async def read_ready(self, count: int, timeout: float = READ_TIMEOUT) -> list[Message]:
        """Every message up to and including the COUNT-th ReadyForQuery."""
        out: list[Message] = []
        seen = 0
        while seen < count:
            message = await self.read(timeout)
            out.append(message)
            if message[0] == "Z":
                seen += 1
        return out

    async def exchange(self, batch: bytes, readies: int) -> list[Message]:
        """Send BATCH at once, read back its replies up to READIES ReadyForQuery."""
        await self.send(batch)
        return await self.read_ready(readies)


def normalised(received: Iterable[Message]) -> list[Message]:
    """The messages with what a pooler must change blanked: BackendKeyData."""
    return [(kind, b"" if kind == "K" else body) for kind, body in received]


def readable(received: Iterable[Message]) -> list[str]:
    """One line per message, for assertion output."""
    lines = []
    for kind, body in received:
        if kind in "EN":
            fields = {chr(p[0]): p[1:].decode(errors="replace") for p in body.split(b"\0") if p}
            lines.append(f"{kind} {fields}")
        else:
            lines.append(f"{kind} {body[:120]!r}")
    return lines

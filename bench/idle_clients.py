"""Open N idle client connections to a pooler and hold them (the memory benchmark).

Each connection does the real startup + authentication handshake (trust
authentication: the pooler asks for no password) up to ReadyForQuery, then
sits idle. Prints `ready <ok> <failed>` on stdout once every login finished and
keeps the connections open until stdin closes.

    python bench/idle_clients.py --port 6432 --count 10000 --user bench --db bench
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import struct
import sys

PROTOCOL_V3 = 196608


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!I", PROTOCOL_V3)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


async def login(host: str, port: int, packet: bytes) -> asyncio.StreamWriter | None:
    """One connection up to ReadyForQuery; None if the pooler refused it."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        writer.write(packet)
        while True:
            header = await asyncio.wait_for(reader.readexactly(5), 30)
            (length,) = struct.unpack("!I", header[1:])
            await reader.readexactly(length - 4)
            if header[:1] == b"Z":
                return writer
            if header[:1] == b"E":  # refused (max_client_conn, ...)
                writer.close()
                return None
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return None


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--user", default="bench")
    parser.add_argument("--db", default="bench")
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    raise_nofile()
    packet = startup_packet(args.user, args.db)
    gate = asyncio.Semaphore(args.concurrency)  # logins in flight at once

    async def one() -> asyncio.StreamWriter | None:
        async with gate:
            return await login(args.host, args.port, packet)

    results = await asyncio.gather(*(one() for _ in range(args.count)))
    held = [w for w in results if w is not None]
    print(f"ready {len(held)} {args.count - len(held)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # hold until the parent closes stdin
    for writer in held:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

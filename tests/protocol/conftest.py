"""Helpers shared by the protocol unit tests (no asyncio, no network)."""

from __future__ import annotations

import pytest


@pytest.fixture
def split_feed():
    """Feed `data` to `reader` one byte at a time, collecting what `pull` returns."""

    def run(reader, data: bytes, pull):
        out = []
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
            while (item := pull()) is not None:
                out.append(item)
        return out

    return run

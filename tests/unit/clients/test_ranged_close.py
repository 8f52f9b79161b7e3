"""A ranged read, once closed, keeps no connection: one that finishes
being made as its stream is cancelled (Python 3.11's wait_for then returns
it instead of raising) is closed, not left open past the read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nearstore.clients import ranged


async def _server() -> tuple[asyncio.Server, int, asyncio.Queue[asyncio.StreamReader]]:
    accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(reader)
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


def _read() -> Any:
    return ranged._Read(obj=None, dest=None)  # type: ignore[arg-type]  # connect uses neither


async def test_a_connection_made_for_a_closed_read_is_closed() -> None:
    server, port, accepted = await _server()
    async with server:
        read = _read()
        target = ranged._Target(("http", "127.0.0.1", port), b"")
        read.close()
        with pytest.raises(asyncio.CancelledError):
            await read.connect(None, target)
        assert not read.conns and not read.idle
        peer = await asyncio.wait_for(accepted.get(), 10)
        assert await asyncio.wait_for(peer.read(), 10) == b""  # the client side closed it

"""The local socket bounds its clients in time as HTTP does: an idle
connection is closed, and a client that stops taking replies is dropped
(it would otherwise hold the object it reads, and a task, for ever)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from nearstore.cache import localsock


async def test_a_client_that_takes_nothing_is_dropped() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="took nothing"):
            for _ in range(100_000):  # until the socket's buffer is full, then the stall
                await localsock._send_raw(ours, b"x" * 65536, stall_s=0.3)
        assert 0.3 <= time.monotonic() - t0 < 5
    finally:
        ours.close()
        theirs.close()


async def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    async def never(*args: object) -> object:
        raise AssertionError("no request was sent")

    server = localsock.LocalSocketServer(str(tmp_path / "s.sock"), never, lambda e: None,  # type: ignore[arg-type]
                                         idle_s=0.3)
    assert await server.start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, server.path)
        t0 = time.monotonic()
        assert await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, 100), 5) == b""
        assert time.monotonic() - t0 >= 0.25
    finally:
        client.close()
        await server.close()

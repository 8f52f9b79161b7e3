"""The S3 upstream's salvage of a broken response's buffered bytes."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from nearstore.gateway.backends.s3 import _buffered


async def test_bytes_that_arrived_before_a_break_are_salvaged() -> None:
    """aiohttp raises a broken body's error ahead of the bytes it still
    holds (the race behind a resume that restarted from byte 0): the
    upstream takes them before it resumes."""
    loop = asyncio.get_running_loop()
    protocol: Any = type("P", (), {"_reading_paused": False, "pause_reading": lambda s: None,
                                   "resume_reading": lambda s: None})()
    reader = aiohttp.StreamReader(protocol, limit=2**16, loop=loop)
    reader.feed_data(b"first bytes")
    reader.set_exception(aiohttp.ClientPayloadError("Not enough data to satisfy content length header"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await reader.readany()  # what the stream's reader sees
    resp: Any = type("R", (), {"content": reader})()
    assert _buffered(resp) == b"first bytes"
    assert _buffered(resp) == b""  # taken once

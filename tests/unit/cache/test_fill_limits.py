"""Fills under load (issue 16): at most ``max_fills`` stream from the
backing store at once, and a fill nobody waits for any more stops (unless
nearly done), while one that another reader shares never does."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nearstore.cache import metrics
from nearstore.cache.readpath import CachedBackend
from nearstore.cache.store import ChunkStore
from nearstore.gateway.backends.local import LocalStore
from nearstore.metadata.backing import ObjectHandle, ObjectMeta, ReadOptions
from tests.unit.gateway.test_local_store import Body

CS = 64 * 1024
PIECE = 4096


class Paced:
    """A backing store whose reads send a piece each time the test lets
    them (``step``), or freely once ``free`` is set; it counts the streams
    open at once."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.open_now = 0
        self.most_open = 0
        self.sent = 0
        self.free = asyncio.Event()
        self.last: asyncio.Event | None = None  # set: the last piece waits for it
        self._tick = asyncio.Condition()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def step(self, pieces: int = 1) -> None:
        for _ in range(pieces):
            async with self._tick:
                self._tick.notify_all()
            await asyncio.sleep(0)

    async def open_object(self, bucket: str, key: str, opts: ReadOptions | None = None, *,
                          head: bool = False) -> ObjectHandle:
        handle = await self.inner.open_object(bucket, key, opts, head=head)
        paced = self

        class Handle:
            info = handle.info

            async def read_range(self, start: int, length: int) -> AsyncIterator[bytes]:
                paced.open_now += 1
                paced.most_open = max(paced.most_open, paced.open_now)
                try:
                    data = b"".join([p async for p in handle.read_range(start, length)])
                    for i in range(0, len(data), PIECE):
                        if paced.last is not None and i + PIECE >= len(data):
                            await paced.last.wait()
                        if not paced.free.is_set():
                            async with paced._tick:
                                await paced._tick.wait()
                        paced.sent += len(data[i:i + PIECE])
                        yield data[i:i + PIECE]
                finally:
                    paced.open_now -= 1

            async def close(self) -> None:
                await handle.close()

        return Handle()  # type: ignore[return-value]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[CachedBackend, Paced]]:
    local = LocalStore(tmp_path / "data", fsync=False)
    store = ChunkStore(tmp_path / "cache", capacity=64 * CS)
    store.load()
    paced = Paced(local)
    cb = CachedBackend(paced, store, chunk_size=CS, meta_ttl=60, prefetch=4, max_fills=2)  # type: ignore[arg-type]
    await cb.start()
    await local.create_bucket("b")
    yield cb, paced
    paced.free.set()
    await cb.close()


async def until(cond: Any, what: str, tries: int = 2000) -> None:
    """Until ``cond()``, polled every millisecond or so, at most ``tries`` times."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never: {what}")


async def read_all(cb: CachedBackend, key: str) -> bytes:
    h = await cb.open_object("b", key)
    try:
        return b"".join([p async for p in h.read_range(0, h.info.size)])
    finally:
        await h.close()


async def test_no_more_fills_in_flight_than_the_cap(env: tuple[CachedBackend, Paced]) -> None:
    cb, paced = env
    objects = {f"k{i}": os.urandom(CS) for i in range(6)}
    for key, data in objects.items():
        await paced.inner.put_object("b", key, Body(data), ObjectMeta())
    reads = [asyncio.ensure_future(read_all(cb, key)) for key in objects]
    await until(lambda: paced.open_now == 2, "two fills streaming")
    for _ in range(20):
        await paced.step(4)
        assert paced.open_now <= 2
    paced.free.set()
    await paced.step()
    got = await asyncio.gather(*reads)
    assert got == list(objects.values())
    assert paced.most_open == 2


async def test_fills_nobody_waits_for_stop(env: tuple[CachedBackend, Paced]) -> None:
    cb, paced = env
    cb._fill_slots = asyncio.Semaphore(8)
    data = os.urandom(6 * CS)
    await paced.inner.put_object("b", "big", Body(data), ObjectMeta())
    abandoned = metrics.FILLS_ABANDONED._value.get()
    h = await cb.open_object("b", "big")
    pieces = h.read_range(0, h.info.size)
    first = asyncio.ensure_future(pieces.__anext__())
    # The first chunk and four ahead of it are filling.
    await until(lambda: paced.open_now == 5, "five fills streaming")
    await paced.step(2)
    first.cancel()  # the client goes away
    await asyncio.gather(first, return_exceptions=True)
    await pieces.aclose()  # type: ignore[attr-defined]
    await h.close()
    await until(lambda: not cb._fills and paced.open_now == 0, "the fills stopped")
    assert metrics.FILLS_ABANDONED._value.get() - abandoned == 5
    assert paced.sent < 6 * CS // 2  # they did not run to their ends
    assert cb.store.used == 0  # nothing half-filled was kept
    # The next reader fills afresh and reads correct bytes.
    paced.free.set()
    assert await read_all(cb, "big") == data


async def test_a_fill_another_reader_waits_for_goes_on(env: tuple[CachedBackend, Paced]) -> None:
    cb, paced = env
    data = os.urandom(CS)
    await paced.inner.put_object("b", "shared", Body(data), ObjectMeta())
    leaving = await cb.open_object("b", "shared")
    staying = asyncio.ensure_future(read_all(cb, "shared"))
    await until(lambda: paced.open_now == 1, "one fill streaming")
    await leaving.close()  # one reader leaves; the other still waits
    waiting = asyncio.ensure_future(cb.fetch_chunk("b", leaving.info, 0))
    await paced.step(2)
    waiting.cancel()  # a peer that hung up: its cancellation stays its own
    await asyncio.gather(waiting, return_exceptions=True)
    paced.free.set()
    await paced.step()
    assert await staying == data
    # (Its bytes came from the growing file: the chunk lands a moment later.)
    await until(lambda: not cb._fills, "the fill finished")
    assert cb.store.used == CS


async def test_a_nearly_done_fill_is_finished(env: tuple[CachedBackend, Paced]) -> None:
    cb, paced = env
    data = os.urandom(CS)
    await paced.inner.put_object("b", "almost", Body(data), ObjectMeta())
    h = await cb.open_object("b", "almost")
    cid = cb._chunk_id("b", h.info, 0)
    await until(lambda: paced.open_now == 1, "the fill streaming")
    while cb.progress[cid].written < 0.8 * CS:
        await paced.step()
    await h.close()
    assert cid in cb._fills  # kept
    paced.free.set()
    await paced.step()
    await until(lambda: not cb._fills, "the fill finished")
    assert cb.store.lookup(cid) is not None


async def test_a_fill_a_reader_was_served_from_is_finished(tmp_path: Path) -> None:
    """A one-byte range read gets its byte from the growing file and
    closes before its chunk is whole: the chunk is still cached."""
    big = 4 * 1024 * 1024  # over the fill's 1 MiB write-behind: bytes show before the end
    local = LocalStore(tmp_path / "data", fsync=False)
    store = ChunkStore(tmp_path / "cache", capacity=4 * big)
    store.load()
    paced = Paced(local)
    cb = CachedBackend(paced, store, chunk_size=big, meta_ttl=60)  # type: ignore[arg-type]
    cb.KEEP_FILL_AT = 2.0  # never "nearly done": only having served a reader keeps it
    await cb.start()
    try:
        await local.create_bucket("b")
        data = os.urandom(big)
        await local.put_object("b", "ranged", Body(data), ObjectMeta())
        paced.last = asyncio.Event()  # every piece flows but the last
        paced.free.set()
        h = await cb.open_object("b", "ranged", ReadOptions(range_header="bytes=0-0"))
        cid = cb._chunk_id("b", h.info, 0)
        assert await read_some(h, 0, 1) == data[:1]
        await h.close()
        assert cid in cb._fills and paced.open_now == 1  # kept, still streaming
        paced.last.set()
        await until(lambda: not cb._fills, "the fill finished")
        assert cb.store.lookup(cid) is not None
    finally:
        paced.free.set()
        if paced.last is not None:
            paced.last.set()
        await cb.close()


async def read_some(h: ObjectHandle, start: int, length: int) -> bytes:
    return b"".join([p async for p in h.read_range(start, length)])

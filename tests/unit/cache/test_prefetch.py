"""Prefetching from loaders' hints (issue 17), in process: a CachedBackend
over a LocalStore that counts its reads, and a Prefetcher acting on
hints. Order, deduplication across streams, bounds, an early stop, the
cache share, priority below clients, and correct bytes after an
overwrite."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nearstore.cache import metrics, prefetch
from nearstore.cache.prefetch import Item, Prefetcher
from nearstore.cache.readpath import CachedBackend
from nearstore.cache.store import ChunkStore
from nearstore.gateway.backends.local import LocalStore
from nearstore.metadata.backing import ObjectHandle, ObjectMeta, ReadOptions
from tests.unit.cache.test_fill_limits import read_all as read
from tests.unit.cache.test_fill_limits import until
from tests.unit.gateway.test_local_store import Body

CS = 64 * 1024


class Counted:
    """A LocalStore that records the ranged reads (fills) it serves, in order."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.reads: list[tuple[str, str | None]] = []
        self.gate: asyncio.Event | None = None  # set: fills wait for it

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def open_object(self, bucket: str, key: str, opts: ReadOptions | None = None, *,
                          head: bool = False) -> ObjectHandle:
        if opts is not None and opts.range_header:
            self.reads.append((key, opts.range_header))
            if self.gate is not None:
                await self.gate.wait()
        return await self.inner.open_object(bucket, key, opts, head=head)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[CachedBackend, Counted, Prefetcher]]:
    local = LocalStore(tmp_path / "data", fsync=False)
    store = ChunkStore(tmp_path / "cache", capacity=64 * CS)
    store.load()
    counted = Counted(local)
    cb = CachedBackend(counted, store, chunk_size=CS, meta_ttl=60)  # type: ignore[arg-type]
    pf = cb.prefetcher = Prefetcher(cb, lanes=1, share=0.5)
    await cb.start()
    await local.create_bucket("b")
    yield cb, counted, pf
    if counted.gate is not None:
        counted.gate.set()
    await cb.close()


async def put(counted: Counted, key: str, data: bytes) -> None:
    await counted.inner.put_object("b", key, Body(data), ObjectMeta())


async def idle(cb: CachedBackend, pf: Prefetcher) -> None:
    """Until every hint is acted on and every fill has landed."""
    await until(lambda: not pf.queued() and not pf.busy and not cb._fills,
                "every hint acted on and every fill landed", tries=5000)


async def test_hints_are_filled_in_order_and_read_as_hits(env: tuple[CachedBackend, Counted, Prefetcher]) -> None:
    cb, counted, pf = env
    objects = {k: os.urandom(2 * CS) for k in ("c", "a", "d", "b")}
    for k, v in objects.items():
        await put(counted, k, v)
    used = metrics.PREFETCH_USED._value.get()
    assert pf.hint("job/0/0", "b", [Item(k) for k in objects]) == 4
    await idle(cb, pf)
    assert [k for k, _ in counted.reads] == ["c", "c", "a", "a", "d", "d", "b", "b"]
    hits = metrics.HITS._value.get()
    for k, v in objects.items():
        assert await read(cb, k) == v
    assert metrics.HITS._value.get() - hits == 8  # every chunk was there
    assert metrics.PREFETCH_USED._value.get() - used == 8
    assert cb.prefetched_unread_bytes == 0
    assert not cb.store.protected and not cb._unprotect_at  # read: ordinary chunks again


async def test_every_rank_sending_the_same_order_fills_each_chunk_once(
        env: tuple[CachedBackend, Counted, Prefetcher]) -> None:
    cb, counted, pf = env
    cb.prefetcher = pf = Prefetcher(cb, lanes=4, share=0.5)
    pf.start()
    keys = [f"k{i}" for i in range(6)]
    for k in keys:
        await put(counted, k, os.urandom(CS))
    for rank in range(4):
        pf.hint(f"job/{rank}/0", "b", [Item(k) for k in keys])
    await idle(cb, pf)
    assert sorted(k for k, _ in counted.reads) == keys  # once each
    await pf.close()


async def test_a_million_keys_are_cut_to_a_window_and_fills_stay_bounded(
        env: tuple[CachedBackend, Counted, Prefetcher]) -> None:
    cb, counted, pf = env
    counted.gate = asyncio.Event()  # fills hang: what is in flight stays there
    for i in range(3):
        await put(counted, f"k{i}", os.urandom(CS))
    accepted = pf.hint("job/0/0", "b", [Item(f"k{i}") for i in range(1_000_000)])
    assert accepted == prefetch.MAX_KEYS and pf.queued() <= prefetch.MAX_KEYS
    for _ in range(200):
        await asyncio.sleep(0.001)
    assert len(cb._fills) <= 1  # one lane, one object, one chunk at a time
    counted.gate.set()


async def test_a_loader_that_stops_leaves_nothing_queued(
        env: tuple[CachedBackend, Counted, Prefetcher], monkeypatch: pytest.MonkeyPatch) -> None:
    cb, counted, pf = env
    counted.gate = asyncio.Event()
    for i in range(5):
        await put(counted, f"k{i}", os.urandom(CS))
    pf.hint("job/0/0", "b", [Item(f"k{i}") for i in range(5)])
    pf.hint("job/1/0", "b", [Item(f"k{i}") for i in range(5)])
    pf.hint("job/0/0", "b", [])  # an explicit stop
    assert 0 < pf.queued() <= 5
    monkeypatch.setattr(prefetch, "STALE_S", 0.0)  # and one never heard from again
    counted.gate.set()
    await idle(cb, pf)
    assert pf.queued() == 0 and len(counted.reads) <= 2


async def test_an_object_overwritten_after_its_hint_is_read_as_its_new_version(
        env: tuple[CachedBackend, Counted, Prefetcher]) -> None:
    cb, counted, pf = env
    await put(counted, "k", b"old" * CS)
    pf.hint("job/0/0", "b", [Item("k")])
    await idle(cb, pf)
    await put(counted, "k", b"new" * CS)
    cb.meta.invalidate("b", "k")  # as a write through the node does
    assert await read(cb, "k") == b"new" * CS


async def test_prefetched_chunks_take_at_most_their_share_and_evicted_unread_is_waste(
        tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "data", fsync=False)
    store = ChunkStore(tmp_path / "cache", capacity=8 * CS)
    store.load()
    cb = CachedBackend(local, store, chunk_size=CS, meta_ttl=60)
    pf = cb.prefetcher = Prefetcher(cb, lanes=1, share=0.25)  # 2 chunks
    await cb.start()
    try:
        await local.create_bucket("b")
        for i in range(4):
            await local.put_object("b", f"k{i}", Body(os.urandom(CS)), ObjectMeta())
        pf.hint("job/0/0", "b", [Item(f"k{i}") for i in range(4)])
        for _ in range(300):
            await asyncio.sleep(0.002)
            assert cb.prefetched_unread_bytes <= 2 * CS
        assert cb.prefetched_unread_bytes == 2 * CS and store.used == 2 * CS  # waiting for readers
        kept = set(cb.prefetched_unread)
        assert set(store.protected) == kept == set(cb._unprotect_at)
        loop = asyncio.get_running_loop()
        assert all(cb.PROTECT_S - 1 < t.when() - loop.time() <= cb.PROTECT_S for t in cb._unprotect_at.values())
        wasted = metrics.PREFETCH_WASTED._value.get()

        async def other_reads(tag: str) -> None:
            for i in range(10):  # more than the cache holds
                await local.put_object("b", f"{tag}{i}", Body(os.urandom(CS)), ObjectMeta())
                h = await cb.open_object("b", f"{tag}{i}")
                await asyncio.gather(*(h.read_range(0, CS).__anext__() for _ in range(1)))
                await h.close()

        await other_reads("o")
        assert kept <= set(store.index)  # kept from eviction until read
        assert metrics.PREFETCH_WASTED._value.get() == wasted
        for cid in kept:
            cb._lapse(cid)  # PROTECT_S later, still unread
        assert not store.protected and store.protected_bytes == 0
        await other_reads("p")  # now they go, and are counted as waste
        for _ in range(1000):
            if metrics.PREFETCH_WASTED._value.get() - wasted >= 2 * CS:
                break
            await asyncio.sleep(0.002)
        assert metrics.PREFETCH_WASTED._value.get() - wasted >= 2 * CS
    finally:
        await cb.close()


async def test_hinted_fills_wait_while_clients_wait(env: tuple[CachedBackend, Counted, Prefetcher]) -> None:
    cb = env[0]
    assert cb.fill_room()
    cb._fills_queued = 1  # a client's fill waiting for a slot
    assert not cb.fill_room()
    cb._fills_queued = 0
    for _ in range(cb._max_fills * 3 // 4 - 1):
        await cb._fill_slots.acquire()
    assert cb.fill_room()  # a quarter of the slots (and one) still free for clients
    await cb._fill_slots.acquire()
    assert not cb.fill_room()
    for _ in range(cb._max_fills * 3 // 4):
        cb._fill_slots.release()


async def test_readers_that_catch_the_prefetch_in_flight_add_lanes_up_to_the_most(
        env: tuple[CachedBackend, Counted, Prefetcher]) -> None:
    cb, counted, pf = env
    cb.prefetcher = pf = Prefetcher(cb, lanes=1, max_lanes=3, share=0.5)
    pf.start()
    counted.gate = asyncio.Event()  # fills hang until the readers are counted
    data = {f"k{i}": os.urandom(CS) for i in range(8)}
    for k, v in data.items():
        await put(counted, k, v)
    late, joins, misses = (metrics.PREFETCH_LATE._value.get(), metrics.JOINS._value.get(),
                           metrics.MISSES._value.get())
    pf.hint("job/0/0", "b", [Item(k) for k in data])
    readers = []
    for i in range(3):
        await until(lambda i=i: len(cb._fills) == i + 1, f"{i + 1} prefetches in flight")
        assert pf.running == i + 1
        readers.append(asyncio.ensure_future(read(cb, f"k{i}")))  # catches k{i}'s prefetch filling
        await until(lambda i=i: metrics.PREFETCH_LATE._value.get() - late == i + 1, "the reader counted late")
    assert pf.running == 3  # the most: the third late read added none
    await asyncio.sleep(0.01)
    assert len(cb._fills) == 3  # and no fourth lane started a fourth object
    assert metrics.JOINS._value.get() - joins == 3 and metrics.MISSES._value.get() == misses
    counted.gate.set()
    assert await asyncio.gather(*readers) == [data[f"k{i}"] for i in range(3)]
    await idle(cb, pf)
    await until(lambda: pf.running == 1, "the added lanes ended with the queues")
    assert sorted(k for k, _ in counted.reads) == sorted(data)  # each object filled once
    await pf.close()


async def test_without_readers_catching_up_the_lanes_stay_as_configured(
        env: tuple[CachedBackend, Counted, Prefetcher]) -> None:
    cb, counted, pf = env
    cb.prefetcher = pf = Prefetcher(cb, lanes=2, max_lanes=8, share=0.5)
    pf.start()
    for i in range(6):
        await put(counted, f"k{i}", os.urandom(CS))
    pf.hint("job/0/0", "b", [Item(f"k{i}") for i in range(6)])
    await idle(cb, pf)
    hits = metrics.HITS._value.get()
    for i in range(6):
        await read(cb, f"k{i}")
    assert metrics.HITS._value.get() - hits == 6 and pf.running == 2
    await pf.close()


async def test_with_hint_direct_only_prefetch_fills_write_with_o_direct(
        env: tuple[CachedBackend, Counted, Prefetcher], monkeypatch: pytest.MonkeyPatch) -> None:
    from nearstore.cache import readpath
    from nearstore.cache.store import ChunkWriter

    cb, counted, pf = env
    writers: list[tuple[str, bool]] = []

    def recorded(path: Path, *, direct: bool = False) -> ChunkWriter:
        w = ChunkWriter(path, direct=direct)
        writers.append((path.name, direct))
        return w

    monkeypatch.setattr(readpath, "ChunkWriter", recorded)
    cb.prefetch_direct = True
    hinted, other = os.urandom(3 * CS + 7), os.urandom(CS)
    await put(counted, "hinted", hinted)
    await put(counted, "other", other)
    pf.hint("job/0/0", "b", [Item("hinted")])
    await idle(cb, pf)
    assert [d for _, d in writers] == [True] * 4
    assert await read(cb, "other") == other  # a client's fill: through the page cache
    await idle(cb, pf)
    assert [d for _, d in writers] == [True] * 4 + [False]
    assert await read(cb, "hinted") == hinted

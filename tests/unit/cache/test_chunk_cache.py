"""The chunk cache in-process: a CachedBackend over a LocalStore, so that
every path (hit, miss, corrupt chunk, cache fault, changed object, budget,
restart) runs fast and deterministically."""

from __future__ import annotations

import mmap
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import xxhash

from nearstore.cache.readpath import CachedBackend, CachedHandle, ObjectChanged
from nearstore.cache.store import ChunkStore
from nearstore.gateway.backends.local import LocalStore
from nearstore.metadata.backing import FileSegment, ObjectMeta, ReadOptions
from tests.unit.gateway.test_local_store import Body

CS = 64 * 1024


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[CachedBackend, LocalStore, Path]]:
    local = LocalStore(tmp_path / "data", fsync=False)
    store = ChunkStore(tmp_path / "cache", capacity=16 * CS)
    store.load()
    cb = CachedBackend(local, store, chunk_size=CS, meta_ttl=60)
    await cb.start()
    await local.create_bucket("bkt")
    yield cb, local, tmp_path
    await cb.close()


async def settle(cb: CachedBackend) -> None:
    """Wait for fills in flight: a cold read streams from a chunk while it
    fills, so the file lands a moment after the read returns."""
    import asyncio

    for _ in range(500):
        if not cb._fills:
            return
        await asyncio.sleep(0.01)


async def read(cb: CachedBackend, key: str, start: int = 0, length: int | None = None) -> bytes:
    rng = None if (start, length) == (0, None) else f"bytes={start}-" + ("" if length is None else str(start + length - 1))
    h = await cb.open_object("bkt", key, ReadOptions(range_header=rng))
    try:
        n = h.info.size - start if length is None else length
        return b"".join([p async for p in h.read_range(start, n)])
    finally:
        await h.close()
        await settle(cb)


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "cache" / "chunks").rglob("*") if p.is_file())


async def test_miss_then_hit(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, root = env
    data = os.urandom(3 * CS + 100)
    await local.put_object("bkt", "k", Body(data), ObjectMeta())
    assert await read(cb, "k") == data
    assert len(chunk_files(root)) == 4
    fills = cb.store.stats.fills
    assert await read(cb, "k") == data
    assert await read(cb, "k", CS - 10, 20) == data[CS - 10 : CS + 10]
    assert cb.store.stats.fills == fills  # all hits


async def test_ranged_read_fills_only_needed_chunks(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, root = env
    data = os.urandom(10 * CS)
    await local.put_object("bkt", "k", Body(data), ObjectMeta())
    cb.prefetch = 1
    assert await read(cb, "k", 5 * CS + 1, 10) == data[5 * CS + 1 : 5 * CS + 11]
    # The chunk itself, plus at most the prefetch window beyond the range's end (none here).
    assert len(chunk_files(root)) == 1


async def test_segments_are_file_backed_on_hits(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, _ = env
    await local.put_object("bkt", "k", Body(os.urandom(2 * CS)), ObjectMeta())
    h = await cb.open_object("bkt", "k")
    assert isinstance(h, CachedHandle)
    segs = [s async for s in h.segments(0, 2 * CS)]
    await h.close()
    assert all(isinstance(s, FileSegment) for s in segs)
    assert [s.length for s in segs if isinstance(s, FileSegment)] == [CS, CS]


def flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


async def test_bit_flip_while_running_is_never_served(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, root = env
    data = os.urandom(2 * CS)
    await local.put_object("bkt", "k", Body(data), ObjectMeta())
    assert await read(cb, "k") == data
    for f in chunk_files(root):
        flip_a_bit(f)
    assert await read(cb, "k") == data
    assert cb.store.stats.fills == 4  # both chunks dropped and refilled


async def test_bit_flip_while_stopped_is_never_served(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "data", fsync=False)
    store = ChunkStore(tmp_path / "cache", capacity=16 * CS)
    store.load()
    cb = CachedBackend(local, store, chunk_size=CS)
    await cb.start()
    await local.create_bucket("bkt")
    data = os.urandom(3 * CS)
    await local.put_object("bkt", "k", Body(data), ObjectMeta())
    assert await read(cb, "k") == data
    await cb.close()
    flip_a_bit(chunk_files(tmp_path)[1])
    (tmp_path / "cache" / "tmp" / "half-written-fill").write_bytes(b"junk")
    store2 = ChunkStore(tmp_path / "cache", capacity=16 * CS)
    assert store2.load() == 3  # a warm cache stays warm
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    cb2 = CachedBackend(LocalStore(tmp_path / "data", fsync=False), store2, chunk_size=CS)
    await cb2.start()
    assert await read(cb2, "k") == data
    assert store2.stats.fills == 1  # only the corrupt chunk
    await cb2.close()


async def test_budget_is_never_exceeded(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, root = env
    objects = {f"o{i}": os.urandom(5 * CS) for i in range(8)}
    for k, v in objects.items():
        await local.put_object("bkt", k, Body(v), ObjectMeta())
    rng = random.Random(1)
    for _ in range(40):
        k = rng.choice(list(objects))
        assert await read(cb, k) == objects[k]
        on_disk = sum(f.stat().st_size for f in chunk_files(root))
        assert on_disk <= cb.store.capacity
        assert on_disk == cb.store.used
    assert cb.store.stats.evictions > 0


async def test_cache_fault_serves_from_backing(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, root = env
    data = os.urandom(2 * CS + 5)
    await local.put_object("bkt", "k", Body(data), ObjectMeta())
    tmp = root / "cache" / "tmp"
    os.rmdir(tmp)
    tmp.write_bytes(b"")  # fills now fail (ENOTDIR), as on a broken disk
    assert await read(cb, "k") == data
    assert chunk_files(root) == []


async def test_overwritten_object_is_never_mixed(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, _ = env
    v1, v2 = os.urandom(4 * CS), os.urandom(4 * CS)
    await local.put_object("bkt", "k", Body(v1), ObjectMeta())
    assert await read(cb, "k", 0, CS) == v1[:CS]  # metadata of v1 is now cached
    await local.put_object("bkt", "k", Body(v2), ObjectMeta())  # behind the cache's back
    # One version whole, or a clean error (mid-response: the connection is
    # cut), never a mix: the cached first chunk is v1's, the fills see v2.
    try:
        got = await read(cb, "k")
    except ObjectChanged:
        pass
    else:
        assert got in (v1, v2)
    cb.meta.invalidate("bkt", "k")
    assert await read(cb, "k") == v2


async def test_write_through_invalidates(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, _, _ = env
    await cb.put_object("bkt", "k", Body(b"one"), ObjectMeta())
    assert await read(cb, "k") == b"one"
    await cb.put_object("bkt", "k", Body(b"two!"), ObjectMeta())
    assert await read(cb, "k") == b"two!"


async def test_concurrent_misses_share_one_fill(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    import asyncio

    cb, local, _ = env
    data = os.urandom(CS)
    await local.put_object("bkt", "k", Body(data), ObjectMeta())
    results = await asyncio.gather(*[read(cb, "k") for _ in range(10)])
    assert all(r == data for r in results)
    assert cb.store.stats.fills == 1


async def test_warm_fills_and_pins(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    from nearstore.cache.warm import warm

    cb, local, _ = env
    objects = {f"w/{i}": os.urandom(2 * CS + i) for i in range(3)}
    for k, v in objects.items():
        await local.put_object("bkt", k, Body(v), ObjectMeta())

    async def fill(key: str, index: int) -> int:
        info = await cb.head_object("bkt", key)
        chunk = await cb.chunk("bkt", info, index)
        assert cb.store.pin(chunk.id)
        return chunk.size

    seen: list[int] = []
    progress = await warm([(k, len(v)) for k, v in objects.items()], CS, fill,
                          report=lambda p: seen.append(p.bytes), report_every=0)
    assert progress.done and progress.errors == 0
    assert progress.objects == 3 and progress.bytes == sum(map(len, objects.values()))
    assert seen == sorted(seen) and seen[-1] == progress.bytes
    fills = cb.store.stats.fills
    # Pinned chunks survive a flood of other reads.
    for i in range(20):
        await local.put_object("bkt", f"flood{i}", Body(os.urandom(CS)), ObjectMeta())
        await read(cb, f"flood{i}")
    for k, v in objects.items():
        assert await read(cb, k) == v
    assert cb.store.stats.fills == fills + 20
    # Pins never take the whole budget.
    assert cb.store.pinned_bytes <= cb.store.capacity * cb.store.MAX_PINNED_SHARE


def test_verification_memo_trusts_only_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import xxhash

    from nearstore.cache import store as store_mod
    from nearstore.cache.errors import ChunkCorrupt
    from nearstore.cache.store import open_verified

    data = os.urandom(1 << 20)
    path = tmp_path / "chunk"
    path.write_bytes(data)
    digest = xxhash.xxh3_64(data).hexdigest()
    hashed: list[int] = []
    real = store_mod.xxhash.xxh3_64

    def counting(buf: bytes | mmap.mmap = b"") -> xxhash.xxh3_64:
        hashed.append(1)
        return real(buf)

    monkeypatch.setattr(store_mod.xxhash, "xxh3_64", counting)
    for _ in range(2):  # written just now: not trusted yet (file times are coarse)
        os.close(open_verified(path, digest, len(data), memo_s=60))
    assert len(hashed) == 2
    time.sleep(1.1)
    hashed.clear()
    for _ in range(3):
        os.close(open_verified(path, digest, len(data), memo_s=60))
    assert len(hashed) == 1  # hashed once more, then trusted
    os.close(open_verified(path, digest, len(data), memo_s=0))
    assert len(hashed) == 2  # memo off: hashed every time
    with open(path, "r+b") as f:  # a byte flipped in place; mtime put back as it was
        st = os.fstat(f.fileno())
        f.seek(100)
        f.write(bytes([data[100] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # (ctime still moves)
    with pytest.raises(ChunkCorrupt):
        open_verified(path, digest, len(data), memo_s=60)


async def test_a_fill_with_a_wrong_size_stores_nothing(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    """Metadata from elsewhere (a peer, a worker) claiming another size is
    caught where the backing store answers: no short chunk is ever stored."""
    from dataclasses import replace

    cb, local, root = env
    data = os.urandom(CS + 500)
    await local.put_object("bkt", "k", Body(data), ObjectMeta())
    info = await cb.head_object("bkt", "k")
    with pytest.raises(ObjectChanged):
        await cb.chunk("bkt", replace(info, size=4464), 0)
    assert chunk_files(root) == []
    assert await read(cb, "k") == data


async def test_a_chunk_of_the_wrong_length_is_never_served(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, _ = env
    data = os.urandom(CS + 500)
    await local.put_object("bkt", "k", Body(data), ObjectMeta())
    assert await read(cb, "k") == data
    # A store from before fills checked sizes: chunk 1 (500 bytes) replaced
    # by a shorter file that hashes right.
    info = await cb.head_object("bkt", "k")
    cid = cb._chunk_id("bkt", info, 1)
    cb.store.drop(cid)
    tmp = cb.store.new_temp()
    from nearstore.cache.store import ChunkWriter

    w = ChunkWriter(tmp)
    w.write(data[CS : CS + 100])
    cb.store.commit(cid, tmp, 100, w.close())
    assert await read(cb, "k") == data
    assert cb.store.index[cid].size == 500


async def test_drop_unless_keeps_pinned_and_wanted(env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, root = env
    await local.put_object("bkt", "k", Body(os.urandom(3 * CS)), ObjectMeta())
    await read(cb, "k")
    ids = sorted(cb.store.index)
    assert len(ids) == 3 and cb.store.pin(ids[0])
    assert cb.store.drop_unless(lambda cid: cid == ids[1]) == 1
    assert sorted(cb.store.index) == ids[:2]
    assert len(chunk_files(root)) == 2


async def test_warm_says_why_chunks_failed() -> None:
    from nearstore.cache.warm import MAX_FAILURES, warm

    async def fill(key: str, index: int) -> int:
        if key == "bad":
            raise OSError(f"disk full at chunk {index}")
        return 10

    progress = await warm([("good", 10), ("bad", 3 * CS)], CS, fill)
    assert progress.errors == 3 and progress.bytes == 10
    assert sorted(progress.failures) == [f"bad#{i}: OSError: disk full at chunk {i}" for i in range(3)]
    assert progress.as_dict()["failures"] == progress.failures
    many = await warm([("bad", (MAX_FAILURES + 5) * CS)], CS, fill)
    assert many.errors == MAX_FAILURES + 5 and len(many.failures) == MAX_FAILURES


async def test_a_fill_writes_in_batches_and_readers_see_only_written_bytes(tmp_path: Path) -> None:
    # Pieces arrive faster than one write finishes: they are batched, every
    # byte lands in order, the hash is the content's, and the progress that
    # readers follow never runs ahead of the file.
    import asyncio
    import threading
    import types

    import xxhash

    from nearstore.cache.readpath import FillProgress
    from nearstore.cache.store import ChunkWriter

    rng = random.Random(3)
    pieces = [rng.randbytes(rng.randint(1, 70_000)) for _ in range(200)]
    writer = ChunkWriter(tmp_path / "fill")
    calls: list[int] = []
    write_many = writer.write_many

    gate = threading.Event()  # the first write waits until 9 more pieces arrived

    def slow_write_many(batch: list[bytes]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            assert gate.wait(10)
        write_many(batch)

    writer.write_many = slow_write_many  # type: ignore[method-assign]
    progress = FillProgress()
    seen: list[tuple[int, int]] = []
    advance = progress.advance

    def checked_advance(n: int) -> None:
        advance(n)
        seen.append((progress.written, os.stat(writer.path).st_size))

    progress.advance = checked_advance  # type: ignore[method-assign]

    async def arriving() -> AsyncIterator[bytes]:
        for i, piece in enumerate(pieces):
            await asyncio.sleep(0)
            if i == 10:
                gate.set()
            yield piece

    fake = types.SimpleNamespace(WRITE_BEHIND=CachedBackend.WRITE_BEHIND)
    await CachedBackend._receive(fake, arriving(), writer, progress)  # type: ignore[arg-type]
    content = b"".join(pieces)
    assert (tmp_path / "fill").read_bytes() == content
    assert writer.close() == xxhash.xxh3_64(content).hexdigest()
    assert progress.written == len(content) == writer.size
    assert all(written <= on_disk for written, on_disk in seen), seen
    assert calls[0] == 1 and calls[1] >= 9  # batched while the first write ran, not a hop per piece


def _has_o_direct(where: Path) -> bool:
    try:
        fd = os.open(where / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(where / "probe")
    return True


async def test_a_direct_chunk_writer_shows_readers_whole_blocks_and_ends_exact(tmp_path: Path) -> None:
    """Prefetch fills write with O_DIRECT: readers of the growing file see
    only flushed blocks, and the closed file is exactly the bytes, cut
    from its padded last block; the staging buffer is reused."""
    import asyncio
    import types

    from nearstore.cache import store as store_mod
    from nearstore.cache.readpath import FillProgress
    from nearstore.cache.store import ChunkWriter

    rng = random.Random(5)
    pieces = [rng.randbytes(rng.randint(1, 200_000)) for _ in range(40)]
    content = b"".join(pieces)
    writer = ChunkWriter(tmp_path / "fill", direct=True)
    direct, stage = writer.direct, writer._stage
    assert direct == _has_o_direct(tmp_path)  # where the filesystem has it (ext4 here)
    progress = FillProgress()
    seen: list[tuple[int, bytes]] = []
    advance = progress.advance

    def checked_advance(n: int) -> None:
        advance(n)
        with open(writer.path, "rb") as f:
            seen.append((progress.written, f.read(progress.written)))

    progress.advance = checked_advance  # type: ignore[method-assign]

    async def arriving() -> AsyncIterator[bytes]:
        for piece in pieces:
            await asyncio.sleep(0)
            yield piece

    fake = types.SimpleNamespace(WRITE_BEHIND=CachedBackend.WRITE_BEHIND)
    await CachedBackend._receive(fake, arriving(), writer, progress)  # type: ignore[arg-type]
    assert seen and all(data == content[:n] for n, data in seen)  # never a byte past what was flushed
    if direct:
        assert writer.written == len(content) // ChunkWriter.BLOCK * ChunkWriter.BLOCK < writer.size
    assert writer.close() == xxhash.xxh3_64(content).hexdigest()
    assert writer.written == writer.size == len(content)
    assert (tmp_path / "fill").read_bytes() == content
    if direct:
        again = ChunkWriter(tmp_path / "again", direct=True)
        assert again._stage is stage  # the buffer of the last fill, not new memory
        again.abort()
        assert not (tmp_path / "again").exists() and stage in store_mod._STAGES


def test_a_direct_chunk_writer_without_o_direct_writes_plainly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from nearstore.cache.store import ChunkWriter

    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")  # tmpfs
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    writer = ChunkWriter(tmp_path / "plain", direct=True)
    assert not writer.direct
    writer.write_many([b"x" * 5000, b"y" * 3])
    assert writer.written == writer.size == 5003
    writer.close()
    assert (tmp_path / "plain").read_bytes() == b"x" * 5000 + b"y" * 3


def test_a_chunk_writer_never_writes_after_abort(tmp_path: Path) -> None:
    from nearstore.cache.store import ChunkWriter

    writer = ChunkWriter(tmp_path / "aborted")
    writer.write_many([b"abc", memoryview(b"def")])
    assert writer.size == 6
    writer.abort()
    assert not (tmp_path / "aborted").exists()
    with pytest.raises(OSError):
        writer.write_many([b"more"])


def test_a_chunks_verified_memo_goes_with_it(tmp_path: Path) -> None:
    """The 30-minute soak found the verified-chunk memo growing with churn:
    an entry stayed after its chunk was evicted (bounded only at 2^20
    entries, ~430 MiB). An entry now leaves with its chunk, and the memo's
    bound is 2^16 entries (~30 MiB)."""
    from nearstore.cache import store as store_mod

    store = ChunkStore(tmp_path / "cache", capacity=2 * CS)
    store.load()
    chunks = []
    for i in range(3):  # the third evicts the first
        tmp = store.new_temp()
        data = bytes([i]) * CS
        tmp.write_bytes(data)
        chunks.append(store.commit(f"{i:032x}", tmp, CS, xxhash.xxh3_64(data).hexdigest()))
        # As open_verified records a file it hashed (older than a second).
        store_mod._verified[store.path(chunks[-1])] = (0, CS, 0, 0, chunks[-1].checksum, time.monotonic())
    assert store.lookup(chunks[0].id) is None  # evicted ...
    assert store.path(chunks[0]) not in store_mod._verified  # ... with its memo entry
    store.discard(chunks[1])
    assert store.path(chunks[1]) not in store_mod._verified
    assert store.path(chunks[2]) in store_mod._verified
    assert store_mod._VERIFIED_MAX * 455 <= 32 * 1024 * 1024


async def test_protections_and_pins_keep_chunks_apart_and_within_the_pin_share(
        env: tuple[CachedBackend, LocalStore, Path]) -> None:
    cb, local, _ = env
    store = cb.store
    await local.put_object("bkt", "k", Body(os.urandom(4 * CS)), ObjectMeta())
    await read(cb, "k")
    a, b, c, d = sorted(store.index)
    assert store.protect(a) and store.pin(a)
    store.unprotect(a)  # the user's pin stands
    assert a in store.pinned and store.policy.victim() != a
    assert store.protect(b)
    store.unpin(b)  # not pinned by the user: the protection stands
    store.pin(b)
    store.unpin(b)
    assert b in store.protected and b not in store.pinned
    for _ in range(2):
        victim = store.policy.victim()
        assert victim in (c, d)
        store.drop(victim)
        store.stats.evictions += 1
    assert set(store.index) == {a, b} and store.policy.victim() is None  # neither may be evicted
    store.unprotect(b)
    assert store.policy.victim() == b and store.protected_bytes == 0
    store.drop(b)
    # Pins and protections share MAX_PINNED_SHARE of the budget.
    store.unpin(a)
    store.MAX_PINNED_SHARE = 1.5 * CS / store.capacity  # room for one chunk
    assert store.protect(a)
    await local.put_object("bkt", "j", Body(os.urandom(CS)), ObjectMeta())
    await read(cb, "j")
    (j,) = set(store.index) - {a}
    assert not store.protect(j) and not store.pin(j)
    store.unprotect(a)
    assert store.pin(j)

"""The cache's read path: a backing store seen through the node-local
chunk cache.

A cached GET, top-down (each step a function here, in this order):

1. ``CachedBackend.open_object``: the object's size and ETag from the
   short-TTL metadata cache (``head_object``); the first chunk made ready
   (``CachedHandle.ready``) before the response starts, so that a changed
   object is retried with fresh metadata and a backing-store error is
   answered as such.
2. ``CachedHandle.segments``: the requested range cut into fixed-size
   chunks; for each, the first source that has it:
   - another node owns it (``CachedBackend.owner``): ``_from_peer``, the
     bytes from the owner (``cache.peers.Cluster.fetch``, read ahead by
     ``_fetch_remote``); if the owner fails, ``_instead_of_peer``;
   - this node owns it: ``_from_here``: the chunk still filling
     (``_stream_filling``, from the growing temporary file), else a local
     hit or a fill (``CachedBackend.chunk`` → ``_fill``, one per chunk, a
     ranged GET with If-Match so a read never mixes two versions), opened
     and verified by ``_open``;
   - on a cache fault (disk full, unwritable directory, a corrupt chunk
     twice), the backing store (``CachedBackend.direct_chunk``): the client
     never notices.
   Chunks ahead of the one being sent are filled in parallel (bounded).

Fills are bounded node-wide too: at most ``max_fills`` stream from the
backing store at once (the others queue, FIFO), and a fill nobody waits for
any more (every reader that asked for it has closed: a client gone, a read
ahead never reached) is cancelled unless it is nearly done
(``KEEP_FILL_AT``) or some reader was served from it (a range read gets its
bytes before its chunk is whole; the chunk is still wanted): a thousand readers that go away do not leave a thousand
fills behind them. Who waits is counted per chunk (``hold``/``let_go``);
callers that await a chunk use ``fetch_chunk``, which holds it meanwhile
and never cancels a fill another reader shares.

Writes go through to the backing store and invalidate the metadata entry
here, in the other worker processes and on every peer; chunks of the old
version are unreachable (their id has the old ETag) and age out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path

from nearstore.cache import metrics
from nearstore.cache.control import Control
from nearstore.cache.errors import (
    ChunkCorrupt,
    ChunkMissing,
    ObjectChanged,
    PeerFailed,
    PeerTampered,
)
from nearstore.cache.peers import Cluster
from nearstore.cache.prefetch import Prefetcher
from nearstore.cache.store import Chunk, ChunkStore, ChunkWriter, open_if_verified, open_verified
from nearstore.metadata.backing import (
    Backend,
    BucketAccess,
    BucketInfo,
    CompletedPart,
    ConditionFailed,
    Deleted,
    FileSegment,
    ListPage,
    ObjectHandle,
    ObjectInfo,
    ObjectMeta,
    PartInfo,
    RangeNotSatisfiable,
    ReadOptions,
    Served,
    StoreError,
    UploadBody,
    UploadInfo,
    VersionPage,
    WriteConditions,
    parse_range,
    read_segments,
)
from nearstore.metadata.identity import chunk_id
from nearstore.metadata.objects import MetaCache
from nearstore.metadata.ring import Node

log = logging.getLogger(__name__)


class FillProgress:
    """How far a fill has written its temporary file: readers of a chunk
    being filled stream from that file as it grows (the file is renamed,
    not rewritten, when complete, so an open descriptor stays valid)
    instead of waiting for the whole chunk."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.written = 0
        self.total = 0  # the chunk's length, once the fill knows it
        self._event = asyncio.Event()

    def advance(self, n: int) -> None:
        self.written += n
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, fill: asyncio.Future[Chunk]) -> None:
        """Until the next write, or the end of the fill."""
        waiter: asyncio.Future[object] = asyncio.ensure_future(self._event.wait())
        waited: set[asyncio.Future[object]] = {waiter, fill}  # type: ignore[arg-type]
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()


class CachedBackend:
    """Wraps a backing store (see the module docstring)."""

    def __init__(
        self,
        inner: Backend,
        store: ChunkStore,
        *,
        chunk_size: int,
        meta_ttl: float = 5.0,
        prefetch: int = 4,
        verify: bool = True,
        reverify_s: float = 0.0,
        max_fills: int = 64,
        prefetch_direct: bool = False,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.store = store
        self.chunk_size = chunk_size
        self.prefetch = max(1, prefetch)
        self._chunk_ids: dict[tuple[str, str, str, int], str] = {}
        self.verify = verify
        self.reverify_s = reverify_s
        self.meta: MetaCache[ObjectInfo] = MetaCache(meta_ttl)
        self._fills: dict[str, asyncio.Future[Chunk]] = {}
        self._fill_tasks: set[asyncio.Task[Chunk]] = set()
        self.progress: dict[str, FillProgress] = {}
        self._holders: dict[str, int] = {}  # chunk id -> readers waiting for its fill
        self._max_fills = max_fills
        self._fills_queued = 0  # fills waiting for a slot
        # Prefetched chunks (cache.prefetch) no reader has touched yet: id -> size.
        self.prefetched_unread: dict[str, int] = {}
        self.prefetched_unread_bytes = 0
        self.prefetch_direct = prefetch_direct  # prefetch fills written with O_DIRECT (ChunkWriter)
        self._unprotect_at: dict[str, asyncio.TimerHandle] = {}  # prefetched chunks kept until read
        store.on_drop.append(self._dropped)
        # Fills in flight that no reader's leaving cancels: some reader was
        # served from it, or a hint started it (cache.prefetch).
        self._keep: set[str] = set()
        self._fill_slots = asyncio.Semaphore(max_fills)
        # Multi-process node (see cache.control): None when alone.
        self.control: Control | None = None
        # Cache peers (cache.peers): None for a node alone.
        self.cluster: Cluster | None = None
        # Loaders' hints (cache.prefetch): None where they are turned off.
        self.prefetcher: Prefetcher | None = None
        self.follower = False
        self._touched: set[str] = set()
        self._toucher: asyncio.Task[None] | None = None

    def attach(self, control: Control) -> None:
        """Join a multi-process node: the owner fills and evicts for all;
        a follower finds chunks on disk and asks the owner for fills."""
        self.control = control
        self.follower = not control.owner
        if control.owner:
            control.on_fill = self._fill_for_worker
            control.on_touch = self._touch_from_worker
        control.on_invalidate = self.meta.invalidate

    def _touch_from_worker(self, ids: list[str]) -> None:
        for cid in ids:
            self.store.lookup(cid)
            if cid in self.prefetched_unread:
                self._prefetch_read(cid)

    async def _fill_for_worker(self, req: dict[str, object]) -> int:
        info = ObjectInfo(key=str(req["key"]), size=int(str(req["size"])), etag=str(req["etag"]), last_modified=0.0)
        chunk = await self.fetch_chunk(str(req["bucket"]), info, int(str(req["index"])))
        return chunk.size

    async def _flush_touches(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._touched and self.control is not None:
                ids, self._touched = list(self._touched), set()
                await self.control.touch(ids)

    async def start(self) -> None:
        await self.inner.start()
        if self.prefetcher is not None:
            self.prefetcher.start()
        if self.follower:
            self._toucher = asyncio.ensure_future(self._flush_touches())

    async def close(self) -> None:
        if self.prefetcher is not None:
            await self.prefetcher.close()
        if self._toucher is not None:
            self._toucher.cancel()
        for timer in self._unprotect_at.values():
            timer.cancel()
        self._unprotect_at.clear()
        for t in list(self._fill_tasks):
            t.cancel()
        await self.inner.close()

    async def _invalidate(self, bucket: str, key: str) -> None:
        self.meta.invalidate(bucket, key)
        if self.control is not None:
            await self.control.broadcast_invalidate(bucket, key)
        if self.cluster is not None:
            await self.cluster.broadcast_invalidate(bucket, key)

    # --- reads --------------------------------------------------------------

    async def head_object(self, bucket: str, key: str) -> ObjectInfo:
        return await self.meta.get(bucket, key, lambda: self.inner.head_object(bucket, key))

    async def open_object(
        self, bucket: str, key: str, opts: ReadOptions | None = None, *, head: bool = False
    ) -> ObjectHandle:
        opts = opts or ReadOptions()
        if opts.part_number is not None or opts.version_id is not None:
            # Part boundaries live with the backing store, and so do the
            # versions other than the current one (chunks are the current
            # version's, by its ETag): these rare reads go straight there.
            # (Checksums come with the cached metadata.)
            return await self.inner.open_object(bucket, key, opts, head=head)
        for attempt in (1, 2):
            info = await self.head_object(bucket, key)
            handle = CachedHandle(self, bucket, key, info)
            if head or info.size == 0:
                return handle
            try:
                rng = parse_range(opts.range_header, info.size)
            except RangeNotSatisfiable:
                return handle  # the handler answers 416 from info
            first = (rng[0] if rng else 0) // self.chunk_size
            try:
                await handle.ready(first)
            except ObjectChanged:
                self.meta.invalidate(bucket, key)
                if attempt == 2:
                    raise  # changing too fast to read consistently: 503, ask again
                continue
            return handle
        raise AssertionError("unreachable")

    # Chunk ids of lately read chunks: a hash of six fields, asked for
    # several times per read (owner, fill, progress), ~4 us each.
    CHUNK_IDS = 65536

    def _chunk_id(self, bucket: str, info: ObjectInfo, index: int) -> str:
        memo = (bucket, info.key, info.etag, index)
        cid = self._chunk_ids.get(memo)
        if cid is None:
            if len(self._chunk_ids) >= self.CHUNK_IDS:
                self._chunk_ids.clear()
            cid = self._chunk_ids[memo] = chunk_id(self.inner.name, bucket, info.key, info.etag, self.chunk_size,
                                                   index)
        return cid

    def chunk_span(self, info: ObjectInfo, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index`` in the object: the one place
        a chunk's length is derived from the object's size."""
        start = index * self.chunk_size
        return start, min(self.chunk_size, info.size - start)

    def owner(self, bucket: str, info: ObjectInfo, index: int) -> Node | None:
        """The chunk's owner when it is another live node of the cluster."""
        if self.cluster is None:
            return None
        return self.cluster.membership.owner_of(self._chunk_id(bucket, info, index))

    def chunk(self, bucket: str, info: ObjectInfo, index: int) -> asyncio.Future[Chunk]:
        """The chunk, cached or being filled (one fill per chunk at a time)."""
        cid = self._chunk_id(bucket, info, index)
        if self.follower:
            return self._follower_chunk(cid, bucket, info, index)
        c = self.store.lookup(cid)
        if c is not None:
            metrics.HITS.inc()
            if cid in self.prefetched_unread:
                self._prefetch_read(cid)
            fut: asyncio.Future[Chunk] = asyncio.get_running_loop().create_future()
            fut.set_result(c)
            return fut
        pending = self._fills.get(cid)
        if pending is not None:
            metrics.JOINS.inc()
            if cid in self.prefetched_unread:
                # A reader caught its prefetch in flight: read, but late.
                metrics.PREFETCH_LATE.inc()
                self._prefetch_read(cid)
                if self.prefetcher is not None:
                    self.prefetcher.behind()
            return pending
        metrics.MISSES.inc()
        return self._start_fill(cid, bucket, info, index)

    def prefetch_chunk(self, bucket: str, info: ObjectInfo, index: int) -> asyncio.Future[Chunk] | None:
        """Fill a chunk for a hint (cache.prefetch): None when it is cached
        or filling already. Not a miss: no reader asked yet."""
        cid = self._chunk_id(bucket, info, index)
        if cid in self.store.index or cid in self._fills or self.follower:
            return None
        metrics.PREFETCH_CHUNKS.inc()
        size = self.chunk_span(info, index)[1]
        self.prefetched_unread[cid] = size
        self.prefetched_unread_bytes += size
        task = self._start_fill(cid, bucket, info, index, direct=self.prefetch_direct)
        self._keep.add(cid)

        def done(t: asyncio.Future[Chunk]) -> None:
            if t.cancelled() or t.exception() is not None:
                self._prefetch_forget(cid)  # nothing was cached: neither read nor wasted
            elif cid in self.prefetched_unread and self.store.protect(cid):
                # Kept until read: an eviction policy sees a chunk nobody
                # read as the coldest (SIEVE takes the unvisited first), and
                # over a dataset twice the cache a third to two thirds of
                # them went unread (bench loader). The hint share bounds
                # what is kept; PROTECT_S bounds how long.
                old = self._unprotect_at.pop(cid, None)
                if old is not None:
                    old.cancel()
                self._unprotect_at[cid] = asyncio.get_running_loop().call_later(self.PROTECT_S, self._lapse, cid)

        task.add_done_callback(done)
        return task

    def fill_room(self) -> bool:
        """Whether a hinted fill may start now: no client's fill waits for a
        slot, and a quarter of the slots (at least one) stay free for them."""
        running = self._max_fills - self._fill_slots._value  # (asyncio keeps no public count)
        return self._fills_queued == 0 and running < self._max_fills - max(1, self._max_fills // 4)

    def _prefetch_read(self, cid: str) -> None:
        metrics.PREFETCH_USED.inc()
        self._prefetch_forget(cid)
        self._lapse(cid)  # read: an ordinary chunk from now on

    def _lapse(self, cid: str) -> None:
        """A prefetched chunk is no longer kept from eviction: read, or
        PROTECT_S unread."""
        timer = self._unprotect_at.pop(cid, None)
        if timer is not None:
            timer.cancel()
        self.store.unprotect(cid)

    def _prefetch_forget(self, cid: str) -> None:
        self.prefetched_unread_bytes -= self.prefetched_unread.pop(cid, 0)

    def _dropped(self, cid: str) -> None:
        """The store dropped a chunk: a prefetched one nobody read was waste."""
        timer = self._unprotect_at.pop(cid, None)
        if timer is not None:
            timer.cancel()
        size = self.prefetched_unread.pop(cid, None)
        if size is not None:
            self.prefetched_unread_bytes -= size
            metrics.PREFETCH_WASTED.inc(size)

    def _start_fill(self, cid: str, bucket: str, info: ObjectInfo, index: int,
                    direct: bool = False) -> asyncio.Future[Chunk]:
        progress = self.progress[cid] = FillProgress()
        task = asyncio.ensure_future(self._fill(cid, bucket, info, index, progress, direct))
        self._fills[cid] = task
        self._fill_tasks.add(task)

        def done(t: asyncio.Task[Chunk]) -> None:
            # (An abandoned fill was forgotten already; a new one may be
            # under the same id.)
            if self._fills.get(cid) is t:
                del self._fills[cid]
                self._keep.discard(cid)
            if self.progress.get(cid) is progress:
                del self.progress[cid]
            progress.advance(0)  # wake readers: the fill is over
            self._fill_tasks.discard(t)
            if not t.cancelled():
                t.exception()  # retrieved: waiters get it through the future

        task.add_done_callback(done)
        return task

    # How long a prefetched chunk nobody has read is kept from eviction (a
    # hint's window is about 30 s of reading ahead: cache.prefetch).
    PROTECT_S = 120.0

    # A fill nobody waits for is kept if this much of its chunk is written:
    # the rest costs less than the next reader's fill from the start.
    KEEP_FILL_AT = 0.75

    def hold(self, cid: str) -> None:
        """A reader waits for chunk ``cid`` (cached or filling)."""
        self._holders[cid] = self._holders.get(cid, 0) + 1

    def let_go(self, cid: str, served: bool = False) -> None:
        """A reader no longer waits for chunk ``cid``: the last one to go
        cancels its fill, unless the fill is nearly done or a reader was
        served from it (``served``: then it was wanted, and the next reader
        of that range will want it cached)."""
        if served and cid in self._fills:
            self._keep.add(cid)
        n = self._holders.get(cid, 0) - 1
        if n > 0:
            self._holders[cid] = n
            return
        self._holders.pop(cid, None)
        task = self._fills.get(cid)
        progress = self.progress.get(cid)
        if task is None or task.done() or self.follower or progress is None or cid in self._keep:
            return
        if progress.total and progress.written >= self.KEEP_FILL_AT * progress.total:
            return
        # Forgotten at once: a reader that comes next starts a fill of its
        # own rather than find this one cancelled.
        self._fills.pop(cid, None)
        self.progress.pop(cid, None)
        task.cancel()
        metrics.FILLS_ABANDONED.inc()

    async def fetch_chunk(self, bucket: str, info: ObjectInfo, index: int) -> Chunk:
        """The chunk, awaited: held meanwhile, and shielded, so a caller
        cancelled (a peer that hung up, a warm stopped) never cancels a
        fill another reader shares; the last one to go stops it."""
        cid = self._chunk_id(bucket, info, index)
        fut = self.chunk(bucket, info, index)
        self.hold(cid)
        try:
            return await asyncio.shield(fut)
        finally:
            self.let_go(cid)

    def _follower_chunk(self, cid: str, bucket: str, info: ObjectInfo, index: int) -> asyncio.Future[Chunk]:
        pending = self._fills.get(cid)
        if pending is not None:
            return pending
        task = asyncio.ensure_future(self._follower_get(cid, bucket, info, index))
        self._fills[cid] = task
        task.add_done_callback(lambda t: (self._fills.pop(cid, None), t.cancelled() or t.exception()) and None)
        return task

    async def _follower_get(self, cid: str, bucket: str, info: ObjectInfo, index: int) -> Chunk:
        loop = asyncio.get_running_loop()
        c = await loop.run_in_executor(None, self.store.find, cid)
        if c is not None:
            metrics.HITS.inc()
            self._touched.add(cid)
            return c
        metrics.MISSES.inc()
        assert self.control is not None
        await self.control.fill(
            {"bucket": bucket, "key": info.key, "etag": info.etag, "size": info.size, "index": index}
        )
        c = await loop.run_in_executor(None, self.store.find, cid)
        if c is None:
            raise ChunkMissing(cid)
        return c

    async def _fill(
        self, cid: str, bucket: str, info: ObjectInfo, index: int, progress: FillProgress | None = None,
        direct: bool = False,
    ) -> Chunk:
        start, length = self.chunk_span(info, index)
        if progress is not None:
            progress.total = length
        self._fills_queued += 1
        try:
            await self._fill_slots.acquire()
        finally:
            self._fills_queued -= 1
        try:
            return await self._fill_now(cid, bucket, info, index, start, length, progress, direct)
        finally:
            self._fill_slots.release()

    async def _fill_now(self, cid: str, bucket: str, info: ObjectInfo, index: int, start: int, length: int,
                        progress: FillProgress | None, direct: bool = False) -> Chunk:
        """Fill one chunk from the backing store (``direct``: written with
        O_DIRECT, for prefetches: see ChunkWriter)."""
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        metrics.FILLS_IN_FLIGHT.inc()
        writer: ChunkWriter | None = None
        try:
            try:
                src = await self.inner.open_object(
                    bucket, info.key,
                    ReadOptions(range_header=f"bytes={start}-{start + length - 1}", conditions={"If-Match": info.etag}),
                )
            except ConditionFailed:
                raise ObjectChanged(info.key) from None
            try:
                if (src.info.etag and src.info.etag != info.etag) or src.info.size != info.size:
                    # Another version, or a size that is not this version's
                    # (metadata from a peer or a worker is checked here, at
                    # the one place that sees the backing store's answer): a
                    # chunk cut to the wrong length must never be stored.
                    raise ObjectChanged(info.key)
                writer = await loop.run_in_executor(
                    None, functools.partial(ChunkWriter, self.store.new_temp(), direct=direct))
                if progress is not None:
                    progress.path = writer.path
                    progress.advance(0)
                try:
                    await self._receive(src.read_range(start, length), writer, progress)
                except ConditionFailed:
                    # A resumed stream found another version: not the
                    # client's condition failing, the object changing.
                    raise ObjectChanged(info.key) from None
            finally:
                await src.close()
            if writer.size != length:
                raise OSError(f"fill of {info.key} chunk {index}: {writer.size} bytes, expected {length}")
            checksum = await loop.run_in_executor(None, writer.close)
            if progress is not None and writer.written > progress.written:
                progress.advance(writer.written - progress.written)  # an O_DIRECT writer's last block
            tmp, writer = writer.path, None
            chunk = self.store.commit(cid, tmp, length, checksum)
            metrics.BACKING_LATENCY.observe(time.monotonic() - began)
            self._update_gauges()
            return chunk
        except BaseException:
            if writer is not None:
                await loop.run_in_executor(None, writer.abort)
            raise
        finally:
            metrics.FILLS_IN_FLIGHT.dec()

    # Bytes received while the previous write runs, at most this many before
    # the receive waits for it (per fill; prefetch bounds the fills).
    WRITE_BEHIND = 1024 * 1024

    async def _receive(self, pieces: AsyncIterator[bytes], writer: ChunkWriter,
                       progress: FillProgress | None) -> None:
        """Write ``pieces`` into ``writer`` as they arrive, receiving the next
        ones while the last batch is written: one executor hop per batch,
        not per piece (a hop per 64 KiB piece made the fill, not the
        network, the limit of a cold read: 53 % of its samples). Readers of
        the growing file (``progress``) see a batch once it is written."""
        loop = asyncio.get_running_loop()
        batch: list[bytes] = []
        queued = 0
        writing: asyncio.Future[None] | None = None

        async def settle() -> None:
            nonlocal writing
            if writing is not None:
                await writing
                writing = None
                if progress is not None and writer.written > progress.written:
                    progress.advance(writer.written - progress.written)  # what readers may read now

        try:
            async for piece in pieces:
                metrics.BYTES_FROM_BACKING.inc(len(piece))
                batch.append(piece)
                queued += len(piece)
                if writing is not None and not writing.done() and queued < self.WRITE_BEHIND:
                    continue
                await settle()
                writing = loop.run_in_executor(None, writer.write_many, batch)
                batch, queued = [], 0
            await settle()
            if batch:
                writing = loop.run_in_executor(None, writer.write_many, batch)
                await settle()
        finally:
            if writing is not None and not writing.done():
                # Cancelled or failed mid-write: the write finishes in its
                # thread (ChunkWriter's lock keeps abort after it).
                writing.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _update_gauges(self) -> None:
        metrics.CACHE_BYTES.set(self.store.used)
        metrics.EVICTIONS.inc(self.store.stats.evictions - getattr(self, "_evictions_seen", 0))
        self._evictions_seen = self.store.stats.evictions

    async def direct_chunk(self, bucket: str, info: ObjectInfo, index: int) -> bytes:
        """A chunk's bytes straight from the backing store (cache fault)."""
        start, length = self.chunk_span(info, index)
        src = await self.inner.open_object(
            bucket, info.key,
            ReadOptions(range_header=f"bytes={start}-{start + length - 1}", conditions={"If-Match": info.etag}),
        )
        try:
            data = b"".join([p async for p in src.read_range(start, length)])
        finally:
            await src.close()
        metrics.BYTES_FROM_BACKING.inc(len(data))
        return data

    # --- writes: through, then invalidate ------------------------------------

    async def put_object(
        self, bucket: str, key: str, body: UploadBody, meta: ObjectMeta, conditions: WriteConditions | None = None
    ) -> ObjectInfo:
        try:
            return await self.inner.put_object(bucket, key, body, meta, conditions)
        finally:
            await self._invalidate(bucket, key)

    async def copy_object(
        self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str, meta: ObjectMeta | None,
        expected_etag: str | None = None, src_version: str | None = None,
    ) -> ObjectInfo:
        try:
            return await self.inner.copy_object(src_bucket, src_key, dst_bucket, dst_key, meta, expected_etag,
                                                src_version)
        finally:
            await self._invalidate(dst_bucket, dst_key)

    async def delete_object(
        self, bucket: str, key: str, if_match: str | None = None, version_id: str | None = None
    ) -> Deleted:
        try:
            return await self.inner.delete_object(bucket, key, if_match, version_id)
        finally:
            await self._invalidate(bucket, key)

    async def get_bucket_versioning(self, bucket: str) -> str | None:
        return await self.inner.get_bucket_versioning(bucket)

    async def put_bucket_versioning(self, bucket: str, status: str) -> None:
        await self.inner.put_bucket_versioning(bucket, status)

    async def list_versions(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", key_marker: str = "",
        version_id_marker: str = "", max_keys: int = 1000,
    ) -> VersionPage:
        return await self.inner.list_versions(
            bucket, prefix=prefix, delimiter=delimiter, key_marker=key_marker, version_id_marker=version_id_marker,
            max_keys=max_keys)

    async def complete_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[CompletedPart],
        conditions: WriteConditions | None = None,
    ) -> ObjectInfo:
        try:
            return await self.inner.complete_upload(bucket, key, upload_id, parts, conditions)
        finally:
            await self._invalidate(bucket, key)

    async def put_tags(
        self, bucket: str, key: str, tags: Mapping[str, str], version_id: str | None = None
    ) -> None:
        try:
            await self.inner.put_tags(bucket, key, tags, version_id)
        finally:
            await self._invalidate(bucket, key)

    async def delete_bucket(self, bucket: str) -> None:
        await self.inner.delete_bucket(bucket)
        self.meta.invalidate_bucket(bucket)

    # --- the rest: straight through -------------------------------------------

    async def list_buckets(self) -> list[BucketInfo]:
        return await self.inner.list_buckets()

    async def create_bucket(self, bucket: str, region: str = "", owner: str = "") -> None:
        await self.inner.create_bucket(bucket, region, owner)

    def bucket_owner(self, bucket: str) -> str:
        return self.inner.bucket_owner(bucket)

    def bucket_access(self, bucket: str) -> BucketAccess:
        return self.inner.bucket_access(bucket)

    async def put_bucket_access(self, bucket: str, name: str, document: str | None) -> None:
        await self.inner.put_bucket_access(bucket, name, document)

    async def put_object_acl(self, bucket: str, key: str, acl: str | None, version_id: str | None = None) -> None:
        try:
            await self.inner.put_object_acl(bucket, key, acl, version_id)
        finally:
            await self._invalidate(bucket, key)

    async def get_bucket_tags(self, bucket: str) -> dict[str, str]:
        return await self.inner.get_bucket_tags(bucket)

    async def put_bucket_tags(self, bucket: str, tags: Mapping[str, str]) -> None:
        await self.inner.put_bucket_tags(bucket, tags)

    async def get_bucket_cors(self, bucket: str) -> bytes:
        return await self.inner.get_bucket_cors(bucket)

    async def put_bucket_cors(self, bucket: str, document: bytes | None) -> None:
        await self.inner.put_bucket_cors(bucket, document)

    async def head_bucket(self, bucket: str) -> BucketInfo:
        return await self.inner.head_bucket(bucket)

    async def list_objects(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", start_after: str = "", max_keys: int = 1000
    ) -> ListPage:
        return await self.inner.list_objects(
            bucket, prefix=prefix, delimiter=delimiter, start_after=start_after, max_keys=max_keys
        )

    async def get_tags(self, bucket: str, key: str, version_id: str | None = None) -> dict[str, str]:
        return await self.inner.get_tags(bucket, key, version_id)

    async def create_upload(self, bucket: str, key: str, meta: ObjectMeta) -> str:
        return await self.inner.create_upload(bucket, key, meta)

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: UploadBody
    ) -> PartInfo:
        return await self.inner.upload_part(bucket, key, upload_id, part_number, body)

    async def upload_part_copy(
        self, bucket: str, key: str, upload_id: str, part_number: int, src_bucket: str, src_key: str,
        src_range: tuple[int, int] | None, expected_etag: str | None = None, src_version: str | None = None,
    ) -> PartInfo:
        return await self.inner.upload_part_copy(
            bucket, key, upload_id, part_number, src_bucket, src_key, src_range, expected_etag, src_version
        )

    async def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        await self.inner.abort_upload(bucket, key, upload_id)

    async def list_parts(
        self, bucket: str, key: str, upload_id: str, *, marker: int = 0, max_parts: int = 1000
    ) -> tuple[UploadInfo, list[PartInfo], bool]:
        return await self.inner.list_parts(bucket, key, upload_id, marker=marker, max_parts=max_parts)

    async def list_uploads(
        self, bucket: str, *, prefix: str = "", key_marker: str = "", upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> tuple[list[UploadInfo], bool]:
        return await self.inner.list_uploads(
            bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=upload_id_marker, max_uploads=max_uploads
        )


class CachedHandle:
    """An object read through the cache; bytes come as verified chunk files
    (sendfile) or, after a cache fault, as bytes from the backing store."""

    served: Served | None = None

    # Chunks read ahead from their owners, held in memory per stream: a
    # remote chunk then costs little more than a local one, and memory stays
    # bounded (REMOTE_AHEAD x chunk size per stream).
    REMOTE_AHEAD = 2

    def __init__(self, cb: CachedBackend, bucket: str, key: str, info: ObjectInfo) -> None:
        self.cb, self.bucket, self.key, self.info = cb, bucket, key, info
        self._ahead: dict[int, asyncio.Future[Chunk]] = {}
        self._remote_ahead: dict[int, asyncio.Task[bytes]] = {}

    def _prefetch_remote(self, index: int, last: int, start: int, length: int) -> None:
        cluster = self.cb.cluster
        if cluster is None:
            return
        cs = self.cb.chunk_size
        for ahead in range(index + 1, min(last, index + self.REMOTE_AHEAD) + 1):
            owner = self._remote(ahead)
            if owner is None or ahead in self._remote_ahead:
                continue
            lo = max(start, ahead * cs) - ahead * cs
            hi = min(start + length, (ahead + 1) * cs) - ahead * cs
            self._remote_ahead[ahead] = asyncio.ensure_future(self._fetch_remote(owner, ahead, lo, hi))

    async def _fetch_remote(self, owner: Node, index: int, lo: int, hi: int) -> bytes:
        """A chunk read ahead from its owner, whole: checked before a byte
        of it goes on, so a tampered one is a failed peer like any other."""
        assert self.cb.cluster is not None
        try:
            return b"".join([p async for p in self.cb.cluster.fetch(owner, self.bucket, self.key, self.info.etag,
                                                                     index, lo, hi)])
        except PeerTampered as e:
            raise PeerFailed(str(e)) from e

    def _want(self, index: int) -> asyncio.Future[Chunk]:
        """The chunk's fill (or the cached chunk), held by this read until
        sent (``_done_with``) or the read closes."""
        fut = self._ahead.get(index)
        if fut is None:
            fut = self._ahead[index] = self.cb.chunk(self.bucket, self.info, index)
            self.cb.hold(self.cb._chunk_id(self.bucket, self.info, index))
        return fut

    def _done_with(self, index: int, served: bool = False) -> None:
        """This read no longer waits for the chunk: it sent its bytes
        (``served``), or will not (closed first, or a cache fault)."""
        if self._ahead.pop(index, None) is not None:
            self.cb.let_go(self.cb._chunk_id(self.bucket, self.info, index), served=served)

    def _remote(self, index: int) -> Node | None:
        return self.cb.owner(self.bucket, self.info, index)

    def _progress(self, index: int) -> FillProgress | None:
        return self.cb.progress.get(self.cb._chunk_id(self.bucket, self.info, index))

    async def ready(self, index: int) -> None:
        """Wait until a chunk is cached, or its fill has started streaming
        (the backing store accepted the ranged GET with If-Match): used
        before the response starts, so that a changed object or a backing
        error is answered as such."""
        if self._remote(index) is not None:
            return  # the owner answers for it; a failure there is served here
        fut = self._want(index)
        progress = self._progress(index)
        while progress is not None and progress.path is None and not fut.done():
            await progress.wait(fut)
        if not fut.done():
            return
        try:
            fut.result()
        except (ObjectChanged, StoreError):
            # The backing store's own answer (503 after retries, 403 ...):
            # before the response starts, the client gets it as it is.
            raise
        except Exception:  # a cache fault: the read will serve it directly
            self._done_with(index)

    async def _stream_filling(
        self, index: int, progress: FillProgress, lo: int, hi: int
    ) -> AsyncIterator[FileSegment | bytes]:
        """Bytes lo..hi of a chunk whose fill is in progress, from its
        temporary file as it grows."""
        fut = self._want(index)
        assert progress.path is not None
        fd = os.open(progress.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            pos = lo
            while pos < hi:
                available = min(progress.written, hi)
                if available > pos:
                    metrics.BYTES_FROM_BACKING_STREAMED.inc(available - pos)
                    yield FileSegment(fd, pos, available - pos)
                    pos = available
                    continue
                if fut.done():
                    exc = fut.exception()
                    if isinstance(exc, (ObjectChanged, StoreError)) or exc is None:
                        raise exc or OSError("fill ended short")
                    # A cache fault mid-fill: the rest from the backing store.
                    log.warning("cache fill of %s chunk %d failed (%s); finishing from the backing store",
                                self.key, index, exc)
                    metrics.FILL_ERRORS.inc()
                    data = await self.cb.direct_chunk(self.bucket, self.info, index)
                    yield data[pos:hi]
                    return
                await progress.wait(fut)
        finally:
            os.close(fd)

    async def segments(self, start: int, length: int) -> AsyncIterator[FileSegment | bytes]:
        """The requested bytes chunk by chunk, each from the first source
        that has it: the owner when another node owns it (``_from_peer``),
        else this node (``_from_here``: a chunk being filled, a cached
        chunk, a fill, or the backing store on a cache fault)."""
        if length <= 0:
            return
        cs = self.cb.chunk_size
        first, last = start // cs, (start + length - 1) // cs
        for index in range(first, last + 1):
            # Keep a bounded window of fills ahead of the chunk being sent.
            for ahead in range(index, min(last, index + self.cb.prefetch) + 1):
                if self._remote(ahead) is None:
                    self._want(ahead)
            self._prefetch_remote(index, last, start, length)
            lo = max(start, index * cs) - index * cs
            hi = min(start + length, (index + 1) * cs) - index * cs
            owner = self._remote(index)
            pending = self._remote_ahead.pop(index, None)
            source: AsyncGenerator[FileSegment | bytes, None]
            if owner is None:
                if pending is not None:
                    pending.cancel()  # read ahead for an owner the ring has since dropped
                source = self._from_here(index, lo, hi)
            else:
                source = self._from_peer(owner, index, lo, hi, pending)
            # Closed at once if the consumer stops: a segment's descriptor
            # must not wait for the garbage collector.
            async with contextlib.aclosing(source) as pieces:
                async for piece in pieces:
                    yield piece

    async def _from_peer(
        self, owner: Node, index: int, lo: int, hi: int, pending: asyncio.Task[bytes] | None
    ) -> AsyncGenerator[bytes, None]:
        """Bytes lo..hi of a chunk another node owns: read ahead already
        (``pending``) or streamed from the owner; if the owner fails, the
        rest from the backing store."""
        assert self.cb.cluster is not None
        sent = 0
        try:
            if pending is not None:
                data = await pending
                sent = len(data)
                metrics.BYTES_FROM_PEERS.inc(sent)
                yield data
                return
            async for piece in self.cb.cluster.fetch(owner, self.bucket, self.key, self.info.etag, index, lo, hi):
                sent += len(piece)
                metrics.BYTES_FROM_PEERS.inc(len(piece))
                yield piece
        except PeerFailed as e:
            yield await self._instead_of_peer(owner, index, lo + sent, hi, e)

    async def _from_here(self, index: int, lo: int, hi: int) -> AsyncGenerator[FileSegment | bytes, None]:
        """Bytes lo..hi of a chunk this node owns: from its temporary file
        while it fills, else the verified chunk file (filled first on a
        miss), else, on a cache fault, from the backing store."""
        progress = self._progress(index)
        if progress is not None and progress.path is not None and not self._want(index).done():
            try:
                async for seg in self._stream_filling(index, progress, lo, hi):
                    yield seg
                self._done_with(index, served=True)
                return
            except FileNotFoundError:
                pass  # renamed into place meanwhile: read it as a cached chunk
        fd = await self._open(index, asyncio.get_running_loop())
        if fd is None:
            data = await self.cb.direct_chunk(self.bucket, self.info, index)
            yield data[lo:hi]
            return
        try:
            metrics.BYTES_FROM_CACHE.inc(hi - lo)
            yield FileSegment(fd, lo, hi - lo)
        finally:
            os.close(fd)
        self._done_with(index, served=True)

    async def _instead_of_peer(self, owner: Node, index: int, lo: int, hi: int, error: BaseException) -> bytes:
        """Bytes lo..hi of a chunk whose owner failed, straight from the
        backing store and not cached here: the chunk is the owner's (a copy
        here would outlive the owner's return), and the health checks
        reroute its chunks once it is down."""
        log.warning("peer %s failed on %s chunk %d (%s); reading it from the backing store", owner.id,
                    self.key, index, error)
        data = await self.cb.direct_chunk(self.bucket, self.info, index)
        return data[lo:hi]

    async def _open(self, index: int, loop: asyncio.AbstractEventLoop) -> int | None:
        """An open, verified descriptor of the chunk, or None on a cache
        fault. A chunk that fails verification is dropped and refilled once."""
        for attempt in (1, 2):
            try:
                want = self._want(index)
                # A cached chunk's future is done already: no shield to build.
                chunk = want.result() if want.done() else await asyncio.shield(want)
            except ObjectChanged:
                raise
            except Exception as e:
                log.warning("cache fill failed for %s chunk %d (%s); serving from the backing store",
                            self.key, index, e)
                metrics.FILL_ERRORS.inc()
                self._done_with(index)
                return None
            try:
                _, length = self.cb.chunk_span(self.info, index)
                if chunk.size != length:
                    # The chunk id does not carry the size: a chunk of the
                    # wrong length (a store from before fills checked it)
                    # is never served.
                    raise ChunkCorrupt(f"{chunk.size} bytes where chunk {index} of {self.key} has {length}")
                if self.cb.verify:  # a chunk hashed lately: no thread hop needed
                    fd = open_if_verified(self.cb.store.path(chunk), chunk.checksum, chunk.size,
                                          self.cb.reverify_s)
                    if fd is not None:
                        return fd
                return await loop.run_in_executor(
                    None, open_verified, self.cb.store.path(chunk), chunk.checksum if self.cb.verify else None,
                    chunk.size, self.cb.reverify_s,
                )
            except (ChunkCorrupt, ChunkMissing) as e:
                log.error("chunk %s failed verification (%s); dropped, refilling", chunk.id, e)
                metrics.CHECKSUM_FAILURES.inc()
                self.cb.store.discard(chunk)
                self._done_with(index)
            except OSError as e:
                log.warning("cannot open chunk %s (%s); serving from the backing store", chunk.id, e)
                return None
            if attempt == 2:
                return None
        return None

    def read_range(self, start: int, length: int) -> AsyncIterator[bytes]:
        return read_segments(self.segments(start, length))

    async def close(self) -> None:
        # Fills this read waited for are let go: one nobody else waits for
        # stops unless nearly done (CachedBackend.let_go). Chunks read ahead
        # from peers are this stream's alone: dropped.
        for index in list(self._ahead):
            self._done_with(index)
        for task in self._remote_ahead.values():
            task.cancel()
        await asyncio.gather(*self._remote_ahead.values(), return_exceptions=True)
        self._remote_ahead.clear()

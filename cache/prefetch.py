"""Prefetching from loaders' hints: fill the chunks a training job will read
next, before it asks.

A loader knows its epoch's order before it reads a byte. It tells the node
the next objects each of its streams (rank x worker) will read, a window
at a time (``POST /_nearstore/hint``, gateway.admin; clients/hints.py).
This module turns those windows into chunk fills, with bounded effort:

- **Order.** Each stream's window is a queue, taken front first. Streams
  take turns, so one rank's long window does not starve another's.
- **Replaced, not appended.** A stream's new window replaces its old one:
  what the reader has passed is dropped (unless its fill has started), and
  a stream not heard from for ``STALE_S`` is forgotten (a loader stopped
  early leaves nothing queued for long).
- **Deduplicated.** Every rank of a job sends the same order. An object
  queued by several streams is filled once: its metadata comes from the
  node's metadata cache, and a chunk cached or filling already is skipped
  (``CachedBackend.prefetch_chunk``: one fill per chunk, as for reads).
  Nothing else is remembered, so an object evicted since it was hinted
  (a dataset larger than the cache) is filled again when hinted again.
- **Below clients.** At most ``lanes`` objects are worked on at once, and a
  hinted chunk starts filling only when no client's fill waits for a slot
  and the node has slots to spare (``CachedBackend.fill_room``).
- **As far ahead as the readers need.** A reader that catches a prefetched
  chunk still filling (``behind``) shows the prefetch too close to it: one
  more lane is added, up to ``max_lanes``; an added lane ends when the
  queues are empty. A remote store serves each connection at a fixed rate
  (100-200 MB/s), so the lanes a loader needs are its reading rate over
  that; a fixed 4 capped a first epoch at 4 connections' speed (bench
  loader, bench/RESULTS.md).
- **Bounded in the cache.** Prefetched chunks nobody has read yet may take
  at most ``share`` of the cache's budget. They enter the cache as new
  chunks (the eviction policy's coldest go first, never a pinned one), and a
  window's worth cannot flush the working set. Until read (at most
  ``CachedBackend.PROTECT_S``) they are kept from eviction themselves: a
  policy sees a chunk nobody has read as the coldest of all, and over a
  dataset twice the cache SIEVE evicted a third to two thirds of them
  unread.
- **Routed.** In a cluster, a chunk another node owns is hinted to its
  owner (``Cluster.hint``, signed like all peer requests) with the
  object's ETag and size, and the owner fills it; the asker's node never
  keeps a copy.
- **Correct.** A chunk is named by the object's ETag when its fill starts,
  and fills are ranged GETs with ``If-Match``. A hinted object overwritten
  before it is read is read as its new version; the prefetched chunks of
  the old one are never served for it.

Metrics (cache.metrics): hints received, chunks prefetched, prefetched
chunks read before eviction, bytes prefetched and evicted unread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nearstore.cache import metrics
from nearstore.metadata.backing import ObjectInfo

if TYPE_CHECKING:
    from nearstore.cache.readpath import CachedBackend
    from nearstore.metadata.ring import Node

log = logging.getLogger(__name__)

MAX_KEYS = 1000  # per hint: a window, not a dataset
MAX_STREAMS = 256
STALE_S = 120.0


@dataclass
class Item:
    """One object to prefetch: by key (``info`` None: looked up here), or
    by version and size, with the chunks to fill (a peer's hint)."""

    key: str
    info: ObjectInfo | None = None
    indices: list[int] | None = None
    # Raises (AccessDenied) unless the hinting user may read the object.
    check: Callable[[ObjectInfo], None] | None = None


@dataclass
class _Stream:
    bucket: str
    items: collections.deque[Item] = field(default_factory=collections.deque)
    heard: float = 0.0


class Prefetcher:
    """The hints of every stream, and the lanes that act on them."""

    def __init__(self, cache: CachedBackend, *, lanes: int = 4, max_lanes: int = 0, share: float = 0.25) -> None:
        self.cache = cache
        self.lanes = lanes  # always running
        self.max_lanes = max(lanes, max_lanes)
        self.share = share
        self._streams: collections.OrderedDict[str, _Stream] = collections.OrderedDict()
        self._work = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._added: set[asyncio.Task[None]] = set()  # lanes added by `behind`
        self._turn = 0
        self.busy = 0  # lanes working on an object

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._lane()) for _ in range(self.lanes)]
        metrics.PREFETCH_LANES.set(self.running)

    async def close(self) -> None:
        tasks = self._tasks + list(self._added)
        self._tasks = []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def running(self) -> int:
        """Lanes now: the permanent ones and those added."""
        return len(self._tasks) + len(self._added)

    def behind(self) -> None:
        """A reader caught a prefetched chunk still filling: one more lane,
        up to ``max_lanes``, while anything is queued."""
        if not self._tasks or self.running >= self.max_lanes or not self.queued():
            return
        task = asyncio.ensure_future(self._lane(added=True))
        self._added.add(task)

        def ended(t: asyncio.Task[None]) -> None:
            self._added.discard(t)
            metrics.PREFETCH_LANES.set(self.running)

        task.add_done_callback(ended)
        metrics.PREFETCH_LANES.set(self.running)

    # --- hints in ---------------------------------------------------------

    def hint(self, stream: str, bucket: str, items: list[Item]) -> int:
        """Replace ``stream``'s window with ``items`` (at most MAX_KEYS);
        returns how many objects the node now holds for the stream."""
        items = items[:MAX_KEYS]
        metrics.PREFETCH_HINTS.inc(len(items))
        self._streams.pop(stream, None)
        if items:
            self._streams[stream] = _Stream(bucket, collections.deque(items), time.monotonic())
            while len(self._streams) > MAX_STREAMS:
                self._streams.popitem(last=False)  # the longest unheard from
            self._work.set()
        return len(items)

    def add(self, stream: str, bucket: str, item: Item) -> None:
        """Append one object to ``stream`` (peers' hints: each names other
        chunks, so none replaces another); the oldest go past MAX_KEYS."""
        s = self._streams.get(stream)
        if s is None or s.bucket != bucket:
            s = self._streams[stream] = _Stream(bucket)
        s.items.append(item)
        while len(s.items) > MAX_KEYS:
            s.items.popleft()
        s.heard = time.monotonic()
        self._work.set()

    def queued(self) -> int:
        return sum(len(s.items) for s in self._streams.values())

    def _next(self) -> tuple[str, Item] | None:
        """The front of the next stream's queue, streams in turn; stale
        streams forgotten on the way."""
        now = time.monotonic()
        for name in [n for n, s in self._streams.items() if now - s.heard > STALE_S or not s.items]:
            del self._streams[name]
        if not self._streams:
            return None
        names = list(self._streams)
        self._turn = (self._turn + 1) % len(names)
        s = self._streams[names[self._turn]]
        return s.bucket, s.items.popleft()

    # --- acting on them ---------------------------------------------------

    async def _lane(self, added: bool = False) -> None:
        while True:
            nxt = self._next()
            if nxt is None:
                if added:
                    return  # the queues are empty: back to the permanent lanes
                self._work.clear()
                await self._work.wait()
                continue
            bucket, item = nxt
            self.busy += 1
            try:
                await self._prefetch(bucket, item)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a hint is advice: a failure costs the reader a cold read
                log.debug("prefetch of %s/%s skipped: %s", bucket, item.key, e)
            finally:
                self.busy -= 1

    async def _prefetch(self, bucket: str, item: Item) -> None:
        cache = self.cache
        info = item.info if item.info is not None else await cache.head_object(bucket, item.key)
        if item.check is not None:
            item.check(info)
        count = max(1, -(-info.size // cache.chunk_size)) if info.size else 0
        indices = item.indices if item.indices is not None else range(count)
        remote: dict[str, tuple[Node, list[int]]] = {}
        fills: list[asyncio.Future[object]] = []
        for index in indices:
            if not 0 <= index < count:
                continue
            owner = cache.owner(bucket, info, index)
            if owner is not None:
                remote.setdefault(owner.id, (owner, []))[1].append(index)
                continue
            # An object's chunks fill side by side, each started only when
            # there is room (a lane filling them one by one was capped at
            # one connection's speed; measured by bench loader).
            await self._room()
            fill = cache.prefetch_chunk(bucket, info, index)  # None: cached or filling already
            if fill is not None:
                fills.append(asyncio.shield(fill))
        if remote and cache.cluster is not None:
            await asyncio.gather(*(cache.cluster.hint(node, bucket, info, idx) for node, idx in remote.values()))
        await asyncio.gather(*fills, return_exceptions=True)

    async def _room(self) -> None:
        """Until a hinted fill may start: clients' fills first, and the
        unread prefetched bytes within their share of the cache."""
        cache = self.cache
        budget = self.share * cache.store.capacity
        delay = 0.01
        while not cache.fill_room() or cache.prefetched_unread_bytes + cache.chunk_size > budget:
            await asyncio.sleep(delay)  # bounded back-off: room comes back as fills end or chunks are read
            delay = min(0.2, delay * 2)

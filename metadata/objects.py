"""The object-metadata cache: size, ETag and headers of recently read
objects, so that a cached read does not ask the backing store first.

Staleness is bounded: an entry lives ``ttl`` seconds. Writes through this
node invalidate at once; a write that bypasses nearstore (straight to the
backing store) is seen after at most ``ttl`` seconds, and never produces
mixed bytes: chunk fills carry If-Match with the cached ETag, so a changed
object fails the fill, the entry is dropped and the read starts over.

Concurrent lookups of one object share a single request to the store.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class MetaCache(Generic[V]):
    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, V]] = OrderedDict()
        self._pending: dict[tuple[str, str], asyncio.Future[V]] = {}
        # Bumped by every invalidation: a lookup that was already on its way
        # to the store when the object was written may bring back the old
        # metadata, and must not cache it.
        self._generation = 0
        self.hits = 0
        self.misses = 0

    async def get(self, bucket: str, key: str, load: Callable[[], Awaitable[V]]) -> V:
        k = (bucket, key)
        now = time.monotonic()
        entry = self._entries.get(k)
        if entry is not None and entry[0] > now:
            self._entries.move_to_end(k)
            self.hits += 1
            return entry[1]
        pending = self._pending.get(k)
        if pending is not None:
            return await asyncio.shield(pending)
        self.misses += 1
        generation = self._generation
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._pending[k] = fut
        try:
            value = await load()
        except BaseException as e:
            fut.set_exception(e)
            # Nobody else may be waiting: keep the loop from warning about
            # an exception that was never retrieved.
            fut.exception()
            raise
        finally:
            if self._pending.get(k) is fut:
                del self._pending[k]
        fut.set_result(value)
        if self.ttl > 0 and generation == self._generation:
            self._entries[k] = (time.monotonic() + self.ttl, value)
            self._entries.move_to_end(k)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def invalidate(self, bucket: str, key: str) -> None:
        self._generation += 1
        self._entries.pop((bucket, key), None)
        self._pending.pop((bucket, key), None)  # later lookups ask the store afresh

    def invalidate_bucket(self, bucket: str) -> None:
        self._generation += 1
        for k in [k for k in self._entries if k[0] == bucket]:
            del self._entries[k]
        for k in [k for k in self._pending if k[0] == bucket]:
            del self._pending[k]

    def __len__(self) -> int:
        return len(self._entries)

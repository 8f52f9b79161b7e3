"""metadata.objects.MetaCache: TTL, shared lookups, and invalidation racing
a lookup that is already on its way to the store."""

from __future__ import annotations

import asyncio

from nearstore.metadata.objects import MetaCache


async def test_hits_within_ttl_and_shared_lookups() -> None:
    cache: MetaCache[int] = MetaCache(ttl=60)
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return calls

    assert await asyncio.gather(*(cache.get("b", "k", load) for _ in range(5))) == [1] * 5
    assert await cache.get("b", "k", load) == 1 and calls == 1
    cache.invalidate("b", "k")
    assert await cache.get("b", "k", load) == 2


async def test_a_lookup_in_flight_during_a_write_is_not_cached() -> None:
    cache: MetaCache[str] = MetaCache(ttl=60)
    release = asyncio.Event()
    version = "old"

    async def slow_load() -> str:
        seen = version  # what the store said before the write landed
        await release.wait()
        return seen

    async def load() -> str:
        return version

    stale = asyncio.ensure_future(cache.get("b", "k", slow_load))
    await asyncio.sleep(0)
    version = "new"
    cache.invalidate("b", "k")  # the write: after the lookup started
    assert await cache.get("b", "k", load) == "new"  # not joined to the stale lookup
    release.set()
    assert await stale == "old"
    assert await cache.get("b", "k", load) == "new"  # and the stale answer was not kept
    cache.invalidate_bucket("b")
    version = "newer"
    assert await cache.get("b", "k", load) == "newer"

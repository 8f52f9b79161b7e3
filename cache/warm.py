"""Warming: load every chunk of a set of objects into the cache ahead of a
job, optionally pinned against eviction, reporting progress as it goes.

The fills go through the same single-flight path as reads (a chunk being
read and warmed at once is fetched once), with a bounded number in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field


@dataclass
class WarmProgress:
    objects: int = 0
    objects_total: int = 0
    bytes: int = 0
    bytes_total: int = 0
    chunks: int = 0
    errors: int = 0
    seconds: float = 0.0
    done: bool = False
    # Why chunks failed: the first MAX_FAILURES reasons, "key#chunk: error".
    failures: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | bool | list[str]]:
        d: dict[str, float | int | bool | list[str]] = dict(asdict(self))
        d["gbps"] = round(self.gbps, 3)
        return d


MAX_FAILURES = 20

# A function that fills one chunk of one object and returns its size
# (pinning it if asked).
ChunkFiller = Callable[[str, int], Awaitable[int]]


async def warm(
    objects: list[tuple[str, int]],
    chunk_size: int,
    fill: ChunkFiller,
    *,
    concurrency: int = 8,
    report: Callable[[WarmProgress], None] | None = None,
    report_every: float = 0.5,
) -> WarmProgress:
    progress = WarmProgress(objects_total=len(objects), bytes_total=sum(s for _, s in objects))
    began = time.monotonic()
    last_report = 0.0
    sem = asyncio.Semaphore(concurrency)
    remaining = {key: max(1, -(-size // chunk_size)) for key, size in objects}

    async def one(key: str, index: int) -> None:
        nonlocal last_report
        async with sem:
            try:
                n = await fill(key, index)
            except Exception as e:
                progress.errors += 1
                if len(progress.failures) < MAX_FAILURES:
                    progress.failures.append(f"{key}#{index}: {type(e).__name__}: {e}")
                n = 0
        progress.bytes += n
        progress.chunks += 1
        remaining[key] -= 1
        if remaining[key] == 0:
            progress.objects += 1
        now = time.monotonic()
        progress.seconds = now - began
        if report is not None and now - last_report >= report_every:
            last_report = now
            report(progress)

    tasks = [
        one(key, i)
        for key, size in objects
        for i in range(max(1, -(-size // chunk_size)) if size else 0)
    ]
    progress.objects += sum(1 for _, size in objects if size == 0)
    await asyncio.gather(*tasks)
    progress.seconds = time.monotonic() - began
    progress.done = True
    if report is not None:
        report(progress)
    return progress

"""What a run measures: sizes, concurrencies, durations, repetitions.

Three presets (full, quick, smoke); every field can be overridden from the
command line. A `Plan` is frozen and lands verbatim in the JSON output, so a
result file always says what produced it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

Mode = Literal["full", "quick", "smoke"]


@dataclass(frozen=True)
class Plan:
    mode: Mode = "full"
    # large GET: whole objects, GB/s
    large_sizes: tuple[int, ...] = (GiB, 64 * MiB)
    large_concurrency: tuple[int, ...] = (1, 4)
    # ranged GET: random aligned ranges of one large object, GB/s and req/s
    range_object: int = GiB
    range_sizes: tuple[int, ...] = (MiB, 8 * MiB)
    range_concurrency: tuple[int, ...] = (4,)
    # small GET: req/s and latency
    small_sizes: tuple[int, ...] = (64 * KiB, 4 * KiB)
    small_concurrency: tuple[int, ...] = (1, 16, 64)
    small_objects: int = 64  # distinct keys per size, requested round robin
    # PUT: objects larger than a part go multipart through S3 (one PUT for
    # plain peers)
    put_sizes: tuple[int, ...] = (64 * MiB, 64 * KiB)
    put_part_size: int = 8 * MiB
    put_large_concurrency: int = 1
    put_small_concurrency: int = 16
    # time to first body byte of a large GET, concurrency 1
    ttfb_object: int = GiB
    # cache: cold (cache emptied before each run) and warm (after one full
    # read) whole-object GETs; each run reads max(streams, cache_run_bytes /
    # size) distinct objects; then warm small-object req/s
    cache_sizes: tuple[int, ...] = (16 * MiB, GiB)
    cache_concurrency: tuple[int, ...] = (1, 4)
    cache_run_bytes: int = 128 * MiB
    cache_small_size: int = 64 * KiB
    cache_small_concurrency: tuple[int, ...] = (16, 64)
    # cluster: warm aggregate GB/s of rings of 1, 2, 3 cache nodes (streams
    # spread over the nodes), then single-chunk objects read through node A,
    # owned by A vs by B (the owner objects must be <= the 16 MiB chunk)
    cluster_nodes: tuple[int, ...] = (1, 2, 3)
    cluster_size: int = GiB
    cluster_objects: int = 4
    cluster_concurrency: int = 6
    cluster_owner_size: int = 16 * MiB
    cluster_owner_objects: int = 16
    cluster_owner_concurrency: tuple[int, ...] = (1, 4)
    # remote: cold whole-object GETs with the backing store behind a proxy
    # that holds each connection to remote_rate bytes/s, as a remote S3 does;
    # one object per stream per run, large enough for the rate to dominate
    remote_size: int = 256 * MiB
    remote_concurrency: tuple[int, ...] = (1, 4)
    remote_rate: float = 100e6
    # repetitions and bounds
    runs: int = 3
    warmup: bool = True
    duration_s: float = 2.0
    warmup_s: float = 1.0
    max_requests: int = 1_000_000
    calibrate: bool = True

    def replace(self, **changes: object) -> Plan:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


PRESETS: dict[Mode, Plan] = {
    "full": Plan(),
    "quick": Plan(
        mode="quick",
        large_sizes=(256 * MiB, 64 * MiB),
        large_concurrency=(1, 4),
        range_object=256 * MiB,
        range_sizes=(MiB, 8 * MiB),
        small_concurrency=(1, 64),
        small_objects=32,
        put_sizes=(64 * MiB, 64 * KiB),
        ttfb_object=256 * MiB,
        cache_sizes=(16 * MiB, 256 * MiB),
        cluster_size=64 * MiB,
        cluster_objects=8,
        remote_size=128 * MiB,
        duration_s=0.8,
        warmup_s=0.3,
    ),
    "smoke": Plan(
        mode="smoke",
        large_sizes=(2 * MiB,),
        large_concurrency=(2,),
        range_object=2 * MiB,
        range_sizes=(256 * KiB,),
        range_concurrency=(2,),
        small_sizes=(4 * KiB,),
        small_concurrency=(4,),
        small_objects=4,
        # S3 parts are at least 5 MiB (all but the last): 6 MiB is 2 parts.
        put_sizes=(6 * MiB, 4 * KiB),
        put_part_size=5 * MiB,
        put_small_concurrency=2,
        ttfb_object=2 * MiB,
        cache_sizes=(2 * MiB,),
        cache_concurrency=(2,),
        cache_run_bytes=4 * MiB,
        cache_small_size=4 * KiB,
        cache_small_concurrency=(4,),
        cluster_nodes=(1, 2),
        cluster_size=2 * MiB,
        cluster_objects=2,
        cluster_concurrency=2,
        cluster_owner_size=2 * MiB,
        cluster_owner_objects=8,
        cluster_owner_concurrency=(1,),
        remote_size=2 * MiB,
        runs=1,
        warmup=False,
        duration_s=0.2,
        warmup_s=0.1,
        max_requests=200,
        calibrate=False,
    ),
}

_UNITS = {"": 1, "b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}


def parse_size(text: str) -> int:
    """'64KiB', '1g', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 4KiB, 64MiB, 1GiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def fmt_size(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"

"""Trace-driven hit-ratio comparison of the chunk store's eviction policies.

    python -m nearstore.bench.eviction [--cache-chunks N] [--seeds N] [--scale X] [--json FILE]

Every policy in ``cache.eviction.POLICIES`` replays the same synthetic traces
through a simulator that drives it exactly as the chunk store does: a hit is a
``touch``; a miss asks ``victim()`` and ``remove``s until the chunk fits, then
``admit``s it. All chunks are the same size (chunks are a few MiB and mostly
full), so the cache is ``--cache-chunks`` chunks and Belady's MIN is exact.

The traces model a node cache under training jobs (each chunk of an object is
its own key):

- ``epochs-1.5x`` / ``epochs-3x``: a dataset 1.5x / 3x the cache, read once
  per epoch in a fresh shuffle, for several epochs.
- ``zipf-0.8+scan`` / ``zipf-1.2+scan``: a skewed hot set (Zipf over 10x the
  cache) with a one-time scan of 2x the cache interleaved in the middle (a
  checkpoint read, a dataset validation pass).
- ``epochs+zipf``: the 1.5x epochs interleaved 1:1 with a Zipf 1.0 hot set
  (another job's lookups, shared validation data) over 5x the cache.

``belady`` is the offline optimum (evict the key used furthest in the future,
and do not cache a key used later than everything cached): an upper bound no
online policy reaches. ``main`` returns 0; the numbers are the result.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nearstore.cache.eviction import DEFAULT_POLICY, POLICIES, EvictionPolicy, make_policy

CHUNK_BYTES = 4 << 20
ORACLE = "belady"


@dataclass(frozen=True)
class Trace:
    name: str
    description: str
    keys: list[str]


@dataclass
class TraceResult:
    trace: str
    description: str
    requests: int
    unique_keys: int
    hit_ratio: dict[str, float]  # policy name (and "belady") -> hits / requests
    seconds: dict[str, float] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class Comparison:
    cache_chunks: int
    chunk_bytes: int
    seeds: list[int]
    traces: list[TraceResult]
    mean_hit_ratio: dict[str, float]
    worst_gap_to_best: dict[str, float]  # max over traces of (best online - this)
    recommended: str


# --- traces ---------------------------------------------------------------


def _chunk_keys(prefix: str, n: int, chunks_per_object: int = 16) -> list[str]:
    return [f"{prefix}/obj{i // chunks_per_object:05d}#{i % chunks_per_object}" for i in range(n)]


def _epochs(keys: list[str], epochs: int, rng: random.Random) -> Iterator[str]:
    order = list(keys)
    for _ in range(epochs):
        rng.shuffle(order)
        yield from order


def _zipf(keys: list[str], alpha: float, rng: random.Random) -> Iterator[str]:
    ranked = list(keys)
    rng.shuffle(ranked)  # popularity unrelated to name or object
    cum = list(itertools.accumulate(1.0 / (r**alpha) for r in range(1, len(ranked) + 1)))
    while True:
        yield from rng.choices(ranked, cum_weights=cum, k=4096)


def _interleave(a: Iterator[str], b: Iterator[str], n_b: int) -> Iterator[str]:
    """Alternate a and b until b has given n_b keys (or runs out)."""
    for key in itertools.islice(b, n_b):
        yield next(a)
        yield key


def make_traces(cache_chunks: int, seed: int, scale: float = 1.0) -> list[Trace]:
    rng = random.Random(seed)
    c = cache_chunks
    epochs = 5
    zipf_requests = int(100_000 * scale)
    traces = []

    for ratio in (1.5, 3.0):
        data = _chunk_keys(f"ds{ratio}", int(ratio * c))
        traces.append(
            Trace(
                f"epochs-{ratio:g}x",
                f"dataset {ratio:g}x cache, {epochs} shuffled epochs",
                list(_epochs(data, epochs, rng)),
            )
        )

    for alpha in (0.8, 1.2):
        hot = _zipf(_chunk_keys("hot", 10 * c), alpha, rng)
        scan = iter(_chunk_keys("scan", 2 * c))
        third = zipf_requests // 3
        keys = list(itertools.islice(hot, third))
        keys += _interleave(hot, scan, 2 * c)
        keys += itertools.islice(hot, zipf_requests - len(keys) + 2 * c)
        traces.append(
            Trace(
                f"zipf-{alpha:g}+scan",
                f"Zipf {alpha:g} over 10x cache, one-time scan of 2x cache mid-trace",
                keys,
            )
        )

    data = _chunk_keys("mixds", int(1.5 * c))
    hot = _zipf(_chunk_keys("mixhot", 5 * c), 1.0, rng)
    traces.append(
        Trace(
            "epochs+zipf",
            f"1.5x epochs ({epochs}) interleaved 1:1 with Zipf 1.0 over 5x cache",
            list(_interleave(hot, _epochs(data, epochs, rng), epochs * len(data))),
        )
    )
    return traces


# --- simulation -----------------------------------------------------------


def simulate(policy: EvictionPolicy, keys: Sequence[str], capacity_bytes: int) -> int:
    """Replay keys against policy the way the chunk store drives it; return hits."""
    hits = used = 0
    for key in keys:
        if key in policy:
            policy.touch(key)
            hits += 1
            continue
        while used + CHUNK_BYTES > capacity_bytes:
            victim = policy.victim()
            if victim is None:
                break
            policy.remove(victim)
            used -= CHUNK_BYTES
        if used + CHUNK_BYTES <= capacity_bytes:
            policy.admit(key, CHUNK_BYTES)
            used += CHUNK_BYTES
    return hits


def belady_hits(keys: Sequence[str], cache_chunks: int) -> int:
    """Belady's MIN with bypass, for equal-size entries: O(n log n)."""
    never = len(keys)
    next_use = [never] * len(keys)
    last: dict[str, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        next_use[i] = last.get(keys[i], never)
        last[keys[i]] = i
    cached: dict[str, int] = {}  # key -> its next use
    heap: list[tuple[int, str]] = []  # (-next use, key), stale entries skipped
    hits = 0
    for i, key in enumerate(keys):
        nxt = next_use[i]
        if key in cached:
            hits += 1
        elif len(cached) >= cache_chunks:
            while cached.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)
            furthest, far_key = -heap[0][0], heap[0][1]
            if nxt >= furthest:
                continue  # bypass: this key is needed later than anything cached
            heapq.heappop(heap)
            del cached[far_key]
        cached[key] = nxt
        heapq.heappush(heap, (-nxt, key))
    return hits


def run_comparison(
    cache_chunks: int = 2000, seeds: Sequence[int] = (0, 1, 2), scale: float = 1.0
) -> Comparison:
    """Run every policy and the oracle over every trace, averaged over seeds."""
    capacity = cache_chunks * CHUNK_BYTES
    results: dict[str, TraceResult] = {}
    for seed in seeds:
        for trace in make_traces(cache_chunks, seed, scale):
            n = len(trace.keys)
            res = results.setdefault(
                trace.name,
                TraceResult(trace.name, trace.description, n, len(set(trace.keys)), {}),
            )
            for name in [*POLICIES, ORACLE]:
                t0 = time.perf_counter()
                if name == ORACLE:
                    hits = belady_hits(trace.keys, cache_chunks)
                else:
                    policy = make_policy(name, capacity)
                    hits = simulate(policy, trace.keys, capacity)
                    totals = res.counters.setdefault(name, {})
                    for counter, value in policy.counters.as_dict().items():
                        totals[counter] = totals.get(counter, 0) + value
                elapsed = time.perf_counter() - t0
                res.seconds[name] = round(res.seconds.get(name, 0.0) + elapsed, 3)
                res.hit_ratio[name] = res.hit_ratio.get(name, 0.0) + hits / n / len(seeds)
    return _summarise(cache_chunks, list(seeds), list(results.values()))


def _summarise(cache_chunks: int, seeds: list[int], results: list[TraceResult]) -> Comparison:
    names = list(POLICIES)
    mean = {p: sum(r.hit_ratio[p] for r in results) / len(results) for p in [*names, ORACLE]}
    gap = {
        p: max(max(r.hit_ratio[q] for q in names) - r.hit_ratio[p] for r in results) for p in names
    }
    # Best mean hit ratio; the smaller worst-case gap breaks near-ties (0.5 pt).
    top = max(mean[p] for p in names)
    near = [p for p in names if top - mean[p] <= 0.005]
    recommended = min(near, key=lambda p: (gap[p], -mean[p]))
    return Comparison(cache_chunks, CHUNK_BYTES, seeds, results, mean, gap, recommended)


# --- output ---------------------------------------------------------------


def format_table(comp: Comparison) -> str:
    cols = [*POLICIES, ORACLE]
    head = f"{'trace':<16} {'requests':>8} " + " ".join(f"{c:>7}" for c in cols)
    lines = [
        f"cache {comp.cache_chunks} chunks x {comp.chunk_bytes >> 20} MiB;"
        f" hit ratio in %, mean of seeds {comp.seeds}",
        head,
        "-" * len(head),
    ]
    for r in comp.traces:
        cells = " ".join(f"{100 * r.hit_ratio[c]:7.1f}" for c in cols)
        lines.append(f"{r.trace:<16} {r.requests:>8} {cells}")
    lines.append("-" * len(head))
    lines.append(
        f"{'mean':<16} {'':>8} " + " ".join(f"{100 * comp.mean_hit_ratio[c]:7.1f}" for c in cols)
    )
    lines.append(
        f"{'worst gap':<16} {'':>8} "  # to the best online policy on any one trace
        + " ".join(f"{100 * comp.worst_gap_to_best[c]:7.1f}" for c in POLICIES)
    )
    lines.append(f"recommended default: {comp.recommended} (configured default: {DEFAULT_POLICY})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m nearstore.bench.eviction", description=__doc__)
    parser.add_argument("--cache-chunks", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3, help="average over seeds 0..N-1")
    parser.add_argument("--scale", type=float, default=1.0, help="Zipf trace length factor")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    comp = run_comparison(args.cache_chunks, range(args.seeds), args.scale)
    print(format_table(comp))
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(comp), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

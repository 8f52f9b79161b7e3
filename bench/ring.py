"""``python -m nearstore.bench.ring``: the directory's algorithms against the issue's targets.

For each algorithm of metadata.ring and each cluster size (3, 100, 1000
nodes of weight 1) it measures:

- lookup: mean microseconds per ``Ring.owner(chunk_id)`` in pure Python, over
  real-looking chunk ids (xxh3-128 hex); target < 5 us at 1000 nodes;
- owners3: the same for ``owners(chunk_id, 3)`` (the fallback path);
- balance: max / mean keyspace share, from ``describe()`` (exact for the
  point and table algorithms, the expectation for rendezvous); target <= 1.05;
- leave / join: the fraction of sampled key hashes whose owner changes when
  the middle node leaves or a new node joins, divided by the ideal 1/N (or
  1/(N+1)); target <= 1.1. ``noise`` is the relative standard error of that
  ratio (1 / sqrt(moved keys)).

Movement is measured by sampling because a join changes ownership of only
about 1/N of the keyspace: 2M uniform 64-bit key hashes (the owner depends on
a key only through its xxh3-64 hash) leave about 2000 moved keys at 1000
nodes, a 2% standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import xxhash

from nearstore.metadata.ring import ALGORITHMS, DEFAULT_ALGORITHM, Node, Ring, sample_owners

SIZES = (3, 100, 1000)
TARGET_LOOKUP_US = 5.0
TARGET_BALANCE = 1.05
TARGET_MOVEMENT = 1.1


def _nodes(n: int) -> list[Node]:
    return [Node(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:9000", f"http://n{i}") for i in range(n)]


def _moved(a: Ring, b: Ring, hashes: np.ndarray) -> float:
    ids_a = np.array([n.id for n in a.nodes])[sample_owners(a, hashes)]
    ids_b = np.array([n.id for n in b.nodes])[sample_owners(b, hashes)]
    return float(np.mean(ids_a != ids_b))


def measure_one(
    algorithm: str, n: int, *, lookups: int = 20_000, samples: int = 2_000_000
) -> dict[str, object]:
    nodes = _nodes(n)
    t = time.perf_counter()
    ring = Ring.build(nodes, algorithm=algorithm)
    build_s = time.perf_counter() - t

    keys = [xxhash.xxh3_128_hexdigest(i.to_bytes(8, "little")) for i in range(lookups)]
    owner = ring.owner
    t = time.perf_counter()
    for k in keys:
        owner(k)
    lookup_us = (time.perf_counter() - t) / lookups * 1e6
    few = keys[: max(1, lookups // 4)]
    t = time.perf_counter()
    for k in few:
        ring.owners(k, 3)
    owners_us = (time.perf_counter() - t) / len(few) * 1e6

    shares = np.array([float(d["share"]) for d in ring.describe()["nodes"]])  # type: ignore[attr-defined]
    balance = float(shares.max() * n)

    # Rendezvous scores every node for every sampled key: fewer samples.
    if algorithm == "rendezvous":
        samples = min(samples, 200_000_000 // n)
    hashes = np.random.default_rng(7).integers(
        0, 2**64 - 1, samples, dtype=np.uint64, endpoint=True
    )
    row: dict[str, object] = {
        "algorithm": algorithm,
        "nodes": n,
        "params": ring.describe()["params"],
        "build_s": round(build_s, 4),
        "lookup_us": round(lookup_us, 3),
        "owners3_us": round(owners_us, 3),
        "balance": round(balance, 4),
        "samples": samples,
    }
    if n > 1:
        leave = Ring.build(nodes[: n // 2] + nodes[n // 2 + 1 :], algorithm=algorithm)
        moved = _moved(ring, leave, hashes)
        row["leave"] = round(moved * n, 4)
        row["leave_noise"] = round(1 / np.sqrt(max(1.0, moved * samples)), 4)
    join = Ring.build([*nodes, Node("10.255.255.255:9000", "http://new")], algorithm=algorithm)
    moved = _moved(ring, join, hashes)
    row["join"] = round(moved * (n + 1), 4)
    row["join_noise"] = round(1 / np.sqrt(max(1.0, moved * samples)), 4)
    row["meets_targets"] = bool(
        (n < 1000 or lookup_us < TARGET_LOOKUP_US)
        and balance <= TARGET_BALANCE
        and float(row.get("leave", 0.0)) <= TARGET_MOVEMENT  # type: ignore[arg-type]
        and float(row["join"]) <= TARGET_MOVEMENT  # type: ignore[arg-type]
    )
    return row


def measure(
    algorithms: list[str] | None = None,
    sizes: tuple[int, ...] = SIZES,
    *,
    lookups: int = 20_000,
    samples: int = 2_000_000,
) -> list[dict[str, object]]:
    """Every (algorithm, size) row, as data."""
    return [
        measure_one(a, n, lookups=lookups, samples=samples)
        for a in (algorithms or list(ALGORITHMS))
        for n in sizes
    ]


def format_table(rows: list[dict[str, object]]) -> str:
    head = f"{'algorithm':<11}{'nodes':>6}{'build s':>9}{'lookup us':>10}{'owners3 us':>11}{'balance':>9}{'leave/ideal':>13}{'join/ideal':>12}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        leave = f"{r['leave']:.3f}±{r['leave_noise']:.3f}" if "leave" in r else "-"
        join = f"{r['join']:.3f}±{r['join_noise']:.3f}"
        lines.append(
            f"{r['algorithm']!s:<11}{r['nodes']!s:>6}{r['build_s']:>9.3f}{r['lookup_us']:>10.2f}"
            f"{r['owners3_us']:>11.2f}{r['balance']:>9.4f}{leave:>13}{join:>12}  "
            f"{'yes' if r['meets_targets'] else 'no'}"
        )
    lines.append(
        f"targets: lookup < {TARGET_LOOKUP_US} us at 1000 nodes, balance <= {TARGET_BALANCE}, "
        f"movement <= {TARGET_MOVEMENT} x ideal; default: {DEFAULT_ALGORITHM}"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m nearstore.bench.ring", description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", help=f"comma list of {sorted(ALGORITHMS)}")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma list of node counts")
    p.add_argument("--lookups", type=int, default=20_000)
    p.add_argument("--samples", type=int, default=2_000_000, help="key hashes for movement")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the rows to FILE")
    args = p.parse_args(argv)
    algorithms = args.algorithms.split(",") if args.algorithms else None
    unknown = set(algorithms or ()) - set(ALGORITHMS)
    if unknown:
        p.error(f"unknown algorithms {sorted(unknown)}")
    sizes = tuple(int(s) for s in args.sizes.split(","))
    rows = measure(algorithms, sizes, lookups=args.lookups, samples=args.samples)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

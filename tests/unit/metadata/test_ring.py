"""metadata.ring: determinism, preference lists, weights, routing around down
nodes, and the issue's targets simulated at 1000 nodes (balance <= 1.05,
movement on join/leave <= 1.1 x ideal). Lookup time is printed, not asserted.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import xxhash

from nearstore.metadata.ring import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    Node,
    NoLiveNodes,
    Ring,
    RingError,
    key_hash,
    sample_owners,
)

ALGOS = sorted(ALGORITHMS)


def nodes(n: int, weight: float = 1.0) -> list[Node]:
    return [
        Node(f"10.0.{i >> 8}.{i & 255}:9000", f"http://10.0.{i >> 8}.{i & 255}:9000", weight)
        for i in range(n)
    ]


def chunk_ids(n: int, start: int = 0) -> list[str]:
    return [xxhash.xxh3_128_hexdigest(i.to_bytes(8, "little")) for i in range(start, start + n)]


def hashes(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)


def owner_ids(ring: Ring, hs: np.ndarray) -> np.ndarray:
    return np.array([n.id for n in ring.nodes])[sample_owners(ring, hs)]


def owner_codes(ring: Ring, hs: np.ndarray, code: dict[str, int]) -> np.ndarray:
    """Owners as integers that mean the same node in every ring (via `code`)."""
    return np.array([code[n.id] for n in ring.nodes])[sample_owners(ring, hs)]


# --- construction -----------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_node_rejects_bad_weight(weight: float) -> None:
    with pytest.raises(RingError):
        Node("a", "http://a", weight)


def test_build_rejects_bad_input() -> None:
    with pytest.raises(RingError):
        Ring.build([])
    with pytest.raises(RingError):
        Ring.build([Node("a", "http://a"), Node("a", "http://b")])
    with pytest.raises(RingError):
        Ring.build(nodes(3), algorithm="nope")
    with pytest.raises(RingError):
        Ring.build(nodes(3), algorithm="ketama", table_size=7)
    with pytest.raises(RingError):
        Ring.build(nodes(3), algorithm="maglev", table_size=65536)  # not prime


def test_default_algorithm_and_version() -> None:
    ring = Ring.build(nodes(3), version=7)
    assert ring.version == 7
    assert ring.describe()["algorithm"] == DEFAULT_ALGORITHM
    assert ring.down == frozenset()


# --- lookups ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGOS)
def test_deterministic_and_order_independent(algorithm: str) -> None:
    ns = nodes(20)
    a = Ring.build(ns, algorithm=algorithm)
    b = Ring.build(list(reversed(ns)), algorithm=algorithm)
    keys = chunk_ids(2000)
    assert [a.owner(k) for k in keys] == [b.owner(k) for k in keys]
    assert [a.owners(k, 4) for k in keys[:200]] == [b.owners(k, 4) for k in keys[:200]]
    assert a.describe() == b.describe()


@pytest.mark.parametrize("algorithm", ALGOS)
def test_owner_heads_distinct_owners(algorithm: str) -> None:
    ring = Ring.build(nodes(10), algorithm=algorithm)
    for k in chunk_ids(500):
        prefs = ring.owners(k, 4)
        assert prefs[0] == ring.owner(k)
        assert len(prefs) == 4 == len({n.id for n in prefs})
    everyone = ring.owners("x", 50)  # more than there are: all of them
    assert sorted(n.id for n in everyone) == sorted(n.id for n in ring.nodes)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_str_and_bytes_keys_agree(algorithm: str) -> None:
    ring = Ring.build(nodes(5), algorithm=algorithm)
    for k in chunk_ids(100):
        assert ring.owner(k) == ring.owner(k.encode())


@pytest.mark.parametrize("algorithm", ALGOS)
def test_sample_owners_matches_owner(algorithm: str) -> None:
    ring = Ring.build(nodes(50), algorithm=algorithm).without(["10.0.0.3:9000", "10.0.0.9:9000"])
    keys = chunk_ids(2000)
    hs = np.array([key_hash(k) for k in keys], dtype=np.uint64)
    assert [ring.nodes[i] for i in sample_owners(ring, hs)] == [ring.owner(k) for k in keys]


@pytest.mark.parametrize("algorithm", ALGOS)
def test_weights_respected(algorithm: str) -> None:
    ns = [*nodes(8), Node("heavy", "http://heavy", 2.0)]
    ring = Ring.build(ns, algorithm=algorithm)
    shares = {d["id"]: d["share"] for d in ring.describe()["nodes"]}  # type: ignore[attr-defined]
    light = [s for i, s in shares.items() if i != "heavy"]
    assert shares["heavy"] == pytest.approx(2 * np.mean(light), rel=0.08)
    # ... and the keys follow the shares (200k keys: ~2% noise on a 20% share).
    hs = hashes(200_000)
    counts = np.bincount(sample_owners(ring, hs), minlength=len(ns))
    heavy = [n.id for n in ring.nodes].index("heavy")
    others = np.delete(counts, heavy)
    assert counts[heavy] / others.mean() == pytest.approx(2.0, rel=0.1)


# --- routing around down nodes ------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGOS)
def test_without_moves_only_the_down_nodes_keys(algorithm: str) -> None:
    ring = Ring.build(nodes(30), algorithm=algorithm)
    gone = {"10.0.0.4:9000", "10.0.0.17:9000"}
    routed = ring.without(gone)
    assert routed.down == gone and routed.version == ring.version
    for k in chunk_ids(3000):
        before, after = ring.owner(k), routed.owner(k)
        if before.id in gone:
            # to the key's own next choice that is up
            assert after == next(n for n in ring.owners(k, 30) if n.id not in gone)
        else:
            assert after == before
        assert all(n.id not in gone for n in routed.owners(k, 5))
    hs = hashes(100_000)
    a, b = owner_ids(ring, hs), owner_ids(routed, hs)
    assert set(a[a != b]) <= gone


def test_without_is_cumulative_and_ignores_unknown_ids() -> None:
    ring = Ring.build(nodes(5))
    assert ring.without(["nobody"]) is ring
    one = ring.without(["10.0.0.1:9000"]).without(["10.0.0.2:9000"])
    both = ring.without(["10.0.0.1:9000", "10.0.0.2:9000"])
    keys = chunk_ids(500)
    assert [one.owner(k) for k in keys] == [both.owner(k) for k in keys]
    info = both.describe()
    down = {d["id"]: d for d in info["nodes"] if d["down"]}  # type: ignore[attr-defined, index]
    assert set(down) == {"10.0.0.1:9000", "10.0.0.2:9000"}
    assert all(d["share"] == 0 for d in down.values())


def test_all_down_raises() -> None:
    ring = Ring.build(nodes(3))
    dead = ring.without([n.id for n in ring.nodes])
    with pytest.raises(NoLiveNodes):
        dead.owner("k")
    with pytest.raises(NoLiveNodes):
        dead.owners("k", 2)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_describe_is_json_and_shares_sum_to_one(algorithm: str) -> None:
    ring = Ring.build(nodes(7), version=3, algorithm=algorithm).without(["10.0.0.2:9000"])
    info = json.loads(json.dumps(ring.describe()))
    assert info["version"] == 3 and info["algorithm"] == algorithm
    assert {"id", "address", "weight", "down", "share"} <= set(info["nodes"][0])
    assert sum(n["share"] for n in info["nodes"]) == pytest.approx(1.0, abs=1e-4)


# --- the targets, simulated at 1000 nodes ---------------------------

N = 1000
# 4M key hashes: a join or leave moves ~4000 of them, a 1.6% standard error
# on the movement ratio (target 1.1); 4000 keys per node, a 1.6% standard
# error on each node's count, checked against the exact shares below.
SAMPLES = 4_000_000


@pytest.fixture(scope="module")
def big() -> tuple[list[Node], Ring]:
    ns = nodes(N)
    return ns, Ring.build(ns)


CODE = {n.id: i for i, n in enumerate([*nodes(N), Node("new:9000", "http://new:9000")])}


@pytest.fixture(scope="module")
def big_owners(big: tuple[list[Node], Ring]) -> tuple[np.ndarray, np.ndarray]:
    hs = hashes(SAMPLES, 3)
    return hs, owner_codes(big[1], hs, CODE)


def test_1000_nodes_balance(
    big: tuple[list[Node], Ring], big_owners: tuple[np.ndarray, np.ndarray]
) -> None:
    _, ring = big
    shares = np.array([d["share"] for d in ring.describe()["nodes"]])  # type: ignore[attr-defined]
    # The keyspace shares are exact (sampling noise at 4000 keys per node
    # would alone reach a max/mean of ~1.05, so they are what is asserted).
    print(f"\nbalance at {N} nodes: max/mean share {shares.max() * N:.4f}")
    assert shares.max() * N <= 1.05
    # ... and sampled keys agree with them within sampling noise (codes are
    # ring indices here: both are sorted by id).
    counts = np.bincount(big_owners[1], minlength=N)
    z = (counts - shares * SAMPLES) / np.sqrt(shares * SAMPLES)
    assert np.abs(z).max() < 5.5


@pytest.mark.parametrize("change", ["leave", "join"])
def test_1000_nodes_movement(
    big: tuple[list[Node], Ring], big_owners: tuple[np.ndarray, np.ndarray], change: str
) -> None:
    ns, _ = big
    hs, a = big_owners
    if change == "leave":
        other = Ring.build(ns[:500] + ns[501:])
        ideal = 1 / N
    else:
        other = Ring.build([*ns, Node("new:9000", "http://new:9000")])
        ideal = 1 / (N + 1)
    b = owner_codes(other, hs, CODE)
    moved = a != b
    ratio = moved.mean() / ideal
    print(f"\n{change}: moved {ratio:.3f} x ideal")
    assert ratio <= 1.1
    # Only the leaver's keys move; only keys for the newcomer move.
    if change == "leave":
        assert set(a[moved].tolist()) == {CODE[ns[500].id]}
    else:
        assert set(b[moved].tolist()) == {CODE["new:9000"]}


def test_1000_nodes_lookup_time_printed(big: tuple[list[Node], Ring]) -> None:
    _, ring = big
    keys = chunk_ids(20_000)
    t = time.perf_counter()
    for k in keys:
        ring.owner(k)
    us = (time.perf_counter() - t) / len(keys) * 1e6
    print(f"\nowner() at {N} nodes: {us:.2f} us per chunk (target < 5, not asserted)")

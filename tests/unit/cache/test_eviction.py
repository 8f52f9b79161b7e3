"""cache.eviction: one contract every policy passes, then policy-specific behaviour."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nearstore.bench import eviction as bench
from nearstore.cache.eviction import (
    DEFAULT_POLICY,
    POLICIES,
    S3FIFO,
    CountedPolicy,
    EvictionPolicy,
    make_policy,
)

CHUNK = 4 << 20
ALL = sorted(POLICIES)


def new(name: str, chunks: int = 10) -> CountedPolicy:
    return make_policy(name, chunks * CHUNK)


def access(policy: EvictionPolicy, key: str, held: set[str], chunks: int) -> bool:
    """Drive policy as the chunk store does (equal chunk sizes); True on a hit."""
    if key in policy:
        policy.touch(key)
        return True
    while len(held) >= chunks:
        victim = policy.victim()
        assert victim is not None
        policy.remove(victim)
        held.remove(victim)
    policy.admit(key, CHUNK)
    held.add(key)
    return False


def drain(policy: EvictionPolicy) -> list[str]:
    """Evict until victim() says there is nothing left; the order of eviction."""
    out = []
    while (victim := policy.victim()) is not None:
        assert victim not in out
        policy.remove(victim)
        out.append(victim)
    return out


# --- the contract ---------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
class TestContract:
    def test_factory(self, name: str) -> None:
        policy = new(name)
        assert isinstance(policy, EvictionPolicy)
        assert policy.name == name
        assert len(policy) == 0 and "a" not in policy
        assert policy.victim() is None

    def test_every_unpinned_key_is_eventually_a_victim(self, name: str) -> None:
        policy = new(name)
        keys = [f"k{i}" for i in range(20)]
        for i, key in enumerate(keys):
            policy.admit(key, CHUNK)
            for _ in range(i % 4):
                policy.touch(key)
        pinned = set(keys[::5])
        for key in pinned:
            policy.pin(key)
        assert sorted(drain(policy)) == sorted(set(keys) - pinned)
        assert len(policy) == len(pinned)
        for key in pinned:
            policy.unpin(key)
        assert sorted(drain(policy)) == sorted(pinned)
        assert len(policy) == 0
        assert policy.counters.evictions == len(keys)
        assert policy.counters.removals == 0

    def test_no_victim_when_everything_is_pinned(self, name: str) -> None:
        policy = new(name)
        for key in "abc":
            policy.admit(key, CHUNK)
            policy.pin(key)
            policy.pin(key)  # a flag, not a count
        policy.touch("a")
        assert policy.victim() is None
        assert len(policy) == 3 and all(k in policy for k in "abc")
        policy.unpin("b")
        assert policy.victim() == "b"
        policy.remove("b")
        assert policy.victim() is None

    def test_remove_is_idempotent(self, name: str) -> None:
        policy = new(name)
        policy.admit("a", CHUNK)
        policy.admit("b", CHUNK)
        policy.remove("a")
        policy.remove("a")
        policy.remove("never-seen")
        assert len(policy) == 1 and "a" not in policy and "b" in policy
        assert policy.counters.removals == 1
        policy.pin("b")
        policy.remove("b")  # removing a pinned key is allowed (delete, corrupt)
        policy.remove("b")
        assert len(policy) == 0 and policy.victim() is None
        policy.unpin("b")  # unknown by now: no-op
        assert len(policy) == 0 and policy.victim() is None

    def test_victim_is_stable_until_something_changes(self, name: str) -> None:
        policy = new(name)
        for key in "abcd":
            policy.admit(key, CHUNK)
        policy.touch("c")
        first = policy.victim()
        assert first is not None
        assert policy.victim() == first
        policy.touch("d" if first != "d" else "c")
        assert policy.victim() == first

    def test_admit_of_a_present_key_is_a_touch(self, name: str) -> None:
        policy = new(name)
        policy.admit("a", CHUNK)
        policy.admit("a", CHUNK)
        assert len(policy) == 1
        assert policy.counters.hits == 1

    def test_unknown_keys_are_ignored(self, name: str) -> None:
        policy = new(name)
        policy.touch("x")
        policy.pin("x")
        policy.unpin("x")
        assert len(policy) == 0 and "x" not in policy and policy.victim() is None
        policy.admit("x", CHUNK)  # pin before admit did not stick
        assert policy.victim() == "x"

    @pytest.mark.parametrize("seed", range(8))
    def test_random_operations_match_a_model(self, name: str, seed: int) -> None:
        rng = random.Random(seed)
        chunks = rng.choice([3, 8, 20])
        policy = new(name, chunks)
        universe = [f"k{i}" for i in range(3 * chunks)]
        model: set[str] = set()
        pinned: set[str] = set()
        for _ in range(3000):
            op = rng.random()
            key = rng.choice(universe)
            if op < 0.35:
                if key not in model:
                    # Make room first, as the store does (pinned chunks stay).
                    while len(model) >= chunks and (victim := policy.victim()) is not None:
                        assert victim in model and victim not in pinned
                        policy.remove(victim)
                        model.remove(victim)
                    model.add(key)
                policy.admit(key, CHUNK)
            elif op < 0.65:
                policy.touch(key)
            elif op < 0.75:
                victim = policy.victim()
                if victim is None:
                    assert model <= pinned
                else:
                    assert victim in model and victim not in pinned
                    policy.remove(victim)
                    model.remove(victim)
            elif op < 0.82:
                policy.remove(key)
                model.discard(key)
                pinned.discard(key)
            elif op < 0.91:
                policy.pin(key)
                if key in model:
                    pinned.add(key)
            else:
                policy.unpin(key)
                pinned.discard(key)
            assert len(policy) == len(model)
            assert {k for k in universe if k in policy} == model
            victim = policy.victim()
            assert (victim is None) == (model <= pinned)
            assert victim is None or (victim in model and victim not in pinned)
        for key in list(pinned):
            policy.unpin(key)
        assert sorted(drain(policy)) == sorted(model)


# --- policy-specific ------------------------------------------------------


def test_default_policy_exists() -> None:
    assert DEFAULT_POLICY in POLICIES


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("arc", CHUNK)


def test_lru_evicts_the_least_recently_touched() -> None:
    policy = new("lru")
    for key in "abcd":
        policy.admit(key, CHUNK)
    policy.touch("a")
    policy.touch("c")
    assert drain(policy) == ["b", "d", "a", "c"]


def test_fifo_ignores_touches() -> None:
    policy = new("fifo")
    for key in "abc":
        policy.admit(key, CHUNK)
    policy.touch("a")
    assert drain(policy) == ["a", "b", "c"]


def test_sieve_passes_over_visited_entries_once() -> None:
    policy = new("sieve")
    for key in "abcd":
        policy.admit(key, CHUNK)
    policy.touch("a")
    policy.touch("b")
    assert policy.victim() == "c"  # a and b lose their bits, keep their places
    policy.remove("c")
    policy.admit("e", CHUNK)
    assert drain(policy) == ["d", "e", "a", "b"]
    assert policy.counters.reinsertions == 2


@pytest.mark.parametrize("name", ["s3fifo", "sieve"])
def test_a_reaccessed_key_survives_a_one_time_scan(name: str) -> None:
    chunks = 10
    policy = new(name, chunks)
    held: set[str] = set()
    access(policy, "hot", held, chunks)
    access(policy, "hot", held, chunks)
    for i in range(20 * chunks):
        access(policy, f"scan{i}", held, chunks)
        if i % chunks == 0:  # still wanted now and then, far less often than LRU needs
            assert access(policy, "hot", held, chunks), i


def test_lru_loses_the_hot_key_to_the_same_scan() -> None:
    chunks = 10
    policy = new("lru", chunks)
    held: set[str] = set()
    access(policy, "hot", held, chunks)
    access(policy, "hot", held, chunks)
    for i in range(chunks):
        access(policy, f"scan{i}", held, chunks)
    assert "hot" not in policy


def test_s3fifo_counters_cover_small_main_and_ghost() -> None:
    chunks = 10
    policy = make_policy("s3fifo", chunks * CHUNK)
    assert isinstance(policy, S3FIFO)
    held: set[str] = set()
    for i in range(chunks):
        access(policy, f"k{i}", held, chunks)
    access(policy, "k9", held, chunks)  # a hit in M: the warm-up spilled k1.. into M
    for i in range(chunks, 3 * chunks):
        access(policy, f"k{i}", held, chunks)  # evicts k0.. into the ghost
    assert policy.counters.evictions >= chunks
    assert policy.ghost_bytes > 0
    ghosted = next(reversed(policy._ghost))  # the newest ghost: its key was evicted from S
    assert ghosted not in policy
    access(policy, ghosted, held, chunks)
    assert policy.counters.hits_ghost == 1
    assert ghosted in policy._main  # a ghost hit goes straight to M
    access(policy, ghosted, held, chunks)
    assert policy.counters.hits_main >= 1
    c = policy.counters
    assert c.hits == c.hits_small + c.hits_main
    assert policy.small_bytes + policy.main_bytes == len(policy) * CHUNK


def test_s3fifo_promotes_from_small_and_caps_frequency() -> None:
    policy = S3FIFO(10 * CHUNK)
    policy._has_evicted = True  # past the warm-up spill: new keys go to S
    policy.admit("a", CHUNK)
    for _ in range(10):
        policy.touch("a")
    assert policy._freq["a"] == 3
    policy.admit("b", CHUNK)
    assert policy.victim() == "b"  # a is promoted to M on the way
    assert policy.counters.promotions == 1
    assert "a" in policy._main and policy._freq["a"] == 0


def test_s3fifo_small_queue_holds_about_a_tenth() -> None:
    chunks = 100
    policy = S3FIFO(chunks * CHUNK)
    held: set[str] = set()
    rng = random.Random(1)
    for _ in range(5000):
        access(policy, f"k{int(rng.paretovariate(1.0)) % 500}", held, chunks)
    assert 5 * CHUNK <= policy.small_bytes <= 20 * CHUNK
    assert policy.ghost_bytes <= 0.9 * chunks * CHUNK


def test_s3fifo_rejects_a_zero_capacity() -> None:
    with pytest.raises(ValueError):
        S3FIFO(0)


# --- the comparison -------------------------------------------------------


def test_belady_on_a_known_trace() -> None:
    # Cache of 2: a b c a b -> MIN keeps a,b and bypasses c: 2 hits.
    assert bench.belady_hits(list("abcab"), 2) == 2
    assert bench.belady_hits(list("abab"), 1) == 1  # keeps a, bypasses b
    assert bench.belady_hits(list("aaaa"), 1) == 3


def test_comparison_is_data_and_the_oracle_bounds_every_policy(tmp_path: Path) -> None:
    comp = bench.run_comparison(cache_chunks=100, seeds=[0], scale=0.05)
    assert [r.trace for r in comp.traces] == [
        "epochs-1.5x",
        "epochs-3x",
        "zipf-0.8+scan",
        "zipf-1.2+scan",
        "epochs+zipf",
    ]
    for r in comp.traces:
        for name in POLICIES:
            assert 0.0 <= r.hit_ratio[name] <= r.hit_ratio[bench.ORACLE] + 1e-9, (r.trace, name)
    assert comp.recommended in POLICIES
    out = tmp_path / "ev.json"
    assert (
        bench.main(["--cache-chunks", "100", "--seeds", "1", "--scale", "0.05", "--json", str(out)])
        == 0
    )
    data = json.loads(out.read_text())
    assert {t["trace"] for t in data["traces"]} == {r.trace for r in comp.traces}

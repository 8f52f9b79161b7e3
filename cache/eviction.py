"""Eviction policies for the chunk store: which chunk goes next, never how many.

The store owns the byte budget. When it needs room it asks ``victim()`` for a
key, removes that chunk, calls ``remove(key)``, and repeats until the new chunk
fits; then it calls ``admit``. A policy only keeps an order over keys.

Invariants every policy keeps (and ``tests/unit/cache/test_eviction.py`` checks for
all of them with one contract test):

- A policy tracks the keys the store holds: admitted and not yet removed.
  ``len``/``in`` count exactly those, pinned or not. Ghost entries (S3-FIFO's
  memory of recently evicted keys) are not tracked keys.
- ``victim()`` names a tracked, unpinned key, or None when there is none. It
  never removes anything; asking again before anything changes gives the same
  key (it is cached until the next admit, remove, pin, unpin, or a touch of
  that very key).
- ``remove`` is the only way a key leaves, and is a no-op for unknown keys.
  Removing the key ``victim()`` last named counts as an eviction (and, in
  S3-FIFO, feeds the ghost queue); any other removal (a delete, a corrupt
  chunk) counts as a removal and leaves no ghost.
- ``pin``/``unpin`` are flags, not counts, and are no-ops for unknown keys (the
  store admits, then pins). A pinned key is set aside, out of the queues; on
  unpin it goes back in at the insertion end, keeping its frequency or
  visited bit.
- ``admit`` of a key already tracked is treated as a ``touch`` (the store should
  not do it; a policy should not be the thing that breaks when it does).
- Every operation is O(1) amortised and does no I/O. One thread owns a policy
  (the store's single eviction owner per node); nothing here locks.

Rejected: cachetools' ``Cache`` classes. They do their own size accounting and
evict inside ``__setitem__``, which would give us two byte budgets to keep in
step with the files on disk; here the store has the only one. A heap-ordered
LFU was rejected for its O(log n) operations and its blindness to one-time
scans without an admission filter.

The comparison that picked the default lives in ``bench/eviction.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_POLICY",
    "FIFO",
    "LRU",
    "POLICIES",
    "S3FIFO",
    "SIEVE",
    "CountedPolicy",
    "EvictionPolicy",
    "PolicyCounters",
    "make_policy",
]


@runtime_checkable
class EvictionPolicy(Protocol):
    """What the chunk store needs from a policy; see the module docstring."""

    def admit(self, key: str, size: int) -> None: ...
    def touch(self, key: str) -> None: ...
    def victim(self) -> str | None: ...
    def remove(self, key: str) -> None: ...
    def pin(self, key: str) -> None: ...
    def unpin(self, key: str) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: str) -> bool: ...


@dataclass
class PolicyCounters:
    """Monotonic counters for metrics. Fields a policy has no use for stay 0."""

    hits: int = 0  # touches of tracked keys
    hits_small: int = 0  # S3-FIFO: touches while in the small queue
    hits_main: int = 0  # S3-FIFO: touches while in the main queue
    hits_ghost: int = 0  # S3-FIFO: admits of a key still in the ghost queue
    promotions: int = 0  # S3-FIFO: small -> main moves
    reinsertions: int = 0  # second chances: S3-FIFO main reinserts, SIEVE bits cleared
    evictions: int = 0  # removals of the key victim() named
    removals: int = 0  # any other removal of a tracked key (delete, corrupt)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class CountedPolicy(EvictionPolicy, Protocol):
    """An ``EvictionPolicy`` that also exposes its counters (all of ours do)."""

    name: ClassVar[str]
    counters: PolicyCounters


class _Base:
    """Victim caching and eviction counting shared by every policy."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.counters = PolicyCounters()
        self._candidate: str | None = None

    def victim(self) -> str | None:
        if self._candidate is None:
            self._candidate = self._choose()
        return self._candidate

    def _choose(self) -> str | None:
        raise NotImplementedError

    def _count_removal(self, key: str) -> bool:
        """Count a removal of a tracked key; True when it was the victim."""
        evicted = key == self._candidate
        if evicted:
            self.counters.evictions += 1
        else:
            self.counters.removals += 1
        self._candidate = None
        return evicted


class LRU(_Base):
    """Least recently used: an ordered dict, oldest first."""

    name = "lru"

    def __init__(self, capacity_bytes: int = 0) -> None:
        super().__init__()
        self._queue: OrderedDict[str, None] = OrderedDict()
        self._pinned: set[str] = set()

    def admit(self, key: str, size: int) -> None:
        if key in self:
            self.touch(key)
            return
        self._queue[key] = None
        self._candidate = None

    def touch(self, key: str) -> None:
        if key in self._queue:
            self._queue.move_to_end(key)
        elif key not in self._pinned:
            return
        self.counters.hits += 1
        if key == self._candidate:
            self._candidate = None

    def _choose(self) -> str | None:
        return next(iter(self._queue), None)

    def remove(self, key: str) -> None:
        if key in self._queue:
            del self._queue[key]
        elif key in self._pinned:
            self._pinned.remove(key)
        else:
            return
        self._count_removal(key)

    def pin(self, key: str) -> None:
        if key in self._queue:
            del self._queue[key]
            self._pinned.add(key)
            self._candidate = None

    def unpin(self, key: str) -> None:
        if key in self._pinned:
            self._pinned.remove(key)
            self._queue[key] = None
            self._candidate = None

    def __len__(self) -> int:
        return len(self._queue) + len(self._pinned)

    def __contains__(self, key: object) -> bool:
        return key in self._queue or key in self._pinned


class FIFO(LRU):
    """First in, first out: LRU without the move on a hit. A baseline only."""

    name = "fifo"

    def touch(self, key: str) -> None:
        if key in self:
            self.counters.hits += 1


# --- SIEVE ------------------------------------------------------------------
# Zhang et al., "SIEVE is Simpler than LRU", NSDI 2024.
#   one FIFO queue, newest at the head; one "visited" bit per entry
#   hit:     set visited (no move: a hit is one store, no list surgery)
#   insert:  at the head, visited = 0
#   evict:   the hand walks from the tail towards the head; a visited entry
#            has its bit cleared and is passed over (it stays where it is);
#            the first unvisited entry is the victim; the hand then rests on
#            the entry newer than the victim, and wraps to the tail at the head
# Entries that survive keep their place, so new entries are weeded out quickly
# while old popular ones settle behind the hand.


class _Node:
    __slots__ = ("key", "newer", "older", "visited")

    def __init__(self, key: str) -> None:
        self.key = key
        self.visited = False
        self.newer: _Node | None = None
        self.older: _Node | None = None


class SIEVE(_Base):
    name = "sieve"

    def __init__(self, capacity_bytes: int = 0) -> None:
        super().__init__()
        self._nodes: dict[str, _Node] = {}  # queued (unpinned) entries
        self._pinned: dict[str, _Node] = {}
        self._head: _Node | None = None  # newest
        self._tail: _Node | None = None  # oldest
        self._hand: _Node | None = None  # None: start at the tail

    def admit(self, key: str, size: int) -> None:
        if key in self:
            self.touch(key)
            return
        node = _Node(key)
        self._nodes[key] = node
        self._link_head(node)
        self._candidate = None

    def touch(self, key: str) -> None:
        node = self._nodes.get(key) or self._pinned.get(key)
        if node is None:
            return
        node.visited = True
        self.counters.hits += 1
        if key == self._candidate:
            self._candidate = None

    def _choose(self) -> str | None:
        node = self._hand or self._tail
        if node is None:
            return None
        while node.visited:  # at most one lap: every bit passed is cleared
            node.visited = False
            self.counters.reinsertions += 1
            node = node.newer or self._tail
            assert node is not None
        self._hand = node
        return node.key

    def remove(self, key: str) -> None:
        node = self._nodes.pop(key, None)
        if node is not None:
            self._unlink(node)
        elif self._pinned.pop(key, None) is None:
            return
        self._count_removal(key)

    def pin(self, key: str) -> None:
        node = self._nodes.pop(key, None)
        if node is not None:
            self._unlink(node)
            self._pinned[key] = node
            self._candidate = None

    def unpin(self, key: str) -> None:
        node = self._pinned.pop(key, None)
        if node is not None:
            self._nodes[key] = node
            self._link_head(node)
            self._candidate = None

    def _link_head(self, node: _Node) -> None:
        node.newer, node.older = None, self._head
        if self._head is not None:
            self._head.newer = node
        self._head = node
        if self._tail is None:
            self._tail = node

    def _unlink(self, node: _Node) -> None:
        if node is self._hand:
            self._hand = node.newer
        if node.newer is not None:
            node.newer.older = node.older
        else:
            self._head = node.older
        if node.older is not None:
            node.older.newer = node.newer
        else:
            self._tail = node.newer
        node.newer = node.older = None

    def __len__(self) -> int:
        return len(self._nodes) + len(self._pinned)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes or key in self._pinned


# --- S3-FIFO ----------------------------------------------------------------
# Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023.
#   three FIFO queues: small S (10% of the bytes), main M (the rest), and a
#   ghost G of recently evicted keys (no data; as many bytes' worth as M)
#   every entry has a frequency counter, capped at 3
#   hit:     freq += 1 (no move)
#   insert:  key in G -> M (it was evicted too soon); otherwise -> S
#   evict:   from M if M is over its share or S is empty, else from S
#   from S:  head accessed (freq >= 1) -> move to M with freq 0, look again;
#            else it is the victim, and its key enters G
#   from M:  head freq > 0 -> reinsert at the tail with freq - 1, look again;
#            else it is the victim (it leaves no ghost)
#   One-hit wonders (a scan, an epoch's cold tail) die in S after a short
#   stay; anything touched twice lives in M under a 2-bit CLOCK.
# Details from the authors' libCacheSim S3FIFO.c: until the first eviction a
# full S spills new keys into M (else a cache filled by a scan would start as
# one big S); the shares are of the unpinned bytes, so pinning a warm set does
# not starve M.

SMALL_RATIO = 0.10
GHOST_RATIO = 0.90
MAX_FREQ = 3
PROMOTE_AT = 1  # accesses while in S that earn a place in M


class S3FIFO(_Base):
    name = "s3fifo"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._small: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._main: OrderedDict[str, int] = OrderedDict()
        self._ghost: OrderedDict[str, int] = OrderedDict()
        self._pinned: dict[str, tuple[int, bool]] = {}  # key -> (size, was in S)
        self._freq: dict[str, int] = {}  # every tracked key, pinned too
        self.small_bytes = 0
        self.main_bytes = 0
        self.ghost_bytes = 0
        self.pinned_bytes = 0
        self._has_evicted = False

    def admit(self, key: str, size: int) -> None:
        if key in self._freq:
            self.touch(key)
            return
        if size < 0:
            raise ValueError(f"negative size {size} for {key!r}")
        self._freq[key] = 0
        self._candidate = None
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is not None:
            self.ghost_bytes -= ghost_size
            self.counters.hits_ghost += 1
            self._push(key, size, small=False)
        else:
            spill = not self._has_evicted and self.small_bytes >= self._small_share()
            self._push(key, size, small=not spill)

    def touch(self, key: str) -> None:
        freq = self._freq.get(key)
        if freq is None:
            return
        self._freq[key] = min(freq + 1, MAX_FREQ)
        self.counters.hits += 1
        if key in self._small:
            self.counters.hits_small += 1
        elif key in self._main:
            self.counters.hits_main += 1
        if key == self._candidate:
            self._candidate = None

    def _choose(self) -> str | None:
        self._has_evicted = True
        while True:
            if self._small and self.main_bytes <= self._main_share():
                key, size = next(iter(self._small.items()))
                if self._freq[key] < PROMOTE_AT:
                    return key
                self._pop(key)
                self._freq[key] = 0
                self._push(key, size, small=False)
                self.counters.promotions += 1
            elif self._main:
                key = next(iter(self._main))
                freq = self._freq[key]
                if freq == 0:
                    return key
                self._freq[key] = freq - 1
                self._main.move_to_end(key)
                self.counters.reinsertions += 1
            else:
                return None

    def remove(self, key: str) -> None:
        if self._freq.pop(key, None) is None:
            return
        was_small = key in self._small
        pinned = self._pinned.pop(key, None)
        if pinned is not None:
            size = pinned[0]
            self.pinned_bytes -= size
        else:
            size = self._pop(key)
        if self._count_removal(key) and was_small:
            self._ghost[key] = size
            self.ghost_bytes += size
            limit = GHOST_RATIO * self.capacity_bytes
            while self.ghost_bytes > limit and self._ghost:
                self.ghost_bytes -= self._ghost.popitem(last=False)[1]

    def pin(self, key: str) -> None:
        if key not in self._freq or key in self._pinned:
            return
        was_small = key in self._small
        size = self._pop(key)
        self._pinned[key] = (size, was_small)
        self.pinned_bytes += size
        self._candidate = None

    def unpin(self, key: str) -> None:
        pinned = self._pinned.pop(key, None)
        if pinned is None:
            return
        size, was_small = pinned
        self.pinned_bytes -= size
        self._push(key, size, small=was_small)
        self._candidate = None

    def _small_share(self) -> float:
        return SMALL_RATIO * max(self.capacity_bytes - self.pinned_bytes, 0)

    def _main_share(self) -> float:
        return (1 - SMALL_RATIO) * max(self.capacity_bytes - self.pinned_bytes, 0)

    def _push(self, key: str, size: int, *, small: bool) -> None:
        if small:
            self._small[key] = size
            self.small_bytes += size
        else:
            self._main[key] = size
            self.main_bytes += size

    def _pop(self, key: str) -> int:
        size = self._small.pop(key, None)
        if size is not None:
            self.small_bytes -= size
            return size
        size = self._main.pop(key)
        self.main_bytes -= size
        return size

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


POLICIES: dict[str, type[LRU] | type[SIEVE] | type[S3FIFO]] = {
    "lru": LRU,
    "fifo": FIFO,
    "sieve": SIEVE,
    "s3fifo": S3FIFO,
}

# Chosen by `python -m nearstore.bench.eviction`, not by habit. Mean hit ratio over its
# five training-like traces: sieve 43.5%, s3fifo 42.6%, fifo 38.7%, lru 37.9%
# (Belady 57.6%). S3-FIFO wins the Zipf+scan traces by <= 0.2 points and the
# 3x-dataset epochs by 2.8, but loses the 1.5x-dataset epochs by 7.2 (its 10%
# small queue is wasted when nothing recurs within it); SIEVE is never more
# than 2.8 points behind the best online policy on any trace.
DEFAULT_POLICY = "sieve"


def make_policy(name: str, capacity_bytes: int) -> CountedPolicy:
    """A fresh policy by name ("lru", "fifo", "sieve", "s3fifo")."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; have {sorted(POLICIES)}") from None
    return cls(capacity_bytes)

"""The consistent-hash directory: which node's cache owns which chunk.

A `Ring` is an immutable, versioned answer to "who owns key K?". Membership
(metadata/membership.py) builds a new ring with `Ring.build` and swaps the
reference atomically; health checks derive a ring that routes around down
peers with `Ring.without`. Lookups do no I/O and take no locks.

Invariants (tests/unit/metadata/test_ring.py checks each):

- A pure function of the membership: the same nodes (in any order) with the
  same weights, algorithm and parameters give the same owners on every
  machine. Nothing depends on the order of joins or on history.
- `owners(k, n)` is the preference list: owner first, then distinct nodes.
  `without(D).owner(k)` is the first node of `owners(k, ...)` not in D, so
  routing around a down peer moves only that peer's keys, and only to the
  next node of each key's own list (spread over all the others).
- Shares follow weights; a join or leave moves about the joining or leaving
  node's share of the keys, i.e. about 1/N (bench/ring.py measures it).

Keys are hashed with xxh3-64 (the key hash); node ids are hashed with xxh3-64
into per-node seeds; per (node, point) values are derived from the seed with
the splitmix64 finaliser, which numpy evaluates for millions of points at
once. Placement is exact integer arithmetic, so all machines agree (only
rendezvous compares floats, where a last-bit difference in `log` between
platforms could flip a near-tie of two scores).

Algorithms (`algorithm=`), chosen by measurement (`python -m nearstore.bench.ring`;
figures at 1000 equal nodes, one core of the development machine):

- ``multiprobe`` (default): ketama points (``vnodes`` = 2048 per unit of
  weight) probed from 3 positions per key (Appel and Lamping 2015, see
  `_Ketama`). Lookup about 2.5 us; max/mean share 1.029; join/leave move
  1.0x ideal; build 0.25 s; about 2M points (~22 MB). Shares are exact
  (`_Ketama.shares` integrates the probe distances).
- ``ketama``: the same points, one probe, ``vnodes`` = 8192. Lookup about
  1 us, but a node's share is a sum of V random arcs (relative spread
  1/sqrt(V)), so max/mean at 1000 nodes is 1.035 to 1.045 depending on the
  ids, too close to the 1.05 target, and it needs 4x the points (2 s to build,
  ~87 MB). Three probes cut the spread more than 4x the points do.
- ``rendezvous``: weighted HRW, score ``-w / ln(u)``: the reference (balance
  exact in expectation, movement exactly minimal), but a lookup scores every
  node: O(N), about 12 us at 1000 nodes even with numpy.
- ``maglev``: the Maglev table (65537 slots, weighted turns). O(1) lookups
  (0.2 us) and balance within one slot, but a join or leave moves 1.6x ideal
  at 100 nodes and 6.7x at 1000.

Rejected without a place here (prototyped): a 2^16..2^18-slot table filled
by weighted HRW has minimal movement but the balance of S/N slots per node
(max/mean about 1.2 at 1000 nodes), and 2^22 slots means 4e9 scores to fill;
capping its loads (bounded loads, filled greedily by score) balanced it but
moved 1.5-2.5x ideal. Jump hash and its descendants (Memento, Anchor) depend
on the order of joins and removals, not only on the membership.
"""

from __future__ import annotations

import abc
import bisect
import heapq
import math
from array import array
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import xxhash

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "NoLiveNodes",
    "Node",
    "Ring",
    "RingError",
    "key_hash",
    "sample_owners",
]

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

U64Array = npt.NDArray[np.uint64]
IntArray = npt.NDArray[np.intp]
FloatArray = npt.NDArray[np.float64]


class RingError(ValueError):
    """A ring cannot be built from these nodes or parameters."""


class NoLiveNodes(LookupError):
    """Every node of the ring is marked down; nothing can own a key."""


@dataclass(frozen=True)
class Node:
    id: str  # stable name, e.g. "10.0.0.7:9000"; the ring hashes this
    address: str  # where its peer API listens, e.g. "http://10.0.0.7:9000"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.id:
            raise RingError("a node needs a non-empty id")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise RingError(f"node {self.id!r}: weight must be finite and > 0")


def key_hash(key: str | bytes) -> int:
    """The 64-bit hash every algorithm places a key by."""
    return xxhash.xxh3_64_intdigest(key.encode() if isinstance(key, str) else key)


def _mix(x: int) -> int:
    """splitmix64 finaliser on a Python int (same as `_mix_np`)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix_np(x: U64Array) -> U64Array:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _Placement(abc.ABC):
    """One algorithm: node indices in, node indices out. Immutable once built;
    `route` returns a copy that routes around the given down nodes."""

    name: ClassVar[str]

    def __init__(self, seeds: U64Array, weights: FloatArray) -> None:
        self.seeds = seeds
        self.weights = weights
        self.live = np.ones(len(seeds), dtype=bool)

    @abc.abstractmethod
    def params(self) -> dict[str, int]: ...

    def route(self, down: frozenset[int]) -> _Placement:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.live = np.ones(len(self.seeds), dtype=bool)
        clone.live[list(down)] = False
        clone._routed()
        return clone

    @abc.abstractmethod
    def _routed(self) -> None:
        """Recompute what depends on `live` (after `route`)."""

    @abc.abstractmethod
    def owner(self, h: int) -> int:
        """Index of the first live node of `order(h)`."""

    @abc.abstractmethod
    def order(self, h: int) -> Iterator[int]:
        """Preference order for hash h (down nodes and repeats included);
        every node appears in it eventually."""

    @abc.abstractmethod
    def owner_indices(self, hashes: U64Array) -> IntArray:
        """Vectorised `owner` (for measurement)."""

    @abc.abstractmethod
    def shares(self) -> FloatArray:
        """Fraction of the keyspace each node owns (0 for down nodes)."""


class _Ketama(_Placement):
    """Points on a circle; with ``probes`` > 1, multi-probe consistent hashing
    (Appel and Lamping 2015): a key hashes to ``probes`` positions and belongs
    to the point nearest clockwise of any of them. A node's score for a key
    (its smallest clockwise distance) depends only on that key and that
    node's points, so removals move only the removed node's keys, as in HRW;
    more probes shrink the spread of shares at the cost of one bisection each.
    """

    name = "ketama"
    _MAX_POINTS = 1 << 26
    _DEFAULTS: ClassVar[dict[str, int]] = {"vnodes": 8192, "probes": 1}

    def __init__(self, seeds: U64Array, weights: FloatArray, **params: int) -> None:
        super().__init__(seeds, weights)
        unknown = set(params) - set(self._DEFAULTS)
        if unknown:
            raise RingError(f"{self.name}: unknown parameters {sorted(unknown)}")
        p = {**self._DEFAULTS, **params}
        self.vnodes, self.probes = p["vnodes"], p["probes"]
        if self.vnodes < 1 or not 1 <= self.probes <= 16:
            raise RingError(f"{self.name}: need vnodes >= 1 and 1 <= probes <= 16")
        counts = np.maximum(1, np.rint(weights * self.vnodes)).astype(np.int64)
        total = int(counts.sum())
        if total > self._MAX_POINTS:
            raise RingError(
                f"{self.name}: {total} points; lower vnodes or give weights relative to 1.0"
            )
        node = np.repeat(np.arange(len(seeds)), counts)
        starts = np.cumsum(counts) - counts
        j = np.arange(total, dtype=np.uint64) - np.repeat(starts, counts).astype(np.uint64)
        pts = _mix_np(seeds[node] + (j + np.uint64(1)) * np.uint64(_GOLDEN)) >> np.uint64(32)
        pts32 = pts.astype(np.uint32)
        # Ties (two points at one position) go to the smaller node id: nodes
        # are sorted by id, so every membership breaks them the same way.
        o = np.lexsort((node, pts32))
        # One buffer serves the numpy (measurement) and the bisect (lookup) side.
        self._pos = array("I", pts32[o].tobytes())
        self.points = np.frombuffer(self._pos, dtype=np.uint32)
        self.point_owner = node[o].astype(np.uint16 if len(seeds) <= 0xFFFF else np.int32)
        self.total = total
        # Bucket index: the first point of each of 2^bits buckets, so that a
        # lookup bisects a handful of points instead of all of them.
        bits = max(1, min(24, total.bit_length() - 2))
        self.shift = 32 - bits
        edges = np.arange(1 << bits, dtype=np.uint64) << np.uint64(self.shift)
        first = np.searchsorted(self.points, edges.astype(np.uint32), side="left")
        self._idx = array("q", np.append(first, total).astype(np.int64).tobytes())
        self._routed()

    def params(self) -> dict[str, int]:
        return {"vnodes": self.vnodes, "probes": self.probes}

    def _routed(self) -> None:
        # For point i: the first point at or after i (circularly) whose node
        # is live; a key whose next point is i belongs to that point's node.
        live_pts = np.flatnonzero(self.live[self.point_owner])
        if live_pts.size == 0 or live_pts.size == self.total:
            self.live_owner, self.live_points = self.point_owner, self.points
        else:
            k = np.searchsorted(live_pts, np.arange(self.total), side="left")
            k[k == live_pts.size] = 0
            nxt = live_pts[k]
            self.live_owner, self.live_points = self.point_owner[nxt], self.points[nxt]
        code = "H" if len(self.seeds) <= 0xFFFF else "i"
        self._own = array(code, self.live_owner.astype(code).tobytes())
        self._lpos = (
            self._pos if self.live_points is self.points else array("I", self.live_points.tobytes())
        )

    def _start(self, q: int) -> int:
        """Index of the first point clockwise of the 64-bit position q.
        A point at 32-bit position P stands for 64-bit P * 2^32 + 2^32 - 1."""
        p = q >> 32
        b = p >> self.shift
        i = bisect.bisect_left(self._pos, p, self._idx[b], self._idx[b + 1])
        return 0 if i == self.total else i

    def _probe(self, h: int, p: int) -> int:
        return h if p == 0 else _mix((h + p * _GOLDEN) & _M64)

    def owner(self, h: int) -> int:
        if self.probes == 1:
            return self._own[self._start(h)]
        pos, idx, lpos, shift = self._pos, self._idx, self._lpos, self.shift
        total = self.total
        best, best_d = 0, 1 << 64
        q = h
        for p in range(self.probes):
            if p:  # inlined _probe and _start: this is the hot path
                x = (h + p * _GOLDEN) & _M64
                x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
                x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
                q = x ^ (x >> 31)
            b = q >> 32
            i = bisect.bisect_left(pos, b, idx[b >> shift], idx[(b >> shift) + 1])
            if i == total:
                i = 0
            d = (((lpos[i] << 32) | 0xFFFFFFFF) - q) & _M64
            if d < best_d:
                best, best_d = i, d
        return self._own[best]

    def order(self, h: int) -> Iterator[int]:
        # Merge the clockwise walks from every probe by distance: a node's
        # first appearance is its score rank.
        heap: list[tuple[int, int, int, int, int]] = []
        for p in range(self.probes):
            q = self._probe(h, p)
            i = self._start(q)
            heap.append(((((self._pos[i] << 32) | 0xFFFFFFFF) - q) & _M64, p, i, 0, q))
        heapq.heapify(heap)
        while heap:
            _, p, i, steps, q = heapq.heappop(heap)
            yield int(self.point_owner[i])
            if steps + 1 < self.total:
                i = (i + 1) % self.total
                d = (((self._pos[i] << 32) | 0xFFFFFFFF) - q) & _M64
                heapq.heappush(heap, (d, p, i, steps + 1, q))

    def owner_indices(self, hashes: U64Array) -> IntArray:
        best = np.full(len(hashes), np.iinfo(np.uint64).max, dtype=np.uint64)
        out = np.zeros(len(hashes), dtype=np.intp)
        low = np.uint64(0xFFFFFFFF)
        for p in range(self.probes):
            q = hashes if p == 0 else _mix_np(hashes + np.uint64((p * _GOLDEN) & _M64))
            i = np.searchsorted(self.points, (q >> np.uint64(32)).astype(np.uint32), "left")
            i[i == self.total] = 0
            d = ((self.live_points[i].astype(np.uint64) << np.uint64(32)) | low) - q
            closer = d < best
            best[closer] = d[closer]
            out[closer] = self.live_owner[i[closer]]
        return out

    def shares(self) -> FloatArray:
        """Exact (for uniform, independent probes): node n wins with
        probability k * sum over its arcs a of the integral from 0 to len(a)
        of F(t)^(k-1), F(t) = P(one probe's distance > t) = sum (len - t)+."""
        live_pts = np.flatnonzero(self.live[self.point_owner])
        n = len(self.seeds)
        if live_pts.size == 0:
            return np.zeros(n)
        pos = self.points[live_pts].astype(np.float64)
        arcs = np.diff(pos, prepend=pos[-1] - 2.0**32) / 2.0**32
        if live_pts.size == 1:
            arcs = np.ones(1)
        owner = self.point_owner[live_pts]
        k = self.probes
        if k == 1:
            return np.bincount(owner, weights=arcs, minlength=n).astype(np.float64)
        order = np.argsort(arcs)
        length = arcs[order]
        # On [length[j-1], length[j]] the arcs longer than t are j..m-1:
        # F(t) = tail_sum[j] - t * (m - j).
        m = len(length)
        tail_sum = np.cumsum(length[::-1])[::-1]
        count = m - np.arange(m)
        t0 = np.concatenate(([0.0], length[:-1]))
        seg = ((tail_sum - count * t0) ** k - (tail_sum - count * length) ** k) / (count * k)
        integral = np.empty(m)
        integral[order] = np.cumsum(seg)
        return np.bincount(owner, weights=k * integral, minlength=n).astype(np.float64)


class _MultiProbe(_Ketama):
    name = "multiprobe"
    _DEFAULTS: ClassVar[dict[str, int]] = {"vnodes": 2048, "probes": 3}


class _Rendezvous(_Placement):
    name = "rendezvous"

    def __init__(self, seeds: U64Array, weights: FloatArray) -> None:
        super().__init__(seeds, weights)
        self._routed()

    def params(self) -> dict[str, int]:
        return {}

    def _routed(self) -> None:
        # Minimise -ln(u) / w (the same ranking as maximising -w / ln(u));
        # a down node gets 1/w = inf and can never win while one is live.
        self.inv_w = np.where(self.live, 1.0 / self.weights, np.inf)

    def _cost(self, h: U64Array, inv_w: FloatArray) -> FloatArray:
        x = _mix_np(h ^ self.seeds)
        u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
        cost: FloatArray = -np.log(u) * inv_w
        return cost

    def owner(self, h: int) -> int:
        return int(np.argmin(self._cost(np.uint64(h), self.inv_w)))  # type: ignore[arg-type]

    def order(self, h: int) -> Iterator[int]:
        cost = self._cost(np.uint64(h), 1.0 / self.weights)  # type: ignore[arg-type]
        yield from (int(i) for i in np.argsort(cost, kind="stable"))

    def owner_indices(self, hashes: U64Array) -> IntArray:
        out = np.empty(len(hashes), dtype=np.intp)
        step = max(1, (1 << 22) // len(self.seeds))
        for a in range(0, len(hashes), step):
            cost = self._cost(hashes[a : a + step, None], self.inv_w[None, :])
            out[a : a + step] = np.argmin(cost, axis=1)
        return out

    def shares(self) -> FloatArray:
        # Exact in expectation: each node wins a key with probability w / W.
        w = np.where(self.live, self.weights, 0.0)
        return w / w.sum() if w.sum() else w


def _is_prime(m: int) -> bool:
    return m >= 2 and all(m % d for d in range(2, math.isqrt(m) + 1))


class _Maglev(_Placement):
    name = "maglev"
    _PROBES = 32

    def __init__(self, seeds: U64Array, weights: FloatArray, *, table_size: int = 65537) -> None:
        super().__init__(seeds, weights)
        n, m = len(seeds), table_size
        if not _is_prime(m) or m < n:
            raise RingError("maglev: table_size must be a prime >= the number of nodes")
        self.m = m
        offset = [_mix(int(s)) % m for s in seeds]
        skip = [_mix(int(s) ^ _GOLDEN) % (m - 1) + 1 for s in seeds]
        rate = (weights / weights.max()).tolist()
        credit = [0.0] * n
        nxt = [0] * n
        table = [-1] * m
        filled = 0
        # Nodes take turns claiming their next free preferred slot; a node of
        # half the largest weight claims every other turn.
        while filled < m:
            for i in range(n):
                credit[i] += rate[i]
                if credit[i] < 1.0:
                    continue
                credit[i] -= 1.0
                j = nxt[i]
                c = (offset[i] + j * skip[i]) % m
                while table[c] >= 0:
                    j += 1
                    c = (offset[i] + j * skip[i]) % m
                table[c] = i
                nxt[i] = j + 1
                filled += 1
                if filled == m:
                    break
        self.table = np.array(table, dtype=np.intp)
        self._table = table

    def params(self) -> dict[str, int]:
        return {"table_size": self.m}

    def _routed(self) -> None:
        """Nothing to precompute: a down owner is detected per lookup."""

    def owner(self, h: int) -> int:
        i = self._table[h % self.m]
        if self.live[i]:
            return i
        return next(j for j in self.order(h) if self.live[j])

    def order(self, h: int) -> Iterator[int]:
        # A down owner's keys probe other slots (so they spread over all
        # nodes by share), then, past a few probes, every node in a
        # key-specific order so that the walk always ends.
        yield self._table[h % self.m]
        for p in range(1, self._PROBES):
            yield self._table[_mix((h + p * _GOLDEN) & _M64) % self.m]
        yield from sorted(range(len(self.seeds)), key=lambda i: _mix(h ^ int(self.seeds[i])))

    def owner_indices(self, hashes: U64Array) -> IntArray:
        out = self.table[(hashes % np.uint64(self.m)).astype(np.intp)]
        for k in np.flatnonzero(~self.live[out]):
            out[k] = self.owner(int(hashes[k]))
        return out

    def shares(self) -> FloatArray:
        counts = np.bincount(self.table, minlength=len(self.seeds)).astype(np.float64) / self.m
        # Down nodes' slots spread by weight (in expectation).
        w = np.where(self.live, self.weights, 0.0)
        if not w.sum():
            return w
        lost = counts[~self.live].sum()
        return np.where(self.live, counts, 0.0) + lost * w / w.sum()


ALGORITHMS: dict[str, type[_Placement]] = {
    c.name: c for c in (_Ketama, _MultiProbe, _Rendezvous, _Maglev)
}
DEFAULT_ALGORITHM = "multiprobe"


@dataclass(frozen=True, eq=False)
class Ring:
    """Immutable. Build with `Ring.build`; never mutate, swap the reference."""

    version: int
    nodes: tuple[Node, ...]  # every member, sorted by id (down ones included)
    down: frozenset[str] = field(default_factory=frozenset)  # ids routed around
    _placement: _Placement = field(repr=False, kw_only=True)

    @classmethod
    def build(
        cls,
        nodes: Iterable[Node],
        *,
        version: int = 0,
        algorithm: str = DEFAULT_ALGORITHM,
        **algorithm_params: int,
    ) -> Ring:
        members = tuple(sorted(nodes, key=lambda n: n.id))
        if not members:
            raise RingError("a ring needs at least one node")
        ids = [n.id for n in members]
        if len(set(ids)) != len(ids):
            raise RingError("duplicate node ids")
        try:
            algo = ALGORITHMS[algorithm]
        except KeyError:
            raise RingError(
                f"unknown algorithm {algorithm!r}; one of {sorted(ALGORITHMS)}"
            ) from None
        seeds = np.array([key_hash(i) for i in ids], dtype=np.uint64)
        weights = np.array([n.weight for n in members], dtype=np.float64)
        try:
            placement = algo(seeds, weights, **algorithm_params)
        except TypeError as exc:  # an unknown parameter for this algorithm
            raise RingError(f"{algorithm}: {exc}") from None
        return cls(version, members, _placement=placement)

    def _index(self) -> dict[str, int]:
        return {n.id: i for i, n in enumerate(self.nodes)}

    def owner(self, key: str | bytes) -> Node:
        """The node that owns the chunk `key`."""
        if len(self.down) == len(self.nodes):
            raise NoLiveNodes("every node of the ring is down")
        return self.nodes[self._placement.owner(key_hash(key))]

    def owners(self, key: str | bytes, n: int) -> list[Node]:
        """The owner, then the next distinct live nodes to fall back to
        (at most n; fewer when fewer are live)."""
        live = len(self.nodes) - len(self.down)
        if live == 0:
            raise NoLiveNodes("every node of the ring is down")
        want = min(n, live)
        out: list[Node] = []
        seen: set[int] = set()
        is_live = self._placement.live
        for i in self._placement.order(key_hash(key)):
            if len(out) >= want:
                break
            if i in seen or not is_live[i]:
                continue
            seen.add(i)
            out.append(self.nodes[i])
        return out

    def without(self, node_ids: Collection[str]) -> Ring:
        """This ring with `node_ids` also marked down: their keys go to each
        key's next node; no other key moves. Unknown ids are ignored (the
        membership may already have dropped them)."""
        index = self._index()
        down = self.down | {i for i in node_ids if i in index}
        if down == self.down:
            return self
        placement = self._placement.route(frozenset(index[i] for i in down))
        return Ring(self.version, self.nodes, frozenset(down), _placement=placement)

    def describe(self) -> dict[str, object]:
        """For GET /_nearstore/ring: JSON-serialisable."""
        shares = self._placement.shares()
        return {
            "version": self.version,
            "algorithm": self._placement.name,
            "params": self._placement.params(),
            "nodes": [
                {
                    "id": n.id,
                    "address": n.address,
                    "weight": n.weight,
                    "down": n.id in self.down,
                    "share": round(float(s), 6),
                }
                for n, s in zip(self.nodes, shares, strict=True)
            ],
        }


def sample_owners(ring: Ring, hashes: U64Array) -> IntArray:
    """Owner index (into ``ring.nodes``) of each 64-bit key hash, vectorised.
    For measurement (bench/ring.py, tests) only; requests use `Ring.owner`."""
    if len(ring.down) == len(ring.nodes):
        raise NoLiveNodes("every node of the ring is down")
    return ring._placement.owner_indices(np.asarray(hashes, dtype=np.uint64))

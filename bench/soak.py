"""``nearstore bench soak --minutes N``: mixed load on a 3-node cluster for
N minutes, every byte checked, the nodes' memory watched.

Client threads (16 by default, boto3 with default settings) each own a few
keys (``soak/c<i>/k<j>``) and run GET (whole and ranged), PUT (1 KiB to
8 MiB, log-uniform; multipart above 6 MiB), LIST, DELETE and HEAD on them,
each request through a node picked at random: a key written through one
node is read back through another.

Because a key has one writer, a `Model` knows exactly what each read may
return: the last acknowledged state, or the outcome of a write that failed
visibly (it may or may not have taken effect). A read that returns an older
acknowledged state is counted as stale (a consistency lapse: the nodes
invalidate each other's metadata on every write); bytes that were never
any state of the key are corrupt. At the end every key is read once more:
an acknowledged write that does not read back is lost.

Every interval (a minute, shorter for short runs) a line: requests, error
rate, p50/p99 latency and each node's resident memory (its process tree);
at the end the memory at start, end and peak per node (flat is good), and
PASS only with 0 corrupt bytes and 0 lost writes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nearstore.bench.harness import (
    BUCKET,
    Cluster,
    ClusterSpec,
    MiB,
    Op,
    Recorder,
    Threads,
    Version,
    error_kind,
    get_checked,
    put_checked,
)
from nearstore.bench.stats import percentile

MULTIPART_ABOVE = 6 * MiB
PART = 5 * MiB
MIX = {"get": 0.45, "range": 0.10, "put": 0.22, "list": 0.08, "delete": 0.08, "head": 0.07}
State = Version | None  # None: the key does not exist


# -- what each key may hold ------------------------------------------------------------


@dataclass
class KeyState:
    acked: State = None  # the last acknowledged state
    maybe: list[State] = field(default_factory=list)  # failed writes since: each may have happened
    older: list[State] = field(default_factory=lambda: [None])  # earlier acknowledged states


class Model:
    """The states of one client's keys (that client is their only writer,
    so no lock is needed). Pure: a read is judged by what it returned."""

    OLDER_KEPT = 4

    def __init__(self, keys: list[str]) -> None:
        self.keys = {k: KeyState() for k in keys}

    def acceptable(self, key: str) -> list[State]:
        """What a read may return now, the last acknowledged state first."""
        st = self.keys[key]
        out: list[State] = [st.acked]
        out += [s for s in st.maybe if s not in out]
        return out

    def candidates(self, key: str) -> tuple[list[State], int]:
        """Acceptable states, then older ones (a stale read); and how many
        of the list are acceptable."""
        ok = self.acceptable(key)
        old = [s for s in reversed(self.keys[key].older) if s not in ok]
        return ok + old, len(ok)

    def acknowledged(self, key: str, state: State) -> None:
        st = self.keys[key]
        # The state before, and failed writes that may have landed before
        # this one: all overwritten now, all stale if read again.
        for old in [st.acked, *st.maybe]:
            if old in st.older:
                st.older.remove(old)
            st.older.append(old)
        del st.older[: -self.OLDER_KEPT]
        st.acked, st.maybe = state, []

    def failed(self, key: str, state: State) -> None:
        """A write that failed visibly: it may still have taken effect."""
        st = self.keys[key]
        if state not in st.maybe and state != st.acked:
            st.maybe.append(state)

    def certain(self, key: str) -> State | bool:
        """The state the key surely has, or False when a failed write leaves
        it open."""
        st = self.keys[key]
        return False if st.maybe else st.acked


def judge(model: Model, key: str, index: int | None) -> str:
    """A read that matched candidate ``index`` (None: matched none): ok,
    stale or bad."""
    if index is None:
        return "bad"
    _, n_ok = model.candidates(key)
    return "ok" if index < n_ok else "stale"


# -- the load ---------------------------------------------------------------------------


@dataclass
class Tally:
    """Figures the load adds to as it goes (under the lock)."""

    stale: int = 0
    list_mismatches: int = 0
    corrupt_details: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _size(rng: random.Random) -> int:
    return int(2 ** rng.uniform(10, 23))  # 1 KiB .. 8 MiB, log-uniform


def _client_body(cluster: Cluster, rec: Recorder, models: list[Model], tally: Tally,
                 next_seed: Callable[[], int], seed: int) -> Callable[[int, threading.Event], None]:
    def body(i: int, stop: threading.Event) -> None:
        rng = random.Random(seed * 7919 + i)
        model = models[i]
        keys = list(model.keys)
        while not stop.is_set():
            kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
            node = rng.randrange(len(cluster.nodes))
            key = rng.choice(keys)
            op = Op(kind, node, i, time.monotonic())
            s3 = cluster.client(node)
            if kind in ("get", "range"):
                _read(s3, model, key, op, rng, tally)
            elif kind == "put":
                v = Version(key, next_seed(), _size(rng))
                ok = put_checked(s3, v, op, PART if v.size > MULTIPART_ABOVE else None)
                (model.acknowledged if ok else model.failed)(key, v)
            elif kind == "delete":
                try:
                    s3.delete_object(Bucket=BUCKET, Key=key)
                    model.acknowledged(key, None)
                except Exception as exc:
                    op.error = error_kind(exc)
                    model.failed(key, None)
            elif kind == "head":
                _head(s3, model, key, op, tally)
            else:
                _list(s3, model, f"soak/c{i}/", op, tally)
            rec.add(op)

    return body


def _read(s3: Any, model: Model, key: str, op: Op, rng: random.Random, tally: Tally) -> None:
    states, _ = model.candidates(key)
    sizes = [s.size for s in states if s is not None]
    span = None
    if op.kind == "range" and sizes and min(sizes) > 1:
        a = rng.randrange(min(sizes))
        span = (a, min(min(sizes) - 1, a + rng.randrange(1, 2 * MiB)))
    want: list[bytes | None] = [s.body() if s is not None else None for s in states]
    index = get_checked(s3, key, want, op, span)
    verdict = judge(model, key, index)
    with tally.lock:
        if verdict == "stale":
            tally.stale += 1
        if op.corrupt:
            tally.corrupt_details.append(op.detail)
    if verdict == "bad" and not op.corrupt and op.error is None:
        op.error = "wrong answer"  # e.g. 404 where the key surely exists


def _head(s3: Any, model: Model, key: str, op: Op, tally: Tally) -> None:
    states, n_ok = model.candidates(key)
    try:
        size: int | None = int(s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"])
    except Exception as exc:
        kind = error_kind(exc)
        if not kind.startswith("404"):
            op.error = kind
            return
        size = None
    seen = [(s.size if s is not None else None) for s in states]
    if size not in seen:
        op.error = "wrong answer"
    elif seen.index(size) >= n_ok:
        with tally.lock:
            tally.stale += 1


def _list(s3: Any, model: Model, prefix: str, op: Op, tally: Tally) -> None:
    try:
        resp = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    except Exception as exc:
        op.error = error_kind(exc)
        return
    listed = {o["Key"]: int(o["Size"]) for o in resp.get("Contents", [])}
    for key in model.keys:
        sure = model.certain(key)
        if sure is False:
            continue
        want = sure.size if isinstance(sure, Version) else None
        if listed.get(key) != want:
            with tally.lock:
                tally.list_mismatches += 1
            return


# -- intervals and the summary -------------------------------------------------------------


@dataclass
class Interval:
    t: float  # seconds since the start, at its end
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    rss_mib: list[float]

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def interval_of(ops: list[Op], t: float, rss: list[int]) -> Interval:
    lat = sorted(op.seconds * 1000 for op in ops)
    return Interval(t, len(ops), sum(1 for op in ops if op.error), percentile(lat, 50),
                    percentile(lat, 99), [r / MiB for r in rss])


def interval_line(iv: Interval) -> str:
    rss = " ".join(f"{r:6.0f}" for r in iv.rss_mib)
    return (f"{iv.t / 60:6.1f} min  {iv.requests:7d} req  {iv.error_rate:7.2%} err  "
            f"p50 {iv.p50_ms:7.1f} ms  p99 {iv.p99_ms:8.1f} ms  RSS MiB {rss}")


@dataclass
class Summary:
    minutes: float
    clients: int
    requests: int = 0
    done: dict[str, int] = field(default_factory=dict)  # requests that succeeded, by kind
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    corrupt_bytes: int = 0
    lost_writes: int = 0
    acked_keys: int = 0
    stale_reads: int = 0
    list_mismatches: int = 0
    rss_start_mib: list[float] = field(default_factory=list)
    rss_end_mib: list[float] = field(default_factory=list)
    rss_max_mib: list[float] = field(default_factory=list)
    intervals: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.corrupt_bytes and not self.lost_writes


def render_summary(s: Summary) -> str:
    lines = [
        f"soak: {s.minutes:g} min, {s.clients} clients, {s.requests} requests, "
        f"{s.errors} errors ({s.errors / max(1, s.requests):.3%}), p50 {s.p50_ms:.1f} ms, "
        f"p99 {s.p99_ms:.1f} ms",
        "succeeded: " + ", ".join(f"{k} {n}" for k, n in s.done.items()),
        f"corrupt bytes {s.corrupt_bytes}, lost writes {s.lost_writes} (of {s.acked_keys} keys "
        f"whose last write was acknowledged), stale reads {s.stale_reads}, list mismatches "
        f"{s.list_mismatches}",
        "node  RSS MiB: start    end    max",
    ]
    for i, (a, b, c) in enumerate(zip(s.rss_start_mib, s.rss_end_mib, s.rss_max_mib, strict=True)):
        lines.append(f"{i:4d}  {a:16.0f} {b:6.0f} {c:6.0f}")
    if s.error_kinds:
        lines.append("errors: " + ", ".join(f"{k} x{n}" for k, n in s.error_kinds.items()))
    lines += s.notes
    lines.append("PASS" if s.passed else "FAIL")
    return "\n".join(lines)


def final_check(cluster: Cluster, models: list[Model], summary: Summary) -> None:
    """Every key once more, through each node in turn: the last acknowledged
    write must read back (unless a failed write after it may have landed)."""
    n = 0
    for model in models:
        for key in model.keys:
            states, n_ok = model.candidates(key)
            want: list[bytes | None] = [s.body() if s is not None else None for s in states[:n_ok]]
            index = None
            op = Op("final", n % len(cluster.nodes), -1, time.monotonic())
            for attempt in range(3):
                op = Op("final", (n + attempt) % len(cluster.nodes), -1, time.monotonic())
                index = get_checked(cluster.client(op.node), key, want, op)
                if index is not None or op.corrupt or (op.error or "").startswith("404"):
                    break
                time.sleep(0.5)
            n += 1
            summary.corrupt_bytes += op.corrupt
            if model.certain(key) is not None:
                summary.acked_keys += 1
            if index is None:
                summary.lost_writes += 1
                summary.notes.append(f"LOST {key}: {op.error or op.detail}")


def run(cluster: Cluster, minutes: float, clients: int, interval_s: float, seed: int = 1,
        out: Any = sys.stdout) -> Summary:
    rec = Recorder()
    models = [Model([f"soak/c{i}/k{j}" for j in range(8)]) for i in range(clients)]
    tally = Tally()
    seeds = itertools.count(1 << 32)  # every write its own content
    lock = threading.Lock()

    def next_seed() -> int:
        with lock:
            return next(seeds)

    summary = Summary(minutes, clients)
    load = Threads(_client_body(cluster, rec, models, tally, next_seed, seed), clients)
    t0 = time.monotonic()
    rss0 = cluster.rss()
    peak = list(rss0)
    summary.rss_start_mib = [r / MiB for r in rss0]
    all_lat: list[float] = []
    kinds: Counter[str] = Counter()
    done: Counter[str] = Counter()
    print(f"soak: {clients} clients on {len(cluster.nodes)} nodes for {minutes:g} min; a line "
          f"every {interval_s:g} s", file=out, flush=True)
    load.start()
    try:
        end = t0 + minutes * 60
        while True:
            now = time.monotonic()
            time.sleep(max(0.0, min(interval_s - (now - t0) % interval_s, end - now)))
            ops = rec.drain()
            rss = cluster.rss()
            peak = [max(a, b) for a, b in zip(peak, rss, strict=True)]
            iv = interval_of(ops, time.monotonic() - t0, rss)
            summary.intervals.append(asdict(iv))
            print(interval_line(iv), file=out, flush=True)
            all_lat += [op.seconds * 1000 for op in ops]
            kinds.update(op.error for op in ops if op.error)
            done.update(op.kind for op in ops if op.ok)
            summary.requests += len(ops)
            summary.errors += iv.errors
            summary.corrupt_bytes += sum(op.corrupt for op in ops)
            if time.monotonic() >= end - 0.01:
                break
    finally:
        load.stop()
    rest = rec.drain()
    summary.requests += len(rest)
    summary.errors += sum(1 for op in rest if op.error)
    summary.corrupt_bytes += sum(op.corrupt for op in rest)
    kinds.update(op.error for op in rest if op.error)
    done.update(op.kind for op in rest if op.ok)
    summary.done = dict(done.most_common())
    all_lat += [op.seconds * 1000 for op in rest]
    end_rss = cluster.rss()
    summary.rss_end_mib = [r / MiB for r in end_rss]
    summary.rss_max_mib = [max(a, b) / MiB for a, b in zip(peak, end_rss, strict=True)]
    all_lat.sort()
    summary.p50_ms, summary.p99_ms = percentile(all_lat, 50), percentile(all_lat, 99)
    summary.error_kinds = dict(kinds.most_common())
    summary.stale_reads = tally.stale
    summary.list_mismatches = tally.list_mismatches
    summary.notes += [f"CORRUPT: {d}" for d in tally.corrupt_details[:10]]
    summary.notes += [f"HARNESS: {f}" for f in load.failures]
    final_check(cluster, models, summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nearstore bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long (fractions too: 0.5)")
    p.add_argument("--clients", type=int, default=16, help="client threads (16)")
    p.add_argument("--interval", type=float,
                   help="seconds between lines (60; a quarter of the run when that is shorter)")
    p.add_argument("--backing", choices=("seaweedfs", "moto"), default="seaweedfs")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the summary to FILE")
    p.add_argument("--workdir", type=Path, help="where the cluster keeps its data (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.minutes <= 0 or args.clients < 1:
        print("--minutes must be positive and --clients at least 1", file=sys.stderr)
        return 2
    interval = args.interval or min(60.0, max(2.0, args.minutes * 60 / 4))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nearstore-soak-"))
    spec = ClusterSpec(backing=args.backing, cache_size=256 * MiB)
    cluster = Cluster(workdir, spec)
    if cluster.backing_unavailable() and args.backing == "seaweedfs":
        print("SeaweedFS unavailable; using moto", file=sys.stderr)
        spec.backing = "moto"
    why = cluster.backing_unavailable()
    if why:
        print(f"no backing store: {why}", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        with cluster:
            summary = run(cluster, args.minutes, args.clients, interval)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render_summary(summary))
    if args.json:
        doc = {"command": "nearstore bench soak " + " ".join(argv), "started": started,
               "backing": spec.backing, **asdict(summary), "passed": summary.passed}
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0 if summary.passed else 1

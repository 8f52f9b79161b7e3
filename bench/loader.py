"""Loader bench: samples per second of ``clients.datasets.TarDataset``.

    python -m nearstore.bench.loader [--samples 10000] [--sample-size 100KiB] [--quick]

The same WebDataset shards (tar files of ``--shard-samples`` samples, each
a ``.bin`` field of ``--sample-size`` random bytes and a ``.cls`` label) are
read by the same loader code from three places, side by side in one run:

- ``local disk``: a ``LocalSource`` over the files (the limit; the files are
  in the page cache after the first pass, as they would be on a node that
  has them locally);
- ``nearstore warm``: a nearstore node with its chunk cache, in front of
  SeaweedFS, after one pass filled the cache; the loader runs on the node,
  so it reads through the short-circuit socket (``clients/local.py``);
- ``nearstore warm, HTTP only``: the same with ``S3Source(local=False)``,
  parallel ranged GETs over loopback TCP (a loader on another machine);
- ``boto3 -> seaweedfs``: the backing store read directly with boto3 (the
  same parallel reads, no cache);
- ``nearstore cold`` (one pass only, first): the node right after its cache
  was cleared.

Target (issue 14), printed met / not met under the table: nearstore cold at
least 0.9 x boto3 reading the backing store directly (LOADER_COLD_VS_DIRECT).

The first epoch with read-ahead hints (issue 17; ``--sections hints``, on by
default): the same shards in a SeaweedFS behind bench/throttle.py, which
holds each connection to ``--remote-rate`` (100 MB/s, a remote S3 stream),
with a nearstore node and its cache in front. Rows, each first epoch on a
cleared cache (the node restarted):

- ``first epoch, hints off`` / ``first epoch, hints on``: ``hints=False``
  against the default (``clients.hints``);
- ``warm epoch``: the epoch after, every shard cached;
- ``boto3 -> throttled store``: the same loader on the throttled store
  directly (no node);
- the three nearstore rows again with ``--ranks`` (2) rank processes of
  ``--rank-workers`` (2) DataLoader workers each, read at once;
- ``--step-ms``: a training step slept per batch of 64 (per rank), as a GPU
  paces a real loader; 0 (the default) measures the loader alone, which on a
  small machine is bound by the CPU the node's fills share with it;
- ``2x cache``: the node's cache budget set to half the dataset, and
  ``--big-epochs`` (2) shuffled epochs read with hints off, then (cache
  cleared) on: samples/s and the hit ratio, hits / chunk reads from the
  node's ``/_nearstore/metrics`` (a read that waited for a fill in flight,
  a prefetch included, is not a hit), with the prefetch counters;
- CPU seconds per GB of each process (node, backing store, proxy,
  loader) in each leg, and the cores a first epoch at 0.8 x warm would
  need at the hinted leg's cost: on a small machine these processes
  share its cores, so the sum bounds a first epoch.

Targets (issue 17): first epoch with hints at least 0.8 x the warm epoch
(HINTED_VS_WARM) and at least 3 x the loader reading the throttled store
directly (HINTED_VS_DIRECT), for one process and for the ranks.

Each leg runs a warm-up pass, then ``--runs`` passes interleaved with the
other legs; a cell is the median (min-max). ``--workers 0,2`` also runs
each leg through torch's DataLoader with that many worker processes.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nearstore.bench.config import fmt_size, parse_size
from nearstore.bench.peers import CacheSeaweedPeer, PeerContext, ProcessPeer, RemoteCacheSeaweedPeer
from nearstore.bench.procs import node_metrics
from nearstore.bench.verdicts import RatioTarget, ratio_table
from nearstore.clients.connect import connect
from nearstore.clients.datasets import LocalSource, S3Source, Source, TarDataset

BUCKET = "loader-bench"
PREFIX = "shards/"
LOADER_COLD_VS_DIRECT = 0.9  # cold samples/s over the backing store's, read directly
HINTED_VS_WARM = 0.8  # first epoch with hints over the warm epoch (issue 17)
HINTED_VS_DIRECT = 3.0  # first epoch with hints over the loader on the throttled store
SECTIONS = ("warm", "hints")
# The node's counters the hint rows read (cache/metrics.py), by short name.
NODE_METRICS = {
    "nearstore_cache_hits_total": "hits",
    "nearstore_cache_misses_total": "misses",
    "nearstore_cache_joins_total": "joins",
    "nearstore_prefetch_late_total": "prefetch_late",
    "nearstore_prefetch_lanes": "lanes",
    "nearstore_prefetch_hints_total": "hinted",
    "nearstore_prefetch_chunks_total": "prefetched",
    "nearstore_prefetch_used_total": "prefetch_used",
    "nearstore_prefetch_wasted_bytes_total": "prefetch_wasted_bytes",
}


def targets(results: dict[str, list[float]], suffixes: list[str]) -> list[RatioTarget]:
    """Issue 14's loader target for each DataLoader setting (suffix)."""
    def med(name: str) -> float | None:
        vals = results.get(name)
        return statistics.median(vals) if vals else None

    return [RatioTarget("cold TarDataset >= 0.9 x boto3 direct", "nearstore cold" + sfx,
                        "boto3 -> seaweedfs" + sfx, LOADER_COLD_VS_DIRECT,
                        med("nearstore cold" + sfx), med("boto3 -> seaweedfs" + sfx))
            for sfx in suffixes]  # fmt: skip


def write_shards(root: Path, samples: int, sample_size: int, per_shard: int) -> list[Path]:
    """Deterministic shards under root/shards/; reused when already there."""
    out_dir = root / BUCKET / PREFIX
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir / "_params.json"
    params = {"samples": samples, "sample_size": sample_size, "per_shard": per_shard}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return sorted(out_dir.glob("*.tar"))
    for old in out_dir.glob("*.tar"):
        old.unlink()
    rng = random.Random(1)
    block = rng.randbytes(sample_size + 4096)
    paths: list[Path] = []
    for s in range(0, samples, per_shard):
        path = out_dir / f"train-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(s, min(samples, s + per_shard)):
                off = rng.randrange(4096)
                for name, data in ((f"{i:07d}.bin", block[off : off + sample_size]),
                                   (f"{i:07d}.cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    stamp.write_text(json.dumps(params))
    return paths


def suffix_of(workers: int) -> str:
    """A leg's name suffix for a DataLoader of that many workers (0: none)."""
    return "" if workers == 0 else f", DataLoader x{workers}"


def decode(sample: dict[str, Any]) -> int:
    """What a training step would touch: the label and the payload's size."""
    return len(sample["bin"]) + int(sample["cls"])


BATCH = 64


def one_pass(ds: TarDataset[int], workers: int, step_s: float = 0.0) -> tuple[int, float]:
    """(samples, seconds) of one epoch through the loader. The dataset (its
    listing and, in-process, its connections) is made once per leg, as a
    training job makes it once for all its epochs. ``step_s``: a training
    step's time per batch of BATCH samples, slept (the GPU's time, not
    this machine's CPU); 0 measures the loader alone."""
    t0 = time.perf_counter()
    n = 0
    if workers == 0:
        for _ in ds:
            n += 1
            if step_s and n % BATCH == 0:
                time.sleep(step_s)
    else:
        from torch.utils.data import DataLoader

        for batch in DataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=list):
            n += len(batch)
            if step_s:
                time.sleep(step_s)
    return n, time.perf_counter() - t0


def hint_targets(results: dict[str, list[float]], suffixes: list[str]) -> list[RatioTarget]:
    """Issue 17's first-epoch targets for each setting (suffix)."""
    def med(name: str) -> float | None:
        vals = results.get(name)
        return statistics.median(vals) if vals else None

    out = []
    for sfx in suffixes:
        on, warm, direct = f"first epoch, hints on{sfx}", f"warm epoch{sfx}", f"boto3 -> throttled store{sfx}"
        out += [RatioTarget("first epoch with hints >= 0.8 x warm epoch", on, warm, HINTED_VS_WARM,
                            med(on), med(warm)),
                RatioTarget("first epoch with hints >= 3 x boto3 on the throttled store", on, direct,
                            HINTED_VS_DIRECT, med(on), med(direct))]  # fmt: skip
    return out


def node_counters(endpoint: str) -> dict[str, float]:
    """The node's NODE_METRICS, by short name (missing ones are 0)."""
    samples = node_metrics(endpoint)
    return {short: samples.get(name, 0.0) for name, short in NODE_METRICS.items()}


def hit_ratio(before: dict[str, float], after: dict[str, float]) -> float | None:
    """hits / chunk reads between two readings of `node_counters`: a read
    that waited for a fill in flight (a prefetch caught up with included)
    is not a hit."""
    hits = after["hits"] - before["hits"]
    reads = hits + after["misses"] - before["misses"] + after["joins"] - before["joins"]
    return hits / reads if reads > 0 else None


def cpu_now(peer: RemoteCacheSeaweedPeer) -> dict[str, float]:
    """CPU seconds so far of each process in the hint rows: the node, the
    backing store, the throttling proxy and the loader (this process and
    its reaped children: the rank processes and their DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)

    def tree(p: ProcessPeer) -> float:
        return p.monitor.cpu_seconds() if p.monitor is not None and p.proc is not None else 0.0

    return {"node": tree(peer), "store": tree(peer.backing), "proxy": tree(peer.throttle),
            "loader": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}


def ranks_pass(make: Callable[[int, int], TarDataset[int]], ranks: int, workers: int,
               step_s: float = 0.0) -> tuple[int, float]:
    """(samples, seconds) of one epoch read by ``ranks`` processes at once,
    each with its own dataset (as a job's ranks each make theirs) and a
    DataLoader of ``workers``; the seconds run from the first rank's start
    to the last one's end. Forked: the factories are closures."""
    if ranks == 1:
        return one_pass(make(0, 1), workers, step_s)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(ranks)
    done: Any = ctx.Queue()

    def rank_main(rank: int) -> None:
        try:
            ds = make(rank, ranks)
            barrier.wait(timeout=120)
            t0 = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process
            n, secs = one_pass(ds, workers, step_s)
            done.put((n, t0, t0 + secs, ""))
        except BaseException as e:  # reported by the parent, which raises
            done.put((0, 0.0, 0.0, f"rank {rank}: {e!r}"))

    procs = [ctx.Process(target=rank_main, args=(r,)) for r in range(ranks)]
    for proc in procs:
        proc.start()
    try:
        got = [done.get(timeout=1800) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
    errors = [g[3] for g in got if g[3]]
    if errors:
        raise RuntimeError("; ".join(errors))
    return sum(g[0] for g in got), max(g[2] for g in got) - min(g[1] for g in got)


def hints_section(args: argparse.Namespace, root: Path, data_dir: Path, paths: list[Path],
                  total: int) -> tuple[dict[str, list[float]], dict[str, Any]] | None:
    """The first-epoch rows, the ranks and the 2x-cache epochs (see the
    module docstring): (samples/s by row, everything else for the JSON
    and the tables), or None when the servers cannot run here."""
    peer_dir = Path(tempfile.mkdtemp(dir=root, prefix="remote-"))
    peer = RemoteCacheSeaweedPeer(PeerContext(peer_dir, data_dir, BUCKET, Path(sys.executable).parent,
                                              remote_rate=args.remote_rate))
    why = peer.unavailable()
    if why:
        print(f"hints rows: cannot run: {why}")
        return None
    results: dict[str, list[float]] = {}
    extra: dict[str, Any] = {"counters": {}, "big": []}
    try:
        peer.start()
        up = peer.backing.client()
        up.create_bucket(Bucket=BUCKET)
        for p in paths:
            up.upload_file(str(p), BUCKET, PREFIX + p.name)
        direct = peer.direct_target()

        def dataset(endpoint: str, access: str, secret: str, hints: bool) -> Callable[[int, int], TarDataset[int]]:
            def make(rank: int, world: int) -> TarDataset[int]:
                source = S3Source(BUCKET, client=functools.partial(connect, endpoint, access_key=access,
                                                                    secret_key=secret))
                return TarDataset(source, PREFIX, decode=decode, prefetch=args.prefetch, shuffle=True, seed=0,
                                  rank=rank, world_size=world, hints=hints)
            return make

        node = functools.partial(dataset, peer.endpoint(), peer.access_key, peer.secret_key)
        settings = [(1, w) for w in args.worker_list] + ([(args.ranks, args.rank_workers)] if args.ranks > 1 else [])
        for ranks, w in settings:
            sfx = suffix_of(w) if ranks == 1 else f", {ranks} ranks x {w} workers"

            def leg(name: str, make: Callable[[int, int], TarDataset[int]], ranks: int = ranks, w: int = w,
                    sfx: str = sfx) -> None:
                before, cpu0 = node_counters(peer.endpoint()), cpu_now(peer)
                n, secs = ranks_pass(make, ranks, w, args.step_ms / 1000)
                cpu1 = cpu_now(peer)
                if n != args.samples:
                    raise RuntimeError(f"{name}{sfx}: {n} samples, expected {args.samples}")
                after = node_counters(peer.endpoint())
                results.setdefault(name + sfx, []).append(n / secs)
                extra["counters"].setdefault(name + sfx, []).append(
                    {k: after[k] - before[k] for k in after} | {"hit_ratio": hit_ratio(before, after),
                                                                 "lanes": after["lanes"], "seconds": secs}
                    | {f"cpu_{k}": cpu1[k] - cpu0[k] for k in cpu1})
                print(f"  {name}{sfx}: {n / secs:,.0f} samples/s", flush=True)

            for run in range(args.runs):
                for hinted in (False, True) if run % 2 == 0 else (True, False):
                    peer.clear_cache()
                    leg(f"first epoch, hints {'on' if hinted else 'off'}", node(hinted))
                leg("warm epoch", node(True))  # every shard cached by the first epoch just read
                leg("boto3 -> throttled store", dataset(direct.endpoint, direct.access_key, direct.secret_key,
                                                        False))
        if args.big_epochs > 0:
            # A budget of half the dataset (at least 4 chunks): every epoch partly cold.
            peer.cache_size = f"{max(64, total // 2 // 2**20)}MiB"
            (peer.ctx.workdir / "nearstore.toml").write_text(peer.config_text())
            for hinted in (False, True):
                peer.clear_cache()
                ds = node(hinted)(0, 1)
                for epoch in range(args.big_epochs):
                    ds.set_epoch(epoch)
                    before = node_counters(peer.endpoint())
                    n, secs = one_pass(ds, 0, args.step_ms / 1000)
                    after = node_counters(peer.endpoint())
                    ratio = hit_ratio(before, after)
                    extra["big"].append({"hints": hinted, "epoch": epoch, "samples_per_s": n / secs,
                                         "hit_ratio": ratio, "cache_size": peer.cache_size,
                                         **{k: after[k] - before[k] for k in after}})
                    print(f"  2x cache, hints {'on' if hinted else 'off'}, epoch {epoch}: {n / secs:,.0f} "
                          f"samples/s, hit ratio {fmt_ratio(ratio)}", flush=True)
    finally:
        peer.stop()
        shutil.rmtree(peer_dir, ignore_errors=True)
    extra["suffixes"] = [suffix_of(w) for w in args.worker_list] + (
        [f", {args.ranks} ranks x {args.rank_workers} workers"] if args.ranks > 1 else [])
    return results, extra


CPU_PARTS = ("node", "store", "proxy", "loader")


def print_cpu(args: argparse.Namespace, results: dict[str, list[float]], extra: dict[str, Any], total: int) -> None:
    """Where the CPU went in each leg (its last run), per GB read: the two
    cores are shared by the node, the backing store, the proxy standing in
    for the network and the loader, so a first epoch here is bound by the
    sum. And what that sum makes of the targets: the cores a first epoch at
    0.8 x the warm epoch would need at these costs."""
    cores = os.cpu_count() or 1
    print()
    print(f"CPU seconds per GB read, by process (last run of each leg; this machine has {cores} cores); "
          "samples per node CPU-second:")
    print()
    print("| leg | node | backing store | throttling proxy | loader | all | cores busy | samples per node CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    gb = total / 1e9
    needs = []
    for sfx in extra["suffixes"]:
        for name in ["first epoch, hints off", "first epoch, hints on", "warm epoch", "boto3 -> throttled store"]:
            last = extra["counters"].get(name + sfx, [{}])[-1]
            if "cpu_node" not in last:
                continue
            per = [last[f"cpu_{k}"] / gb for k in CPU_PARTS]
            node_cpu = last["cpu_node"]
            per_node = f"{args.samples / node_cpu:,.0f}" if node_cpu > 0.05 else "-"
            print(f"| {name}{sfx} | " + " | ".join(f"{v:.2f}" for v in per)
                  + f" | {sum(per):.2f} | {sum(per) * gb / last['seconds']:.2f} | {per_node} |")
        hinted = extra["counters"].get("first epoch, hints on" + sfx, [{}])[-1]
        warm = results.get("warm epoch" + sfx)
        if "cpu_node" in hinted and warm:
            cost = sum(hinted[f"cpu_{k}"] for k in CPU_PARTS) / gb  # CPU-s per GB
            want = HINTED_VS_WARM * statistics.median(warm) * total / args.samples / 1e9  # GB/s
            needs.append(f"A first epoch{sfx} at {HINTED_VS_WARM} x warm is {want:.2f} GB/s; at the hinted leg's "
                         f"{cost:.2f} CPU-s per GB that needs {want * cost:.1f} busy cores (this machine: {cores}).")
    for line in needs:
        print()
        print(line)


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_hints(args: argparse.Namespace, results: dict[str, list[float]], extra: dict[str, Any],
                total: int) -> list[RatioTarget]:
    """The hint rows, the 2x-cache table and the targets; the targets judged."""
    print()
    paced = f"a training step of {args.step_ms:g} ms per {BATCH} samples (slept)" if args.step_ms \
        else "the loader alone (no training step)"
    print(f"first epoch with read-ahead hints: the store behind a proxy at {args.remote_rate / 1e6:g} MB/s "
          f"per connection; {paced}; samples/s, median (min-max) of {args.runs} runs")
    print()
    print("| leg | samples/s | GB/s | vs warm epoch | hit ratio | prefetched chunks | prefetched read "
          "| read late | lanes at the end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sfx in extra["suffixes"]:
        warm = results.get("warm epoch" + sfx)
        base = statistics.median(warm) if warm else None
        for name in ["first epoch, hints off", "first epoch, hints on", "warm epoch", "boto3 -> throttled store"]:
            vals = results.get(name + sfx)
            if not vals:
                continue
            med = statistics.median(vals)
            gbps = med * total / args.samples / 1e9
            last = extra["counters"].get(name + sfx, [{}])[-1]
            vs = f"{med / base:.2f}" if base else "-"
            print(f"| {name}{sfx} | {fmt_cell(vals)} | {gbps:.2f} | {vs} | {fmt_ratio(last.get('hit_ratio'))} "
                  f"| {last.get('prefetched', 0):,.0f} | {last.get('prefetch_used', 0):,.0f} "
                  f"| {last.get('prefetch_late', 0):,.0f} | {last.get('lanes', 0):,.0f} |")
    print_cpu(args, results, extra, total)
    if extra["big"]:
        print()
        print(f"dataset 2 x the cache budget ({fmt_size(total)} over a {extra['big'][0]['cache_size']} cache), "
              "shuffled epochs:")
        print()
        print("| hints | epoch | samples/s | hit ratio | prefetched chunks | prefetched read | wasted prefetch |")
        print("|---|---|---|---|---|---|---|")
        for row in extra["big"]:
            print(f"| {'on' if row['hints'] else 'off'} | {row['epoch']} | {row['samples_per_s']:,.0f} | "
                  f"{fmt_ratio(row['hit_ratio'])} | {row['prefetched']:,.0f} | {row['prefetch_used']:,.0f} | "
                  f"{fmt_size(int(row['prefetch_wasted_bytes']))} |")
    goals = hint_targets(results, extra["suffixes"])
    print()
    print(ratio_table(goals, "samples/s"))
    return goals


def fmt_cell(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def warm_section(args: argparse.Namespace, root: Path, data_dir: Path,
                 paths: list[Path]) -> dict[str, list[float]] | None:
    """The warm node against local disk and boto3 on the store (issue 14's
    rows): samples/s by row, or None when the servers cannot run here."""
    workers = args.worker_list
    peer_dir = Path(tempfile.mkdtemp(dir=root, prefix="peer-"))  # fresh servers every run
    peer = CacheSeaweedPeer(PeerContext(peer_dir, data_dir, BUCKET, Path(sys.executable).parent))
    why = peer.unavailable()
    if why:
        print(f"cannot run: {why}")
        return None
    results: dict[str, list[float]] = {}
    try:
        peer.start()
        seaweed = peer.backing
        up = seaweed.client()
        up.create_bucket(Bucket=BUCKET)
        for p in paths:
            up.upload_file(str(p), BUCKET, PREFIX + p.name)

        def s3_source(endpoint: str, access: str, secret: str, local: bool = True) -> S3Source:
            return S3Source(BUCKET, local=local, client=functools.partial(
                connect, endpoint, access_key=access, secret_key=secret))

        sources: dict[str, Callable[[], Source]] = {
            "local disk": lambda: LocalSource(data_dir / BUCKET),
            "nearstore warm": lambda: s3_source(peer.endpoint(), peer.access_key, peer.secret_key),
            "nearstore warm, HTTP only": lambda: s3_source(peer.endpoint(), peer.access_key,
                                                          peer.secret_key, local=False),
            "boto3 -> seaweedfs": lambda: s3_source(seaweed.endpoint(), seaweed.access_key,
                                                   seaweed.secret_key),
        }
        for w in workers:
            suffix = suffix_of(w)
            legs = {name: TarDataset(make(), PREFIX, decode=decode, prefetch=args.prefetch)
                    for name, make in sources.items()}
            n, secs = one_pass(legs["nearstore warm"], w)  # cold: the cache is empty
            results[f"nearstore cold{suffix}"] = [n / secs]
            for ds in legs.values():  # warm-up pass of each
                one_pass(ds, w)
            for run in range(args.runs):
                order: Iterable[str] = list(legs) if run % 2 == 0 else reversed(list(legs))
                for name in order:
                    n, secs = one_pass(legs[name], w)
                    if n != args.samples:
                        raise RuntimeError(f"{name}: {n} samples, expected {args.samples}")
                    results.setdefault(name + suffix, []).append(n / secs)
                    print(f"  {name}{suffix}: {n / secs:,.0f} samples/s", flush=True)
            if w != workers[-1]:
                peer.clear_cache()
    finally:
        peer.stop()
        shutil.rmtree(peer_dir, ignore_errors=True)

    return results


def print_warm(args: argparse.Namespace, results: dict[str, list[float]], paths: list[Path],
               total: int) -> list[RatioTarget]:
    workers = args.worker_list
    print()
    print(f"loader: {args.samples:,} samples of {fmt_size(args.sample_size)} in "
          f"{len(paths)} tar shards; samples/s, median (min-max) of {args.runs} runs")
    print()
    print("| leg | samples/s | GB/s | vs local disk |")
    print("|---|---|---|---|")
    for w in workers:
        suffix = suffix_of(w)
        base = statistics.median(results["local disk" + suffix])
        for name in ["local disk", "nearstore warm", "nearstore warm, HTTP only", "boto3 -> seaweedfs",
                     "nearstore cold"]:
            vals = results.get(name + suffix)
            if not vals:
                continue
            med = statistics.median(vals)
            gbps = med * total / args.samples / 1e9
            print(f"| {name}{suffix} | {fmt_cell(vals)} | {gbps:.2f} | {med / base:.2f} |")
    print()
    print(ratio_table(targets(results, [suffix_of(w) for w in workers]), "samples/s"))
    return targets(results, [suffix_of(w) for w in workers])




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nearstore bench loader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--sample-size", type=parse_size, default=100 * 1024)
    ap.add_argument("--shard-samples", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=2, help="shards read ahead per loader (TarDataset prefetch)")
    ap.add_argument("--workers", default="0", help="DataLoader workers to try, e.g. 0,2 (0: plain iteration)")
    ap.add_argument("--quick", action="store_true", help="2,000 samples, 1 run")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="which tables: warm (the warm node against local disk and boto3), hints "
                         "(first epochs with and without hints, behind a throttled store)")
    ap.add_argument("--remote-rate", type=float, default=100e6, metavar="BYTES/S",
                    help="the throttled store's bytes/s per connection (hints section)")
    ap.add_argument("--ranks", type=int, default=2, help="rank processes of the hints section's ranks rows (1: none)")
    ap.add_argument("--rank-workers", type=int, default=2, help="DataLoader workers of each rank")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="hints section: a training step slept per batch of 64 samples per rank (0: the loader alone)")
    ap.add_argument("--big-epochs", type=int, default=2,
                    help="shuffled epochs over a cache half the dataset's size, hints off then on (0: none)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the shards here between runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.runs = min(args.samples, 2000), 1
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.worker_list = workers
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections <= set(SECTIONS):
        ap.error(f"--sections: {', '.join(sorted(sections - set(SECTIONS)))} unknown (of {', '.join(SECTIONS)})")

    tmp = None
    root = args.workdir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="nearstore-loader-bench-")
        root = Path(tmp)
    data_dir = root / "data"
    paths = write_shards(data_dir, args.samples, args.sample_size, args.shard_samples)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} shards, {args.samples:,} samples of {fmt_size(args.sample_size)}, "
          f"{fmt_size(total)} in all", flush=True)

    results: dict[str, list[float]] = {}
    goals: list[RatioTarget] = []
    extra: dict[str, Any] = {}
    try:
        if "warm" in sections:
            warm = warm_section(args, root, data_dir, paths)
            if warm is None:
                return 2
            results |= warm
        if "hints" in sections:
            hinted = hints_section(args, root, data_dir, paths, total)
            if hinted is None:
                return 2
            results |= hinted[0]
            extra = hinted[1]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if "warm" in sections:
        goals += print_warm(args, results, paths, total)
    if extra:
        goals += print_hints(args, results, extra, total)
    if args.json:
        args.json.write_text(json.dumps({
            "samples": args.samples, "sample_size": args.sample_size, "shards": len(paths), "bytes": total,
            "results": results, "hint_counters": extra.get("counters", {}), "big_cache": extra.get("big", []),
            "targets": [{"target": t.text, "subject": t.subject, "reference": t.reference, "ratio": t.ratio,
                         "met": t.met} for t in goals]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

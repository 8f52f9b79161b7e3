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

Each leg runs a warm-up pass, then ``--runs`` passes interleaved with the
other legs; a cell is the median (min-max). ``--workers 0,2`` also runs
each leg through torch's DataLoader with that many worker processes.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import random
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
from nearstore.bench.peers import CacheSeaweedPeer, PeerContext
from nearstore.bench.verdicts import RatioTarget, ratio_table
from nearstore.clients.connect import connect
from nearstore.clients.datasets import LocalSource, S3Source, Source, TarDataset

BUCKET = "loader-bench"
PREFIX = "shards/"
LOADER_COLD_VS_DIRECT = 0.9  # cold samples/s over the backing store's, read directly


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


def one_pass(ds: TarDataset[int], workers: int) -> tuple[int, float]:
    """(samples, seconds) of one epoch through the loader. The dataset (its
    listing and, in-process, its connections) is made once per leg, as a
    training job makes it once for all its epochs."""
    t0 = time.perf_counter()
    n = 0
    if workers == 0:
        for _ in ds:
            n += 1
    else:
        from torch.utils.data import DataLoader

        for batch in DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=list):
            n += len(batch)
    return n, time.perf_counter() - t0


def fmt_cell(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:,.0f} ({min(values):,.0f}-{max(values):,.0f})"


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
    ap.add_argument("--workdir", type=Path, default=None, help="keep the shards here between runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.runs = min(args.samples, 2000), 1
    workers = [int(w) for w in args.workers.split(",") if w.strip()]

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

    peer_dir = Path(tempfile.mkdtemp(dir=root, prefix="peer-"))  # fresh servers every run
    peer = CacheSeaweedPeer(PeerContext(peer_dir, data_dir, BUCKET, Path(sys.executable).parent))
    why = peer.unavailable()
    if why:
        print(f"cannot run: {why}")
        return 2
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
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

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
    if args.json:
        goals = [{"target": t.text, "subject": t.subject, "reference": t.reference,
                  "ratio": t.ratio, "met": t.met}
                 for t in targets(results, [suffix_of(w) for w in workers])]  # fmt: skip
        args.json.write_text(json.dumps({"samples": args.samples, "sample_size": args.sample_size,
                                         "shards": len(paths), "bytes": total, "results": results,
                                         "targets": goals}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m nearstore.bench.readers`` (``nearstore bench readers``): the client readers
against the node's own warm throughput.

1. One nearstore node with its chunk cache in front of SeaweedFS (the
   ``nearstore-cache+seaweedfs`` peer), one object (1 GiB by default) read
   once to warm the cache, then, run after run, side by side:

   - the bench's raw load generator (bench/loadgen.py: one kernel copy, the
     body only counted): the whole object on one connection, and its 16 MiB
     chunks on N connections. The best of these is the node's warm
     throughput, what a reader is measured against;
   - ``clients.ranged.read_into`` with N streams into a preallocated
     ``bytearray`` (target: at least 0.9x the node's warm throughput);
   - ``clients.ranged.aread_into`` (the async form) with 8 streams;
   - (these over HTTP, ``local=False``) and ``clients.ranged.read_into`` as
     it runs by default on the node's own machine: through the node's
     short-circuit socket (``clients.local``).

2. Three nodes, one ring, in front of SeaweedFS (``nearstore-cluster+
   seaweedfs``), the object warm on its owners: ``clients.ranged`` through
   node A (a peer hop for the chunks A does not own) against
   ``clients.direct`` (each chunk from its owner), sync and async.

Every reader's bytes are checked (each MiB of the dataset carries its
offset). Figures are GB/s (10^9 bytes/s) of a whole-object read, HEAD
included, median (min-max) over ``--runs``, and the client process's CPU
seconds per GB (the node's not counted): where client and node share the
cores, a reader's CPU is taken from the node. The machine is shared, so the
ratios taken within one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from nearstore.bench import dataset
from nearstore.bench.config import parse_size
from nearstore.bench.loadgen import GetJob, run_job
from nearstore.bench.peers import CacheSeaweedPeer, ClusterSeaweedPeer, PeerContext, S3Peer
from nearstore.bench.scenarios import ObjectSpec
from nearstore.bench.stats import summarize
from nearstore.clients import direct, ranged
from nearstore.clients.connect import connect

SOCKET_ROW = "ranged.read_into, short-circuit socket"
BUCKET = "readers"
KEY = "big.bin"
STAMP = 1 << 20  # bench/dataset.py stamps every MiB with its offset

Case = Callable[[], tuple[float, float]]  # one measured read: GB/s, client CPU s per GB


def check(view: memoryview, size: int) -> None:
    """The object's bytes, by the offsets stamped in them."""
    if len(view) != size:
        raise AssertionError(f"read {len(view)} bytes of {size}")
    for off in range(0, size - 7, STAMP):
        if view[off : off + 8] != struct.pack(">Q", off):
            raise AssertionError(f"wrong bytes at offset {off}")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def read_case(read: Callable[[], memoryview], size: int) -> Case:
    """A reader's whole-object read, timed, its bytes checked."""

    def run() -> tuple[float, float]:
        c0, t0 = _cpu(), time.perf_counter()
        view = read()
        elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
        check(view, size)
        return size / elapsed / 1e9, cpu / (size / 1e9)

    return run


def raw_case(peer: S3Peer, size: int, connections: int, whole: bool) -> Case:
    job: GetJob = {
        "op": "get", "target": peer.target().to_dict(), "keys": [KEY], "object_size": size,
        "range_size": 0 if whole else ranged.CHUNK, "concurrency": connections, "duration_s": 120.0,
        "max_requests": 1 if whole else -(-size // ranged.CHUNK), "ttfb_only": False, "client": "raw", "seed": 1,
    }  # fmt: skip

    def run() -> tuple[float, float]:
        result = _loop(run_job(job))
        if result["errors"]:
            raise RuntimeError(f"load generator: {result['first_error']}")
        gb = result["bytes"] / 1e9
        return gb / result["elapsed_s"], result["client_cpu_s"] / gb

    return run


def _loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)


Figures = dict[str, dict[str, list[float]]]  # case -> {"gbps": [...], "cpu_s_per_gb": [...]}


def measure(cases: dict[str, Case], runs: int, say: Callable[[str], None]) -> Figures:
    """Every case once per run, in turn, so that noise falls on all alike."""
    out: Figures = {name: {"gbps": [], "cpu_s_per_gb": []} for name in cases}
    for run in range(runs):
        for name, case in cases.items():
            gbps, cpu = case()
            out[name]["gbps"].append(gbps)
            out[name]["cpu_s_per_gb"].append(cpu)
            say(f"run {run + 1}/{runs} {name}: {gbps:.2f} GB/s, {cpu:.2f} s CPU/GB")
    return out


@contextlib.contextmanager
def running(peer: S3Peer, files: dict[str, Path], size: int, say: Callable[[str], None]) -> Iterator[Any]:
    """The peer started with the object loaded; yields a boto3 client for it."""
    why = peer.unavailable()
    if why:
        raise RuntimeError(f"{peer.name}: {why}")
    say(f"starting {peer.name}")
    try:
        peer.start()
        say(f"loading {size >> 20} MiB into the backing store")
        peer.load([ObjectSpec(KEY, size)], files)
        yield connect(peer.endpoint(), access_key=peer.access_key, secret_key=peer.secret_key)
    finally:
        peer.stop()


def single_node(ctx: PeerContext, files: dict[str, Path], size: int, runs: int, streams: list[int],
                say: Callable[[str], None]) -> Figures:
    peer = CacheSeaweedPeer(ctx)
    with running(peer, files, size, say) as s3:
        buf = bytearray(size)  # touched once here, reused by every read
        say("warming the cache")
        check(ranged.read_into(s3, BUCKET, KEY, buf), size)
        cases: dict[str, Case] = {"raw loadgen, whole object, 1 connection": raw_case(peer, size, 1, True)}
        for n in streams:
            cases[f"raw loadgen, 16 MiB chunks, {n} connections"] = raw_case(peer, size, n, False)
        for n in streams:
            cases[f"ranged.read_into, {n} streams"] = read_case(
                partial(ranged.read_into, s3, BUCKET, KEY, buf, streams=n, local=False), size)
        cases["ranged.aread_into (async), 8 streams"] = read_case(
            lambda: _loop(ranged.aread_into(s3, BUCKET, KEY, buf, streams=8, local=False)), size)
        cases[SOCKET_ROW] = read_case(partial(ranged.read_into, s3, BUCKET, KEY, buf), size)
        return measure(cases, runs, say)


def cluster(ctx: PeerContext, files: dict[str, Path], size: int, runs: int, streams: list[int],
            say: Callable[[str], None]) -> Figures:
    with running(ClusterSeaweedPeer(ctx), files, size, say) as s3:
        buf = bytearray(size)
        say("warming the cache on the chunks' owners")
        reader = direct.DirectReader(s3)
        check(reader.read_into(BUCKET, KEY, buf), size)
        if len(reader.sent) < 2:
            raise RuntimeError(f"the direct reader did not spread over the nodes: {reader.sent}")
        cases: dict[str, Case] = {}
        for n in streams:
            cases[f"ranged.read_into via node A, {n} streams"] = read_case(
                partial(ranged.read_into, s3, BUCKET, KEY, buf, streams=n, local=False), size)
            cases[f"direct.read_into, {n} streams"] = read_case(
                partial(direct.read_into, s3, BUCKET, KEY, buf, streams=n), size)
        cases["direct.aread_into (async), 8 streams"] = read_case(
            lambda: _loop(direct.aread_into(s3, BUCKET, KEY, buf, streams=8)), size)
        cases["ranged.read_into via node A's socket (short-circuit)"] = read_case(
            partial(ranged.read_into, s3, BUCKET, KEY, buf), size)
        return measure(cases, runs, say)


def _fmt(values: list[float]) -> str:
    s = summarize(values)
    return f"{s.median:5.2f} ({s.min:.2f}-{s.max:.2f})" if s else "-"


def _median(values: list[float]) -> float:
    s = summarize(values)
    return s.median if s else float("nan")


def _rows(figures: Figures, against: float | None) -> list[str]:
    head = f"  {'reader':44s} {'GB/s':>20s}" + ("  x node" if against else "") + "  CPU s/GB"
    rows = [head]
    for name, f in figures.items():
        ratio = f"  {_median(f['gbps']) / against:6.2f}" if against else ""
        rows.append(f"  {name:44s} {_fmt(f['gbps']):>20s}{ratio}  {_median(f['cpu_s_per_gb']):9.2f}")
    return rows


def render(size: int, runs: int, single: Figures, multi: Figures, streams: list[int]) -> tuple[str, dict[str, float]]:
    lines = [f"readers: one {size / 2**30:g} GiB object, warm cache; GB/s median (min-max) of {runs} runs;",
             "CPU: the client process's CPU seconds per GB read (the node's not counted)", ""]
    ratios: dict[str, float] = {}

    def gbps(figures: Figures, name: str) -> float:
        return _median(figures[name]["gbps"])

    if single:
        node = max(gbps(single, k) for k in single if k.startswith("raw"))
        lines += ["single node (nearstore-cache+seaweedfs)", *_rows(single, node)]
        ratios["ranged_best_over_node"] = max(gbps(single, k) for k in single
                                              if k.startswith("ranged.read_into") and k != SOCKET_ROW) / node
        ratios["socket_over_node"] = gbps(single, SOCKET_ROW) / node
        for n in streams:
            ratios[f"ranged_{n}_over_raw_{n}"] = (
                gbps(single, f"ranged.read_into, {n} streams") / gbps(single, f"raw loadgen, 16 MiB chunks, {n} connections"))
        lines += [f"  node warm throughput (best raw) {node:.2f} GB/s; best ranged.read_into "
                  f"{ratios['ranged_best_over_node']:.2f}x it (target >= 0.9); same streams: "
                  + ", ".join(f"{n}: {ratios[f'ranged_{n}_over_raw_{n}']:.2f}x" for n in streams),
                  f"  short-circuit socket (the reader's default on the node's machine): "
                  f"{ratios['socket_over_node']:.2f}x the node's HTTP throughput", ""]
    if multi:
        lines += ["cluster of 3 (nearstore-cluster+seaweedfs): through node A vs each chunk from its owner",
                  *_rows(multi, None)]
        for n in streams:
            ratio = gbps(multi, f"direct.read_into, {n} streams") / gbps(multi, f"ranged.read_into via node A, {n} streams")
            ratios[f"direct_{n}_over_ranged_via_node_{n}"] = ratio
            lines.append(f"  direct / via node A, {n} streams: {ratio:.2f}x")
    return "\n".join(lines), ratios


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m nearstore.bench.readers", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="object size (1GiB)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per reader (3)")
    p.add_argument("--streams", default="4,8,16", help="stream counts (4,8,16)")
    p.add_argument("--only", choices=("single", "cluster"), help="one part only")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    p.add_argument("--workdir", type=Path, help="dataset and servers' data (default: a temp dir, removed)")
    args = p.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",") if s.strip()]
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nearstore-readers-"))
    bin_dir = Path(sys.executable).parent
    try:
        data = workdir / "data"
        say(f"writing a {args.size >> 20} MiB object")
        files = dataset.build(data, BUCKET, [ObjectSpec(KEY, args.size)])
        single: Figures = {}
        multi: Figures = {}
        if args.only in (None, "single"):
            single = single_node(PeerContext(workdir / "single", data, BUCKET, bin_dir), files, args.size,
                                 args.runs, streams, say)
        if args.only in (None, "cluster"):
            multi = cluster(PeerContext(workdir / "cluster", data, BUCKET, bin_dir), files, args.size,
                            args.runs, streams, say)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    table, ratios = render(args.size, args.runs, single, multi, streams)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "runs": args.runs, "single": single,
                                         "cluster": multi, "ratios": ratios}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

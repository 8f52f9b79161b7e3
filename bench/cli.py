"""``nearstore bench``: run the scenarios against the peers, print the table.

nearstore/cli.py dispatches ``nearstore bench ARGS...`` to `main`; until then
``python -m nearstore.bench ARGS...`` does the same.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nearstore.bench.config import PRESETS, Plan, parse_size
from nearstore.bench.peers import PEER_ALIASES, PEERS
from nearstore.bench.scenarios import SCENARIOS, select

DEFAULT_PEERS = ["nginx", "seaweedfs", "moto", "nearstore"]
# Smoke: only peers that need nothing outside the virtualenv (nginx is
# listed so that a machine without it shows it skipped, with the reason).
SMOKE_PEERS = ["nginx", "moto", "nearstore"]
# Scenarios whose figures mean something only on particular peers: without
# --peers they run on these, with this subject (without --subject). The
# cache's cold reads need a cache to empty, and its targets name nginx
# proxy_cache, SeaweedFS direct, nginx static and nearstore's local store.
SCENARIO_PEERS: dict[str, tuple[list[str], str]] = {
    "cache": (["nearstore-cache+seaweedfs", "nginx-cache+seaweedfs", "seaweedfs", "nginx",
               "nearstore"], "nearstore-cache+seaweedfs"),
    "proxy": (["nearstore+seaweedfs"], "nearstore+seaweedfs"),
    "cluster": (["nearstore-cluster"], "nearstore-cluster"),
    "remote": (["nearstore-cache+remote-seaweedfs"], "nearstore-cache+remote-seaweedfs"),
}  # fmt: skip


def default_peers(scenarios: list[str], smoke: bool) -> tuple[list[str], str]:
    """(peers, subject) when --peers is not given: the union of what each
    scenario needs, the per-node ones the usual peers; the subject is
    nearstore where a per-node scenario runs, else the first special one's."""
    plain = SMOKE_PEERS if smoke else DEFAULT_PEERS
    peers: list[str] = []
    subjects: list[str] = []
    for name in scenarios:
        need, subject = SCENARIO_PEERS.get(name, (plain, "nearstore"))
        peers += [p for p in need if p not in peers]
        subjects.append(subject)
    subject = "nearstore" if "nearstore" in subjects else (subjects or ["nearstore"])[0]
    return peers, subject


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(parse_size(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return vals


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nearstore bench",
        description="Per-node throughput of nearstore beside nginx, SeaweedFS and moto.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller objects (< 5 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny run for tests (seconds)")
    p.add_argument("--scenarios", type=_names, help=f"comma list of {sorted(SCENARIOS)}")
    p.add_argument("--peers", type=_names, help=f"comma list of {sorted(PEERS)}")
    p.add_argument("--subject", help="the peer ratios are taken for (default: nearstore, or "
                   "the scenario's own: nearstore-cache+seaweedfs for cache ...)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the comparison")
    p.add_argument("--setup", action="store_true", help="apt-get install nginx and wrk first")
    p.add_argument("--no-setup", action="store_true", help="never install anything")
    p.add_argument("--list", action="store_true", help="list scenarios and peers, then exit")
    p.add_argument("--workdir", type=Path, help="dataset and peer data (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("sizes and concurrency (override the preset)")
    g.add_argument("--large-sizes", type=_sizes, metavar="1GiB,64MiB")
    g.add_argument("--large-concurrency", type=_ints, metavar="1,4")
    g.add_argument("--range-object", type=parse_size, metavar="1GiB")
    g.add_argument("--range-sizes", type=_sizes, metavar="1MiB,8MiB")
    g.add_argument("--range-concurrency", type=_ints, metavar="4")
    g.add_argument("--small-sizes", type=_sizes, metavar="64KiB,4KiB")
    g.add_argument("--small-concurrency", type=_ints, metavar="1,16,64")
    g.add_argument("--put-sizes", type=_sizes, metavar="64MiB,64KiB")
    g.add_argument("--put-part-size", type=parse_size, metavar="8MiB")
    g.add_argument("--put-large-concurrency", type=int, metavar="N")
    g.add_argument("--put-small-concurrency", type=int, metavar="N")
    g.add_argument("--ttfb-object", type=parse_size, metavar="1GiB")
    g.add_argument("--cache-sizes", type=_sizes, metavar="16MiB,1GiB")
    g.add_argument("--cache-concurrency", type=_ints, metavar="1,4")
    g.add_argument("--cache-small-concurrency", type=_ints, metavar="16,64")
    g.add_argument("--cluster-nodes", type=_ints, metavar="1,2,3")
    g.add_argument("--cluster-size", type=parse_size, metavar="1GiB")
    g.add_argument("--cluster-objects", type=int, metavar="N")
    g.add_argument("--cluster-concurrency", type=int, metavar="N")
    g.add_argument("--cluster-owner-objects", type=int, metavar="N")
    g.add_argument("--cluster-owner-concurrency", type=_ints, metavar="1,4")
    g.add_argument("--remote-size", type=parse_size, metavar="256MiB")
    g.add_argument("--remote-concurrency", type=_ints, metavar="1,4")
    g.add_argument("--remote-rate", type=float, metavar="BYTES/S",
                   help="per-connection rate of the remote-like backing store (100e6)")
    r = p.add_argument_group("repetitions")
    r.add_argument("--runs", type=int, help="measured runs per case (after a warm-up)")
    r.add_argument("--duration", type=float, dest="duration_s", help="seconds per run")
    r.add_argument("--warmup-duration", type=float, dest="warmup_s", help="seconds of warm-up")
    r.add_argument("--no-warmup", action="store_true")
    r.add_argument("--max-requests", type=int, help="request bound per run")
    r.add_argument("--no-calibrate", action="store_true", help="skip the generator calibration")
    return p


_PLAN_FIELDS = (
    "large_sizes", "large_concurrency", "range_object", "range_sizes", "range_concurrency",
    "small_sizes", "small_concurrency", "put_sizes", "put_part_size", "put_large_concurrency",
    "put_small_concurrency", "ttfb_object", "cache_sizes", "cache_concurrency",
    "cache_small_concurrency", "cluster_nodes", "cluster_size", "cluster_objects",
    "cluster_concurrency", "cluster_owner_objects", "cluster_owner_concurrency",
    "remote_size", "remote_concurrency", "remote_rate",
    "runs", "duration_s", "warmup_s", "max_requests",
)  # fmt: skip


def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    changes: dict[str, object] = {
        f: getattr(args, f) for f in _PLAN_FIELDS if getattr(args, f) is not None
    }
    if args.no_warmup:
        changes["warmup"] = False
    if args.no_calibrate:
        changes["calibrate"] = False
    return plan.replace(**changes) if changes else plan


def _progress(enabled: bool, total: int) -> tuple[Callable[[str], None], Callable[[int], None],
                                                   Callable[[], None]]:  # fmt: skip
    if not enabled:
        return (lambda _msg: None), (lambda _n: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        t0 = time.monotonic()

        def say(msg: str) -> None:
            print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

        return say, (lambda _n: None), (lambda: None)
    bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)

    def describe(msg: str) -> None:
        bar.set_description_str(msg[:60])

    return describe, bar.update, bar.close


def main(argv: list[str]) -> int:
    # Client-side benches, each its own module: nearstore bench readers|loader|models ...
    if argv[:1] == ["readers"]:  # the client readers against the node (bench/readers.py)
        from nearstore.bench.readers import main as readers_main

        return readers_main(argv[1:])
    if argv[:1] == ["loader"]:  # samples/s of the dataset loader (bench/loader.py)
        from nearstore.bench.loader import main as loader_main

        return loader_main(argv[1:])
    if argv[:1] == ["models"]:  # safetensors cold starts (bench/models.py)
        from nearstore.bench.models import main as models_main

        return models_main(argv[1:])
    # Robustness, not throughput: nearstore bench faults|soak ...
    if argv[:1] == ["faults"]:  # each fault under load, every byte checked (bench/faults.py)
        from nearstore.bench.faults import main as faults_main

        return faults_main(argv[1:])
    if argv[:1] == ["soak"]:  # mixed load for N minutes, memory watched (bench/soak.py)
        from nearstore.bench.soak import main as soak_main

        return soak_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"scenario {s.name:8s} {s.help}")
        for name, cls in PEERS.items():
            print(f"peer     {name:26s} {cls.description}")
        return 0
    plan = plan_from_args(args)
    # The per-node scenarios run by default; proxy, cache, cluster and remote
    # compare special peers (nearstore+seaweedfs, nearstore-cache+seaweedfs,
    # nearstore-cluster, nearstore-cache+remote-seaweedfs ...) and are run by
    # name, on those unless --peers says otherwise (SCENARIO_PEERS). Keeps
    # --quick under 5 min.
    special = tuple(SCENARIO_PEERS)
    scenarios = args.scenarios or [n for n in SCENARIOS if n not in special]
    peers, subject = default_peers(scenarios, args.smoke)
    if args.peers:
        peers, subject = [PEER_ALIASES.get(p, p) for p in args.peers], "nearstore"
    subject = args.subject or subject
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        print(f"unknown peer(s) {unknown}; known: {sorted(PEERS)}", file=sys.stderr)
        return 2
    try:
        cases = select(scenarios, plan)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2

    from nearstore.bench import report, tools
    from nearstore.bench.runner import Runner

    bin_dir = Path(sys.executable).parent
    missing = tools.missing_tools(bin_dir)
    if missing and (args.setup or not (args.smoke or args.no_setup)):
        print(tools.install(missing), file=sys.stderr)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nearstore-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(plan, cases, peers, workdir, subject=subject, keep=args.keep,
                    bin_dir=bin_dir)  # fmt: skip
    say, tick, close = _progress(not args.no_progress, runner.total_steps())
    command = "nearstore bench " + " ".join(argv)
    try:
        results = runner.run(command, say, tick)
    finally:
        close()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.render(results))
    if args.json:
        report.write_json(results, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        why = report.write_plot(results, args.plot)
        print(f"plot not drawn: {why}" if why else f"wrote {args.plot}")
    return 0 if any(p.status == "ok" for p in results.peers) else 1

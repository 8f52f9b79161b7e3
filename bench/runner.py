"""The run: peers one after another, every case on each, and the ratios.

Order and invariants:

- One dataset per run (`bench.dataset`), loaded into every peer, so all
  peers serve the same bytes. Peers run one at a time (peer-major): a peer's
  memory and CPU are its own, and idle peers cost the shared cores nothing.
- Each case: one warm-up run (discarded), then ``plan.runs`` runs; the
  figures are the median with min-max over runs.
- A peer that cannot run is *skipped* (with the reason); one that fails to
  start, load, or dies mid-run is *failed* (with the log's tail). Neither
  stops the run.
- Ratios are subject / peer on each case's figures (subject: nearstore).
- A peer that is a gateway in front of a backing store (`ProxyPeer`) is
  measured on two legs, direct (the backing store) and through (the
  gateway), alternating run by run in one process of each: the report's
  overhead table is through / direct, against the case's goals.
- The generator is calibrated against nginx (the fastest peer): the Python
  generator's raw and aiohttp clients and wrk on the same load, so the output
  says how close the generator gets to what the machine serves.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nearstore.bench import dataset
from nearstore.bench.config import Plan, fmt_size
from nearstore.bench.generators import PythonGenerator, run_wrk
from nearstore.bench.loadgen import ClientKind, RunResult
from nearstore.bench.peers import (
    PEERS,
    Peer,
    PeerContext,
    PeerFailed,
    ProcessPeer,
    ProxyPeer,
    find_tool,
)
from nearstore.bench.procs import TreeMonitor, tail, timed
from nearstore.bench.scenarios import (
    COLD_DURATION_S,
    LOWER_IS_BETTER,
    Case,
    Goal,
    JobSpec,
    ObjectSpec,
    large_key,
    objects_for,
    small_keys,
)
from nearstore.bench.stats import Stat, percentile, summarize
from nearstore.bench.targets import Target

BUCKET = "nearstore-bench"


@dataclass
class CaseResult:
    id: str
    scenario: str
    label: str
    headline: str
    shown: list[str]
    note: str
    runs: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Stat] = field(default_factory=dict)
    errors: int = 0
    first_error: str = ""
    bound: str = ""

    @property
    def ok(self) -> bool:
        return self.headline in self.summary


@dataclass
class PeerResult:
    name: str
    description: str
    status: str  # ok | skipped | failed
    reason: str = ""
    version: str = ""
    start_s: float = 0.0
    load_s: float = 0.0
    peak_rss_bytes: int = 0
    processes: int = 0
    cases: dict[str, CaseResult] = field(default_factory=dict)
    # Gateway peers only: the backing store's name, and every case measured
    # on it directly (`cases` then holds the figures through the gateway).
    backing: str = ""
    direct: dict[str, CaseResult] = field(default_factory=dict)


@dataclass
class OverheadRow:
    """One figure of a gateway peer: direct vs through, and its goal."""

    peer: str
    case: str
    metric: str
    direct: Stat | None
    through: Stat | None
    ratio: float | None  # through / direct of the medians
    delta: float | None  # through - direct of the medians
    goal: str = ""
    met: bool | None = None


@dataclass
class GeneratorCase:
    label: str
    generator: str
    gbps: Stat | None
    rps: Stat | None
    client_cpu: Stat | None
    errors: int


@dataclass
class Results:
    plan: Plan
    command: str
    machine: dict[str, str]
    subject: str
    started: str
    elapsed_s: float = 0.0
    peers: list[PeerResult] = field(default_factory=list)
    # case id -> metric -> peer -> subject / peer
    ratios: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    generator: list[GeneratorCase] = field(default_factory=list)
    generator_note: str = ""
    case_order: list[str] = field(default_factory=list)
    overhead: list[OverheadRow] = field(default_factory=list)
    peer_goals: list[PeerGoalRow] = field(default_factory=list)


@dataclass
class PeerGoalRow:
    """One figure of one case, subject peer against a reference peer."""

    case: str
    metric: str
    subject: str
    reference: str
    value: Stat | None
    ref_value: Stat | None
    ratio: float | None
    goal: str
    met: bool | None


def machine_info() -> dict[str, str]:
    info = {
        "cores": str(os.cpu_count() or 0),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def run_metrics(
    r: RunResult, server_cpu_s: float, machine_cpu_s: float = math.nan, span_s: float = 0.0
) -> dict[str, float]:
    """Figures of one run. CPU shares of the server and the machine are over
    span_s, the wall time the harness saw around the job (the counters tick
    at 100 Hz: runs much shorter than a second give rough shares)."""
    el = r["elapsed_s"]
    ok = r["requests"] > 0 and el > 0
    nan = math.nan
    span = span_s or el
    return {
        "gbps": r["bytes"] / el / 1e9 if ok else nan,
        "rps": r["requests"] / el if ok else nan,
        "p50_ms": percentile(r["latency_ms"], 50),
        "p99_ms": percentile(r["latency_ms"], 99),
        "ttfb_p50_ms": percentile(r["ttfb_ms"], 50),
        "ttfb_p99_ms": percentile(r["ttfb_ms"], 99),
        "client_cpu": r["client_cpu_s"] / el if el > 0 else nan,
        "server_cpu": server_cpu_s / span if span > 0 else nan,
        # Everything busy on the machine, in cores: more than client + server
        # means other work shared the cores during the run (noise).
        "machine_cpu": machine_cpu_s / span if span > 0 else nan,
        "requests": float(r["requests"]),
        "errors": float(r["errors"]),
        "elapsed_s": el,
    }


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / (os.sysconf("SC_CLK_TCK") or 100)


def guess_bound(summary: dict[str, Stat], cores: int) -> str:
    """Which resource most likely capped a figure (a guess from CPU use)."""
    client = summary["client_cpu"].median if "client_cpu" in summary else 0.0
    server = summary["server_cpu"].median if "server_cpu" in summary else 0.0
    machine = summary["machine_cpu"].median if "machine_cpu" in summary else 0.0
    if machine >= 0.85 * cores and machine - client - server >= 0.3:
        # Kernel work for loopback outside process time (softirq), or other
        # processes on the machine: either way the cores were full.
        return f"CPU full, {machine - client - server:.1f} core outside client+server"
    if client + server >= 0.85 * cores:
        return (
            "CPU (both)"
            if min(client, server) > 0.5
            else ("CPU (client)" if client > server else "CPU (server)")
        )
    if client >= 0.85:
        return "client (1 core)"
    if server >= 0.85:
        return "server (~1 core busy)"
    return "latency / I/O"


ProgressFn = Callable[[str], None]


class Runner:
    def __init__(
        self,
        plan: Plan,
        cases: list[Case],
        peer_names: list[str],
        workdir: Path,
        subject: str = "nearstore",
        keep: bool = False,
        bin_dir: Path | None = None,
    ) -> None:
        self.plan = plan
        self.cases = cases
        self.peer_names = peer_names
        self.workdir = workdir
        self.subject = subject
        self.keep = keep
        self.bin_dir = bin_dir or Path(sys.executable).parent
        self.cores = os.cpu_count() or 1
        self.gen = PythonGenerator()
        # Measured while nginx is up (see _calibrate).
        self.calibration: list[GeneratorCase] = []
        self.calibration_note = ""

    def case_steps(self, case: Case) -> int:
        return self.plan.runs + (1 if self.plan.warmup and not case.cold else 0)

    def steps_per_peer(self, name: str = "") -> int:
        legs = getattr(PEERS.get(name), "legs", 1)
        return legs * sum(self.case_steps(c) for c in self.cases)

    def total_steps(self) -> int:
        return sum(self.steps_per_peer(n) for n in self.peer_names)

    def run(self, command: str, progress: ProgressFn, tick: Callable[[int], None]) -> Results:
        t0 = time.monotonic()
        results = Results(
            plan=self.plan,
            command=command,
            machine=machine_info(),
            subject=self.subject,
            started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
            case_order=[c.id for c in self.cases],
        )
        data_dir = self.workdir / "data"
        progress("writing the dataset")
        self.gen.start()  # its start-up must not land in the first run
        objects = objects_for(self.cases)
        files = dataset.build(data_dir, BUCKET, objects)
        try:
            for name in self.peer_names:
                ctx = PeerContext(self.workdir / "peers" / name, data_dir, BUCKET, self.bin_dir,
                                  remote_rate=self.plan.remote_rate)
                peer = PEERS[name](ctx)
                pr = self._run_peer(peer, objects, files, progress, tick)
                results.peers.append(pr)
        finally:
            self.gen.close()
        results.generator = self.calibration
        results.generator_note = self.calibration_note
        results.ratios = compute_ratios(results, self.subject)
        results.overhead = compute_overhead(results, self.cases)
        results.peer_goals = compute_peer_goals(results, self.cases)
        results.elapsed_s = time.monotonic() - t0
        return results

    def _run_peer(
        self,
        peer: Peer,
        objects: list[ObjectSpec],
        files: dict[str, Path],
        progress: ProgressFn,
        tick: Callable[[int], None],
    ) -> PeerResult:
        pr = PeerResult(peer.name, peer.description, "ok")
        steps = self.steps_per_peer(peer.name)
        backing = _backing(peer)
        if backing is not None:
            pr.backing = backing.name
        reason = peer.unavailable()
        if reason:
            pr.status, pr.reason = "skipped", reason
            tick(steps)
            return pr
        pr.version = peer.version()
        try:
            progress(f"{peer.name}: starting")
            with timed() as t:
                peer.start()
            pr.start_s = t[0]
            progress(f"{peer.name}: loading {len(objects)} objects")
            with timed() as t:
                peer.load(objects, files)
            pr.load_s = t[0]
        except PeerFailed as exc:
            pr.status, pr.reason = "failed", str(exc)
            peer.stop()
            self._cleanup(peer)
            tick(steps)
            return pr
        except BaseException:
            peer.stop()
            raise
        try:
            legs = [Leg("", peer.target())]
            if isinstance(peer, ProxyPeer) and peer.legs > 1:
                legs = [Leg("direct", peer.direct_target()), Leg("through", peer.target())]
            for case in self.cases:
                dead = _dead(peer)
                if dead:
                    pr.status, pr.reason = "failed", dead
                    break
                progress(f"{peer.name}: {case.id}")
                got = self._run_case(peer, legs, case, tick)
                pr.cases[case.id] = got[-1]
                if len(got) == 2:
                    pr.direct[case.id] = got[0]
            if peer.name == "nginx" and self.plan.calibrate and pr.status == "ok":
                progress("nginx: calibrating the load generator")
                self.calibration, self.calibration_note = self._calibrate(legs[-1].target)
        finally:
            if isinstance(peer, ProcessPeer):
                pr.peak_rss_bytes = peer.peak_rss_bytes()
                pr.processes = peer.past_processes
            if peer.monitor is not None:
                pr.processes += peer.monitor.processes()
            peer.stop()
            self._cleanup(peer)
        done = sum(self.case_steps(c) for c in self.cases if c.id in pr.cases)
        tick(steps - done * (2 if pr.direct else 1))
        return pr

    def _cleanup(self, peer: Peer) -> None:
        if not self.keep:
            # Keep the log, drop the stored data (SeaweedFS volumes, nearstore).
            for child in peer.ctx.workdir.iterdir() if peer.ctx.workdir.exists() else []:
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)

    def _run_case(
        self, peer: Peer, legs: list[Leg], case: Case, tick: Callable[[int], None]
    ) -> list[CaseResult]:
        """One CaseResult per leg. With two legs the runs alternate (direct,
        through; then through, direct; ...) so drift on the machine lands on
        both alike."""
        crs = [
            CaseResult(
                case.id, case.scenario, case.label, case.headline, list(case.shown), case.note
            )
            for _ in legs
        ]
        max_req = min(self.plan.max_requests, case.max_requests or self.plan.max_requests)
        warmup = self.plan.warmup and not case.cold
        runs = ([True] if warmup else []) + [False] * self.plan.runs
        spec, spread = case.spec, None
        try:
            chosen = peer.case_targets(case)
        except PeerFailed as exc:
            for cr in crs:
                cr.first_error = f"preparing the case: {exc}"[:500]
            tick(len(runs) * len(legs))
            return crs
        if chosen is not None:
            # A cluster: the streams go to its nodes, on the keys it chose.
            targets, keys = chosen
            spec = dataclasses.replace(case.spec, keys=keys)
            legs, spread, crs = [Leg("", targets[0])], targets, crs[:1]
            crs[0].note = "; ".join(x for x in (case.note, f"{len(keys)} key(s)") if x)
        if case.prime:
            # One full read of every key, unmeasured: the caches are warm.
            for leg in legs:
                keys = spec.keys
                prime = JobSpec("get", min(4, len(keys)), keys, spec.object_size)
                # Through one node even on a cluster: each chunk is cached
                # on its owner whichever node reads it.
                self.gen.run(prime.job(leg.target, COLD_DURATION_S, len(keys), seed=999))
        all_monitors = _monitors(peer)
        stopped = False
        for i, warm in enumerate(runs):
            order = list(range(len(legs)))
            if i % 2:
                order.reverse()
            for li in order:
                leg, cr = legs[li], crs[li]
                if case.cold:
                    try:
                        peer.clear_cache()
                    except PeerFailed as exc:
                        cr.first_error = cr.first_error or f"clearing the cache: {exc}"
                        stopped = True
                        break
                    all_monitors = _monitors(peer)  # a restart makes new ones
                duration = self.plan.warmup_s if warm else self.plan.duration_s
                if case.duration_s is not None:
                    duration = max(duration, case.duration_s)
                job = spec.job(leg.target, duration, max_req, seed=1000 + i, spread=spread)
                counters0 = peer.counters()
                aside = [p.monitor for p in peer.aside()]
                cpu0 = [_cpu(m) for m in all_monitors]
                aside0 = [_cpu(m) for m in aside]
                busy0 = machine_busy_s()
                t0 = time.perf_counter()
                r = self.gen.run(job)
                span = time.perf_counter() - t0
                busy = machine_busy_s() - busy0
                cpu = [_cpu(m) - c0 for m, c0 in zip(all_monitors, cpu0, strict=True)]
                aside_s = sum(_cpu(m) - c0 for m, c0 in zip(aside, aside0, strict=True))
                tick(1)
                if warm:
                    continue
                cr.errors += r["errors"]
                if r["first_error"] and not cr.first_error:
                    cr.first_error = r["first_error"]
                # Server CPU: every server process of the peer (the gateway
                # and its backing store, on either leg: both are the server).
                m = run_metrics(r, sum(cpu), busy, span)
                counters1 = peer.counters()
                for k, v in counters1.items():
                    if k in counters0:
                        m[k] = v - counters0[k]
                if len(all_monitors) > 1 and span > 0:
                    front = 1 + len(peer.extra_nodes())
                    m["gateway_cpu"] = sum(cpu[:front]) / span
                    m["backing_cpu"] = sum(cpu[front:]) / span
                    if front > 1:  # a cluster: its busiest node
                        m["node_cpu_max"] = max(cpu[:front]) / span
                if aside and span > 0:  # beside the server, no part of it
                    m["aside_cpu"] = aside_s / span
                cr.runs.append(m)
                dead = _dead(peer)
                if dead:
                    cr.first_error = cr.first_error or dead
                    stopped = True
                    break
            if stopped:
                break
        for cr in crs:
            for metric in cr.runs[0] if cr.runs else []:
                s = summarize([run[metric] for run in cr.runs])
                if s is not None:
                    cr.summary[metric] = s
            cr.bound = guess_bound(cr.summary, self.cores) if cr.ok else ""
        return crs

    def _calibrate(self, target: Target) -> tuple[list[GeneratorCase], str]:
        """Python raw vs aiohttp vs wrk, same loads, against nginx."""
        plan = self.plan
        large = max(plan.large_sizes)
        small = plan.small_sizes[0]
        loads = [
            (f"GET {fmt_size(large)} x1", JobSpec("get", 1, (large_key(large),), large)),
            (f"GET {fmt_size(large)} x4", JobSpec("get", 4, (large_key(large),), large)),
            (
                f"GET {fmt_size(small)} x64",
                JobSpec("get", 64, small_keys(small, plan.small_objects), small),
            ),
        ]
        # Only loads whose objects this run wrote (e.g. not with `cache` alone).
        have = {o.key for o in objects_for(self.cases)}
        loads = [(label, spec) for label, spec in loads if set(spec.keys) <= have]
        wrk = find_tool("wrk", self.bin_dir)
        out: list[GeneratorCase] = []
        for label, spec in loads:
            gens: list[str] = ["python-raw", "python-aiohttp"] + (["wrk"] if wrk else [])
            for gen in gens:
                runs: list[dict[str, float]] = []
                # Quick mode: one run each (the calibration is not the benchmark).
                for i in range(plan.runs if plan.mode == "full" else 1):
                    if gen == "wrk":
                        assert wrk is not None
                        # One URL (wrk rotates none): same size, same server work.
                        url = target.plain_url(spec.keys[0])
                        r = run_wrk(wrk, url, spec.concurrency, plan.duration_s)
                    else:
                        client: ClientKind = "raw" if gen == "python-raw" else "aiohttp"
                        job = spec.job(target, plan.duration_s, plan.max_requests, i, client)
                        r = self.gen.run(job)
                    runs.append(run_metrics(r, 0.0))
                out.append(
                    GeneratorCase(
                        label,
                        gen,
                        summarize([x["gbps"] for x in runs]),
                        summarize([x["rps"] for x in runs]),
                        summarize([x["client_cpu"] for x in runs]),
                        int(sum(x["errors"] for x in runs)),
                    )
                )
        return out, calibration_note(out, wrk is not None)


def calibration_note(cases: list[GeneratorCase], have_wrk: bool) -> str:
    by = {(c.label, c.generator): c for c in cases}
    notes = []
    for label in dict.fromkeys(c.label for c in cases):
        raw = by.get((label, "python-raw"))
        ref = by.get((label, "wrk")) if have_wrk else None
        aio = by.get((label, "python-aiohttp"))
        if raw is None or raw.rps is None or raw.gbps is None:
            continue
        part = f"{label}: python-raw {raw.gbps.median:.2f} GB/s {raw.rps.median:,.0f} req/s"
        if raw.client_cpu is not None:
            part += f" (client CPU {raw.client_cpu.median:.2f} core)"
        if ref is not None and ref.rps is not None and ref.rps.median > 0:
            part += f", {raw.rps.median / ref.rps.median:.0%} of wrk"
        if aio is not None and aio.rps is not None and aio.rps.median > 0:
            part += f", {raw.rps.median / aio.rps.median:.1f}x aiohttp's client"
        notes.append(part)
    return "; ".join(notes)


def compute_ratios(results: Results, subject: str) -> dict[str, dict[str, dict[str, float]]]:
    peers = {p.name: p for p in results.peers if p.status == "ok"}
    subj = peers.get(subject)
    out: dict[str, dict[str, dict[str, float]]] = {}
    if subj is None:
        return out
    for case_id, sc in subj.cases.items():
        for metric in sc.shown:
            if metric not in sc.summary:
                continue
            mine = sc.summary[metric].median
            for name, pr in peers.items():
                if name == subject or case_id not in pr.cases:
                    continue
                other = pr.cases[case_id].summary.get(metric)
                if other is None or other.median <= 0:
                    continue
                out.setdefault(case_id, {}).setdefault(metric, {})[name] = mine / other.median
    return out


def compute_overhead(results: Results, cases: list[Case]) -> list[OverheadRow]:
    """through / direct for every figure of every gateway peer, with goals."""
    goals: dict[tuple[str, str], Goal] = {(c.id, g.metric): g for c in cases for g in c.goals}
    rows: list[OverheadRow] = []
    for pr in results.peers:
        if pr.status != "ok" or not pr.direct:
            continue
        for cid in results.case_order:
            through, direct = pr.cases.get(cid), pr.direct.get(cid)
            if through is None or direct is None:
                continue
            for metric in through.shown:
                t, d = through.summary.get(metric), direct.summary.get(metric)
                ratio = t.median / d.median if t and d and d.median > 0 else None
                delta = t.median - d.median if t and d else None
                row = OverheadRow(pr.name, cid, metric, d, t, ratio, delta)
                goal = goals.get((cid, metric))
                if goal is not None:
                    row.goal = goal.describe()
                    row.met = goal.met(d.median, t.median) if t and d else False
                rows.append(row)
    return rows


def compute_peer_goals(results: Results, cases: list[Case]) -> list[PeerGoalRow]:
    """Each case's peer goals where its subject ran (the reference may not)."""
    peers = {p.name: p for p in results.peers if p.status == "ok"}
    rows: list[PeerGoalRow] = []
    for case in cases:
        for g in case.peer_goals:
            subject = g.subject or results.subject  # "": the run's subject
            subj = peers.get(subject)
            if subj is None or subject == g.reference or case.id not in subj.cases:
                continue
            ref = peers.get(g.reference)
            v = subj.cases[case.id].summary.get(g.metric)
            rcr = ref.cases.get(case.id) if ref is not None else None
            rv = rcr.summary.get(g.metric) if rcr is not None else None
            ratio = v.median / rv.median if v and rv and rv.median > 0 else None
            # Without the reference's figure the goal is not judged (None).
            met: bool | None = None
            if rv is not None and g.ratio_min is not None:
                met = v is not None and g.met(v.median, rv.median) is True
            rows.append(PeerGoalRow(case.id, g.metric, subject, g.reference, v, rv,
                                    ratio, g.text if g.ratio_min is not None else "", met))  # fmt: skip
    return rows


def ratio_direction(metric: str) -> str:
    return "lower is better" if metric in LOWER_IS_BETTER else "higher is better"


@dataclass(frozen=True)
class Leg:
    """Where one leg of a case sends its load ("" for ordinary peers)."""

    name: str
    target: Target


def _backing(peer: Peer) -> ProcessPeer | None:
    """The backing store a gateway or cache peer runs beside it, if any."""
    backing = getattr(peer, "backing", None)
    return backing if isinstance(backing, ProcessPeer) else None


def _monitors(peer: Peer) -> list[TreeMonitor | None]:
    """The peer's process trees: its own first, then its other nodes' (a
    cluster), then its backing store's."""
    out = [peer.monitor, *(n.monitor for n in peer.extra_nodes())]
    backing = _backing(peer)
    if backing is not None:
        out.append(backing.monitor)
    return out


def _cpu(m: TreeMonitor | None) -> float:
    return m.cpu_seconds() if m is not None else 0.0


def _dead(peer: Peer) -> str:
    procs: list[ProcessPeer] = []
    if isinstance(peer, ProcessPeer):
        procs.append(peer)
    procs += peer.extra_nodes() + peer.aside()
    backing = _backing(peer)
    if backing is not None:
        procs.append(backing)
    for p in procs:
        if p.proc is not None:
            rc = p.proc.poll()
            if rc is not None:
                return f"{p.name} exited with {rc}: {tail(p.log)}"
    return ""


__all__ = ["BUCKET", "CaseResult", "PeerResult", "Results", "Runner"]

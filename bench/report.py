"""Presenting results: the table, the JSON file, the comparison plot.

The table is Markdown (it pastes into RESULTS.md unchanged): one row per
case and figure, one column per peer with "median (min-max)", then the
ratio columns subject / peer. Memory (peak RSS of each server's process
tree) closes the table. NaN never reaches the JSON: missing figures are null.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from nearstore.bench.runner import CaseResult, Results, ratio_direction
from nearstore.bench.scenarios import LOWER_IS_BETTER, METRIC_UNITS, NGINX_CACHE
from nearstore.bench.stats import Stat
from nearstore.bench.verdicts import count_met, verdict

PEER_ORDER = ["nginx", "nginx-cache+seaweedfs", "seaweedfs", "moto"]


def _fmt(metric: str, v: float) -> str:
    if math.isnan(v):
        return "-"
    if metric == "gbps":
        return f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"
    if metric == "rps":
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def fmt_stat(metric: str, s: Stat | None) -> str:
    if s is None:
        return "-"
    if s.n == 1 or s.min == s.max:
        return _fmt(metric, s.median)
    return f"{_fmt(metric, s.median)} ({_fmt(metric, s.min)}-{_fmt(metric, s.max)})"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}" if r >= 0.1 else f"{r:.2g}"


def fmt_bytes(n: int) -> str:
    if n <= 0:
        return "-"
    return f"{n / (1 << 20):,.0f} MiB" if n >= 10 << 20 else f"{n / (1 << 20):.1f} MiB"


def peer_columns(results: Results) -> list[str]:
    names = [p.name for p in results.peers]
    ordered = [n for n in PEER_ORDER if n in names]
    ordered += [n for n in names if n not in ordered and n != results.subject]
    if results.subject in names:
        ordered.append(results.subject)
    return ordered


def table(results: Results) -> str:
    cols = peer_columns(results)
    peers = {p.name: p for p in results.peers}
    subject = results.subject
    others = [c for c in cols if c != subject] if subject in peers else []
    head = ["scenario", "case", "figure", *cols, *(f"{subject}/{o}" for o in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    footnotes: list[str] = []
    case_meta: dict[str, CaseResult] = {}
    for p in results.peers:
        for cid, cr in p.cases.items():
            case_meta.setdefault(cid, cr)
    for cid in results.case_order:
        meta = case_meta.get(cid)
        if meta is None:
            continue
        for i, metric in enumerate(meta.shown):
            unit = METRIC_UNITS.get(metric, metric)
            row = [meta.scenario if i == 0 else "", meta.label if i == 0 else "", unit]
            for c in cols:
                pr = peers[c]
                got = pr.cases.get(cid)
                if pr.status == "skipped":
                    row.append("skipped")
                elif got is None:
                    row.append("failed" if pr.status == "failed" else "-")
                else:
                    cell = fmt_stat(metric, got.summary.get(metric))
                    if i == 0 and got.errors:
                        footnotes.append(f"{c} {cid}: {got.errors} errors: {got.first_error}")
                        cell += " !"
                    row.append(cell)
            for o in others:
                r = results.ratios.get(cid, {}).get(metric, {}).get(o)
                row.append(fmt_ratio(r))
            lines.append("| " + " | ".join(row) + " |")
    mem = ["memory", "peak RSS", "MiB"]
    for c in cols:
        pr = peers[c]
        procs = f" ({pr.processes} proc)" if pr.processes > 1 else ""
        mem.append(fmt_bytes(pr.peak_rss_bytes) + procs if pr.status != "skipped" else "skipped")
    mem += [""] * len(others)
    lines.append("| " + " | ".join(mem) + " |")
    out = "\n".join(lines)
    notes = [f"- {p.name} {p.status}: {p.reason}" for p in results.peers if p.status != "ok"]
    if notes:
        out += "\n\n" + "\n".join(notes)
    if footnotes:
        out += "\n\n" + "\n".join(f"- ! {f[:300]}" for f in footnotes)
    return out


def cpu_table(results: Results) -> str:
    """Cores busy per case: load generator / server tree / whole machine."""
    cols = [p for p in peer_columns(results)]
    peers = {p.name: p for p in results.peers}
    lines = [
        "| case | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for cid in results.case_order:
        cells = []
        for c in cols:
            cr = peers[c].cases.get(cid)
            if cr is None or "server_cpu" not in cr.summary:
                cells.append("-")
                continue
            server = ("gateway_cpu", "backing_cpu") if "gateway_cpu" in cr.summary else (
                "server_cpu",)  # fmt: skip
            parts = [cr.summary.get(m) for m in ("client_cpu", *server, "machine_cpu")]
            cells.append("/".join("?" if s is None else f"{s.median:.2f}" for s in parts))
        lines.append(f"| {cid} | " + " | ".join(cells) + " |")
    return (
        "CPU, cores busy (median): load generator / server processes / whole machine "
        f"(of {results.machine.get('cores', '?')}); a peer with a backing store beside it "
        "shows load generator / front (nearstore or nginx) / backing store / whole machine:"
        "\n\n" + "\n".join(lines)
    )


@dataclass(frozen=True)
class CpuTarget:
    """Work per server CPU-second the subject must reach on a case: at least
    `floor`, and at least `share` x the rate per CPU-second of the first of
    `references` the run has (if any). floor None: the figure it is set
    against was not recorded; the row says `text` and is not judged."""

    floor: float | None
    share: float | None = None
    references: tuple[str, ...] = ("nginx",)
    text: str = ""


# 64 KiB PUTs per server CPU-second before issue 14, which asks for twice
# as many. bench/RESULTS.md records none: its full run has the PUT's req/s
# ("put | 64 KiB x16", 752) and the server's cores ("What limits each
# figure", 0.89) apart, never the per-CPU figure, so none is invented here.
PUT_SMALL_PER_CPU_BEFORE: float | None = None

# Case id prefix -> its per-core target. The small-GET floor (the hot-path
# issue) holds for warm cache hits of the same sizes too (issue 14), against
# nginx proxy_cache where the run has it, else nginx static.
_SMALL = CpuTarget(6000.0, 0.3)
_CACHED = CpuTarget(6000.0, 0.3, (NGINX_CACHE, "nginx"))
PER_CPU_TARGETS: dict[str, CpuTarget] = {
    "small/64 KiB": _SMALL,
    "small/4 KiB": _SMALL,
    "cache/warm 64 KiB": _CACHED,
    "cache/warm 4 KiB": _CACHED,
    "put/64 KiB": CpuTarget(
        None if PUT_SMALL_PER_CPU_BEFORE is None else 2 * PUT_SMALL_PER_CPU_BEFORE,
        references=(),
        text="2 x the figure before issue 14 (not recorded)",
    ),
}


def per_cpu_target(cid: str) -> CpuTarget | None:
    return next((t for prefix, t in PER_CPU_TARGETS.items() if cid.startswith(prefix)), None)


def judge_per_cpu(
    target: CpuTarget, mine: float, got: dict[str, float | None]
) -> tuple[str, bool | None]:
    """(target text, met) of the subject's figure per CPU-second `mine`
    against `target`, `got` the run's peers' figures; None: not judged."""
    if target.floor is None:
        return target.text, None
    ref = next((r for r in target.references if got.get(r)), None)
    text = f">= {target.floor:,.0f}"
    if ref is None and target.share is not None and target.references:
        text += f" ({target.share:g} x {' or '.join(target.references)}: not measured)"
    ok = mine >= target.floor
    if ref is not None and target.share is not None:
        theirs = got[ref]
        assert theirs is not None
        text += f" and >= {target.share:g} x {ref}"
        ok = ok and mine >= target.share * theirs
    return text, ok


def per_cpu(cr: CaseResult) -> float | None:
    """The case's headline figure per CPU-second of the server under test
    (the front alone where a backing store runs beside it): the median of
    the runs' ratios."""
    cpu_key = "gateway_cpu" if "gateway_cpu" in cr.summary else "server_cpu"
    vals = sorted(r[cr.headline] / r[cpu_key] for r in cr.runs
                  if r.get(cpu_key) and cr.headline in r and not math.isnan(r[cr.headline]))
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def per_cpu_table(results: Results) -> str:
    """Each case's headline figure per server CPU-second, every peer, with
    the subject's ratios and the per-core targets met or not: on 2 shared
    cores the load generator caps the totals, the work per core it does not."""
    cols = peer_columns(results)
    peers = {p.name: p for p in results.peers}
    subject = results.subject
    others = [c for c in cols if c != subject] if subject in peers else []
    head = ["case", "figure per server CPU-s", *cols, *(f"{subject}/{o}" for o in others), "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = per_cpu_verdicts(results)
    for cid in results.case_order:
        got = per_cpu_figures(results, cid)
        if not any(v is not None for v in got.values()):
            continue
        meta = next(peers[c].cases[cid] for c in got)
        metric = meta.headline
        if metric in LOWER_IS_BETTER:
            continue  # a latency per CPU-second means nothing
        row = [cid, METRIC_UNITS.get(metric, metric)]
        row += [_fmt(metric, v) if (v := got.get(c)) is not None else "-" for c in cols]
        mine = got.get(subject)
        for o in others:
            theirs = got.get(o)
            row.append(fmt_ratio(mine / theirs) if mine is not None and theirs else "-")
        text, ok = verdicts.get(cid, ("", None))
        row += [text, verdict(ok) if cid in verdicts else ""]
        lines.append("| " + " | ".join(row) + " |")
    out = "Work per server CPU-second (median of the runs' figure / server cores busy; a peer with a " \
          "backing store counts its front alone):\n\n" + "\n".join(lines)
    if verdicts:
        out += "\n\nPer-core targets " + count_met([ok for _, ok in verdicts.values()])
    return out


def per_cpu_figures(results: Results, cid: str) -> dict[str, float | None]:
    """Each peer's headline figure per server CPU-second on one case."""
    return {p.name: per_cpu(p.cases[cid]) for p in results.peers if cid in p.cases}


def per_cpu_verdicts(results: Results) -> dict[str, tuple[str, bool | None]]:
    """case id -> (target text, met) of the subject's per-core targets."""
    out: dict[str, tuple[str, bool | None]] = {}
    for cid in results.case_order:
        target = per_cpu_target(cid)
        got = per_cpu_figures(results, cid) if target is not None else {}
        if target is not None and (mine := got.get(results.subject)) is not None:
            out[cid] = judge_per_cpu(target, mine, got)
    return out


def all_verdicts(results: Results) -> list[bool | None]:
    """Every target of the run: through/direct, between peers, per core."""
    out: list[bool | None] = [r.met for r in results.overhead if r.goal]
    out += [r.met for r in results.peer_goals if r.goal]
    return out + [ok for _, ok in per_cpu_verdicts(results).values()]


def counters_table(results: Results) -> str:
    """Cache counters per run (median) of the peers that export them."""
    lines: list[str] = []
    for p in results.peers:
        rows = []
        for cid in results.case_order:
            cr = p.cases.get(cid)
            if cr is None or "cache_hits" not in cr.summary:
                continue
            hits, misses = cr.summary["cache_hits"].median, cr.summary["cache_misses"].median
            back = cr.summary.get("backing_bytes")
            mib = f"{back.median / (1 << 20):,.0f}" if back is not None else "?"
            rows.append(f"| {cid} | {hits:,.0f} | {misses:,.0f} | {mib} |")
        if rows:
            lines += [
                f"{p.name}, its cache counters per measured run (median):",
                "",
                "| case | hits | misses | MiB from the backing store |",
                "|---|---|---|---|",
                *rows,
                "",
            ]
    return "\n".join(lines).rstrip()


def peer_goal_table(results: Results) -> str:
    """Targets between peers (the `cache` and `put` scenarios): subject / reference."""
    if not results.peer_goals:
        return ""
    lines = [
        "Targets between peers (same run, same case; subject / reference of the median):",
        "",
        "| case | figure | subject | reference | subject's | reference's | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.peer_goals:
        met = "" if r.goal == "" else (
            "not judged (reference missing)" if r.met is None else verdict(r.met))  # fmt: skip
        lines.append(
            f"| {r.case} | {METRIC_UNITS.get(r.metric, r.metric)} | {r.subject} | {r.reference} | "
            f"{fmt_stat(r.metric, r.value)} | {fmt_stat(r.metric, r.ref_value)} | "
            f"{fmt_ratio(r.ratio)} | {r.goal or '(no target)'} | {met} |"
        )
    targets = [r.met for r in results.peer_goals if r.goal]
    if targets:
        lines += ["", "Targets " + count_met(targets)]
    return "\n".join(lines)


def overhead_table(results: Results) -> str:
    """Gateway peers: each figure direct from the backing store and through
    nearstore, through/direct, the goal and whether it is met, and the CPU of
    both legs (client / gateway / backing store / whole machine)."""
    if not results.overhead:
        return ""
    peers = {p.name: p for p in results.peers}
    out: list[str] = []
    for name in dict.fromkeys(r.peer for r in results.overhead):
        pr = peers[name]
        # A proxy standing in for the network (the `remote` peer): its
        # cores shown apart, counted in neither g nor b.
        a = ("aside_cpu",) if any("aside_cpu" in cr.summary for cr in pr.cases.values()) else ()
        ab = "/a" if a else ""
        lines = [
            f"Through nearstore vs direct ({name}: nearstore fronting {pr.backing}, "
            "both legs alternating in the same run):",
            "",
            "| case | figure | direct | through | through/direct | through-direct | target "
            f"| met | CPU direct c/b{ab}/m | CPU through c/g/b{ab}/m |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        last = ""
        for r in (r for r in results.overhead if r.peer == name):
            first = r.case != last
            last = r.case
            cpu_d = cpu_t = ""
            if first:
                d, t = pr.direct.get(r.case), pr.cases.get(r.case)
                cpu_d = _cores(d, ("client_cpu", "backing_cpu", *a, "machine_cpu"))
                cpu_t = _cores(t, ("client_cpu", "gateway_cpu", "backing_cpu", *a, "machine_cpu"))
            delta = "-" if r.delta is None else _fmt(r.metric, r.delta)
            met = "" if r.met is None else verdict(r.met)
            lines.append(
                f"| {r.case if first else ''} | {METRIC_UNITS.get(r.metric, r.metric)} | "
                f"{fmt_stat(r.metric, r.direct)} | {fmt_stat(r.metric, r.through)} | "
                f"{fmt_ratio(r.ratio)} | {delta} | {r.goal} | {met} | {cpu_d} | {cpu_t} |"
            )
        goals = [r for r in results.overhead if r.peer == name and r.met is not None]
        if goals:
            n_met = sum(1 for r in goals if r.met)
            lines += ["", f"Targets met: {n_met} of {len(goals)}."]
        aside = ", a the throttling proxy (the network's stand-in: in neither g nor b)"
        lines += [
            "",
            "CPU in cores (median): c client (load generator), g nearstore, b backing store"
            f"{aside if a else ''}, m whole machine (of {results.machine.get('cores', '?')}).",
        ]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _cores(cr: CaseResult | None, metrics: tuple[str, ...]) -> str:
    if cr is None:
        return "-"
    vals = [cr.summary.get(m) for m in metrics]
    return "/".join("?" if s is None else f"{s.median:.2f}" for s in vals)


def generator_table(results: Results) -> str:
    if not results.generator:
        return "generator calibration: not run (needs the nginx peer; --no-calibrate skips it)"
    lines = [
        "| load (against nginx) | generator | GB/s | req/s | client CPU (cores) |",
        "|---|---|---|---|---|",
    ]
    for g in results.generator:
        lines.append(
            f"| {g.label} | {g.generator} | {fmt_stat('gbps', g.gbps)} | "
            f"{fmt_stat('rps', g.rps)} | {fmt_stat('p50_ms', g.client_cpu)} |"
        )
    return "\n".join(lines) + "\n\n" + results.generator_note


def headline(results: Results) -> list[str]:
    """Per scenario and figure: geometric mean of subject / peer over cases."""
    subj = next((p for p in results.peers if p.name == results.subject), None)
    if subj is None or subj.status != "ok":
        why = subj.reason if subj is not None else "not selected"
        return [f"no ratios: {results.subject} did not run ({why})"]
    out = []
    groups = list(dict.fromkeys((cr.scenario, cr.headline) for cr in subj.cases.values()))
    for sc, metric in groups:
        parts = []
        for other in peer_columns(results):
            if other == results.subject:
                continue
            vals = [
                r
                for cid, cr in subj.cases.items()
                if (cr.scenario, cr.headline) == (sc, metric)
                and (r := results.ratios.get(cid, {}).get(metric, {}).get(other)) is not None
                and r > 0
            ]
            if vals:
                g = math.exp(sum(math.log(v) for v in vals) / len(vals))
                parts.append(f"/{other} {fmt_ratio(g)}")
        if parts:
            unit = METRIC_UNITS.get(metric, metric)
            out.append(
                f"{sc} ({unit}, {ratio_direction(metric)}): {results.subject} " + ", ".join(parts)
            )
    return out


def render(results: Results) -> str:
    m = results.machine
    head = (
        f"nearstore bench ({results.plan.mode}): {m.get('cores')} cores, "
        f"{m.get('memory', '?')}, {m.get('cpu', '?')}; {results.plan.runs} runs per case "
        f"after {'a warm-up' if results.plan.warmup else 'no warm-up'}, "
        f"{results.plan.duration_s:g} s each; median (min-max); took {results.elapsed_s:.0f} s"
    )
    lines = [head, "", table(results)]
    notes = {cr.id: cr.note for p in results.peers for cr in p.cases.values() if cr.note}
    lines += [f"- {cid}: {note}" for cid, note in notes.items()]
    lines += ["", cpu_table(results)]
    lines += ["", per_cpu_table(results)]
    overhead = overhead_table(results)
    if overhead:
        lines += ["", overhead]
    goals = peer_goal_table(results)
    if goals:
        lines += ["", goals]
    counters = counters_table(results)
    if counters:
        lines += ["", counters]
    lines += ["", generator_table(results)]
    lines += ["", "Headline ratios:"]
    lines += [f"- {h}" for h in headline(results)]
    verdicts = all_verdicts(results)
    if verdicts:
        lines += ["", "All targets of this run " + count_met(verdicts)]
    return "\n".join(lines)


def _clean(obj: object) -> object:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 6)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def to_json(results: Results) -> dict[str, object]:
    d = dataclasses.asdict(results)
    d["headline"] = headline(results)
    d["lower_is_better"] = sorted(LOWER_IS_BETTER)
    cleaned = _clean(d)
    assert isinstance(cleaned, dict)
    return cleaned


def write_json(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results), indent=1) + "\n")


def write_plot(results: Results, path: Path) -> str | None:
    """Draw one panel per case (headline figure, min-max bars); None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    cols = [c for c in peer_columns(results)]
    peers = {p.name: p for p in results.peers}
    cases = results.case_order
    ncols = 4
    nrows = max(1, math.ceil(len(cases) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    colors = {
        "nginx": "#777777",
        "seaweedfs": "#3b7dd8",
        "moto": "#e0a030",
        "nearstore": "#2a9d55",
        "nginx-cache+seaweedfs": "#aaaaaa",
        "nearstore-cache+seaweedfs": "#1f7a42",
    }
    for ax, cid in zip(axes.flat, cases, strict=False):
        metric = ""
        xs, heights, lo, hi, color = [], [], [], [], []
        for c in cols:
            res = peers[c].cases.get(cid)
            if res is None:
                continue
            metric = res.headline
            s = res.summary.get(metric)
            if s is None:
                continue
            xs.append(c)
            heights.append(s.median)
            lo.append(s.median - s.min)
            hi.append(s.max - s.median)
            color.append(colors.get(c, "#999999"))
        ax.bar(xs, heights, yerr=[lo, hi], color=color, capsize=3)
        if metric in LOWER_IS_BETTER and heights and min(heights) > 0:
            ax.set_yscale("log")  # latencies span orders of magnitude
        ax.set_title(f"{cid}", fontsize=9)
        ax.set_ylabel(METRIC_UNITS.get(metric, metric), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    fig.suptitle(f"nearstore bench ({results.plan.mode}); error bars: min-max of runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

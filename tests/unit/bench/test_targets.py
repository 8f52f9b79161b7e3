"""Issue 14's targets: attached to the right cases with the right thresholds,
judged per core where they are per core, and the peers a special scenario
picks without --peers. Pure functions only: no server starts here."""

from __future__ import annotations

from nearstore.bench.cli import SMOKE_PEERS, default_peers
from nearstore.bench.config import PRESETS, Plan
from nearstore.bench.report import PER_CPU_TARGETS, judge_per_cpu, per_cpu_target, per_cpu_verdicts
from nearstore.bench.runner import CaseResult, PeerResult, Results
from nearstore.bench.scenarios import CACHE_SUBJECT, NGINX_CACHE, Case, select
from nearstore.bench.verdicts import RatioTarget, count_met, ratio_table, verdict

MiB = 1 << 20
# Large cache objects, so that the warm large-object targets are attached.
PLAN = PRESETS["quick"]


def _goals(case: Case) -> dict[str, float | None]:
    return {g.reference: g.ratio_min for g in case.peer_goals}


def test_cache_cold_targets() -> None:
    for plan in PRESETS.values():
        for c in (c for c in select(["cache"], plan) if c.cold):
            assert {g.subject for g in c.peer_goals} == {CACHE_SUBJECT}
            assert _goals(c) == {NGINX_CACHE: 1.2, "seaweedfs": 0.9}


def test_cache_warm_large_targets_1_and_4_streams() -> None:
    warm = [c for c in select(["cache"], PLAN) if c.prime and c.headline == "gbps"]
    large = [c for c in warm if c.spec.object_size >= 16 * MiB]
    assert {c.spec.concurrency for c in large} == {1, 4}
    for c in large:
        assert _goals(c) == {"nginx": 0.9, NGINX_CACHE: 1.0, "nearstore": 0.95}
    for c in warm:
        if c.spec.object_size < 16 * MiB:
            assert not c.peer_goals


def test_cache_small_targets_are_per_core() -> None:
    """The warm small cases' req/s against nginx is shown, not judged; their
    target is the small scenario's per core, against nginx proxy_cache
    first."""
    for plan in PRESETS.values():
        small = [c for c in select(["cache"], plan) if c.headline == "rps"]
        assert small
        for c in small:
            assert all(g.ratio_min is None for g in c.peer_goals)
            target = per_cpu_target(c.id)
            assert target is not None and (target.floor, target.share) == (6000.0, 0.3)
            assert target.references == (NGINX_CACHE, "nginx")
    assert per_cpu_target("cache/warm 64 KiB x16") == PER_CPU_TARGETS["cache/warm 64 KiB"]
    assert per_cpu_target("cache/warm 16 MiB x1") is None


def test_proxy_targets() -> None:
    cases = select(["proxy"], PLAN)
    large = [c for c in cases if c.headline == "gbps"]
    small = [c for c in cases if c.headline == "p50_ms"]
    assert large and len(small) == 1
    for c in large:
        assert [(g.metric, g.ratio_min) for g in c.goals] == [("gbps", 0.9)]
    assert [(g.metric, g.delta_max) for g in small[0].goals] == [("p50_ms", 0.5)]
    assert small[0].spec.object_size == 4096
    g = small[0].goals[0]
    assert g.met(1.0, 1.5) and not g.met(1.0, 1.51)


def test_put_targets() -> None:
    for plan in PRESETS.values():
        cases = select(["put"], plan)
        multipart = [c for c in cases if c.spec.put_part_size]
        assert multipart
        for c in multipart:
            assert [(g.subject, g.reference, g.ratio_min) for g in c.peer_goals] == [("", "nginx", 0.5)]
    target = per_cpu_target("put/64 KiB x16")
    assert target is not None
    # No 64 KiB PUT per CPU-second in bench/RESULTS.md: shown, not judged.
    assert judge_per_cpu(target, 900.0, {"nginx": 5000.0}) == (
        "2 x the figure before issue 14 (not recorded)", None)


def test_judge_per_cpu_against_the_first_reference_present() -> None:
    target = PER_CPU_TARGETS["cache/warm 64 KiB"]
    assert judge_per_cpu(target, 7000.0, {NGINX_CACHE: 20000.0, "nginx": 30000.0}) == (
        f">= 6,000 and >= 0.3 x {NGINX_CACHE}", True)
    assert judge_per_cpu(target, 7000.0, {"nginx": 30000.0})[1] is False  # 0.23 x nginx
    assert judge_per_cpu(target, 5000.0, {}) == (
        f">= 6,000 (0.3 x {NGINX_CACHE} or nginx: not measured)", False)


def _result(name: str, rps: float, cpu: float, cid: str = "cache/warm 4 KiB x4") -> PeerResult:
    pr = PeerResult(name=name, description="", status="ok")
    scenario, label = cid.split("/", 1)
    pr.cases[cid] = CaseResult(id=cid, scenario=scenario, label=label, headline="rps", shown=["rps"],
                               note="", runs=[{"rps": rps, "server_cpu": cpu}])
    return pr


def test_per_cpu_target_applies_to_cache_small_cases() -> None:
    cid = "cache/warm 4 KiB x4"
    results = Results(plan=Plan(), command="", machine={}, subject=CACHE_SUBJECT, started="",
                      case_order=[cid])
    results.peers = [_result(CACHE_SUBJECT, 3500.0, 0.5), _result(NGINX_CACHE, 20000.0, 1.0)]
    assert per_cpu_verdicts(results) == {cid: (f">= 6,000 and >= 0.3 x {NGINX_CACHE}", True)}
    results.peers[1] = _result(NGINX_CACHE, 30000.0, 1.0)  # 7,000 < 0.3 x 30,000
    assert per_cpu_verdicts(results)[cid][1] is False


def test_default_peers_of_the_special_scenarios() -> None:
    peers, subject = default_peers(["cache"], smoke=False)
    assert subject == CACHE_SUBJECT == peers[0]
    assert set(peers) == {CACHE_SUBJECT, NGINX_CACHE, "seaweedfs", "nginx", "nearstore"}
    assert default_peers(["cache"], smoke=True) == (peers, subject)
    assert default_peers(["proxy"], smoke=False) == (["nearstore+seaweedfs"], "nearstore+seaweedfs")
    remote = "nearstore-cache+remote-seaweedfs"
    assert default_peers(["remote"], smoke=False) == ([remote], remote)
    # The per-node scenarios keep the usual peers and nearstore as subject.
    assert default_peers(["small"], smoke=True) == (SMOKE_PEERS, "nearstore")
    peers, subject = default_peers(["put", "proxy"], smoke=True)
    assert peers == [*SMOKE_PEERS, "nearstore+seaweedfs"] and subject == "nearstore"


def test_verdicts() -> None:
    assert [verdict(v) for v in (True, False, None)] == ["met", "**not met**", "n/a"]
    assert count_met([True, False, None]) == "met: 1 of 2. Not judged: 1."
    t = RatioTarget("x >= 0.9 x y", "x", "y", 0.9, 90.0, 100.0)
    assert t.met and not RatioTarget("", "x", "y", 0.9, 89.0, 100.0).met
    assert RatioTarget("", "x", "y", 0.9, 89.0, None).met is None
    table = ratio_table([t], "GB/s")
    assert "| x >= 0.9 x y | x | y | 90 | 100 | 0.90 | met |" in table
    assert table.endswith("Targets met: 1 of 1.")

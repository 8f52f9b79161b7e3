"""The loader bench's hint rows (bench/loader.py, issue 17): the targets,
the node's counters, the rank processes, and the section end to end on a
few tiny shards (seconds: never the benchmark)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nearstore.bench import loader
from nearstore.clients.datasets import LocalSource, TarDataset

from ..clients.test_datasets import make_tar

REPO = Path(__file__).resolve().parents[3]


def test_hint_targets() -> None:
    results = {"first epoch, hints on": [90.0, 80.0, 100.0], "warm epoch": [100.0],
               "boto3 -> throttled store": [40.0], "first epoch, hints on, 2 ranks x 2 workers": [10.0]}
    goals = loader.hint_targets(results, ["", ", 2 ranks x 2 workers"])
    assert [(g.ratio, g.met) for g in goals[:2]] == [(0.9, True), (90 / 40, False)]
    assert [g.met for g in goals[2:]] == [None, None]  # not measured: not judged


@pytest.fixture
def metrics_endpoint() -> Iterator[str]:
    text = (b"# HELP nearstore_cache_hits_total x\nnearstore_cache_hits_total 30.0\n"
            b"nearstore_cache_misses_total 10.0\nnearstore_prefetch_chunks_total 7.0\n"
            b"nearstore_prefetch_hints_created 1.7e9\n")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/_nearstore/metrics" else 404)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_node_counters_and_hit_ratio(metrics_endpoint: str) -> None:
    after = loader.node_counters(metrics_endpoint)
    assert after["hits"] == 30 and after["misses"] == 10 and after["prefetched"] == 7
    assert after["prefetch_used"] == 0  # a counter the node has not shown yet
    before = dict.fromkeys(after, 0.0)
    assert loader.hit_ratio(before, after) == 0.75
    assert loader.hit_ratio(after, after) is None


def test_ranks_pass_reads_every_sample_once_across_ranks(tmp_path: Path) -> None:
    for s in range(6):
        members = [m for i in range(5) for m in ((f"{s}{i:02d}.bin", b"x" * 10), (f"{s}{i:02d}.cls", b"1"))]
        (tmp_path / f"s{s}.tar").write_bytes(make_tar(members))

    def make(rank: int, world: int) -> TarDataset[int]:
        return TarDataset(LocalSource(tmp_path), decode=loader.decode, rank=rank, world_size=world)

    n, secs = loader.ranks_pass(make, 2, 0)
    assert n == 30 and secs > 0


def test_smoke_hints_section(tmp_path: Path) -> None:
    """The hints section end to end: SeaweedFS behind the throttle, a node
    in front; every row measured, the 2x-cache epochs, the targets judged."""
    out = tmp_path / "loader.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nearstore.bench.loader", "--sections", "hints", "--samples", "60",
         "--shard-samples", "20", "--sample-size", "4KiB", "--runs", "1", "--ranks", "2", "--rank-workers", "1",
         "--big-epochs", "1", "--workdir", str(tmp_path), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    for sfx in ("", ", 2 ranks x 1 workers"):
        for leg in ("first epoch, hints off", "first epoch, hints on", "warm epoch", "boto3 -> throttled store"):
            assert doc["results"][leg + sfx] and all(v > 0 for v in doc["results"][leg + sfx]), leg + sfx
    assert doc["hint_counters"]["first epoch, hints off"][0]["hinted"] == 0  # hints=False sends none
    assert doc["hint_counters"]["first epoch, hints on"][0]["hinted"] > 0
    assert [(r["hints"], r["epoch"]) for r in doc["big_cache"]] == [(False, 0), (True, 0)]
    assert len(doc["targets"]) == 4 and all(t["met"] in (True, False) for t in doc["targets"])
    assert "| first epoch, hints on |" in proc.stdout and "Targets met:" in proc.stdout

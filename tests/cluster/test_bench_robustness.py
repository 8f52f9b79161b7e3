"""`nearstore bench faults` and `nearstore bench soak`, run small: the
commands start their own cluster (SeaweedFS, or moto where weed is
missing, and three nodes), and what they report must say that no client
got a wrong byte and no acknowledged write was lost.

Two of the cheapest faults (a failing backing store, a peer killed in the
middle of a chunk) and a 12-second soak: under a minute together on the
development machine. The full table is `nearstore bench faults`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str],
                                                                 dict[str, Any]]:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "nearstore.bench", *args, "--json", str(out),
                           "--workdir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.exists(), f"no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


@pytest.mark.timeout(110)
def test_faults_subset_serves_no_wrong_byte_and_loses_no_write(tmp_path: Path) -> None:
    proc, doc = _bench(tmp_path, "faults", "--faults", "backing-503,kill-peer-stream",
                       "--seconds", "1", timeout=100)
    rows = {r["fault"]: r for r in doc["rows"]}
    assert set(rows) == {"backing-503", "kill-peer-stream"}, proc.stdout
    for row in rows.values():
        assert not row["skipped"] and not row["harness_errors"], row
        assert row["requests"] > 0, row
        assert row["corrupt_bytes"] == 0 and row["lost_writes"] == 0, row
        assert row["passed"], row
    assert rows["backing-503"]["acked_writes"] > 0  # writes were made, and read back
    assert any("cut after" in n for n in rows["kill-peer-stream"]["notes"]), rows
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "| backing-503 |" in proc.stdout and "| kill-peer-stream |" in proc.stdout


@pytest.mark.timeout(90)
def test_a_short_soak_passes(tmp_path: Path) -> None:
    proc, doc = _bench(tmp_path, "soak", "--minutes", "0.2", "--clients", "6", timeout=80)
    assert doc["passed"] and proc.returncode == 0, proc.stdout
    assert doc["corrupt_bytes"] == 0 and doc["lost_writes"] == 0
    assert doc["requests"] > 0 and doc["intervals"]
    assert all(r > 0 for r in doc["rss_max_mib"]) and len(doc["rss_max_mib"]) == 3
    assert "PASS" in proc.stdout and "RSS MiB" in proc.stdout

"""The harness's side of the load generators.

`PythonGenerator` drives one ``python -m nearstore.bench.loadgen`` process (jobs over a
pipe, one JSON line each way). `run_wrk` runs Debian's wrk for a GET of
plain URLs; it is the compiled reference the Python generator is calibrated
against (see `bench.runner.calibrate`), not the default, because on this
machine the Python generator's raw client matches it (MEASURED at run time
and written to the JSON) and also does PUT, multipart, ranges and TTFB.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from nearstore.bench.loadgen import GetJob, PutJob, RunResult

_REPO_ROOT = Path(__file__).resolve().parent.parent
_GRACE_S = 120.0  # beyond the job's own bound: the last in-flight requests


def failed_result(why: str) -> RunResult:
    return RunResult(
        requests=0,
        bytes=0,
        elapsed_s=0.0,
        errors=1,
        first_error=why[:300],
        latency_ms=[],
        ttfb_ms=[],
        client_cpu_s=0.0,
    )


class PythonGenerator:
    """A long-lived load-generator process; restarted if it dies."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def _ensure(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
            )
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "nearstore.bench.loadgen"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                # `-m` puts the working directory first on sys.path: run from
                # the repository so that a stray bench.py elsewhere is not it.
                cwd=_REPO_ROOT,
                start_new_session=True,
            )
        return self._proc

    def start(self) -> None:
        self._ensure()

    def run(self, job: GetJob | PutJob) -> RunResult:
        proc = self._ensure()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            return failed_result("load generator died")
        line = _readline(proc.stdout, job["duration_s"] + _GRACE_S)
        if line is None:
            self.close()
            return failed_result("load generator did not answer in time (killed)")
        result: RunResult = json.loads(line)
        result["generator"] = "python-raw" if job.get("client") == "raw" else "python-aiohttp"
        if job["op"] == "put":
            result["generator"] = "python-aiohttp"
        return result

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def _readline(stream: IO[str], timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            line = stream.readline()
            return line or None


# ----------------------------------------------------------------------- wrk

# Only a done() hook: a Lua request() per request costs wrk most of its speed
# (10k instead of 50k req/s here), so wrk always asks for the URL it is given.
_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"errors":%d,' ..
    '"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(wrk: str, url: str, concurrency: int, duration_s: float) -> RunResult:
    """One wrk run on one URL (1 thread: one core, as the Python generator)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_SCRIPT)
        script = f.name
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
           "--timeout", "60s", "-s", script, url]  # fmt: skip
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        out = proc.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        os.unlink(script)
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            d = json.loads(line[len("WRKJSON ") :])
            elapsed = d["duration_us"] / 1e6
            return RunResult(
                requests=d["requests"],
                bytes=d["bytes"],
                elapsed_s=elapsed,
                errors=d["errors"],
                first_error="",
                # wrk gives percentiles, not samples: two stand-ins suffice
                # for p50/p99 of a single run.
                latency_ms=[d["p50_us"] / 1000] * 98 + [d["p99_us"] / 1000] * 2,
                ttfb_ms=[],
                client_cpu_s=usage.ru_utime + usage.ru_stime,
                generator="wrk",
            )
    return failed_result(f"wrk failed ({proc.returncode}): {out[-300:]}")

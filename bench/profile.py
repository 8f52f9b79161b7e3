"""Where a small GET's CPU goes: one nearstore process on the local store,
wrk (one thread, 32 connections) on a presigned 64 KiB GET, the server's CPU
from /proc, and, where py-spy is installed (``pip install py-spy``), its
sampled stacks summed into the top frames (self and inclusive).

    python -m nearstore.bench.profile OUTDIR [--seconds 10] [--no-spy] [--size 65536]

Prints GETs/s and GETs per server CPU-second; OUTDIR keeps wrk's output,
the raw stacks (``stacks.txt``) and the summary (``top.txt``).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3

from nearstore.bench.procs import TreeMonitor, free_ports

KEYS = {"NEARSTORE_ACCESS_KEY": "profile", "NEARSTORE_SECRET_KEY": "profile-secret-key"}


def summarize(stacks: Path, top: int = 25) -> str:
    """py-spy's raw (collapsed) stacks as the top frames, self and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        names = [f"{f.split(' (')[0]} ({f.split(' (')[-1].split(':')[0].rsplit('/', 1)[-1]})" for f in stack.split(";")]
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    lines = [f"samples: {total}", "", "self:"]
    lines += [f"{100 * c / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top * 2)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearstore.bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--size", type=int, default=64 * 1024)
    p.add_argument("--no-spy", action="store_true")
    args = p.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("needs wrk (apt-get install wrk, or nearstore bench --setup)", file=sys.stderr)
        return 2
    bin_dir = Path(sys.executable).parent
    spy = None if args.no_spy else (shutil.which("py-spy", path=f"{bin_dir}:{os.environ.get('PATH', '')}"))
    args.out.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with open(args.out / "node.log", "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "nearstore.cli", "serve", "--port", str(port), "--data-dir",
                                 str(args.out / "data"), "--log-level", "warning"],
                                env={**os.environ, **KEYS}, stdout=subprocess.DEVNULL, stderr=log)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/_nearstore/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEYS["NEARSTORE_ACCESS_KEY"],
                          aws_secret_access_key=KEYS["NEARSTORE_SECRET_KEY"], region_name="us-east-1")
        s3.create_bucket(Bucket="profile")
        s3.put_object(Bucket="profile", Key="obj", Body=os.urandom(args.size))
        signed = s3.generate_presigned_url("get_object", Params={"Bucket": "profile", "Key": "obj"}, ExpiresIn=3600)
        subprocess.run([wrk, "-t1", "-c32", "-d2s", signed], capture_output=True, check=False)  # warm-up
        monitor = TreeMonitor(node.pid)  # the bench's own CPU accounting, whole process tree
        before = monitor.cpu_seconds()
        sampler = None
        if spy:
            sampler = subprocess.Popen([spy, "record", "--pid", str(node.pid), "--duration", str(args.seconds),
                                        "--rate", "250", "--format", "raw", "--nonblocking",
                                        "--output", str(args.out / "stacks.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = subprocess.run([wrk, "-t1", "-c32", f"-d{args.seconds}s", signed], capture_output=True, text=True,
                             check=False)
        cpu = monitor.cpu_seconds() - before
        if sampler is not None:
            sampler.wait(60)
    finally:
        node.terminate()
        node.wait(30)
    (args.out / "wrk.txt").write_text(run.stdout)
    done = int(next(line for line in run.stdout.splitlines() if "requests in" in line).split()[0])
    print(f"{args.size} B GETs: {done / args.seconds:,.0f}/s, server CPU {cpu:.2f} s, "
          f"{done / cpu:,.0f} GETs per server CPU-second" + (" (sampled by py-spy)" if spy else ""))
    if spy and (args.out / "stacks.txt").exists():
        summary = summarize(args.out / "stacks.txt")
        (args.out / "top.txt").write_text(summary + "\n")
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

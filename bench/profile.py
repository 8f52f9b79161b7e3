"""Where a small request's CPU goes (GET, HEAD or PUT): one nearstore process on the local store,
wrk (one thread, 32 connections) on a presigned 64 KiB GET, the server's CPU
from /proc, and, where py-spy is installed (``pip install py-spy``), its
sampled stacks summed into the top frames (self and inclusive).

    python -m nearstore.bench.profile OUTDIR [--seconds 10] [--no-spy] [--size 65536]
        [--method GET|HEAD|PUT] [--hot-path on|off|both] [--workers N]

Prints requests/s and requests per server CPU-second, by default for the
hot path off and on (``[server] hot_path``), alternated twice, each on its
own node, so that the two are compared within one run; OUTDIR/N-MODE keeps
wrk's output, the raw stacks (``stacks.txt``) and the summary (``top.txt``).
With ``--workers N`` it also prints the first process's own share of the
CPU: on the hit path the workers should need nothing of it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import boto3
import botocore.config

from nearstore.bench.procs import TreeMonitor, cpu_seconds_of, free_ports

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


def measure(args: argparse.Namespace, out: Path, hot_path: bool, wrk: str, spy: str | None) -> tuple[float, float]:
    """One node, hot path on or off: (requests/s, requests per server CPU-second)."""
    out.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **KEYS, "NEARSTORE_HOT_PATH": "true" if hot_path else "false"}
    with open(out / "node.log", "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "nearstore.cli", "serve", "--port", str(port), "--data-dir",
                                 str(out / "data"), "--log-level", "warning", "--workers", str(args.workers)],
                                env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/_nearstore/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEYS["NEARSTORE_ACCESS_KEY"],
                          aws_secret_access_key=KEYS["NEARSTORE_SECRET_KEY"], region_name="us-east-1",
                          # SigV4, as the bench's targets sign (boto3 would presign V2 here).
                          config=botocore.config.Config(signature_version="s3v4"))
        s3.create_bucket(Bucket="profile")
        s3.put_object(Bucket="profile", Key="obj", Body=os.urandom(args.size))
        operation = {"GET": "get_object", "HEAD": "head_object", "PUT": "put_object"}[args.method]
        signed = s3.generate_presigned_url(operation, Params={"Bucket": "profile", "Key": "obj"}, ExpiresIn=3600)
        load = [wrk, "-t1", "-c32"]
        if args.method == "PUT":  # presigned: UNSIGNED-PAYLOAD, each PUT a whole new version, fsynced
            script = out / "put.lua"
            script.write_text(f'wrk.method = "PUT"\nwrk.body = string.rep("x", {args.size})\n')
            load += ["-s", str(script)]
        head = args.method == "HEAD"
        if head:
            _head_load(signed, 2.0)  # warm-up
        else:
            subprocess.run([*load, "-d2s", signed], capture_output=True, check=False)  # warm-up
        monitor = TreeMonitor(node.pid)  # the bench's own CPU accounting, whole process tree
        before = monitor.cpu_seconds()
        owner_before = cpu_seconds_of(node.pid)
        sampler = None
        if spy:
            sampler = subprocess.Popen([spy, "record", "--pid", str(node.pid), "--duration", str(args.seconds),
                                        "--rate", "250", "--format", "raw", "--nonblocking",
                                        "--output", str(out / "stacks.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if head:
            done = _head_load(signed, args.seconds)
        else:
            run = subprocess.run([*load, f"-d{args.seconds}s", signed], capture_output=True, text=True, check=False)
        cpu = monitor.cpu_seconds() - before
        owner_cpu = cpu_seconds_of(node.pid) - owner_before
        if sampler is not None:
            sampler.wait(60)
    finally:
        node.terminate()
        node.wait(30)
    if not head:
        (out / "wrk.txt").write_text(run.stdout)
        done = int(next(line for line in run.stdout.splitlines() if "requests in" in line).split()[0])
        non_2xx = [line for line in run.stdout.splitlines() if "Non-2xx" in line]
        if non_2xx:
            raise SystemExit(f"{out}: {non_2xx[0].strip()}")
    print(f"hot path {'on ' if hot_path else 'off'}: {args.size} B {args.method}s: {done / args.seconds:,.0f}/s, "
          f"server CPU {cpu:.2f} s, {done / cpu:,.0f} per server CPU-second"
          + (f", the first process {owner_cpu:.2f} s of it" if args.workers > 1 else "")
          + (" (sampled by py-spy)" if spy else ""),
          flush=True)
    if spy and (out / "stacks.txt").exists():
        (out / "top.txt").write_text(summarize(out / "stacks.txt") + "\n")
    return done / args.seconds, done / cpu


def _head_load(url: str, seconds: float, connections: int = 32) -> int:
    """HEADs on ``url`` from ``connections`` keep-alive connections for
    ``seconds``; how many were answered 200. wrk cannot: it waits for the
    body a HEAD response's Content-Length announces."""
    parts = urllib.parse.urlsplit(url)
    request = (f"HEAD {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n").encode()

    async def one(deadline: float) -> int:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        done = 0
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"HEAD answered {head[:200]!r}")
                done += 1
        finally:
            writer.close()
        return done

    async def run() -> int:
        deadline = time.monotonic() + seconds
        return sum(await asyncio.gather(*(one(deadline) for _ in range(connections))))

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearstore.bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--size", type=int, default=64 * 1024)
    p.add_argument("--method", choices=("GET", "HEAD", "PUT"), default="GET")
    p.add_argument("--hot-path", choices=("on", "off", "both"), default="both",
                   help="both (default): off, on, off, on, each its own node, side by side")
    p.add_argument("--workers", type=int, default=1, help="the node's processes (py-spy samples the first)")
    p.add_argument("--no-spy", action="store_true")
    args = p.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("needs wrk (apt-get install wrk, or nearstore bench --setup)", file=sys.stderr)
        return 2
    bin_dir = Path(sys.executable).parent
    spy = None if args.no_spy else (shutil.which("py-spy", path=f"{bin_dir}:{os.environ.get('PATH', '')}"))
    modes = {"on": [True], "off": [False], "both": [False, True, False, True]}[args.hot_path]
    per_cpu: dict[bool, list[float]] = {False: [], True: []}
    for i, mode in enumerate(modes):
        per_cpu[mode].append(measure(args, args.out / f"{i}-{'hot' if mode else 'aiohttp'}", mode, wrk, spy)[1])
    if per_cpu[False] and per_cpu[True]:
        ratios = [on / off for on, off in zip(per_cpu[True], per_cpu[False], strict=True)]
        print("hot path on / off, per server CPU-second: " + ", ".join(f"{r:.2f}x" for r in ratios))
    if spy:
        last = args.out / f"{len(modes) - 1}-{'hot' if modes[-1] else 'aiohttp'}" / "top.txt"
        if last.exists():
            print(last.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nearstore cluster --nodes N``: a whole cluster on this machine.

A backing node (the embedded local store, standing in for the shared
bucket) and N cache nodes in front of it, each with its own port and cache
directory, one ring, one cluster secret. Clients talk to any cache node;
each chunk is cached once, on its owner. Ctrl-C or SIGTERM stops them all
gracefully. Meant for trying the cluster and for tests, not production
(see deploy/ for that).

A node that dies (``kill -9`` one to watch the others route around it) is
reported and the others keep serving; SIGHUP restarts the dead ones, and
``--restart`` restarts each as soon as it is seen dead.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from nearstore.gateway import config as config_mod


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node on port {port} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_nearstore/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"node on port {port} did not become healthy")


def run(nodes: int, port: int, directory: str, backing: str | None, cache_size: str, restart: bool = False) -> int:
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("NEARSTORE_ACCESS_KEY", config_mod.DEV_ACCESS_KEY)
    env.setdefault("NEARSTORE_SECRET_KEY", config_mod.DEV_SECRET_KEY)
    env.setdefault("NEARSTORE_CLUSTER_SECRET", secrets.token_hex(16))
    exe = [sys.executable, "-m", "nearstore.cli", "serve"]
    procs: list[subprocess.Popen[bytes]] = []
    argvs: list[tuple[int, list[str]]] = []  # (port, argv) of procs[i]
    stopping: list[bool] = []
    revive: list[bool] = []

    def stop(*_: object) -> None:
        stopping.append(True)
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def start(node_port: int, argv: list[str]) -> subprocess.Popen[bytes]:
        argvs.append((node_port, argv))
        procs.append(subprocess.Popen(argv, env=env))
        return procs[-1]

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, lambda *_: revive.append(True))
    try:
        if backing is None:
            backing_port = port + 100
            _wait_healthy(backing_port, start(backing_port, [*exe, "--port", str(backing_port),
                                                               "--data-dir", str(root / "backing")]))
            backing = f"http://127.0.0.1:{backing_port}"
            print(f"nearstore cluster: backing store (local directory) on {backing}", file=sys.stderr)
        ports = [port + i for i in range(nodes)]
        peers = ", ".join(f'"http://127.0.0.1:{n}"' for n in ports)
        for node_port in ports:
            node_dir = root / f"node{node_port}"
            node_dir.mkdir(exist_ok=True)
            cfg = node_dir / "nearstore.toml"
            cfg.write_text(
                "[[buckets]]\n"
                'name = "*"\n'
                f'endpoint = "{backing}"\n'
                f'access_key = "{env["NEARSTORE_ACCESS_KEY"]}"\n'
                f'secret_key = "{env["NEARSTORE_SECRET_KEY"]}"\n'
                "[cache]\n"
                f'size = "{cache_size}"\n'
                "[cluster]\n"
                f"peers = [{peers}]\n"
            )
            start(node_port, [*exe, "--port", str(node_port), "--data-dir", str(node_dir / "data"), "--config",
                              str(cfg)])
        for node_port, proc in zip(ports, procs[-nodes:], strict=True):
            _wait_healthy(node_port, proc)
        print(
            f"nearstore cluster: {nodes} cache nodes on "
            + ", ".join(f"http://127.0.0.1:{n}" for n in ports)
            + f" (ring: /_nearstore/ring); data under {root}; Ctrl-C stops them",
            file=sys.stderr, flush=True,
        )
        return _supervise(procs, argvs, env, stopping, revive, restart)
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
        for proc in procs:
            try:
                proc.wait(45)
            except subprocess.TimeoutExpired:
                proc.kill()


def _supervise(procs: list[subprocess.Popen[bytes]], argvs: list[tuple[int, list[str]]], env: dict[str, str],
               stopping: list[bool], revive: list[bool], restart: bool) -> int:
    """Until stopped: report each node that dies, once, while the others
    keep serving; restart the dead on SIGHUP (or at once with ``restart``).
    1 if every node died, 0 once stopped."""
    reported: set[int] = set()
    while not stopping:
        dead = [i for i, proc in enumerate(procs) if proc.poll() is not None]
        for i in dead:
            if i not in reported:
                reported.add(i)
                port = argvs[i][0]
                print(f"nearstore cluster: the node on port {port} died (exit code {procs[i].returncode}); the "
                      f"others keep serving. kill -HUP {os.getpid()} restarts it", file=sys.stderr, flush=True)
        if dead and (restart or revive):
            revive.clear()
            for i in dead:
                port, argv = argvs[i]
                procs[i] = subprocess.Popen(argv, env=env)
                reported.discard(i)
                print(f"nearstore cluster: restarted the node on port {port}", file=sys.stderr, flush=True)
            continue
        if len(dead) == len(procs):
            return 1
        time.sleep(0.5)
    return 0

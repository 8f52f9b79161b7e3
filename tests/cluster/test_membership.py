"""Membership of a static three-node cluster on loopback: every node shows
the same ring, a dead peer is marked down within three seconds and comes
back when it returns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.servers import free_port

BIN = Path(sys.executable).parent
KEYS = {"NEARSTORE_ACCESS_KEY": "ring-access", "NEARSTORE_SECRET_KEY": "ring-secret",
        "NEARSTORE_CLUSTER_SECRET": "ring-cluster-secret"}


def _ring(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_nearstore/ring", timeout=5) as r:
        return dict(json.loads(r.read()))


def _start(tmp: Path, port: int, ports: list[int],
           procs: dict[int, subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    cfg = tmp / f"node{port}.toml"
    peers = ", ".join(f'"http://127.0.0.1:{p}"' for p in ports)
    cfg.write_text(f"[cluster]\npeers = [{peers}]\n")
    log = open(tmp / f"node{port}.log", "ab")
    proc = subprocess.Popen([str(BIN / "nearstore"), "serve", "--port", str(port), "--data-dir",
                             str(tmp / f"data{port}"), "--config", str(cfg)],
                            env={**os.environ, **KEYS}, stderr=log)
    log.close()
    procs[port] = proc  # registered first: the test stops it whatever happens
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node {port} exited: {(tmp / f'node{port}.log').read_text()[-2000:]}")
        try:
            _ring(port)
            return proc
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def _wait_for(port: int, predicate: Any, timeout: float) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    state = _ring(port)
    while not predicate(state) and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
        state = _ring(port)
    return time.monotonic() - t0, state


@pytest.mark.timeout(90)
def test_static_cluster_ring_and_health(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for p in ports:
            _start(tmp_path, p, ports, procs)
        # Peers not heard from yet are not down (they may not have started).
        for p in ports:
            assert not any(n["down"] for n in _ring(p)["nodes"])
        # Once each node has heard from every peer, a peer that dies is down
        # within 3.5 s.
        for p in ports:
            _took, state = _wait_for(p, lambda s: all(peer["heard"] for peer in s["peers"]), 10)
            assert all(peer["heard"] for peer in state["peers"]), state
        rings = [_ring(p) for p in ports]
        ids = sorted(f"127.0.0.1:{p}" for p in ports)
        for port, ring in zip(ports, rings, strict=True):
            assert ring["self"] == f"127.0.0.1:{port}"
            assert sorted(n["id"] for n in ring["nodes"]) == ids
            assert not any(n["down"] for n in ring["nodes"])
        # The same ring everywhere: the same shares.
        shares = [sorted((n["id"], n["share"]) for n in r["nodes"]) for r in rings]
        assert shares[0] == shares[1] == shares[2]

        victim = ports[2]
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(10)
        vid = f"127.0.0.1:{victim}"

        def down(state: dict[str, Any]) -> bool:
            return any(p["id"] == vid and not p["up"] for p in state["peers"])

        took, state = _wait_for(ports[0], down, 10)
        assert down(state), state
        assert took <= 3.5, f"marked down after {took:.1f} s"
        # The ring routes around it: the victim is down in the ring itself.
        assert [n["id"] for n in state["nodes"] if n["down"]] == [vid]

        _start(tmp_path, victim, ports, procs)

        def up(state: dict[str, Any]) -> bool:
            return all(p["up"] for p in state["peers"])

        took, state = _wait_for(ports[0], up, 10)
        assert up(state), state
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(20)

"""`nearstore cluster`: a backing node and N cache nodes, one command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from tests.helpers.servers import free_port

BIN = Path(sys.executable).parent


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _base_port() -> int:
    """A port P with P, P+1 and P+100 (the backing node) all free."""
    for _ in range(100):
        base = free_port()
        if base + 100 < 65536 and all(_free(p) for p in (base, base + 1, base + 100)):
            return base
    raise RuntimeError("no free port range")


@pytest.mark.timeout(120)
def test_local_cluster_serves_through_every_node(tmp_path: Path) -> None:
    base = _base_port()
    ports = [base, base + 1]
    env = {**os.environ, "NEARSTORE_ACCESS_KEY": "lc-access", "NEARSTORE_SECRET_KEY": "lc-secret"}
    log = open(tmp_path / "cluster.log", "wb")
    proc = subprocess.Popen([str(BIN / "nearstore"), "cluster", "--nodes", "2", "--port", str(base),
                             "--dir", str(tmp_path / "cluster")], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    try:
        deadline = time.monotonic() + 40
        ready = False
        while time.monotonic() < deadline and not ready:
            try:
                for p in ports:
                    urllib.request.urlopen(f"http://127.0.0.1:{p}/_nearstore/ring", timeout=1).read()
                ready = True
            except OSError:
                time.sleep(0.2)
        assert ready, "cluster did not come up"
        clients = [boto3.client("s3", endpoint_url=f"http://127.0.0.1:{p}", aws_access_key_id="lc-access",
                                aws_secret_access_key="lc-secret", region_name="us-east-1") for p in ports]
        clients[0].create_bucket(Bucket="local-cluster")
        data = os.urandom(3 * 1024 * 1024)
        clients[1].put_object(Bucket="local-cluster", Key="k", Body=data)
        for c in clients:
            assert c.get_object(Bucket="local-cluster", Key="k")["Body"].read() == data

        # kill -9 one node: the others keep serving, the death is reported,
        # and SIGHUP brings it back (issue 16: trying failover is possible).
        import json

        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/_nearstore/health", timeout=5).read())
        os.kill(health["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while b"died" not in (tmp_path / "cluster.log").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the cluster stopped when one node died"
        assert b"port %d died" % ports[1] in (tmp_path / "cluster.log").read_bytes()
        for _ in range(3):
            assert clients[0].get_object(Bucket="local-cluster", Key="k")["Body"].read() == data
        proc.send_signal(signal.SIGHUP)
        deadline, back = time.monotonic() + 30, False
        while not back and time.monotonic() < deadline:
            try:
                back = clients[1].get_object(Bucket="local-cluster", Key="k")["Body"].read() == data
            except Exception:
                time.sleep(0.3)
        assert back, "the dead node did not come back on SIGHUP"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "cluster.log").read_text()[-3000:]

"""A node of several processes (--workers): all serve the port, the owner
fills for everyone, writes are visible at once through every process, and
SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.helpers.procs import BIN, moto_server, wait_ready
from tests.helpers.servers import free_port

KEYS = {"NEARSTORE_ACCESS_KEY": "wk-access", "NEARSTORE_SECRET_KEY": "wk-secret"}


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as url:
        yield url


def _node(tmp: Path, moto: str | None, workers: int = 2) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [str(BIN / "nearstore"), "serve", "--port", str(port), "--data-dir", str(tmp / "data"),
            "--workers", str(workers)]
    if moto:
        cfg = tmp / "node.toml"
        cfg.write_text(
            f'[[buckets]]\nname = "*"\nendpoint = "{moto}"\naccess_key = "x"\nsecret_key = "x"\n'
            '[cache]\nchunk_size = "1MiB"\nsize = "64MiB"\n'
        )
        args += ["--config", str(cfg)]
    log = open(tmp / "node.log", "wb")
    proc = subprocess.Popen(args, env={**os.environ, **KEYS}, stderr=log)
    log.close()  # the child holds its own descriptor
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/_nearstore/health", proc)
    return proc, url


def _client(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=KEYS["NEARSTORE_ACCESS_KEY"],
                        aws_secret_access_key=KEYS["NEARSTORE_SECRET_KEY"], region_name="us-east-1")


def _pids_serving(url: str, want: int, timeout: float = 20) -> set[int]:
    """Process ids answering on the port (new connection each time; the
    kernel spreads them over the SO_REUSEPORT sockets)."""
    import json

    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < want and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/_nearstore/health", timeout=5) as r:
                pids.add(json.loads(r.read())["pid"])
        except OSError:
            # A connection queued on a process that just died is reset (the
            # kernel's SO_REUSEPORT behaviour); the next one goes elsewhere.
            pass
        time.sleep(0.02)
    return pids


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(90)
def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    proc, url = _node(tmp_path, None, workers=2)
    try:
        pids = _pids_serving(url, 2)
        assert len(pids) == 2, pids
        s3 = _client(url)
        s3.create_bucket(Bucket="workers")
        for i in range(30):
            body = os.urandom(1000 + i)
            s3.put_object(Bucket="workers", Key=f"k{i % 3}", Body=body)
            assert s3.get_object(Bucket="workers", Key=f"k{i % 3}")["Body"].read() == body
    finally:
        _stop(proc)
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids)


@pytest.mark.timeout(120)
def test_cache_across_workers_is_consistent(tmp_path: Path, moto: str) -> None:
    proc, url = _node(tmp_path, moto, workers=2)
    try:
        s3 = _client(url)
        s3.create_bucket(Bucket="workers-cache")
        data = os.urandom(3 * 1024 * 1024 + 5)
        s3.put_object(Bucket="workers-cache", Key="obj", Body=data)
        _pids_serving(url, 2)
        for _ in range(12):
            assert s3.get_object(Bucket="workers-cache", Key="obj")["Body"].read() == data
        # Only the owner fills: one file per chunk, each filled once.
        chunks = list((tmp_path / "data" / "cache" / "chunks").rglob("*.*"))
        assert len(chunks) == 4
        # Read-after-write through whichever process answers.
        for i in range(15):
            v = os.urandom(200_000 + i)
            s3.put_object(Bucket="workers-cache", Key="raw", Body=v)
            assert s3.get_object(Bucket="workers-cache", Key="raw")["Body"].read() == v
        metrics = urllib.request.urlopen(url + "/_nearstore/metrics", timeout=5).read().decode()
        hits = [line for line in metrics.splitlines() if line.startswith("nearstore_cache_hits_total")]
        assert hits and float(hits[0].split()[1]) > 0
    finally:
        _stop(proc)


@pytest.mark.timeout(90)
def test_a_dead_worker_is_replaced(tmp_path: Path) -> None:
    proc, url = _node(tmp_path, None, workers=2)
    try:
        pids = _pids_serving(url, 2)
        worker = next(p for p in pids if p != proc.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 20
        replaced: set[int] = set()
        while time.monotonic() < deadline:
            replaced = _pids_serving(url, 2, timeout=2)
            if len(replaced) == 2 and worker not in replaced:
                break
        assert len(replaced) == 2 and worker not in replaced, replaced
    finally:
        _stop(proc)


def test_a_second_node_cannot_join_a_nodes_port(tmp_path: Path) -> None:
    """SO_REUSEPORT lets any process of the same user join a port; a second
    node that did would split the requests between two stores (data would
    seem to vanish). Only the processes of one node share it."""
    (tmp_path / "a").mkdir()
    proc, url = _node(tmp_path / "a", None)
    try:
        s3 = _client(url)
        s3.create_bucket(Bucket="only-in-a")
        port = url.rsplit(":", 1)[1]
        for workers in ("2", "1"):
            second = subprocess.run(
                [str(BIN / "nearstore"), "serve", "--port", port, "--data-dir", str(tmp_path / "b"),
                 "--workers", workers],
                env={**os.environ, **KEYS}, capture_output=True, text=True, timeout=60)
            assert second.returncode == 1, second.stderr
            assert (f"address already in use by another nearstore node (pid {proc.pid}, data dir "
                    f"{tmp_path / 'a' / 'data'})") in second.stderr
        # Every request still reaches node a's store.
        fresh = [_client(url) for _ in range(20)]  # new connections: spread over the processes
        assert all([b["Name"] for b in c.list_buckets()["Buckets"]] == ["only-in-a"] for c in fresh)
    finally:
        _stop(proc)

"""Peers over TLS, found through DNS (security review): two real nodes on
127.0.0.1 and 127.0.0.2, the same port, members of one DNS name (a fake
resolver, as a Kubernetes headless Service would answer), serving HTTPS
with certificates of a private CA that name the Service. They find each
other, reach each other over https (DNS discovery no longer hard-codes
http), check each other's certificates, and, with mutual TLS, the peer API
refuses a caller without a client certificate even when it holds the
cluster secret."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from nearstore.cache import peers
from tests.helpers.procs import BIN, moto_server, wait_ready
from tests.helpers.servers import free_port

NAME = "peers.nearstore.test"
ADDRS = ("127.0.0.1", "127.0.0.2")
KEYS = {"NEARSTORE_ACCESS_KEY": "tls-access", "NEARSTORE_SECRET_KEY": "tls-secret",
        "NEARSTORE_CLUSTER_SECRET": "tls-cluster-secret"}
MiB = 1024 * 1024

# Loaded first by each node's interpreter (PYTHONPATH): NAME resolves to
# both loopback addresses, everything else as usual.
FAKE_DNS = f'''
import socket
_real = socket.getaddrinfo
def _fake(host, port, *args, **kw):
    if host == {NAME!r}:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port))) for a in {ADDRS!r}]
    return _real(host, port, *args, **kw)
socket.getaddrinfo = _fake
'''


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as url:
        yield url


class TLSCluster:
    def __init__(self, tmp: Path, moto: str) -> None:
        import trustme

        self.tmp, self.port = tmp, free_port()
        ca = trustme.CA()
        self.ca = tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        # One certificate per node naming the Service (what peers check) and
        # the node's address (what the test's clients use).
        for addr in ADDRS:
            cert = ca.issue_cert(NAME, addr)
            cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / f"{addr}.pem"))
        self.client_cert = tmp / "client.pem"
        ca.issue_cert("someone").private_key_and_cert_chain_pem.write_to_path(str(self.client_cert))
        (tmp / "sitecustomize.py").write_text(FAKE_DNS)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.moto = moto

    def start(self, addr: str) -> None:
        pem = self.tmp / f"{addr}.pem"
        cfg = self.tmp / f"{addr}.toml"
        cfg.write_text(
            f'[[buckets]]\nname = "*"\nendpoint = "{self.moto}"\naccess_key = "x"\nsecret_key = "x"\n'
            f'[cache]\nchunk_size = "1MiB"\nsize = "256MiB"\n'
            f'[tls]\ncert = "{pem}"\nkey = "{pem}"\n'
            f'[cluster]\ndns = "{NAME}"\nca = "{self.ca}"\ncert = "{pem}"\nkey = "{pem}"\nmtls = true\n')
        env = {**os.environ, **KEYS, "PYTHONPATH": f"{self.tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        log = open(self.tmp / f"{addr}.log", "ab")
        self.procs[addr] = subprocess.Popen(
            [str(BIN / "nearstore"), "serve", "--host", addr, "--port", str(self.port),
             "--data-dir", str(self.tmp / f"d-{addr}"), "--config", str(cfg)], env=env, stderr=log)
        log.close()
        wait_ready(f"https://{addr}:{self.port}/_nearstore/health", self.procs[addr],
                   context=ssl.create_default_context(cafile=str(self.ca)))

    def url(self, addr: str) -> str:
        return f"https://{addr}:{self.port}"

    def client(self, addr: str) -> Any:
        return boto3.client("s3", endpoint_url=self.url(addr), verify=str(self.ca),
                            aws_access_key_id=KEYS["NEARSTORE_ACCESS_KEY"],
                            aws_secret_access_key=KEYS["NEARSTORE_SECRET_KEY"], region_name="us-east-1")

    def ring(self, addr: str) -> dict[str, Any]:
        conn = http.client.HTTPSConnection(addr, self.port, timeout=5,
                                           context=ssl.create_default_context(cafile=str(self.ca)))
        try:
            conn.request("GET", "/_nearstore/ring")
            return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
        finally:
            conn.close()

    def chunk_files(self, addr: str) -> list[Path]:
        root = self.tmp / f"d-{addr}" / "cache" / "chunks"
        return list(root.rglob("*.*")) if root.exists() else []

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(20)


@pytest.fixture
def cluster(tmp_path: Path, moto: str) -> Iterator[TLSCluster]:
    c = TLSCluster(tmp_path, moto)
    try:
        for addr in ADDRS:
            c.start(addr)
        yield c
    finally:
        c.stop()


def wait_for_each_other(c: TLSCluster, timeout: float = 30) -> None:
    """Until each node has found the other through DNS and heard from it
    over https (its health probe passed the certificate checks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = [c.ring(a) for a in ADDRS]
        if all([p["heard"] and p["up"] for p in v["peers"]] == [True] for v in views):
            for v in views:
                assert [p["address"] for p in v["peers"]] == [
                    f"https://{a}:{c.port}" for a in ADDRS if f"{a}:{c.port}" != v["self"]]
            return
        time.sleep(0.2)
    raise AssertionError(f"the nodes did not find each other: {views}")


@pytest.mark.timeout(120)
def test_peers_found_by_dns_talk_tls_and_serve_each_other(cluster: TLSCluster) -> None:
    wait_for_each_other(cluster)
    a, b = (cluster.client(addr) for addr in ADDRS)
    a.create_bucket(Bucket="tls")
    data = os.urandom(32 * MiB)  # 32 chunks: each node owns some
    a.put_object(Bucket="tls", Key="obj", Body=data)
    for client in (b, a, b):
        got = client.get_object(Bucket="tls", Key="obj")["Body"].read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # Each chunk cached once, on its owner: the readers asked each other
    # for the chunks they did not own, over https.
    counts = [len(cluster.chunk_files(addr)) for addr in ADDRS]
    assert sum(counts) == 32 and min(counts) > 0, counts


@pytest.mark.timeout(120)
def test_with_mutual_tls_the_peer_api_wants_a_client_certificate(cluster: TLSCluster) -> None:
    wait_for_each_other(cluster)
    target = f"{ADDRS[0]}:{cluster.port}"
    query = urllib.parse.urlencode({"bucket": "tls", "key": "k"})
    path = f"/_nearstore/peer/invalidate?{query}"

    def post(context: ssl.SSLContext) -> int:
        # Signed with the cluster secret: only the certificate differs.
        conn = http.client.HTTPSConnection(ADDRS[0], cluster.port, timeout=5, context=context)
        try:
            conn.request("POST", path, headers={
                peers.AUTH_HEADER: peers.sign(KEYS["NEARSTORE_CLUSTER_SECRET"], "POST", path, target)})
            return conn.getresponse().status
        finally:
            conn.close()

    plain = ssl.create_default_context(cafile=str(cluster.ca))
    assert post(plain) == 403
    with_cert = ssl.create_default_context(cafile=str(cluster.ca))
    with_cert.load_cert_chain(str(cluster.client_cert))
    assert post(with_cert) == 204
    # S3 clients present no certificate and are served as ever.
    assert cluster.client(ADDRS[0]).list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200

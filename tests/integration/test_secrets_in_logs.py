"""Secrets never appear in a node's logs (issue 16), at the most verbose
level and through the paths that log the most: failed signatures, a
backing store that refuses, a peer that is down, bad peer signatures,
metrics asked with a wrong token, garbled requests. Secrets: users' secret
keys, the backing store's, the cluster secret, the metrics token, and the
signatures of presigned URLs (bearer credentials until they expire)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from nearstore.cache import peers
from tests.helpers import rawhttp
from tests.helpers.procs import moto_server
from tests.helpers.s3util import error_of
from tests.helpers.servers import SECRET_KEY, S3Server, free_port, start_server

UPSTREAM_SECRET = "UpstreamSecret-9f3a7c1e"
CLUSTER_SECRET = "ClusterSecret-5b2d8e04"
METRICS_TOKEN = "MetricsToken-c71e9a36"


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.mark.timeout(120)
def test_no_secret_reaches_the_log(tmp_path: Path, moto: str) -> None:
    upstream = boto3.client("s3", endpoint_url=moto, aws_access_key_id="upkey",
                            aws_secret_access_key=UPSTREAM_SECRET, region_name="us-east-1")
    upstream.create_bucket(Bucket="upb")
    port, dead = free_port(), free_port()
    config = (f'[server]\nmetrics_token = "{METRICS_TOKEN}"\n'
              f'[cluster]\nsecret = "{CLUSTER_SECRET}"\nnode_id = "127.0.0.1:{port}"\n'
              f'peers = ["http://127.0.0.1:{port}", "http://127.0.0.1:{dead}"]\n')
    node: S3Server = start_server("nearstore", tmp_path / "node", port=port, extra_args=["--log-level", "debug"],
                                  config_text=config,
                                  buckets=[{"name": "upb", "endpoint": moto, "access_key": "upkey",
                                            "secret_key": UPSTREAM_SECRET}])
    presigned: list[str] = []
    try:
        s3 = node.client()
        s3.put_object(Bucket="upb", Key="k", Body=b"data" * 1000)
        assert s3.get_object(Bucket="upb", Key="k")["Body"].read() == b"data" * 1000
        assert error_of(s3.get_object, Bucket="upb", Key="missing")[1] == "NoSuchKey"
        # The backing store refuses (its bucket is gone).
        upstream.delete_object(Bucket="upb", Key="k")
        upstream.delete_bucket(Bucket="upb")
        error_of(s3.put_object, Bucket="upb", Key="k2", Body=b"x")
        # A wrong secret, a presigned URL with a signature, and one tampered.
        assert error_of(node.client(secret_key="wrong-secret-key-0000").list_buckets)[1] == "SignatureDoesNotMatch"
        url = s3.generate_presigned_url("get_object", Params={"Bucket": "upb", "Key": "k"}, ExpiresIn=60)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        presigned.extend(query.get("X-Amz-Signature", query.get("Signature", [])))
        assert presigned
        for u in (url, url[:-4] + "0000"):
            try:
                urllib.request.urlopen(u, timeout=10).read()
            except urllib.error.HTTPError:
                pass
        # Metrics with a wrong token; the peer API with a bad signature and a
        # good one from another node's point of view.
        for token in ("wrong", METRICS_TOKEN):
            rawhttp.send(node, "GET", "/_nearstore/metrics", {"Authorization": f"Bearer {token}",
                                                               "X-Forwarded-For": "10.0.0.1"}, b"")
        path = "/_nearstore/peer/invalidate?bucket=upb&key=k"
        for header in ("1.2.3", peers.sign(CLUSTER_SECRET, "POST", path, "someone-else")):
            rawhttp.send(node, "POST", path, {peers.AUTH_HEADER: header}, b"")
        # Garbled requests.
        for raw in (b"\x16\x03\x01garbage\r\n\r\n", b"GET /upb/k?X-Amz-Signature=" + presigned[0].encode()
                    + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"):
            with socket.create_connection((node.host, node.port), timeout=5) as s:
                s.sendall(raw)
                s.recv(65536)
        # A read the down peer would own, served here instead.
        s3.list_buckets()
    finally:
        node.stop()
    log = node.log_path.read_text(errors="replace")
    assert "WARNING" in log and "Content-Length" in log  # the failures were logged
    for secret in (SECRET_KEY, UPSTREAM_SECRET, CLUSTER_SECRET, METRICS_TOKEN, *presigned):
        assert secret not in log, f"{secret!r} in the log"

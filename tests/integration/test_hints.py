"""Loaders' hints on a real node (issue 17): ``POST /_nearstore/hint``
signed like an S3 request fills the named objects' chunks before they are
read, so the reads are hits; the route refuses what it must (anonymous,
a body that is not what was signed, malformed hints, a bucket not read
through the cache)."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.helpers.cachenode import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    CacheNode,
    Proc,
    moto_client,
)
from tests.integration.test_cache import MiB, delta, get, put_objects

HINTED, USED = "nearstore_prefetch_chunks_total", "nearstore_prefetch_used_total"


@pytest.fixture
def node(tmp_path: Path, moto: Proc) -> Iterator[CacheNode]:
    n = CacheNode(tmp_path / "node", moto.url, {"chunk_size": "1MiB", "size": "64MiB"}).start()
    yield n
    n.stop()


def post_hint(node: CacheNode, bucket: str, doc: Any, *, signed: bool = True,
              tampered: bool = False) -> tuple[int, dict[str, Any]]:
    body = json.dumps(doc).encode()
    url = f"{node.url}/_nearstore/hint?{urlencode({'bucket': bucket})}"
    headers = {"Content-Type": "application/json", "x-amz-content-sha256": hashlib.sha256(body).hexdigest()}
    if signed:
        req = AWSRequest(method="POST", url=url, data=body, headers=headers)
        S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(req)
        headers = dict(req.headers.items())
    if tampered:  # another body than the one signed
        body = json.dumps({**doc, "keys": ["other"]}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST", headers=headers),
                                    timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, {"body": e.read().decode()}


def health_pid(node: CacheNode) -> int:
    """The process that answered (a new connection each time)."""
    with urllib.request.urlopen(f"{node.url}/_nearstore/health", timeout=10) as resp:
        return int(json.loads(resp.read())["pid"])


def until(cond: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


@pytest.mark.timeout(120)
def test_hinted_objects_are_read_from_the_cache(node: CacheNode, moto: Proc) -> None:
    backing = moto_client(moto)
    bucket = f"hints-{uuid.uuid4().hex[:8]}"
    backing.create_bucket(Bucket=bucket)
    objects = put_objects(backing, bucket, "shard-", 4, 2 * MiB + 5)  # 3 chunks each
    before = node.metrics()
    status, answer = post_hint(node, bucket, {"stream": "job/0/0", "keys": sorted(objects)})
    assert status == 200 and answer["accepted"] == 4, answer
    until(lambda: delta(node.metrics(), before, HINTED) == 12
          and node.metrics().get("nearstore_fills_in_flight", 0) == 0, "12 chunks prefetched")
    s3 = node.client()
    mid = node.metrics()
    for key, data in objects.items():
        assert get(s3, bucket, key) == data
    after = node.metrics()
    assert delta(after, mid, "nearstore_cache_misses_total") == 0
    assert delta(after, mid, "nearstore_cache_hits_total") == 12
    assert delta(after, before, USED) == 12


@pytest.mark.timeout(120)
def test_the_hint_route_refuses_what_it_must(node: CacheNode, moto: Proc, tmp_path: Path) -> None:
    backing = moto_client(moto)
    bucket = f"hints-{uuid.uuid4().hex[:8]}"
    backing.create_bucket(Bucket=bucket)
    good = {"stream": "s", "keys": ["a"]}
    assert post_hint(node, bucket, good, signed=False)[0] == 403
    status, answer = post_hint(node, bucket, good, tampered=True)
    assert status == 400 and "XAmzContentSHA256Mismatch" in answer["body"]
    for bad in ({"keys": ["a"]}, {"stream": "s", "keys": "a"}, {"stream": "s", "keys": [1]},
                {"stream": "x" * 201, "keys": []}, {"stream": "s", "keys": ["k"] * 1001}, ["s"]):
        status, answer = post_hint(node, bucket, bad)
        assert status == 400 and "InvalidRequest" in answer["body"], (bad, status, answer)
    status, answer = post_hint(node, "no-such-bucket-here", good)
    assert status == 404 and "NoSuchBucket" in answer["body"]
    # Stopping: an empty window drops the stream.
    status, answer = post_hint(node, bucket, {"stream": "s", "keys": []})
    assert status == 200 and answer["accepted"] == 0


@pytest.mark.timeout(180)
def test_hints_to_any_process_of_a_multi_process_node_are_filled(
        tmp_path: Path, moto: Proc, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``workers = 2`` a hint reaches whichever process the kernel gave
    the connection; only the owner fills, so a follower hands the hint to
    it. Eight hints on eight connections: every one is acted on."""
    monkeypatch.setenv("NEARSTORE_WORKERS", "2")
    node = CacheNode(tmp_path / "node", moto.url, {"chunk_size": "1MiB", "size": "64MiB"}).start()
    try:
        backing = moto_client(moto)
        bucket = f"hints-{uuid.uuid4().hex[:8]}"
        backing.create_bucket(Bucket=bucket)
        objects = put_objects(backing, bucket, "shard-", 8, MiB)  # a chunk each
        pids: set[int] = set()
        until(lambda: pids.add(health_pid(node)) or len(pids) == 2, "both processes serving")
        before = node.metrics()
        for i, key in enumerate(sorted(objects)):
            status, answer = post_hint(node, bucket, {"stream": f"job/{i}/0", "keys": [key]})
            assert status == 200 and answer["accepted"] == 1, answer
        until(lambda: delta(node.metrics(), before, HINTED) == 8
              and node.metrics().get("nearstore_fills_in_flight", 0) == 0, "8 chunks prefetched")
        s3 = node.client()
        for key, data in objects.items():
            assert get(s3, bucket, key) == data
        assert delta(node.metrics(), before, "nearstore_cache_misses_total") == 0
    finally:
        node.stop()

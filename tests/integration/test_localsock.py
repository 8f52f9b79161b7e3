"""Short-circuit reads over the node's Unix socket (cache/localsock.py,
clients/local.py): same bytes and the same errors as a GET, on the local
store and through the chunk cache; a corrupt chunk file is never handed out."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from nearstore.clients.connect import connect
from nearstore.clients.datasets import S3Source, TarDataset
from nearstore.clients.local import LocalChanged, LocalNode, LocalNotServed
from nearstore.clients.ranged import RangedReader
from tests.helpers.cachenode import (
    ACCESS_KEY,
    SECRET_KEY,
    CacheNode,
    MiB,
    Proc,
    flip_byte,
    moto_client,
)
from tests.helpers.servers import S3Server
from tests.unit.clients.test_datasets import make_tar


@pytest.fixture
def node(nearstore_server: S3Server) -> Iterator[tuple[Any, LocalNode, str]]:
    s3 = connect(nearstore_server.url, access_key=nearstore_server.access_key,
                 secret_key=nearstore_server.secret_key)
    bucket = f"localsock-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    local = LocalNode.discover(s3)
    assert local is not None, "the test node serves a local socket"
    yield s3, local, bucket
    LocalNode.forget(s3)


def test_reads_match_get(node: tuple[Any, LocalNode, str]) -> None:
    s3, local, bucket = node
    data = os.urandom(5 * MiB + 123)
    s3.put_object(Bucket=bucket, Key="dir/a b+c", Body=data)
    etag = s3.head_object(Bucket=bucket, Key="dir/a b+c")["ETag"]
    view, size, got_etag = local.read_into(bucket, "dir/a b+c")
    assert bytes(view) == data and size == len(data) and got_etag == etag
    # in 1 MiB pieces on 3 connections, into a caller's buffer
    buf = bytearray(len(data) + 7)
    view, _, _ = local.read_into(bucket, "dir/a b+c", buf, chunk=MiB, streams=3)
    assert bytes(view) == data and len(view) == len(data)
    view, _, _ = local.read_into(bucket, "dir/a b+c", start=MiB - 5, end=3 * MiB + 5, chunk=MiB)
    assert bytes(view) == data[MiB - 5 : 3 * MiB + 5]
    view, _, _ = local.read_into(bucket, "dir/a b+c", start=len(data) - 10, end=len(data) + 100)
    assert bytes(view) == data[-10:]
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert bytes(local.read_into(bucket, "empty")[0]) == b""


def test_errors_are_s3_errors(node: tuple[Any, LocalNode, str], nearstore_server: S3Server) -> None:
    s3, local, bucket = node
    s3.put_object(Bucket=bucket, Key="k", Body=b"hello")
    with pytest.raises(ClientError, match="NoSuchKey"):
        local.read_into(bucket, "missing")
    with pytest.raises(LocalChanged):
        local.read_into(bucket, "k", if_match='"0123"')
    with pytest.raises(ClientError, match="InvalidRange"):
        local.read_into(bucket, "k", start=100, end=200)
    # wrong secret: refused exactly as over HTTP
    bad = LocalNode(local.path, connect(nearstore_server.url, access_key=nearstore_server.access_key,
                                        secret_key="wrong-secret"))
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        bad.read_into(bucket, "k")
    bad.close()
    # the connection pool still works after all those
    assert bytes(local.read_into(bucket, "k")[0]) == b"hello"


def test_malformed_requests_get_an_error_and_the_connection_lives(node: tuple[Any, LocalNode, str]) -> None:
    s3, local, bucket = node
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(local.path)
        for junk in (b"not json", b"{}", json.dumps({"url": "http://h/b/k", "range": [5, 1]}).encode(),
                     json.dumps({"url": "http://h/b/k?X-Amz-Signature=zz"}).encode()):
            sock.sendall(junk)
            reply = json.loads(sock.recv(65536))
            assert 400 <= reply["status"] < 500 and reply["code"], reply
        url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"})
        sock.sendall(json.dumps({"url": url}).encode())
        assert json.loads(sock.recv(65536))["status"] == 200


def test_discovery_can_be_turned_off(node: tuple[Any, LocalNode, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s3, _, _ = node
    LocalNode.forget(s3)
    monkeypatch.setenv("NEARSTORE_LOCAL_READS", "0")
    assert LocalNode.discover(s3) is None


# -- through the chunk cache ----------------------------------------------------------


@pytest.fixture
def cache_node(tmp_path: Path, moto: Proc, monkeypatch: pytest.MonkeyPatch) -> Iterator[CacheNode]:
    sock_dir = tempfile.mkdtemp(prefix="ns-")  # pytest's tmp paths can pass sun_path's 107 bytes
    monkeypatch.setenv("NEARSTORE_LOCAL_SOCKET", f"{sock_dir}/node.sock")
    n = CacheNode(tmp_path / "n", moto.url).start()
    yield n
    n.stop()
    os.rmdir(sock_dir)


def _cached_object(cache_node: CacheNode, moto: Proc) -> tuple[Any, LocalNode, str, bytes]:
    """An object of 5 chunks and a bit in the backing store, and the
    node's socket: (s3 client of the node, its LocalNode, bucket, bytes)."""
    backing = moto_client(moto)
    bucket = f"lsc-{uuid.uuid4().hex[:10]}"
    backing.create_bucket(Bucket=bucket)
    data = os.urandom(5 * cache_node.chunk_size + 100)
    backing.put_object(Bucket=bucket, Key="obj", Body=data)
    s3 = connect(cache_node.url, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    local = LocalNode.discover(s3)
    assert local is not None
    return s3, local, bucket, data


def test_cached_chunks_cold_warm_and_corrupt(cache_node: CacheNode, moto: Proc) -> None:
    s3, local, bucket, data = _cached_object(cache_node, moto)
    cs = cache_node.chunk_size
    try:
        before = cache_node.metrics()
        assert bytes(local.read_into(bucket, "obj", chunk=cs)[0]) == data  # cold: filled
        # The bytes were streamed from the fills' temporary files; each is
        # renamed into place just after its last byte, maybe after the reply.
        deadline = time.monotonic() + 10
        while len(cache_node.chunk_files()) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cache_node.chunk_files()) == 6
        assert bytes(local.read_into(bucket, "obj", chunk=2 * cs)[0]) == data  # warm
        after = cache_node.metrics()
        hits = "nearstore_cache_hits_total"
        assert after.get(hits, 0) - before.get(hits, 0) >= 6
        for path in cache_node.chunk_files():
            flip_byte(path, 50)
        # every chunk fails its check and is filled again: never the flipped bytes
        assert bytes(local.read_into(bucket, "obj", chunk=cs)[0]) == data
        assert bytes(local.read_into(bucket, "obj", start=cs + 40, end=cs + 60)[0]) == data[cs + 40 : cs + 60]
    finally:
        LocalNode.forget(s3)


def test_datasets_use_the_short_circuit(cache_node: CacheNode, moto: Proc) -> None:
    backing = moto_client(moto)
    bucket = f"lsd-{uuid.uuid4().hex[:10]}"
    backing.create_bucket(Bucket=bucket)
    members = [(f"{i:03d}.bin", os.urandom(20_000)) for i in range(150)]  # 3 MiB: several chunks
    backing.put_object(Bucket=bucket, Key="shards/a.tar", Body=make_tar(members))
    s3 = connect(cache_node.url, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    before = cache_node.metrics()
    try:
        src = S3Source(bucket, client=lambda: s3)
        got = [(s["__key__"], s["bin"]) for s in TarDataset(src, "shards/")]
        assert got == [(n[:3], d) for n, d in members]
        # the shard came over the socket, in one request per 16 MiB piece
        after = cache_node.metrics()
        name = "nearstore_local_read_bytes_total"
        assert after.get(name, 0) - before.get(name, 0) == s3.head_object(Bucket=bucket, Key="shards/a.tar")["ContentLength"]
    finally:
        LocalNode.forget(s3)


# -- mapping instead of copying (LocalNode.map) -----------------------------------------


def test_map_matches_get_on_the_local_store(node: tuple[Any, LocalNode, str]) -> None:
    """On the local store an object is one file: mapped whole, any range
    too (its place in the region is shifted to line up with the file)."""
    import numpy as np

    s3, local, bucket = node
    data = os.urandom(3 * MiB + 123)
    s3.put_object(Bucket=bucket, Key="m", Body=data)
    with local.map(bucket, "m") as m:
        assert bytes(m.view) == data and m.size == len(data) and len(m) == len(data)
        assert m.mapped == len(data) and m.copied == 0
    with local.map(bucket, "m", start=MiB - 5, end=2 * MiB + 5, chunk=MiB) as m:
        assert bytes(m.view) == data[MiB - 5 : 2 * MiB + 5] and m.mapped == len(m.view)
    # copy-on-write: writable, and a write stays here
    m = local.map(bucket, "m")
    arr = np.frombuffer(m.view, dtype=np.uint8)
    arr[:4] = 0
    m.close()  # arr keeps the region: not unmapped under it
    assert arr[:4].tolist() == [0, 0, 0, 0] and arr[4:].tobytes() == data[4:]
    assert bytes(local.read_into(bucket, "m")[0]) == data
    del arr
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    with local.map(bucket, "empty") as m:
        assert bytes(m.view) == b"" and m.size == 0
    with pytest.raises(LocalChanged):
        local.map(bucket, "m", if_match='"0123"')
    with pytest.raises(ClientError, match="NoSuchKey"):
        local.map(bucket, "missing")


def test_map_cached_chunks_survives_eviction(cache_node: CacheNode, moto: Proc) -> None:
    s3, local, bucket, data = _cached_object(cache_node, moto)
    cs = cache_node.chunk_size
    try:
        with local.map(bucket, "obj", chunk=cs) as m:  # cold: filled as it goes
            assert bytes(m.view) == data
        warm = local.map(bucket, "obj", chunk=cs)
        assert bytes(warm.view) == data and warm.mapped == len(data) and warm.copied == 0
        # a range that starts mid-page: shifted, still mapped
        with local.map(bucket, "obj", start=cs + 40, end=3 * cs + 7, chunk=cs) as m:
            assert bytes(m.view) == data[cs + 40 : 3 * cs + 7] and m.copied == 0
        # pieces that end mid-page: those pages are copied, the rest mapped
        with local.map(bucket, "obj", chunk=cs // 2 + 100, streams=3) as m:
            assert bytes(m.view) == data and m.copied > 0 and m.mapped > 0
        # evicted (the chunk files unlinked): the mapping keeps the inodes
        files = cache_node.chunk_files()
        assert len(files) == 6
        for path in files:
            path.unlink()
        assert bytes(warm.view) == data
        warm.close()
        with local.map(bucket, "obj", chunk=cs) as m:  # filled again
            assert bytes(m.view) == data
    finally:
        LocalNode.forget(s3)


def test_a_pass_through_bucket_is_read_over_http_without_asking_again(
        tmp_path: Path, moto: Proc, monkeypatch: pytest.MonkeyPatch) -> None:
    """No local file holds a pass-through bucket's bytes: the node answers
    NotImplemented once, the reader falls back to HTTP and remembers."""
    sock_dir = tempfile.mkdtemp(prefix="ns-")
    monkeypatch.setenv("NEARSTORE_LOCAL_SOCKET", f"{sock_dir}/node.sock")
    node = CacheNode(tmp_path / "p", moto.url, {"enabled": False}).start()
    try:
        backing = moto_client(moto)
        bucket = f"lsp-{uuid.uuid4().hex[:10]}"
        backing.create_bucket(Bucket=bucket)
        data = os.urandom(3 * MiB + 5)
        backing.put_object(Bucket=bucket, Key="obj", Body=data)
        s3 = connect(node.url, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        try:
            for _ in range(2):
                reader = RangedReader(s3, chunk=MiB)
                assert reader.read_bytes(bucket, "obj") == data
                assert "local" not in reader.sent  # over HTTP
            local = LocalNode.discover(s3)
            assert local is not None and bucket in local.http_only  # the socket stays in use
            with pytest.raises(LocalNotServed):
                local.read_into(bucket, "obj")  # answered here, no request
            assert node.metrics().get("nearstore_local_reads_total", 0) == 0
        finally:
            LocalNode.forget(s3)
    finally:
        node.stop()
        os.rmdir(sock_dir)


def test_only_a_getobject_url_reads_and_its_version_is_honoured(node: tuple[Any, LocalNode, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Security review: any GET-signed URL (a presigned GetObjectTagging)
    handed out the object's bytes, and partNumber / versionId were ignored."""
    s3, local, bucket = node
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old = s3.put_object(Bucket=bucket, Key="k", Body=b"old bytes")["VersionId"]
    s3.put_object(Bucket=bucket, Key="k", Body=b"new bytes")
    urls = {
        "tagging": s3.generate_presigned_url("get_object_tagging", Params={"Bucket": bucket, "Key": "k"}),
        "part": s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k", "PartNumber": 1}),
    }
    for name, url in urls.items():
        monkeypatch.setattr(local, "_url", lambda b, k, u=url: u)
        with pytest.raises(ClientError) as e:
            local.read_into(bucket, "k")
        assert e.value.response["Error"]["Code"] == "InvalidRequest", name
    versioned = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k", "VersionId": old})
    monkeypatch.setattr(local, "_url", lambda b, k: versioned)
    assert bytes(local.read_into(bucket, "k")[0]) == b"old bytes"


def test_a_socket_served_by_an_untrusted_user_is_not_used(nearstore_server: S3Server,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Security review: the socket's path comes from an unauthenticated
    answer; the client checks who serves it (SO_PEERCRED) before handing
    it presigned URLs."""
    s3 = connect(nearstore_server.url, access_key=nearstore_server.access_key,
                 secret_key=nearstore_server.secret_key)
    LocalNode.forget(s3)
    monkeypatch.setattr("nearstore.clients.local.trusted_uids", lambda: {os.getuid() + 4242})
    try:
        assert LocalNode.discover(s3) is None
    finally:
        LocalNode.forget(s3)
    monkeypatch.undo()
    try:
        assert LocalNode.discover(s3) is not None  # its own user's: used
    finally:
        LocalNode.forget(s3)

"""The backing-store contract: what the gateway's write path and the cache's
fill path rely on, passed by every store behind the narrow interface
(``nearstore.metadata.backing.Backend``): the embedded local store and
the S3 upstream (against a real moto server), driven directly, no HTTP
front in between."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nearstore.gateway import errors
from nearstore.gateway.backends.local import LocalStore
from nearstore.gateway.backends.s3 import S3Upstream
from nearstore.gateway.config import UpstreamConfig
from nearstore.metadata.backing import Backend, CompletedPart, ObjectMeta, ReadOptions
from tests.helpers.servers import MOTO_ACCESS_KEY, MOTO_SECRET_KEY, S3Server
from tests.unit.gateway.test_local_store import Body

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, moto_server: S3Server) -> AsyncIterator[Backend]:
    backend: Backend
    if request.param == "local":
        backend = LocalStore(tmp_path / "data", fsync=False)
    else:
        backend = S3Upstream(UpstreamConfig(name="*", endpoint=moto_server.url, bucket="",
                                            access_key=MOTO_ACCESS_KEY, secret_key=MOTO_SECRET_KEY))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def bucket(store: Backend) -> str:
    name = f"contract-{uuid.uuid4().hex[:12]}"
    await store.create_bucket(name)
    return name


async def _read(store: Backend, bucket: str, key: str, start: int = 0, length: int | None = None,
                etag: str | None = None) -> tuple[str, bytes]:
    """(the handle's ETag, bytes start..start+length) as the cache's fill
    reads them: a ranged open pinned with If-Match, then read_range."""
    rng = None
    if length is not None:
        rng = f"bytes={start}-{start + length - 1}"
    conditions = {"If-Match": etag} if etag else {}
    h = await store.open_object(bucket, key, ReadOptions(range_header=rng, conditions=conditions))
    try:
        n = h.info.size - start if length is None else length
        return h.info.etag, b"".join([p async for p in h.read_range(start, n)])
    finally:
        await h.close()


async def test_put_head_and_ranged_reads(store: Backend, bucket: str) -> None:
    data = os.urandom(3 * MiB + 17)
    info = await store.put_object(bucket, "a/b c+d", Body(data), ObjectMeta(content_type="x/y",
                                                                           user_meta={"k": "v"}))
    head = await store.head_object(bucket, "a/b c+d")
    assert head.size == len(data) and head.etag == info.etag
    assert head.content_type == "x/y" and head.user_meta == {"k": "v"}
    assert await _read(store, bucket, "a/b c+d") == (info.etag, data)
    # A range reports the whole object's size and reads exactly its bytes.
    h = await store.open_object(bucket, "a/b c+d", ReadOptions(range_header="bytes=1048576-2097151"))
    try:
        assert h.info.size == len(data)
        assert b"".join([p async for p in h.read_range(MiB, MiB)]) == data[MiB : 2 * MiB]
    finally:
        await h.close()
    assert await _read(store, bucket, "a/b c+d", MiB, 100, etag=info.etag) == (info.etag, data[MiB : MiB + 100])


async def test_a_read_pinned_to_another_version_is_refused_or_told(store: Backend, bucket: str) -> None:
    """The fill path's guarantee: an If-Match on an old ETag either fails
    with PreconditionFailed or opens a handle whose ETag says so."""
    old = await store.put_object(bucket, "k", Body(b"one" * 1000), ObjectMeta())
    new = await store.put_object(bucket, "k", Body(b"two" * 1000), ObjectMeta())
    assert old.etag != new.etag
    try:
        etag, _ = await _read(store, bucket, "k", 0, 10, etag=old.etag)
    except errors.PreconditionFailed:
        return
    assert etag == new.etag


async def test_missing_objects_and_buckets(store: Backend, bucket: str) -> None:
    with pytest.raises(errors.NoSuchKey):
        await store.head_object(bucket, "nope")
    with pytest.raises(errors.NoSuchKey):
        await store.open_object(bucket, "nope")
    with pytest.raises(errors.NoSuchBucket):
        await store.head_object(f"missing-{uuid.uuid4().hex[:12]}", "k")


async def test_a_failed_put_leaves_the_old_version(store: Backend, bucket: str) -> None:
    first = await store.put_object(bucket, "k", Body(b"first"), ObjectMeta())
    with pytest.raises(errors.S3Error):
        await store.put_object(bucket, "k", Body(b"x" * 300_000, fail=True), ObjectMeta())
    assert await _read(store, bucket, "k") == (first.etag, b"first")
    with pytest.raises(errors.S3Error):
        await store.put_object(bucket, "fresh", Body(b"y" * 300_000, fail=True), ObjectMeta())
    with pytest.raises(errors.NoSuchKey):
        await store.head_object(bucket, "fresh")


async def test_list_pages_and_delete(store: Backend, bucket: str) -> None:
    keys = [f"p/{i:02d}" for i in range(5)] + ["p/sub/x", "q"]
    for k in keys:
        await store.put_object(bucket, k, Body(k.encode()), ObjectMeta())
    page = await store.list_objects(bucket, prefix="p/", delimiter="/", max_keys=3)
    assert [o.key for o in page.objects] == ["p/00", "p/01", "p/02"] and page.is_truncated
    assert page.next_marker == "p/02"
    rest = await store.list_objects(bucket, prefix="p/", delimiter="/", start_after=page.next_marker)
    assert [o.key for o in rest.objects] == ["p/03", "p/04"] and list(rest.common_prefixes) == ["p/sub/"]
    assert not rest.is_truncated
    await store.delete_object(bucket, "q")
    await store.delete_object(bucket, "q")  # deleting what is gone is fine, as in S3
    with pytest.raises(errors.NoSuchKey):
        await store.head_object(bucket, "q")


async def test_multipart(store: Backend, bucket: str) -> None:
    parts_data = [os.urandom(5 * MiB), os.urandom(1234)]
    upload = await store.create_upload(bucket, "mp", ObjectMeta(content_type="a/b"))
    parts = [await store.upload_part(bucket, "mp", upload, n, Body(d)) for n, d in enumerate(parts_data, 1)]
    info = await store.complete_upload(bucket, "mp", upload,
                                       [CompletedPart(p.part_number, p.etag) for p in parts])
    assert info.etag.endswith('-2"')
    etag, body = await _read(store, bucket, "mp")
    assert etag == info.etag and body == b"".join(parts_data)
    # An aborted upload leaves nothing.
    gone = await store.create_upload(bucket, "aborted", ObjectMeta())
    await store.upload_part(bucket, "aborted", gone, 1, Body(b"z" * 100))
    await store.abort_upload(bucket, "aborted", gone)
    with pytest.raises(errors.NoSuchKey):
        await store.head_object(bucket, "aborted")

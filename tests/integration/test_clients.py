"""clients/: connect() and the parallel ranged reader against a real node."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from nearstore.clients.connect import connect
from nearstore.clients.local import LocalNode
from nearstore.clients.ranged import ObjectChanged, RangedReader, download, read_bytes, read_into
from tests.helpers.servers import S3Server

MiB = 1024 * 1024


@pytest.fixture(params=["http", "local"])
def node(nearstore_server: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Any:
    """A node and a bucket; reads go over HTTP, or through the node's
    short-circuit socket (the node runs on this machine)."""
    monkeypatch.setenv("NEARSTORE_LOCAL_READS", "1" if request.param == "local" else "0")
    monkeypatch.setenv("NEARSTORE_ENDPOINT", nearstore_server.url)
    monkeypatch.setenv("NEARSTORE_ACCESS_KEY", nearstore_server.access_key)
    monkeypatch.setenv("NEARSTORE_SECRET_KEY", nearstore_server.secret_key)
    s3 = connect()
    bucket = f"clients-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    yield s3, bucket
    LocalNode.forget(s3)


def used_local(s3: Any) -> bool:
    return LocalNode.discover(s3) is not None


def test_connect_uses_the_environment(node: Any) -> None:
    s3, bucket = node
    s3.put_object(Bucket=bucket, Key="k", Body=b"hello")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"hello"
    assert s3.meta.config.s3["addressing_style"] == "path"
    assert s3.meta.config.max_pool_connections >= 64


@pytest.mark.parametrize("size", [0, 1, 3 * MiB + 17])
def test_parallel_ranged_read(node: Any, size: int, tmp_path: Path) -> None:
    s3, bucket = node
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key="obj", Body=data)
    assert read_bytes(s3, bucket, "obj", streams=4, chunk=MiB) == data
    buf = bytearray(size + 10)
    reader = RangedReader(s3, streams=3, chunk=MiB)
    view = reader.read_into(bucket, "obj", buf)
    assert bytes(view) == data and len(view) == size
    # the path the fixture asked for is the one taken
    assert ("local" in reader.sent) == (os.environ["NEARSTORE_LOCAL_READS"] == "1")
    assert download(s3, bucket, "obj", tmp_path / "out.bin", streams=4, chunk=MiB) == size
    assert (tmp_path / "out.bin").read_bytes() == data


def test_buffer_too_small(node: Any) -> None:
    s3, bucket = node
    s3.put_object(Bucket=bucket, Key="obj", Body=b"x" * 100)
    with pytest.raises(ValueError):
        read_into(s3, bucket, "obj", bytearray(10))


def test_a_changed_object_is_never_mixed(node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s3, bucket = node
    s3.put_object(Bucket=bucket, Key="obj", Body=os.urandom(2 * MiB))
    real_head = s3.head_object

    def head_then_overwrite(**kw: Any) -> Any:
        head = real_head(**kw)
        s3.put_object(Bucket=bucket, Key="obj", Body=os.urandom(2 * MiB))
        return head

    real_read = LocalNode._read

    def first_piece_then_overwrite(self: LocalNode, *args: Any) -> Any:
        got = real_read(self, *args)
        s3.put_object(Bucket=bucket, Key="obj", Body=os.urandom(2 * MiB))
        return got

    monkeypatch.setattr(s3, "head_object", head_then_overwrite)
    monkeypatch.setattr(LocalNode, "_read", first_piece_then_overwrite)
    with pytest.raises(ObjectChanged):
        read_bytes(s3, bucket, "obj", chunk=MiB, streams=1)


def test_a_cancelled_local_read_writes_nothing_after(node: Any) -> None:
    s3, bucket = node
    data = os.urandom(24 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    buf = bytearray(len(data))

    async def cancel_soon() -> None:
        task = asyncio.ensure_future(RangedReader(s3, chunk=MiB).aread_into(bucket, "big", buf))
        await asyncio.sleep(0.002)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    snapshot = bytes(buf)
    time.sleep(0.2)
    assert bytes(buf) == snapshot  # nothing writes into the buffer after the cancellation
    assert bytes(asyncio.run(RangedReader(s3, chunk=MiB).aread_into(bucket, "big", buf))) == data

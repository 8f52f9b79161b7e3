"""RangedReader.read_spans: arbitrary ranges of one pinned version into
caller-given buffers (the HTTP transport under clients.rangeget)."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from nearstore.clients.connect import connect
from nearstore.clients.ranged import ObjectChanged, RangedReader
from tests.helpers.servers import S3Server

MiB = 1024 * 1024


def test_spans_into_caller_buffers(nearstore_server: S3Server) -> None:
    s3 = connect(nearstore_server.url, access_key=nearstore_server.access_key,
                 secret_key=nearstore_server.secret_key)  # fmt: skip
    bucket = f"spans-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(3 * MiB + 17)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    reader = RangedReader(s3, streams=3, local=False)
    obj = reader.open(bucket, "k")
    one = bytearray(1000)
    parts = [memoryview(bytearray(n)) for n in (5, 0, MiB, 12345)]
    whole = bytearray(len(data))
    reader.read_spans(obj, [(7, one), (MiB - 3, parts), (0, memoryview(whole)), (len(data), bytearray())])
    assert bytes(one) == data[7:1007] and bytes(whole) == data
    assert b"".join(bytes(p) for p in parts) == data[MiB - 3 : MiB - 3 + 5 + MiB + 12345]
    assert reader.sent and "local" not in reader.sent
    tail = bytearray(17)
    asyncio.run(reader.aread_spans(obj, [(3 * MiB, tail)]))
    assert bytes(tail) == data[-17:]
    with pytest.raises(ValueError, match="outside"):
        reader.read_spans(obj, [(len(data) - 5, bytearray(10))])
    with pytest.raises(ValueError, match="twice"):
        reader.read_spans(obj, [(0, bytearray(10)), (0, bytearray(10))])
    s3.put_object(Bucket=bucket, Key="k", Body=data[::-1])
    with pytest.raises(ObjectChanged):
        reader.read_spans(obj, [(0, bytearray(10))])

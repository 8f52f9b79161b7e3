"""Parallel ranged reads of one large object.

The object is cut into chunk-aligned ranges (16 MiB by default, the
cache's chunk size, so each range is one cache chunk) read by several
concurrent GETs straight into a caller's buffer: a ``bytearray``, a
``memoryview`` (e.g. of a numpy array or a pinned host buffer) or a file.
Memory use is the destination plus one socket buffer per stream.

Every range is pinned to the ETag seen at the start (If-Match), so a read
never mixes two versions of an object: a change mid-read raises
``ObjectChanged``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import ClientError

CHUNK = 16 * 1024 * 1024
PIECE = 1024 * 1024


class ObjectChanged(Exception):
    """The object was overwritten while it was being read."""


def _ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(size, start + chunk)) for start in range(0, size, chunk)]


def _head(s3: Any, bucket: str, key: str) -> tuple[int, str]:
    head = s3.head_object(Bucket=bucket, Key=key)
    return int(head["ContentLength"]), head["ETag"]


def _read_range(s3: Any, bucket: str, key: str, etag: str, start: int, end: int) -> Iterator[bytes]:
    """The bytes start..end (exclusive) of the version ``etag``, in pieces."""
    try:
        resp = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            raise ObjectChanged(key) from e
        raise
    body = resp["Body"]
    try:
        pos = start
        while pos < end:
            data = body.read(min(PIECE, end - pos))
            if not data:
                raise OSError(f"{key}: range {start}-{end} ended at {pos}")
            pos += len(data)
            yield data
    finally:
        body.close()


def _parallel(size: int, chunk: int, streams: int, one: Callable[[tuple[int, int]], None]) -> None:
    spans = _ranges(size, chunk)
    if spans:
        with ThreadPoolExecutor(max(1, min(streams, len(spans)))) as pool:
            list(pool.map(one, spans))


def read_into(
    s3: Any,
    bucket: str,
    key: str,
    out: bytearray | memoryview | None = None,
    *,
    streams: int = 8,
    chunk: int = CHUNK,
) -> memoryview:
    """Read the whole object into ``out`` (allocated when None) with
    ``streams`` concurrent ranged GETs; returns a view of the bytes."""
    size, etag = _head(s3, bucket, key)
    buf = memoryview(out if out is not None else bytearray(size)).cast("B")
    if len(buf) < size:
        raise ValueError(f"buffer of {len(buf)} bytes for an object of {size}")

    def one(span: tuple[int, int]) -> None:
        pos = span[0]
        for data in _read_range(s3, bucket, key, etag, *span):
            buf[pos : pos + len(data)] = data
            pos += len(data)

    _parallel(size, chunk, streams, one)
    return buf[:size]


def read_bytes(s3: Any, bucket: str, key: str, *, streams: int = 8, chunk: int = CHUNK) -> bytes:
    return bytes(read_into(s3, bucket, key, streams=streams, chunk=chunk))


def download(s3: Any, bucket: str, key: str, path: str | os.PathLike[str], *, streams: int = 8,
             chunk: int = CHUNK) -> int:
    """Read the object into a file with concurrent ranged GETs (each writes
    its own region with pwrite); returns the size."""
    size, etag = _head(s3, bucket, key)
    with open(path, "wb") as f:
        f.truncate(size)
        fd = f.fileno()

        def one(span: tuple[int, int]) -> None:
            pos = span[0]
            for data in _read_range(s3, bucket, key, etag, *span):
                os.pwrite(fd, data, pos)
                pos += len(data)

        _parallel(size, chunk, streams, one)
    return size

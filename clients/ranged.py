"""Parallel ranged reads of one large object, sync and async.

The object is cut into chunk-aligned ranges (16 MiB by default, the
cache's chunk size, so each range is one cache chunk) read by several
concurrent GETs straight into a caller's buffer: a ``bytearray``, a
``memoryview`` (e.g. of a numpy array or a pinned host buffer) or a file.
The bytes go from the socket into the destination with no copy in Python
(``readinto`` on the response's connection, the GIL released while the
kernel copies), so memory use is the destination plus one socket buffer
per stream, and the reader runs at the node's own rate.

Every range is pinned to the ETag seen at the start (If-Match), so a read
never mixes two versions of an object: a change mid-read raises
``ObjectChanged``.

Functions (``s3`` is a boto3 client, e.g. ``clients.connect()``)::

    read_into(s3, bucket, key, out=None, *, streams=8, chunk=CHUNK) -> memoryview
    read_bytes(s3, bucket, key, *, streams=8, chunk=CHUNK) -> bytes
    download(s3, bucket, key, path, *, streams=8, chunk=CHUNK) -> int
    await aread_into(...), await aread_bytes(...), await adownload(...)

The async forms run the same boto3 range reads on a private thread pool
and never block the event loop; cancelling one stops the ranges not yet
started and waits for the ones in flight (they write into the caller's
buffer) before the cancellation goes on. Threads, not an event-loop HTTP
client: boto3 brings signing, retries and credentials, and with
``readinto`` a thread costs nothing while the kernel fills the buffer,
whereas an event-loop client would copy every byte on the loop's thread.

`RangedReader` is the machinery; a subclass changes which client reads
each range (``clients.direct`` sends each chunk to the node that caches it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError
from botocore.response import StreamingBody

CHUNK = 16 * 1024 * 1024
PIECE = 1024 * 1024  # bytes per write when the destination is a file

Span = tuple[int, int]  # start, end (exclusive)
Buffer = bytearray | memoryview


class ObjectChanged(Exception):
    """The object was overwritten while it was being read."""


@dataclass(frozen=True)
class Pinned:
    """One version of an object, as seen by the HEAD a read starts with."""

    bucket: str
    key: str
    size: int
    etag: str
    chunk: int  # the ranges' size (the last may be shorter)

    def spans(self) -> list[Span]:
        return [(start, min(self.size, start + self.chunk)) for start in range(0, self.size, self.chunk)]


class _Body:
    """A GET's response body read straight into caller memory.

    botocore's body wraps urllib3's, which wraps ``http.client``'s; reading
    the last with ``readinto`` fills the destination from the socket with no
    intermediate ``bytes`` (which cost a fresh, slowly first-touched
    allocation per piece). Anything else (a checksum-validating body, a
    future botocore) is read through the public ``read``."""

    def __init__(self, body: Any) -> None:
        self.body = body
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        self._fp = fp if type(body) is StreamingBody and isinstance(fp, http.client.HTTPResponse) else None

    def fill(self, view: memoryview) -> None:
        """Exactly ``len(view)`` bytes into ``view``."""
        pos, n = 0, len(view)
        while pos < n:
            if self._fp is not None:
                got = self._fp.readinto(view[pos:])
            else:
                data = self.body.read(min(PIECE, n - pos))
                got = len(data)
                view[pos : pos + got] = data
            if not got:
                raise OSError(f"response body ended {n - pos} bytes short")
            pos += got

    def close(self) -> None:
        if self._fp is not None and self._fp.isclosed():
            # Read to its end: the connection goes back to the pool, as
            # urllib3 does itself when it reads a body to the end.
            self.body._raw_stream.release_conn()
        self.body.close()


Sink = Callable[[_Body, int, int], None]  # (body, start, end): store bytes start..end


def head(s3: Any, bucket: str, key: str) -> tuple[int, str]:
    resp = s3.head_object(Bucket=bucket, Key=key)
    return int(resp["ContentLength"]), resp["ETag"]


def fetch_span(s3: Any, obj: Pinned, span: Span, sink: Sink) -> None:
    """Bytes ``span`` of the version ``obj`` through the client ``s3`` into
    ``sink``; ``ObjectChanged`` if that version is gone."""
    start, end = span
    try:
        resp = s3.get_object(Bucket=obj.bucket, Key=obj.key, Range=f"bytes={start}-{end - 1}", IfMatch=obj.etag)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            raise ObjectChanged(obj.key) from e
        raise
    body = _Body(resp["Body"])
    try:
        got = resp.get("ContentRange") or (f"bytes 0-{obj.size - 1}/{obj.size}" if obj.size else "")
        want = f"bytes {start}-{end - 1}/"
        if not got.startswith(want) or int(resp.get("ContentLength", -1)) != end - start:
            raise OSError(f"{obj.key}: asked for {want}, got {got!r} ({resp.get('ContentLength')} bytes)")
        sink(body, start, end)
    finally:
        body.close()


def _into_memory(buf: memoryview) -> Sink:
    def sink(body: _Body, start: int, end: int) -> None:
        body.fill(buf[start:end])

    return sink


def _into_file(fd: int) -> Sink:
    local = threading.local()

    def sink(body: _Body, start: int, end: int) -> None:
        piece = getattr(local, "piece", None)
        if piece is None:
            piece = local.piece = memoryview(bytearray(PIECE))  # one per thread, reused
        pos = start
        while pos < end:
            view = piece[: min(PIECE, end - pos)]
            body.fill(view)
            os.pwrite(fd, view, pos)
            pos += len(view)

    return sink


def _buffer(out: Buffer | None, size: int) -> memoryview:
    buf = memoryview(out if out is not None else bytearray(size)).cast("B")
    if len(buf) < size:
        raise ValueError(f"buffer of {len(buf)} bytes for an object of {size}")
    return buf


class RangedReader:
    """Reads objects with ``streams`` concurrent ranged GETs through ``s3``.

    Two methods decide where the bytes come from; a subclass overrides them:
    `open` (the HEAD: size, ETag, range size) and `fetch` (one range)."""

    def __init__(self, s3: Any, *, streams: int = 8, chunk: int = CHUNK) -> None:
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        self.s3, self.streams, self.chunk = s3, streams, chunk

    def open(self, bucket: str, key: str) -> Pinned:
        size, etag = head(self.s3, bucket, key)
        return Pinned(bucket, key, size, etag, self.chunk)

    def fetch(self, obj: Pinned, span: Span, sink: Sink) -> None:
        fetch_span(self.s3, obj, span, sink)

    # -- sync
    def _run(self, obj: Pinned, sink: Sink) -> None:
        spans = obj.spans()
        if spans:
            with concurrent.futures.ThreadPoolExecutor(max(1, min(self.streams, len(spans)))) as pool:
                # map cancels the ranges not yet started when one fails.
                list(pool.map(lambda span: self.fetch(obj, span, sink), spans))

    def read_into(self, bucket: str, key: str, out: Buffer | None = None) -> memoryview:
        """The whole object into ``out`` (allocated when None); returns a
        view of its bytes."""
        obj = self.open(bucket, key)
        buf = _buffer(out, obj.size)
        self._run(obj, _into_memory(buf))
        return buf[: obj.size]

    def read_bytes(self, bucket: str, key: str) -> bytes:
        return bytes(self.read_into(bucket, key))

    def download(self, bucket: str, key: str, path: str | os.PathLike[str]) -> int:
        """The object into a file (each range written in place with pwrite);
        returns the size."""
        obj = self.open(bucket, key)
        with open(path, "wb") as f:
            f.truncate(obj.size)
            self._run(obj, _into_file(f.fileno()))
        return obj.size

    # -- async
    async def _arun(self, obj: Pinned, sink: Sink) -> None:
        spans = obj.spans()
        if not spans:
            return
        pool = concurrent.futures.ThreadPoolExecutor(max(1, min(self.streams, len(spans))))
        futures = [pool.submit(self.fetch, obj, span, sink) for span in spans]
        try:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=False)
            running = [f for f in futures if not f.done()]
            if running:
                # They write into the caller's buffer: finish before it is handed back.
                await asyncio.shield(asyncio.to_thread(concurrent.futures.wait, running))

    async def aread_into(self, bucket: str, key: str, out: Buffer | None = None) -> memoryview:
        obj = await asyncio.to_thread(self.open, bucket, key)
        buf = _buffer(out, obj.size)
        await self._arun(obj, _into_memory(buf))
        return buf[: obj.size]

    async def aread_bytes(self, bucket: str, key: str) -> bytes:
        return bytes(await self.aread_into(bucket, key))

    async def adownload(self, bucket: str, key: str, path: str | os.PathLike[str]) -> int:
        obj = await asyncio.to_thread(self.open, bucket, key)
        with open(path, "wb") as f:
            f.truncate(obj.size)
            await self._arun(obj, _into_file(f.fileno()))
        return obj.size


class Functions:
    """The module-level functions of a reader class: ``Functions(R).read_into(s3,
    bucket, key, ...)`` is ``R(s3, streams=..., chunk=...).read_into(bucket, key, ...)``
    (this module's functions are those of `RangedReader`, clients.direct's
    those of its DirectReader)."""

    def __init__(self, reader: type[RangedReader]) -> None:
        self.reader = reader

    def read_into(self, s3: Any, bucket: str, key: str, out: Buffer | None = None, *, streams: int = 8,
                  chunk: int = CHUNK) -> memoryview:
        """Read the whole object into ``out`` (allocated when None) with
        ``streams`` concurrent ranged GETs; returns a view of the bytes."""
        return self.reader(s3, streams=streams, chunk=chunk).read_into(bucket, key, out)

    def read_bytes(self, s3: Any, bucket: str, key: str, *, streams: int = 8, chunk: int = CHUNK) -> bytes:
        return self.reader(s3, streams=streams, chunk=chunk).read_bytes(bucket, key)

    def download(self, s3: Any, bucket: str, key: str, path: str | os.PathLike[str], *, streams: int = 8,
                 chunk: int = CHUNK) -> int:
        """Read the object into a file with concurrent ranged GETs (each
        writes its own region with pwrite); returns the size."""
        return self.reader(s3, streams=streams, chunk=chunk).download(bucket, key, path)

    async def aread_into(self, s3: Any, bucket: str, key: str, out: Buffer | None = None, *, streams: int = 8,
                         chunk: int = CHUNK) -> memoryview:
        """`read_into` without blocking the event loop."""
        return await self.reader(s3, streams=streams, chunk=chunk).aread_into(bucket, key, out)

    async def aread_bytes(self, s3: Any, bucket: str, key: str, *, streams: int = 8, chunk: int = CHUNK) -> bytes:
        return await self.reader(s3, streams=streams, chunk=chunk).aread_bytes(bucket, key)

    async def adownload(self, s3: Any, bucket: str, key: str, path: str | os.PathLike[str], *, streams: int = 8,
                        chunk: int = CHUNK) -> int:
        return await self.reader(s3, streams=streams, chunk=chunk).adownload(bucket, key, path)


_functions = Functions(RangedReader)
read_into, read_bytes, download = _functions.read_into, _functions.read_bytes, _functions.download
aread_into, aread_bytes, adownload = _functions.aread_into, _functions.aread_bytes, _functions.adownload

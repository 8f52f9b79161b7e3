"""Byte ranges of one version of an object, read straight into memory.

The primitive under the model loaders (``clients.safetensors``): open an
object with one small ranged GET (its first bytes, size and ETag in one
round trip), then read any byte range of that version into a caller's
``memoryview`` with ``If-Match`` on the ETag, many ranges at once.

Opening is one ranged ``get_object`` through boto3 (the first bytes, the
size and the ETag in one round trip). Over plain HTTP (``transport="http"``,
the default for http:// endpoints) the ranges are then read by
``clients.ranged.RangedReader.read_spans``: presigned GETs on kept-alive
connections driven by one asyncio loop, each body received straight into
the destination (one copy, from the socket to the caller's memory), many
ranges at once, retried as whole reads are. HTTPS endpoints, and
``transport="boto"``, read every range with boto3's ``get_object`` (TLS
verification as the client is set up) and ``Body.readinto``.

When the node runs on this machine (``transport="auto"`` and the node's
short-circuit socket answers, see ``clients.local``), ranges are read from
its chunk files instead, with ``preadv`` straight into the destination:
no HTTP, no loopback TCP. A list of small destinations (tensors) is read
with one request into a per-thread scratch buffer, then copied out.

Transient failures (a connection reset, a kept-alive connection closed by
the server, 5xx, throttling) are retried a few times with backoff (by
``clients.ranged``, or boto3's own retries); other error answers become
botocore's ``ClientError``, as from boto3 itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from botocore.exceptions import ClientError

from nearstore.clients.local import LocalChanged, LocalNode, LocalUnavailable
from nearstore.clients.ranged import CHUNK, ObjectChanged, Pinned, RangedReader

Transport = Literal["auto", "http", "boto"]


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an object: what every range read is pinned to."""

    bucket: str
    key: str
    size: int
    etag: str

    def pinned(self, chunk: int = CHUNK) -> Pinned:
        return Pinned(self.bucket, self.key, self.size, self.etag, chunk)


def _bytes_view(v: Any) -> memoryview:
    v = memoryview(v)
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


def _fill(readinto: Callable[[memoryview], int | None], segs: list[memoryview], key: str,
          start: int) -> None:  # fmt: skip
    """Read into each buffer in turn until all are full."""
    pos = start
    for seg in segs:
        got = 0
        while got < len(seg):
            k = readinto(seg[got:])
            if not k:
                raise OSError(f"{key}: range from {start} ended at {pos + got}")
            got += k
        pos += got


_SCRATCH = threading.local()
DIRECT_MIN = 256 * 1024  # a buffer this large is read into directly


def _read_local(node: LocalNode, obj: ObjectVersion, start: int, segs: list[memoryview]) -> None:
    """The range from the node's chunk files: each large buffer read into
    directly, each run of small ones through a per-thread scratch buffer
    (one request for many small tensors, then a copy)."""
    runs: list[list[memoryview]] = []
    for seg in segs:
        if len(seg) >= DIRECT_MIN or not runs or len(runs[-1][0]) >= DIRECT_MIN:
            runs.append([seg])
        else:
            runs[-1].append(seg)
    pos = start
    for run in runs:
        n = sum(len(v) for v in run)
        if len(run) == 1:
            dest = run[0]
        else:
            scratch = getattr(_SCRATCH, "buf", None)
            if scratch is None or len(scratch) < n:
                scratch = _SCRATCH.buf = bytearray(max(n, DIRECT_MIN))
            dest = memoryview(scratch)[:n]
        try:
            view, _, _ = node.read_into(obj.bucket, obj.key, dest, start=pos, end=pos + n,
                                        if_match=obj.etag, streams=1)  # fmt: skip
        except LocalChanged as e:
            raise ObjectChanged(obj.key) from e
        if len(view) != n:
            raise LocalUnavailable(f"{obj.key}: {len(view)} bytes for {n}")
        if len(run) > 1:
            off = 0
            for v in run:
                v[:] = dest[off : off + len(v)]
                off += len(v)
        pos += n


def _content_range(value: str | None) -> tuple[int, int, int] | None:
    """'bytes a-b/total' -> (a, b + 1, total); None if absent or odd."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    first, _, last = span.partition("-")
    try:
        return int(first), int(last) + 1, int(total)
    except ValueError:
        return None


class RangeGetter:
    """Opens objects and reads their byte ranges with a boto3 client's
    endpoint and credentials (see the module docstring)."""

    def __init__(self, s3: Any, *, transport: Transport = "auto") -> None:
        self.s3 = s3
        scheme = urlsplit(s3.meta.endpoint_url).scheme
        auto = transport == "auto"
        if transport == "auto":
            transport = "http" if scheme == "http" else "boto"
        if transport == "http" and scheme != "http":
            raise ValueError(f"transport 'http' needs an http:// endpoint, not {scheme}://")
        self.transport = transport
        # The node's short-circuit socket when it runs on this machine
        # (clients.local): ranges are then preadv'd from its chunk files.
        self.local = LocalNode.discover(s3) if auto else None

    # -- opening an object ---------------------------------------------------

    def open(self, bucket: str, key: str, first: int = 256 * 1024) -> tuple[ObjectVersion, bytes]:
        """The object's version (size, ETag) and its first ``first`` bytes
        (fewer if it is smaller), from one ranged GET."""
        if first < 1:
            raise ValueError("first must be at least 1")
        if self.local is not None:  # the node on this machine: no HTTP round trip
            try:
                view, size, etag = self.local.read_into(bucket, key, start=0, end=first)
                return ObjectVersion(bucket, key, size, etag), bytes(view)
            except LocalUnavailable:
                self.local = None
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "InvalidRange":
                    raise
                # an empty object has no byte 0: asked over HTTP below
        try:
            resp = self.s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{first - 1}")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("InvalidRange", "416"):
                raise
            head = self.s3.head_object(Bucket=bucket, Key=key)  # an empty object has no byte 0
            return ObjectVersion(bucket, key, int(head["ContentLength"]), head["ETag"]), b""
        with resp["Body"] as stream:
            body = stream.read(first)  # no more, even from a server that ignores Range
        cr = _content_range(resp.get("ContentRange"))
        size = cr[2] if cr is not None else int(resp["ContentLength"])
        return ObjectVersion(bucket, key, size, resp["ETag"]), body

    # -- reading ranges ------------------------------------------------------

    def read_into(self, obj: ObjectVersion, start: int,
                  out: memoryview | Sequence[memoryview]) -> None:  # fmt: skip
        """Fill ``out`` with the bytes ``start .. start + len(out)`` of the
        version ``obj`` (ObjectChanged if the object is no longer it).
        ``out`` may be a list of buffers, filled in turn by the one GET."""
        segs = _segments(obj, start, out)
        if not segs:
            return
        local = self.local
        if local is not None:
            try:
                return _read_local(local, obj, start, segs)
            except LocalUnavailable:
                self.local = None  # over HTTP from now on
        if self.transport == "boto":
            self._read_boto(obj, start, sum(len(v) for v in segs), segs)
        else:
            RangedReader(self.s3, local=False).read_spans(obj.pinned(), [(start, segs)])

    def _read_boto(self, obj: ObjectVersion, start: int, n: int,
                   segs: list[memoryview]) -> None:  # fmt: skip
        try:
            resp = self.s3.get_object(Bucket=obj.bucket, Key=obj.key,
                                      Range=f"bytes={start}-{start + n - 1}", IfMatch=obj.etag)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise ObjectChanged(obj.key) from e
            raise
        with resp["Body"] as body:
            _fill(body.readinto, segs, obj.key, start)


def _segments(obj: ObjectVersion, start: int, out: memoryview | Sequence[memoryview]) -> list[memoryview]:
    """``out``'s non-empty buffers as byte views, checked to lie in the object."""
    segs = [_bytes_view(v) for v in ([out] if isinstance(out, memoryview) else out)]
    segs = [v for v in segs if len(v)]
    n = sum(len(v) for v in segs)
    if n and (start < 0 or start + n > obj.size):
        raise ValueError(f"{obj.key}: range {start}+{n} outside an object of {obj.size}")
    return segs


def read_ranges(
    getter: RangeGetter,
    jobs: Sequence[tuple[ObjectVersion, int, memoryview | Sequence[memoryview]]],
    *,
    streams: int = 16,
) -> None:
    """Read every (object, start, destination) job, ``streams`` at a time;
    the first failure cancels what has not started and is raised."""
    if not jobs:
        return
    if getter.local is None and getter.transport == "http":
        # Over HTTP: each object's ranges on one asyncio loop, ``streams``
        # GETs at a time (clients.ranged), no thread per range.
        by_obj: dict[ObjectVersion, list[tuple[int, list[memoryview]]]] = {}
        for obj, start, out in jobs:
            by_obj.setdefault(obj, []).append((start, _segments(obj, start, out)))
        reader = RangedReader(getter.s3, streams=streams, local=False)
        for obj, spans in by_obj.items():
            reader.read_spans(obj.pinned(), spans)
        return
    if getter.transport == "boto":  # no more threads than boto3 keeps connections
        streams = min(streams, getter.s3.meta.config.max_pool_connections)
    if len(jobs) == 1 or streams <= 1:
        for obj, start, out in jobs:
            getter.read_into(obj, start, out)
        return
    with ThreadPoolExecutor(min(streams, len(jobs)), thread_name_prefix="rangeget") as pool:
        futures = [pool.submit(getter.read_into, *job) for job in jobs]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                for other in futures:
                    other.cancel()
                raise f.exception()  # type: ignore[misc]


def split_range(start: int, end: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """``start..end`` cut at every multiple of ``chunk``: one cache chunk per GET."""
    cuts = range((start // chunk + 1) * chunk, end, chunk)
    return list(zip([start, *cuts], [*cuts, end], strict=True)) if end > start else []

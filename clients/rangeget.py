"""Byte ranges of one version of an object, read straight into memory.

The primitive under the model loaders (``clients.safetensors``): open an
object with one small ranged GET (its first bytes, size and ETag in one
round trip), then read any byte range of that version into a caller's
``memoryview`` with ``If-Match`` on the ETag, many ranges at once.

Over plain HTTP a range is one GET on a kept-alive ``http.client``
connection, authenticated by a URL that boto3 presigns once per object
(credentials, endpoint and addressing exactly as the client has them),
and the body is read with ``readinto`` into the destination: one copy,
from the socket to the caller's memory. boto3's ``Body.read`` makes two
(and allocates every piece), which is what bounds the plain ranged
reader. HTTPS endpoints, and ``transport="boto"``, go through boto3's
``get_object`` (TLS verification as the client is set up) and
``Body.readinto``.

When the node runs on this machine (``transport="auto"`` and the node's
short-circuit socket answers, see ``clients.local``), ranges are read from
its chunk files instead, with ``preadv`` straight into the destination:
no HTTP, no loopback TCP. A list of small destinations (tensors) is read
with one request into a per-thread scratch buffer, then copied out.

Transient failures (a connection reset, a kept-alive connection closed by
the server, 5xx, throttling) are retried a few times with backoff; other
error answers become botocore's ``ClientError``, as from boto3 itself.
"""

from __future__ import annotations

import http.client
import io
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit
from xml.etree import ElementTree

from botocore.exceptions import ClientError

from clients.local import LocalChanged, LocalNode, LocalUnavailable
from clients.ranged import CHUNK, ObjectChanged

Transport = Literal["auto", "http", "boto"]
T = TypeVar("T")

PRESIGN_SECONDS = 3600
ATTEMPTS = 5
TIMEOUT_S = 60.0
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an object: what every range read is pinned to."""

    bucket: str
    key: str
    size: int
    etag: str
    url: str  # presigned GET (http transport), "" for boto


class _Retry(Exception):
    """A transient failure: the range may be read again."""


class _ConnPool:
    """Idle kept-alive connections per (host, port); at most ``max_idle``
    each. Reset in a forked child (a socket must not be shared)."""

    def __init__(self, max_idle: int = 64) -> None:
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self, host: str, port: int) -> http.client.HTTPConnection:
        """An idle connection still open (one the server closed is readable:
        dropped, as urllib3 does), else a new one."""
        while True:
            with self._lock:
                if self._pid != os.getpid():
                    self._idle, self._pid = {}, os.getpid()
                idle = self._idle.get((host, port))
                conn = idle.pop() if idle else None
            if conn is None:
                return http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
            if conn.sock is not None and not _readable(conn.sock):
                return conn
            conn.close()

    def clear(self, host: str, port: int) -> None:
        """Close every idle connection to (host, port): after a connection
        failure the others are likely dead too (a restarted server)."""
        with self._lock:
            idle = self._idle.pop((host, port), [])
        for conn in idle:
            conn.close()

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault((conn.host, conn.port), [])
            if len(idle) < self.max_idle and self._pid == os.getpid():
                idle.append(conn)
                return
        conn.close()


def _bytes_view(v: Any) -> memoryview:
    v = memoryview(v)
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


def _fill(readinto: Callable[[memoryview], int | None], segs: list[memoryview], key: str,
          start: int) -> None:  # fmt: skip
    """Read into each buffer in turn until all are full; a body that ends
    early is a transient failure (the range is read again)."""
    pos = start
    for seg in segs:
        got = 0
        while got < len(seg):
            k = readinto(seg[got:])
            if not k:
                raise _Retry(f"{key}: range from {start} ended at {pos + got}")
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


def _readable(sock: socket.socket) -> bool:
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(p.poll(0))


_POOL = _ConnPool()


def _client_error(status: int, body: bytes, op: str = "GetObject") -> ClientError:
    code, message = str(status), http.client.responses.get(status, "")
    try:
        root = ElementTree.fromstring(body) if body else None
    except ElementTree.ParseError:
        root = None
    if root is not None:
        code = root.findtext("Code") or code
        message = root.findtext("Message") or message
    if status == 404 and code == "404":
        code = "NoSuchKey"
    return ClientError(
        {"Error": {"Code": code, "Message": message},
         "ResponseMetadata": {"HTTPStatusCode": status}}, op)  # fmt: skip


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

    def __init__(self, s3: Any, *, transport: Transport = "auto",
                 attempts: int = ATTEMPTS) -> None:  # fmt: skip
        self.s3 = s3
        scheme = urlsplit(s3.meta.endpoint_url).scheme
        auto = transport == "auto"
        if transport == "auto":
            transport = "http" if scheme == "http" else "boto"
        if transport == "http" and scheme != "http":
            raise ValueError(f"transport 'http' needs an http:// endpoint, not {scheme}://")
        self.transport = transport
        self.attempts = max(1, attempts)
        # The node's short-circuit socket when it runs on this machine
        # (clients.local): ranges are then preadv'd from its chunk files.
        self.local = LocalNode.discover(s3) if auto else None

    # -- opening an object ---------------------------------------------------

    def open(self, bucket: str, key: str, first: int = 256 * 1024) -> tuple[ObjectVersion, bytes]:
        """The object's version (size, ETag) and its first ``first`` bytes
        (fewer if it is smaller), from one ranged GET."""
        if first < 1:
            raise ValueError("first must be at least 1")
        if self.transport == "boto":
            return self._open_boto(bucket, key, first)
        url = self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS)

        def once() -> tuple[ObjectVersion, bytes]:
            status, headers, body = self._request(url, {"Range": f"bytes=0-{first - 1}"},
                                                  max(first, 64 * 1024))  # fmt: skip
            if status == 416:  # an empty object has no byte 0
                if headers.get("content-range", "").strip() == "bytes */0":
                    return ObjectVersion(bucket, key, 0, headers.get("etag", ""), url), b""
                size, etag = self._head(bucket, key)
                return ObjectVersion(bucket, key, size, etag, url), b""
            if status not in (200, 206):
                raise _client_error(status, body)
            if status == 200:  # Range ignored: the whole object's size from its length
                size = int(headers.get("content-length", len(body)))
                body = body[:first]
            else:
                cr = _content_range(headers.get("content-range"))
                if cr is None or cr[0] != 0 or cr[1] - cr[0] != len(body):
                    raise OSError(f"{key}: bad Content-Range {headers.get('content-range')!r}")
                size = cr[2]
            return ObjectVersion(bucket, key, size, headers.get("etag", ""), url), body

        return self._retrying(once, key)

    def _head(self, bucket: str, key: str) -> tuple[int, str]:
        head = self.s3.head_object(Bucket=bucket, Key=key)
        return int(head["ContentLength"]), head["ETag"]

    def _open_boto(self, bucket: str, key: str, first: int) -> tuple[ObjectVersion, bytes]:
        try:
            resp = self.s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{first - 1}")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("InvalidRange", "416"):
                raise
            size, etag = self._head(bucket, key)
            return ObjectVersion(bucket, key, size, etag, ""), b""
        with resp["Body"] as stream:
            body = stream.read(first)  # no more, even from a server that ignores Range
        cr = _content_range(resp.get("ContentRange"))
        size = cr[2] if cr is not None else int(resp["ContentLength"])
        return ObjectVersion(bucket, key, size, resp["ETag"], ""), body

    # -- reading ranges ------------------------------------------------------

    def read_into(self, obj: ObjectVersion, start: int,
                  out: memoryview | Sequence[memoryview]) -> None:  # fmt: skip
        """Fill ``out`` with the bytes ``start .. start + len(out)`` of the
        version ``obj`` (ObjectChanged if the object is no longer it).
        ``out`` may be a list of buffers, filled in turn by the one GET."""
        segs = [_bytes_view(v) for v in ([out] if isinstance(out, memoryview) else out)]
        segs = [v for v in segs if len(v)]
        n = sum(len(v) for v in segs)
        if n == 0:
            return
        if start < 0 or start + n > obj.size:
            raise ValueError(f"{obj.key}: range {start}+{n} outside an object of {obj.size}")
        local = self.local
        if local is not None:
            try:
                return _read_local(local, obj, start, segs)
            except LocalUnavailable:
                self.local = None  # over HTTP from now on
        if self.transport == "boto":
            self._retrying(lambda: self._read_boto(obj, start, n, segs), obj.key)
        else:
            self._retrying(lambda: self._read_http(obj, start, n, segs), obj.key)

    def _read_http(self, obj: ObjectVersion, start: int, n: int,
                   segs: list[memoryview]) -> None:  # fmt: skip
        end = start + n
        parts = urlsplit(obj.url)
        target = f"{parts.path}?{parts.query}"
        conn = _POOL.get(parts.hostname or "127.0.0.1", parts.port or 80)
        reusable = False
        try:
            try:
                conn.request("GET", target, headers={
                    "Range": f"bytes={start}-{end - 1}", "If-Match": obj.etag})  # fmt: skip
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                _POOL.clear(conn.host, conn.port)
                raise _Retry(f"{e!r}") from e
            if resp.status != 206:
                body = resp.read()
                if resp.status == 412:
                    raise ObjectChanged(obj.key)
                if resp.status in _RETRY_STATUS:
                    raise _Retry(f"status {resp.status}")
                if resp.status == 200 and start == 0 and len(body) == obj.size == end:
                    _fill(io.BytesIO(body).readinto, segs, obj.key, start)  # Range ignored
                    reusable = not resp.will_close
                    return
                raise _client_error(resp.status, body)
            cr = _content_range(resp.getheader("content-range"))
            if cr != (start, end, obj.size):
                resp.close()
                raise OSError(f"{obj.key}: asked {start}-{end - 1}/{obj.size}, "
                              f"got Content-Range {resp.getheader('content-range')!r}")
            try:
                _fill(resp.readinto, segs, obj.key, start)
            except (OSError, http.client.HTTPException) as e:
                raise _Retry(f"{e!r}") from e
            reusable = not resp.will_close and resp.isclosed()
        finally:
            if reusable:
                _POOL.put(conn)
            else:
                conn.close()

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

    def _request(self, url: str, headers: dict[str, str],
                 limit: int) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """One GET; at most ``limit`` bytes of the body are read (a server
        that ignores Range must not make us read a whole object here)."""
        parts = urlsplit(url)
        conn = _POOL.get(parts.hostname or "127.0.0.1", parts.port or 80)
        try:
            conn.request("GET", f"{parts.path}?{parts.query}", headers=headers)
            resp = conn.getresponse()
            body = resp.read(limit)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            _POOL.clear(conn.host, conn.port)
            raise _Retry(f"{e!r}") from e
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status in _RETRY_STATUS:
            conn.close()
            raise _Retry(f"status {resp.status}")
        if resp.will_close or not resp.isclosed():  # closed, or body left unread
            conn.close()
        else:
            _POOL.put(conn)
        return resp.status, hdrs, body

    def _retrying(self, fn: Callable[[], T], what: str) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except _Retry as e:
                if attempt == self.attempts - 1:
                    raise OSError(f"{what}: gave up after {self.attempts} attempts: {e}") from e
                if attempt:  # the first retry is at once: often a stale kept-alive connection
                    time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")


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

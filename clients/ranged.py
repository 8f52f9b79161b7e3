"""Parallel ranged reads of one large object, sync and async.

The object is cut into chunk-aligned ranges (16 MiB by default, the
cache's chunk size, so each range is one cache chunk) read by several
concurrent GETs straight into a caller's buffer: a ``bytearray``, a
``memoryview`` (e.g. of a numpy array or a pinned host buffer) or a file.

Every range is pinned to the ETag seen at the start (If-Match), so a read
never mixes two versions of an object: a change mid-read raises
``ObjectChanged``.

Functions (``s3`` is a boto3 client, e.g. ``nearstore.connect()``)::

    read_into(s3, bucket, key, out=None, *, streams=16, chunk=CHUNK) -> memoryview
    read_bytes(s3, bucket, key, *, streams=16, chunk=CHUNK) -> bytes
    download(s3, bucket, key, path, *, streams=16, chunk=CHUNK) -> int
    await aread_into(...), await aread_bytes(...), await adownload(...)

How: boto3 does what it is good at, once per read: the HEAD (size, ETag)
and presigning the GET (credentials, endpoint, addressing exactly as the
client has them). The ranges are then plain HTTP/1.1 GETs (``Range``,
``If-Match``) on kept-alive connections driven by one asyncio loop, each
connection receiving its body straight into the destination (the
protocol's receive buffer *is* the destination's slice): one kernel copy,
no thread per stream, no Python per byte. The synchronous functions run
the same coroutine on a private loop. Measured (bench/readers.py): a
thread pool of boto3 ``get_object`` calls, even reading with ``readinto``,
spent about 1.6x the load generator's CPU per byte (0.7 ms of boto3 per
request, and the threads' GIL hand-offs); this reader spends about what the
load generator does, which matters where the client shares cores with the
node.

Connection failures, stalls (no byte for ``IDLE_TIMEOUT`` s), 429 and 5xx
are retried on a new connection (``ATTEMPTS`` in all, with backoff); a 412
is ``ObjectChanged``; other errors are botocore ``ClientError``s with the
server's code. A response the reader cannot take as it is (no
Content-Length, or not the range asked for) is an error, never bytes
written in the wrong place. The connections go to the presigned URL's host
directly (no proxy). Cancelling an async read aborts its connections
before the cancellation goes on, so nothing writes into the buffer after.

When the node runs on this machine, reads into memory skip HTTP: the
node's short-circuit socket hands out descriptors of the chunk files and
the reader ``preadv``s them (``clients.local``; ``local=False`` or
NEARSTORE_LOCAL_READS=0 turns that off). Anything the socket cannot serve
falls back to the HTTP path above.

`RangedReader` is the machinery; a subclass changes which node reads each
range (`route`): ``clients.direct`` sends each chunk to the node caching it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit
from xml.etree import ElementTree

from botocore.exceptions import ClientError

from nearstore.clients.local import LocalChanged, LocalNode, LocalNotServed, LocalUnavailable
from nearstore.metadata.defaults import DEFAULT_CHUNK_SIZE

CHUNK = DEFAULT_CHUNK_SIZE
# Concurrent ranges per read: bench/readers.py measured 0.73x (4), 0.86x
# (8) and 0.98x (16) of the node's warm throughput on 2 cores.
STREAMS = 16
PIECE = 1024 * 1024  # bytes per write when the destination is a file
ATTEMPTS = 4
IDLE_TIMEOUT = 30.0  # seconds without a byte before a range is abandoned (and retried)
FIRST_CHOICE_IDLE_TIMEOUT = 5.0  # the same for a node with another behind it in the route
CONNECT_TIMEOUT = 3.0
PRESIGN_SECONDS = 3600
HEAD_MAX = 64 * 1024
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

Span = tuple[int, int]  # start, end (exclusive)
Buffer = bytearray | memoryview
T = TypeVar("T")


class ObjectChanged(Exception):
    """The object was overwritten while it was being read."""


class EndpointFailed(OSError):
    """A node could not serve a range (refused, reset, stalled, 5xx after
    the retries): another node may."""


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


# -- where the bytes of a range go


class _Writer(Protocol):
    def buffer(self, limit: int) -> memoryview: ...  # writable, 1..limit bytes

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class _Dest(Protocol):
    def region(self, start: int, end: int) -> _Writer: ...


class _MemoryRegion:
    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def buffer(self, limit: int) -> memoryview:
        return self.view[self.pos : self.pos + limit]

    def advance(self, n: int) -> None:
        self.pos += n

    def finish(self) -> None:
        pass


class _Memory:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf

    def region(self, start: int, end: int) -> _Writer:
        return _MemoryRegion(self.buf[start:end])


class _FileRegion:
    """Bytes gathered in a 1 MiB piece, written in place with pwrite."""

    def __init__(self, file: _File, start: int) -> None:
        self.file, self.offset, self.fill = file, start, 0
        self.piece = file.pieces.pop() if file.pieces else memoryview(bytearray(PIECE))

    def buffer(self, limit: int) -> memoryview:
        return self.piece[self.fill : self.fill + min(limit, PIECE - self.fill)]

    def advance(self, n: int) -> None:
        self.fill += n
        if self.fill == PIECE:
            self.flush()

    def flush(self) -> None:
        if self.fill:
            os.pwrite(self.file.fd, self.piece[: self.fill], self.offset)
            self.offset, self.fill = self.offset + self.fill, 0

    def finish(self) -> None:
        self.flush()
        self.file.pieces.append(self.piece)


class _File:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pieces: list[memoryview] = []  # reused by the ranges in turn

    def region(self, start: int, end: int) -> _Writer:
        return _FileRegion(self, start)


class _ScatterRegion:
    """One span's bytes into a caller's buffers, filled in turn."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self.views, self.i, self.pos = [v for v in views if len(v)], 0, 0

    def buffer(self, limit: int) -> memoryview:
        return self.views[self.i][self.pos : self.pos + limit]

    def advance(self, n: int) -> None:
        self.pos += n
        if self.i < len(self.views) and self.pos == len(self.views[self.i]):
            self.i, self.pos = self.i + 1, 0

    def finish(self) -> None:
        pass


class _Scatter:
    def __init__(self, spans: dict[Span, Sequence[memoryview]]) -> None:
        self.spans = spans

    def region(self, start: int, end: int) -> _Writer:
        return _ScatterRegion(self.spans[(start, end)])


def _bytes_view(v: Buffer) -> memoryview:
    v = memoryview(v)
    return v if v.format == "B" and v.ndim == 1 else v.cast("B")


def _buffer(out: Buffer | None, size: int) -> memoryview:
    buf = memoryview(out if out is not None else bytearray(size)).cast("B")
    if len(buf) < size:
        raise ValueError(f"buffer of {len(buf)} bytes for an object of {size}")
    return buf


# -- HTTP/1.1 on asyncio, bodies received in place


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes  # error bodies only (a range's bytes went to its writer)


class _Conn(asyncio.BufferedProtocol):
    """One kept-alive HTTP/1.1 connection; a response body goes straight
    into the writer chosen when its head arrives (``get_buffer`` hands the
    kernel the writer's memory, never more than the body's remaining bytes)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.progress = 0  # bytes received, for stall detection
        self._head = bytearray(HEAD_MAX)
        self._hn = 0
        self._state = "idle"  # head, body
        self._choose: Callable[[int, dict[str, str]], _Writer | None] = lambda s, h: None
        self._writer: _Writer | None = None
        self._left = 0
        self._error = bytearray()
        self._scratch = memoryview(bytearray(4096))
        self._resp: _Response | None = None
        self._fut: asyncio.Future[_Response] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's class

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(EndpointFailed(f"connection lost: {exc or 'closed by the server'}"))

    def request(self, data: bytes, choose: Callable[[int, dict[str, str]], _Writer | None]) -> asyncio.Future[_Response]:
        assert self.transport is not None and self._state == "idle"
        self._choose, self._state, self._hn, self.reusable = choose, "head", 0, False
        self._fut = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._fut

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state == "body":
            if self._writer is not None:
                return self._writer.buffer(self._left)
            return self._scratch[: self._left]
        if self._hn < HEAD_MAX:
            return memoryview(self._head)[self._hn :]
        return self._scratch  # a head too long: failed in buffer_updated

    def buffer_updated(self, nbytes: int) -> None:
        self.progress += nbytes
        try:
            if self._state == "body":
                self._body(nbytes)
            elif self._state == "head":
                self._hn += nbytes
                self._parse_head()
            else:
                self._abort(EndpointFailed("bytes from the server between responses"))
        except Exception as e:  # the destination's own failure (a full disk ...): the read's
            self._abort(e)

    def _parse_head(self) -> None:
        end = self._head.find(b"\r\n\r\n", 0, self._hn)
        if end < 0:
            if self._hn >= HEAD_MAX:
                self._abort(EndpointFailed(f"no end of the response head in {HEAD_MAX} bytes"))
            return
        lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
        try:
            version, status = lines[0].split(" ", 2)[:2]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers["content-length"])
        except (ValueError, KeyError):
            self._abort(EndpointFailed(f"a response this reader cannot take: {lines[0]!r} {lines[1:]}"))
            return
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._abort(EndpointFailed(f"a chunked response ({lines[0]!r})"))
            return
        self.reusable = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        self._resp = _Response(int(status), headers, b"")
        self._writer = self._choose(self._resp.status, headers)
        self._error.clear()
        self._left, self._state = length, "body"
        rest = memoryview(self._head)[end + 4 : self._hn]
        self._hn = 0
        while rest and self._left:
            target = self.get_buffer(len(rest))
            n = min(len(target), len(rest))
            target[:n] = rest[:n]
            rest = rest[n:]
            self._body(n)
        if self._state == "body" and not self._left:
            self._body(0)
        if rest:
            self._abort(EndpointFailed("bytes from the server beyond the response"))

    def _body(self, n: int) -> None:
        if self._writer is not None:
            self._writer.advance(n)
        elif len(self._error) < HEAD_MAX:
            self._error += self._scratch[:n]
        self._left -= n
        if self._left:
            return
        self._state = "idle"
        assert self._resp is not None
        self._resp.body = bytes(self._error)
        if self._writer is not None:
            self._writer.finish()
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(self._resp)

    def _fail(self, exc: Exception) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(exc)

    def _abort(self, exc: Exception) -> None:
        self._fail(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _ssl_context(s3: Any) -> ssl.SSLContext:
    """TLS verification as the boto3 client does it (its ``verify``)."""
    verify = getattr(getattr(getattr(s3, "_endpoint", None), "http_session", None), "_verify", True)
    if verify is False:
        return ssl._create_unverified_context()
    return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)


def _client_error(status: int, body: bytes) -> ClientError:
    code, message = str(status), ""
    try:
        root = ElementTree.fromstring(body) if body else None
    except ElementTree.ParseError:
        root = None
    if root is not None:
        code, message = root.findtext("Code") or code, root.findtext("Message") or ""
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")  # fmt: skip


@dataclass
class _Target:
    """A presigned GET of the object at one endpoint."""

    key: tuple[str, str, int]  # scheme, host, port: the connection pool's key
    head: bytes  # request line and Host


@dataclass
class _Read:
    """One object being read: its version, destination, presigned URLs
    and kept-alive connections (closed with it)."""

    obj: Pinned
    dest: _Dest
    targets: dict[int, _Target] = field(default_factory=dict)
    idle: dict[tuple[str, str, int], list[_Conn]] = field(default_factory=dict)
    conns: set[_Conn] = field(default_factory=set)
    ssl: dict[int, ssl.SSLContext] = field(default_factory=dict)
    closed: bool = False

    def target(self, s3: Any) -> _Target:
        t = self.targets.get(id(s3))
        if t is None:
            url = urlsplit(s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.obj.bucket, "Key": self.obj.key}, ExpiresIn=PRESIGN_SECONDS))
            port = url.port or (443 if url.scheme == "https" else 80)
            head = f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n".encode()
            t = self.targets[id(s3)] = _Target((url.scheme, url.hostname or "", port), head)
            if url.scheme == "https":
                self.ssl[id(s3)] = _ssl_context(s3)
        return t

    async def connect(self, s3: Any, target: _Target, reuse: bool = True) -> _Conn:
        idle = self.idle.get(target.key)
        while idle and reuse:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        scheme, host, port = target.key
        ctx = self.ssl.get(id(s3)) if scheme == "https" else None
        making = asyncio.ensure_future(
            loop.create_connection(_Conn, host, port, ssl=ctx, server_hostname=host if ctx else None))
        try:
            # Shielded: on Python 3.11 a wait_for cancelled just as the
            # connection is made drops it unclosed (the cancelled-read test
            # saw the ResourceWarning); here it is closed instead.
            _, conn = await asyncio.wait_for(asyncio.shield(making), CONNECT_TIMEOUT)
        except BaseException as e:
            making.cancel()
            making.add_done_callback(_close_if_made)
            if isinstance(e, (OSError, TimeoutError)) and not isinstance(e, ssl.SSLCertVerificationError):
                raise EndpointFailed(f"{host}:{port}: {e!r}") from e
            raise
        if self.closed:
            # Python 3.11's wait_for returns a result that arrived with the
            # cancellation instead of raising it: a stream cancelled when
            # its read was closed can get here, and must not keep the
            # connection (it would outlive the read, unclosed).
            conn.close()
            raise asyncio.CancelledError
        self.conns.add(conn)
        return conn

    def release(self, target: _Target, conn: _Conn) -> None:
        if conn.reusable and not conn.closed and not self.closed:
            self.idle.setdefault(target.key, []).append(conn)
        else:
            conn.close()
            self.conns.discard(conn)

    def close(self) -> None:
        self.closed = True
        for conn in self.conns:
            conn.close()
        self.conns.clear()
        self.idle.clear()


def _close_if_made(made: asyncio.Task[tuple[asyncio.Transport, _Conn]]) -> None:
    """A connection made for a caller that gave up waiting: closed."""
    if not made.cancelled() and made.exception() is None:
        made.result()[0].close()


async def _wait(conn: _Conn, fut: asyncio.Future[_Response], idle: float) -> _Response:
    """The response, or EndpointFailed once no byte came for ``idle`` s."""
    seen = -1
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), idle)
        except TimeoutError:
            if conn.progress == seen:
                conn.close()
                raise EndpointFailed(f"no byte for {idle:.0f} s") from None
            seen = conn.progress


_LOCAL = threading.local()


def _run_here(coro: Coroutine[Any, Any, T]) -> T:
    """On this thread's private loop, made once (asyncio.run's set-up and
    tear-down cost about a millisecond a read); a forked child makes its own."""
    loop = getattr(_LOCAL, "loop", None)
    if loop is None or loop.is_closed() or _LOCAL.pid != os.getpid():
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
            loop = asyncio.new_event_loop()
        _LOCAL.loop, _LOCAL.pid = loop, os.getpid()
    return loop.run_until_complete(coro)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from synchronous code, on a private loop
    (on a thread of its own when this thread already runs a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_here(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_run_here, coro).result()


class RangedReader:
    """Reads objects with ``streams`` concurrent ranged GETs through ``s3``.

    A subclass changes where the bytes come from: `open` (the HEAD: size,
    ETag, range size) and `route` (which nodes, in order, may serve a
    range), with `failed` told when one of them could not. ``sent`` counts
    the ranges each node served."""

    # Whether reads may go through this machine's node socket (clients.local).
    local_reads = True

    def __init__(self, s3: Any, *, streams: int = STREAMS, chunk: int = CHUNK, local: bool = True) -> None:
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        self.s3, self.streams, self.chunk = s3, max(1, streams), chunk
        self.local = local and self.local_reads
        self.sent: dict[str, int] = {}

    def _local_read(self, bucket: str, key: str, out: Buffer | None) -> memoryview | None:
        """The object through the node's short-circuit socket, or None
        when there is none here or it cannot serve this read."""
        node = LocalNode.discover(self.s3) if self.local else None
        if node is None:
            return None
        try:
            view, _, _ = node.read_into(bucket, key, out, streams=min(self.streams, 4), chunk=self.chunk)
        except LocalNotServed:
            return None  # this bucket only: the node and its socket stay
        except LocalUnavailable:
            LocalNode.forget(self.s3)  # looked for again on a later read
            return None
        except LocalChanged as e:
            raise ObjectChanged(key) from e
        self.sent["local"] = self.sent.get("local", 0) + 1
        return view

    def open(self, bucket: str, key: str) -> Pinned:
        resp = self.s3.head_object(Bucket=bucket, Key=key)
        return Pinned(bucket, key, int(resp["ContentLength"]), resp["ETag"], self.chunk)

    def route(self, obj: Pinned, span: Span) -> Sequence[tuple[str, Any]]:
        """(name, boto3 client) of each node that may serve ``span``, the
        one to ask first first; each but the last is asked once and given
        up on after FIRST_CHOICE_IDLE_TIMEOUT s without a byte."""
        return [(str(self.s3.meta.endpoint_url), self.s3)]

    def failed(self, name: str, error: Exception) -> None:
        """Node ``name`` could not serve a range (the next in the route will)."""

    # -- one range
    async def _fetch(self, read: _Read, span: Span) -> None:
        route = self.route(read.obj, span)
        for i, (name, s3) in enumerate(route):
            last = i == len(route) - 1
            try:
                if last:
                    await self._get(read, s3, span, ATTEMPTS, IDLE_TIMEOUT)
                else:
                    await self._get(read, s3, span, 1, FIRST_CHOICE_IDLE_TIMEOUT)
            except EndpointFailed as e:
                if last:
                    raise
                self.failed(name, e)
                continue
            self.sent[name] = self.sent.get(name, 0) + 1
            return

    async def _get(self, read: _Read, s3: Any, span: Span, attempts: int, idle: float) -> None:
        obj, (start, end) = read.obj, span
        target = read.target(s3)
        want = f"bytes {start}-{end - 1}/{obj.size}"
        request = target.head + (f"Range: bytes={start}-{end - 1}\r\nIf-Match: {obj.etag}\r\n"
                                 "Accept-Encoding: identity\r\n\r\n").encode()  # fmt: skip

        chosen = False

        def choose(status: int, headers: dict[str, str]) -> _Writer | None:
            """Where the body goes: the destination only if it is the range asked for."""
            nonlocal chosen
            whole = status == 200 and start == 0 and end == obj.size
            ok = (status == 206 and headers.get("content-range") == want) or whole
            chosen = ok and int(headers.get("content-length", -1)) == end - start
            return read.dest.region(start, end) if chosen else None

        error: Exception = EndpointFailed("no attempt")
        attempt = 0
        reuse = True
        while attempt < attempts:
            if attempt:
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random()))
            conn: _Conn | None = None
            try:
                conn = await read.connect(s3, target, reuse)
                reused, before = conn.progress > 0, conn.progress
                resp = await _wait(conn, conn.request(request, choose), idle)
            except EndpointFailed as e:
                if conn is not None:
                    conn.close()
                    if reused and conn.progress == before:
                        reuse = False  # a kept-alive connection the server had closed: not an attempt
                        continue
                error = e
                attempt += 1
                continue
            reuse = True
            attempt += 1
            read.release(target, conn)
            if chosen:
                return
            if resp.status == 412:
                raise ObjectChanged(obj.key)
            if resp.status in _RETRY_STATUS:
                error = EndpointFailed(f"HTTP {resp.status}")
                continue
            if resp.status < 300:
                raise OSError(f"{obj.key}: asked for {want}, got HTTP {resp.status} "
                              f"{resp.headers.get('content-range')!r} ({resp.headers.get('content-length')} bytes)")
            raise _client_error(resp.status, resp.body)
        host = target.key[1]
        raise EndpointFailed(f"{host}: {obj.key} {want}: gave up after {attempts} attempts: {error}") from error

    async def _read(self, obj: Pinned, dest: _Dest, spans: Sequence[Span] | None = None) -> None:
        spans = obj.spans() if spans is None else spans
        todo = iter(spans)
        read = _Read(obj, dest)

        async def stream() -> None:
            for span in todo:
                await self._fetch(read, span)

        tasks = [asyncio.ensure_future(stream()) for _ in range(min(self.streams, len(spans)))]
        try:
            if tasks:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
        finally:
            read.close()  # from here on nothing writes into the destination
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the API
    def read_into(self, bucket: str, key: str, out: Buffer | None = None) -> memoryview:
        """The whole object into ``out`` (allocated when None); returns a
        view of its bytes."""
        view = self._local_read(bucket, key, out)
        if view is not None:
            return view
        obj = self.open(bucket, key)
        buf = _buffer(out, obj.size)
        _run(self._read(obj, _Memory(buf)))
        return buf[: obj.size]

    def read_bytes(self, bucket: str, key: str) -> bytes:
        return bytes(self.read_into(bucket, key))

    def read_spans(self, obj: Pinned, spans: Sequence[tuple[int, Buffer | Sequence[Buffer]]]) -> None:
        """Arbitrary byte ranges of the version ``obj`` (as `open` gives it,
        or made from a size and ETag seen otherwise) into caller-given
        buffers: each ``(start, buffer or list of buffers)`` is one ranged
        GET (If-Match: ``obj.etag``) of ``start .. start + their total
        length``, its body received straight into the buffers in turn;
        ``streams`` at a time, over HTTP (never the local socket), routed and
        retried as whole reads are. ObjectChanged if the object is no longer
        that version."""
        _run(self.aread_spans(obj, spans))

    async def aread_spans(self, obj: Pinned, spans: Sequence[tuple[int, Buffer | Sequence[Buffer]]]) -> None:
        """`read_spans` without blocking the event loop."""
        todo: dict[Span, Sequence[memoryview]] = {}
        for start, out in spans:
            views = [_bytes_view(out)] if isinstance(out, (bytearray, memoryview)) else [_bytes_view(v) for v in out]
            end = start + sum(len(v) for v in views)
            if end == start:
                continue
            if start < 0 or end > obj.size:
                raise ValueError(f"{obj.key}: range {start}-{end} outside an object of {obj.size}")
            if (start, end) in todo:
                raise ValueError(f"{obj.key}: range {start}-{end} given twice")
            todo[(start, end)] = views
        if todo:
            await self._read(obj, _Scatter(todo), list(todo))

    def download(self, bucket: str, key: str, path: str | os.PathLike[str]) -> int:
        """The object into a file (each range written in place with pwrite);
        returns the size."""
        obj = self.open(bucket, key)
        with open(path, "wb") as f:
            f.truncate(obj.size)
            _run(self._read(obj, _File(f.fileno())))
        return obj.size

    async def aread_into(self, bucket: str, key: str, out: Buffer | None = None) -> memoryview:
        if self.local:
            # The short-circuit read runs in a thread that cannot be stopped
            # midway: a cancelled caller waits for it, so that nothing writes
            # into the buffer once the cancellation has gone on.
            local = asyncio.ensure_future(asyncio.to_thread(self._local_read, bucket, key, out))
            try:
                view = await asyncio.shield(local)
            except asyncio.CancelledError:
                await asyncio.gather(local, return_exceptions=True)
                raise
            if view is not None:
                return view
        obj = await asyncio.to_thread(self.open, bucket, key)
        buf = _buffer(out, obj.size)
        await self._read(obj, _Memory(buf))
        return buf[: obj.size]

    async def aread_bytes(self, bucket: str, key: str) -> bytes:
        return bytes(await self.aread_into(bucket, key))

    async def adownload(self, bucket: str, key: str, path: str | os.PathLike[str]) -> int:
        obj = await asyncio.to_thread(self.open, bucket, key)
        with open(path, "wb") as f:
            f.truncate(obj.size)
            await self._read(obj, _File(f.fileno()))
        return obj.size


class Functions:
    """The module-level functions of a reader class: ``Functions(R).read_into(s3,
    bucket, key, ...)`` is ``R(s3, streams=..., chunk=...).read_into(bucket, key, ...)``
    (this module's functions are those of `RangedReader`, clients.direct's
    those of its DirectReader)."""

    def __init__(self, reader: type[RangedReader]) -> None:
        self.reader = reader

    def read_into(self, s3: Any, bucket: str, key: str, out: Buffer | None = None, *, streams: int = STREAMS,
                  chunk: int = CHUNK, local: bool = True) -> memoryview:
        """Read the whole object into ``out`` (allocated when None) with
        ``streams`` concurrent ranged GETs (or the node's short-circuit
        socket, unless ``local=False``); returns a view of the bytes."""
        return self.reader(s3, streams=streams, chunk=chunk, local=local).read_into(bucket, key, out)

    def read_bytes(self, s3: Any, bucket: str, key: str, *, streams: int = STREAMS, chunk: int = CHUNK,
                   local: bool = True) -> bytes:
        return self.reader(s3, streams=streams, chunk=chunk, local=local).read_bytes(bucket, key)

    def download(self, s3: Any, bucket: str, key: str, path: str | os.PathLike[str], *, streams: int = STREAMS,
                 chunk: int = CHUNK) -> int:
        """Read the object into a file with concurrent ranged GETs (each
        writes its own region with pwrite); returns the size."""
        return self.reader(s3, streams=streams, chunk=chunk).download(bucket, key, path)

    async def aread_into(self, s3: Any, bucket: str, key: str, out: Buffer | None = None, *, streams: int = STREAMS,
                         chunk: int = CHUNK, local: bool = True) -> memoryview:
        """`read_into` without blocking the event loop."""
        return await self.reader(s3, streams=streams, chunk=chunk, local=local).aread_into(bucket, key, out)

    async def aread_bytes(self, s3: Any, bucket: str, key: str, *, streams: int = STREAMS, chunk: int = CHUNK,
                          local: bool = True) -> bytes:
        return await self.reader(s3, streams=streams, chunk=chunk, local=local).aread_bytes(bucket, key)

    async def adownload(self, s3: Any, bucket: str, key: str, path: str | os.PathLike[str], *, streams: int = STREAMS,
                        chunk: int = CHUNK) -> int:
        return await self.reader(s3, streams=streams, chunk=chunk).adownload(bucket, key, path)


_functions = Functions(RangedReader)
read_into, read_bytes, download = _functions.read_into, _functions.read_bytes, _functions.download
aread_into, aread_bytes, adownload = _functions.aread_into, _functions.aread_bytes, _functions.adownload

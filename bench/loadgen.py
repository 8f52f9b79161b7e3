"""The Python load generator: a separate process driven by JSON lines.

Run as ``python -m nearstore.bench.loadgen``; each line on stdin is one job (`GetJob`
or `PutJob`), each line on stdout its `RunResult`. One long-lived process
serves a whole peer's worth of jobs so that interpreter start-up is paid
once, and it is never the process being measured.

Invariants:

- Every job is bounded twice: by ``duration_s`` (no request starts after the
  deadline) and by ``max_requests``; a request in flight at the deadline is
  finished and counted, so throughput is complete bytes over elapsed time.
- GETs use a minimal HTTP/1.1 client on `asyncio.BufferedProtocol`: every
  connection receives into one shared, reused 1 MiB buffer and the body is
  only counted, never copied or kept. This is the cheapest way to read a
  socket from Python (one kernel copy, like wrk or curl) and it costs the
  shared two cores as little as possible. The aiohttp client is kept as an
  alternative (``client: "aiohttp"``) to measure that claim.
- PUTs use aiohttp (the body is one pre-built buffer, sent as is).
- Latency is request written -> last body byte; TTFB is request written ->
  first body byte (not the status line: a gateway that answers headers before
  it has data should not look fast).

Rejected: boto3 as the client (0.7 GB/s and 400 req/s on this machine, see
MEASURED.md), and one process per job (0.3 s of imports per run).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import resource
import sys
import time
from typing import Literal, NotRequired, TypedDict, cast
from urllib.parse import urlsplit

from nearstore.bench.targets import Target, TargetDict

RECV_BUFFER = 1 << 20
MAX_HEAD = 64 * 1024
REQUEST_TIMEOUT_S = 60.0
ClientKind = Literal["raw", "aiohttp"]


class GetJob(TypedDict):
    op: Literal["get"]
    target: TargetDict
    keys: list[str]
    object_size: int  # size of every key (for ranges)
    range_size: int  # 0: whole objects; else random aligned ranges of this size
    concurrency: int
    duration_s: float
    max_requests: int
    ttfb_only: bool  # close each connection at the first body byte
    client: ClientKind
    seed: int
    # Several endpoints (a cluster's nodes): stream i talks to spread[i % n];
    # absent or empty: every stream talks to `target`.
    spread: NotRequired[list[TargetDict]]


class PutJob(TypedDict):
    op: Literal["put"]
    target: TargetDict
    key_prefix: str
    key_slots: int  # keys are reused (overwritten) round robin: bounded disk use
    size: int
    part_size: int  # 0: one PUT; else S3 multipart with parts of this size
    concurrency: int
    duration_s: float
    max_requests: int


class RunResult(TypedDict):
    requests: int
    bytes: int
    elapsed_s: float
    errors: int
    first_error: str
    latency_ms: list[float]  # sorted; empty when ttfb_only
    ttfb_ms: list[float]  # sorted
    client_cpu_s: float
    generator: NotRequired[str]


class LoadError(Exception):
    """A request failed (status, reset, malformed response)."""


# ---------------------------------------------------------------- GET (raw)


class _Response:
    __slots__ = ("body", "first_byte", "status")

    def __init__(self) -> None:
        self.status = 0
        self.body = 0
        self.first_byte = 0.0


class _HttpConnection(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection that counts response bodies."""

    def __init__(self, shared: memoryview, ttfb_only: bool) -> None:
        self._buf = shared
        self._ttfb_only = ttfb_only
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[_Response] | None = None
        self._head = bytearray()
        self._remaining = -1  # body bytes still expected; -1: in the head
        self._resp = _Response()
        self._close_after = False  # the server said Connection: close
        self.closed = False

    # asyncio protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(LoadError(f"connection lost: {exc}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        if self._waiter is None or self._waiter.done():
            return  # bytes after a finished response (ttfb_only): ignored
        if self._remaining < 0:
            self._head += self._buf[:nbytes]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._fail(
                        f"no end of response head in {MAX_HEAD} bytes: {bytes(self._head[:80])!r}"
                    )
                return
            try:
                status, length, self._close_after = _parse_head(bytes(self._head[:end]))
            except LoadError as exc:
                self._fail(str(exc))
                return
            got = len(self._head) - end - 4
            self._head.clear()
            self._resp.status = status
            self._remaining = length
            self._count(got)
        else:
            self._count(nbytes)

    # ------------------------------------------------------------------
    def _count(self, n: int) -> None:
        if n <= 0 and self._remaining > 0:
            return
        resp = self._resp
        if n > 0 and resp.first_byte == 0.0:
            resp.first_byte = time.perf_counter()
            if self._ttfb_only:
                resp.body += n
                self._finish(close=True)
                return
        resp.body += n
        self._remaining -= n
        if self._remaining <= 0:
            self._finish(close=self._remaining < 0 or self._close_after)

    def _finish(self, close: bool) -> None:
        waiter, self._waiter = self._waiter, None
        self._remaining = -1
        if self._resp.first_byte == 0.0:  # empty body
            self._resp.first_byte = time.perf_counter()
        if close and self._transport is not None:
            self._transport.abort()
            self.closed = True
        if waiter is not None and not waiter.done():
            waiter.set_result(self._resp)

    def _fail(self, why: str) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(LoadError(why))
        if self._transport is not None:
            self._transport.abort()
        self.closed = True

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True

    def request(self, data: bytes) -> asyncio.Future[_Response]:
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._resp = _Response()
        self._remaining = -1
        self._head.clear()
        self._transport.write(data)
        return self._waiter


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, Content-Length, whether the connection closes after it)."""
    try:
        status = int(head[9:12])
    except ValueError as exc:
        raise LoadError(f"bad status line {head[:40]!r}") from exc
    m = _CONTENT_LENGTH.search(head)
    if m is None:
        # Every S3 GET answer carries Content-Length; chunked bodies are not
        # supported by this counter, so such a response is an error.
        raise LoadError(f"no Content-Length (status {status})")
    # Werkzeug (moto) says "Connection: close" and then leaves the socket
    # open, ignoring a next request: believe the header, do not wait for EOF.
    close = head.startswith(b"HTTP/1.0") or _CONNECTION_CLOSE.search(head) is not None
    return status, int(m.group(1)), close


def _request_bytes(url: str, range_header: str | None) -> tuple[bytes, bytes]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept-Encoding: identity\r\n"
    return head.encode(), (f"Range: {range_header}\r\n" if range_header else "").encode()


class _Plan:
    """Which request comes next: round robin over keys, random ranges."""

    def __init__(self, job: GetJob, urls: list[str], first: int = 0) -> None:
        self._heads = [_request_bytes(u, None)[0] for u in urls]
        n = len(urls)
        self._next = itertools.cycle([(first + i) % n for i in range(n)])
        self._rng = random.Random(job["seed"])
        self._range = job["range_size"]
        self._slots = max(1, job["object_size"] // self._range) if self._range else 0
        self.issued = 0

    def next_request(self) -> tuple[int, bytes]:
        """(expected status, request bytes)."""
        self.issued += 1
        head = self._heads[next(self._next)]
        if not self._range:
            return 200, head + b"\r\n"
        start = self._rng.randrange(self._slots) * self._range
        rng = f"Range: bytes={start}-{start + self._range - 1}\r\n".encode()
        return 206, head + rng + b"\r\n"


async def _run_get_raw(
    job: GetJob, urls: list[str], spread: list[tuple[Target, list[str]]] | None = None
) -> RunResult:
    loop = asyncio.get_running_loop()
    shared = memoryview(bytearray(RECV_BUFFER))
    ends = spread or [(Target.from_dict(job["target"]), urls)]
    # Endpoint i starts at key i: the endpoints do not read the same key at once.
    plans = [_Plan(job, u, i) for i, (_, u) in enumerate(ends)]
    acc = _Accumulator()
    deadline = 0.0

    def issued() -> int:
        return sum(p.issued for p in plans)

    async def connect(target: Target) -> _HttpConnection:
        _, proto = await loop.create_connection(
            lambda: _HttpConnection(shared, job["ttfb_only"]), target.host, target.port
        )
        return proto

    async def worker(w: int) -> None:
        target, plan = ends[w % len(ends)][0], plans[w % len(ends)]
        conn: _HttpConnection | None = None
        while time.perf_counter() < deadline and issued() < job["max_requests"]:
            try:
                if conn is None or conn.closed:
                    conn = await connect(target)
                expect, data = plan.next_request()
                t0 = time.perf_counter()
                resp = await asyncio.wait_for(conn.request(data), REQUEST_TIMEOUT_S)
                t1 = time.perf_counter()
            except (OSError, LoadError, TimeoutError) as exc:
                acc.error(repr(exc))
                conn = None
                await asyncio.sleep(0.01)
                continue
            if resp.status != expect:
                acc.error(f"status {resp.status}, expected {expect}")
                continue
            acc.ok(resp.body, t1 - t0, resp.first_byte - t0, keep_latency=not job["ttfb_only"])
        if conn is not None:
            conn.close()

    cpu0 = _cpu()
    start = time.perf_counter()
    deadline = start + job["duration_s"]
    await asyncio.gather(*(worker(w) for w in range(job["concurrency"])))
    return acc.result(time.perf_counter() - start, _cpu() - cpu0)


# ------------------------------------------------------------ GET (aiohttp)


async def _run_get_aiohttp(job: GetJob, urls: list[str]) -> RunResult:
    import aiohttp
    from yarl import URL

    yurls = [URL(u, encoded=True) for u in urls]
    plan = _Plan(job, urls)
    rng = random.Random(job["seed"])
    acc = _Accumulator()
    connector = aiohttp.TCPConnector(limit=job["concurrency"], force_close=job["ttfb_only"])
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    idx = itertools.cycle(range(len(urls)))
    slots = max(1, job["object_size"] // job["range_size"]) if job["range_size"] else 0

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline and plan.issued < job["max_requests"]:
                plan.issued += 1
                headers = {"Accept-Encoding": "identity"}
                expect = 200
                if slots:
                    s = rng.randrange(slots) * job["range_size"]
                    headers["Range"] = f"bytes={s}-{s + job['range_size'] - 1}"
                    expect = 206
                t0 = time.perf_counter()
                first = 0.0
                n = 0
                try:
                    async with session.get(yurls[next(idx)], headers=headers) as resp:
                        while True:
                            chunk = await resp.content.readany()
                            if not chunk:
                                break
                            if not first:
                                first = time.perf_counter()
                                if job["ttfb_only"]:
                                    n += len(chunk)
                                    resp.close()
                                    break
                            n += len(chunk)
                        status = resp.status
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    acc.error(repr(exc))
                    continue
                t1 = time.perf_counter()
                if status != expect:
                    acc.error(f"status {status}, expected {expect}")
                    continue
                acc.ok(n, t1 - t0, (first or t1) - t0, keep_latency=not job["ttfb_only"])

        cpu0 = _cpu()
        start = time.perf_counter()
        deadline = start + job["duration_s"]
        await asyncio.gather(*(worker() for _ in range(job["concurrency"])))
        return acc.result(time.perf_counter() - start, _cpu() - cpu0)


# --------------------------------------------------------------------- PUT

_UPLOAD_ID = re.compile(rb"<UploadId>([^<]+)</UploadId>")


async def _run_put(job: PutJob) -> RunResult:
    import aiohttp
    from yarl import URL

    target = Target.from_dict(job["target"])
    body = memoryview(random.Random(7).randbytes(job["size"]))
    part = job["part_size"] if target.kind == "s3" else 0
    slots = max(1, job["key_slots"])
    keys = [f"{job['key_prefix']}{i:05d}" for i in range(slots)]
    single_urls = [URL(target.put_url(k), encoded=True) for k in keys] if not part else []
    acc = _Accumulator()
    issued = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=job["concurrency"])

    async def check(resp: aiohttp.ClientResponse) -> bytes:
        data = await resp.read()
        # S3 answers 200; WebDAV (nginx) 201 Created or 204 on overwrite.
        if resp.status not in (200, 201, 204):
            raise LoadError(f"status {resp.status}: {data[:200]!r}")
        return data

    async def put_multipart(session: aiohttp.ClientSession, key: str) -> None:
        async with session.post(URL(target.create_multipart_url(key), encoded=True)) as r:
            m = _UPLOAD_ID.search(await check(r))
        if m is None:
            raise LoadError("CreateMultipartUpload: no UploadId")
        upload_id = m.group(1).decode()
        etags: list[str] = []
        for n, off in enumerate(range(0, job["size"], part), start=1):
            url = URL(target.upload_part_url(key, upload_id, n), encoded=True)
            async with session.put(url, data=body[off : off + part]) as r:
                await check(r)
                etags.append(r.headers.get("ETag", ""))
        xml = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>"
            for n, e in enumerate(etags, start=1)
        )
        doc = f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode()
        async with session.post(
            URL(target.complete_multipart_url(key, upload_id), encoded=True), data=doc
        ) as r:
            text = await check(r)
            if b"<Error>" in text:  # S3 may fail a completion inside a 200
                raise LoadError(f"CompleteMultipartUpload: {text[:200]!r}")

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(w: int) -> None:
            nonlocal issued
            while time.perf_counter() < deadline and issued < job["max_requests"]:
                i = (issued * 7 + w) % slots
                issued += 1
                t0 = time.perf_counter()
                try:
                    if part:
                        await put_multipart(session, keys[i])
                    else:
                        async with session.put(single_urls[i], data=body) as r:
                            await check(r)
                except (aiohttp.ClientError, OSError, LoadError, TimeoutError) as exc:
                    acc.error(repr(exc))
                    await asyncio.sleep(0.01)
                    continue
                dt = time.perf_counter() - t0
                acc.ok(job["size"], dt, dt, keep_latency=True)

        cpu0 = _cpu()
        start = time.perf_counter()
        deadline = start + job["duration_s"]
        await asyncio.gather(*(worker(w) for w in range(job["concurrency"])))
        return acc.result(time.perf_counter() - start, _cpu() - cpu0)


# ------------------------------------------------------------------ common


class _Accumulator:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.errors = 0
        self.first_error = ""
        self.latency: list[float] = []
        self.ttfb: list[float] = []

    def ok(self, nbytes: int, latency_s: float, ttfb_s: float, keep_latency: bool) -> None:
        self.requests += 1
        self.bytes += nbytes
        if keep_latency:
            self.latency.append(latency_s * 1000)
        self.ttfb.append(ttfb_s * 1000)

    def error(self, why: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = why[:300]

    def result(self, elapsed: float, cpu: float) -> RunResult:
        return RunResult(
            requests=self.requests,
            bytes=self.bytes,
            elapsed_s=elapsed,
            errors=self.errors,
            first_error=self.first_error,
            latency_ms=sorted(self.latency),
            ttfb_ms=sorted(self.ttfb),
            client_cpu_s=cpu,
        )


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_job(job: GetJob | PutJob) -> RunResult:
    if job["op"] == "put":
        return await _run_put(job)
    target = Target.from_dict(job["target"])
    urls = [target.get_url(k) for k in job["keys"]]
    if job["client"] == "aiohttp":
        return await _run_get_aiohttp(job, urls)
    spread = [Target.from_dict(d) for d in job.get("spread") or []]
    ends = [(t, [t.get_url(k) for k in job["keys"]]) for t in spread] or None
    return await _run_get_raw(job, urls, ends)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        job = json.loads(line)
        try:
            result = await run_job(job)
        except Exception as exc:  # reported to the harness, which fails the case
            result = _Accumulator().result(0.0, 0.0)
            result["errors"] = 1
            result["first_error"] = f"generator crashed: {exc!r}"[:300]
        # Latency lists can be long; the harness only needs percentiles, but
        # keeping raw samples lets it pool runs. Bounded by max_requests.
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def main() -> None:
    try:
        import uvloop

        uvloop.run(_serve())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve())


if __name__ == "__main__":
    main()

"""A fault-injecting HTTP/1.1 proxy, for nearstore -> proxy -> upstream
(moto, SeaweedFS) and between the nodes of a cluster.

The tests use it (tests/helpers/faultproxy.py re-exports it) and so does
``nearstore bench faults``, which puts one in front of the backing store and
one in front of each node's peer API.

It runs an asyncio loop in a daemon thread, listens on a free 127.0.0.1
port and forwards each request to the target, parsing just enough HTTP
(request and response heads, Content-Length and chunked bodies, keep-alive)
to count requests and to break them at a chosen byte. Faults are rules,
matched per request in the order they were added, each for a number of
requests (``times``; None: until cleared)::

    proxy = FaultProxy(moto.host, moto.port).start()
    proxy.fail(times=2, method="GET")              # 503 SlowDown (XML), twice
    proxy.delay(0.3)                               # every response 300 ms late
    proxy.reset_response(after=1 << 20, method="GET")    # RST after 1 MiB of body
    proxy.truncate_response(after=1 << 20, method="GET") # FIN after 1 MiB, short body
    proxy.reset_request(after=1 << 20, method="PUT")     # RST while uploading
    proxy.drop(times=1)                            # RST before any answer
    proxy.stall_response(after=0, seconds=5)       # hold every answer 5 s (clear() ends it)
    proxy.down(); proxy.up()                       # refuse connections / accept again
    proxy.partition(); proxy.heal()                # blackhole every byte / let them flow
    proxy.clear()                                  # pass-through again, log kept

A partition accepts connections (the kernel would complete the handshake on
loopback anyway) and then carries nothing either way, in-flight bodies
included, until healed: the other side sees silence and its read timeout,
not a refused connection. That is a dropped link, as opposed to ``down()``,
a closed port.

Every request is logged as an :class:`Event` (method, path, query, the access
key it was signed with, selected headers, what the proxy did, the status it
or the upstream answered, body bytes each way) so that a test can assert that
retries happened and what they carried (Range, If-Match ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

READ_PIECE = 256 * 1024
HEAD_LIMIT = 1024 * 1024
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
_QUERY_CREDENTIAL = re.compile(r"X-Amz-Credential=([^%/&]+)(?:%2F|/)", re.I)
# Request headers an Event keeps (lower case).
KEPT_HEADERS = ("range", "if-match", "if-none-match", "content-length", "transfer-encoding",
                "expect", "content-md5", "x-amz-content-sha256", "content-type",
                "x-amz-copy-source", "x-amz-copy-source-range", "x-amz-checksum-algorithm",
                "x-amz-sdk-checksum-algorithm", "x-amz-checksum-crc32", "host")


@dataclass
class Rule:
    # "error" | "delay" | "reset_response" | "truncate_response" | "reset_request" | "drop"
    # | "stall_response"
    action: str
    times: int | None = 1
    method: str | None = None
    path: str | None = None  # regular expression searched in the path
    query: str | None = None  # regular expression searched in the query string
    after: int = 0  # body bytes forwarded before the fault
    seconds: float = 0.0  # delay; stall_response (until clear() at the latest)
    status: int = 503
    code: str = "SlowDown"
    # Called (in a worker thread) just before the fault takes effect; a test
    # may change the upstream there (overwrite the object mid-GET ...), a
    # benchmark kill a node while its request is held (delay) or mid-body.
    on_fire: Callable[[], Any] | None = None
    fired: int = 0

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.method and self.method.upper() != method:
            return False
        if self.path and not re.search(self.path, path):
            return False
        return not (self.query is not None and not re.search(self.query, query))


@dataclass
class Event:
    n: int
    method: str
    path: str
    query: str
    access_key: str | None
    headers: dict[str, str]
    action: str = "pass"  # or the rule's action
    status: int | None = None  # what the client of the proxy was answered (None: no head)
    request_bytes: int = 0  # request body bytes forwarded upstream
    response_bytes: int = 0  # response body bytes forwarded to the client
    complete: bool = False  # the exchange finished normally
    error: str | None = None

    def __repr__(self) -> str:
        q = f"?{self.query}" if self.query else ""
        return (f"<#{self.n} {self.method} {self.path}{q} {self.action} -> {self.status} "
                f"req={self.request_bytes} resp={self.response_bytes}"
                f"{' ' + self.error if self.error else ''}>")


class _Abort(Exception):
    """End this connection now (a fault fired, or a side went away)."""


def _error_xml(code: str, status: int, path: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>Injected by the test proxy ({status})</Message>"
            f"<Resource>{path}</Resource><RequestId>FAULTPROXY</RequestId></Error>").encode()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), dropping whatever is unsent."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self._rules: list[Rule] = []
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self._partitioned = False
        self._generation = 0  # bumped by clear(): ends stalls in progress

    # -- lifecycle ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy",
                                        daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start() if self._loop is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=HEAD_LIMIT, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self) -> None:
        for w in list(self._writers):
            _rst(w)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._close_all()

    # -- modes ---------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail(self, times: int | None = 1, status: int = 503, code: str = "SlowDown",
             **match: Any) -> Rule:
        """Answer ``status`` with an S3 error ``code`` instead of forwarding."""
        return self.add(Rule("error", times=times, status=status, code=code, **match))

    def delay(self, seconds: float, times: int | None = None, **match: Any) -> Rule:
        """Forward the request ``seconds`` late (the answer comes that much
        later), or when `clear` is called, if sooner."""
        return self.add(Rule("delay", times=times, seconds=seconds, **match))

    def reset_response(self, after: int, times: int | None = 1, **match: Any) -> Rule:
        """Forward the response head and ``after`` body bytes, then RST."""
        return self.add(Rule("reset_response", times=times, after=after, **match))

    def truncate_response(self, after: int, times: int | None = 1, **match: Any) -> Rule:
        """Forward the head and ``after`` body bytes, then close cleanly (FIN):
        the body is shorter than its Content-Length."""
        return self.add(Rule("truncate_response", times=times, after=after, **match))

    def reset_request(self, after: int, times: int | None = 1, **match: Any) -> Rule:
        """Forward ``after`` bytes of the request body upstream, then RST both
        connections (the upstream sees a short upload)."""
        return self.add(Rule("reset_request", times=times, after=after, **match))

    def drop(self, times: int | None = 1, **match: Any) -> Rule:
        """Read the request head, then RST without an answer."""
        return self.add(Rule("drop", times=times, **match))

    def stall_response(self, after: int, seconds: float, times: int | None = None,
                       **match: Any) -> Rule:
        """Forward the response head and ``after`` body bytes, then nothing
        for ``seconds`` (or until `clear`), then the rest: a store that
        hangs mid-answer."""
        return self.add(Rule("stall_response", times=times, after=after, seconds=seconds,
                             **match))

    def clear(self) -> None:
        """Pass-through: no rules, stalls in progress released (the log is kept)."""
        with self._lock:
            self._rules.clear()
            self._generation += 1

    def partition(self) -> None:
        """Carry nothing, either way, until `heal`: a dropped link."""
        self._partitioned = True

    def heal(self) -> None:
        self._partitioned = False

    async def _gate(self) -> None:
        """Hold while partitioned (polling: a partition lasts seconds)."""
        while self._partitioned:
            await asyncio.sleep(0.05)

    async def _stall(self, seconds: float) -> None:
        generation = self._generation
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while loop.time() < until and generation == self._generation:
            await asyncio.sleep(min(0.05, max(0.0, until - loop.time())))

    def down(self) -> None:
        """Upstream down: stop listening (connections are refused) and reset
        every open connection."""
        self._call(self._shutdown())

    def up(self) -> None:
        if self._server is None:
            self._call(self._listen())

    def reset(self) -> None:
        """Back to a listening pass-through proxy with an empty log."""
        self.clear()
        self.heal()
        self.up()
        with self._lock:
            self._events.clear()

    # -- log -------------------------------------------------------------------------

    def events(self, method: str | None = None, path: str | None = None) -> list[Event]:
        with self._lock:
            evs = list(self._events)
        return [e for e in evs if (method is None or e.method == method)
                and (path is None or re.search(path, e.path))]

    def clear_log(self) -> None:
        with self._lock:
            self._events.clear()

    def _pick(self, method: str, path: str, query: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path, query):
                    rule.fired += 1
                    return rule
        return None

    # -- the proxy -------------------------------------------------------------------

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(cwriter)
        self.connections += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head = await creader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    break
                keep, upstream = await self._exchange(head, creader, cwriter, upstream)
                if not keep:
                    break
        except _Abort:
            pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if upstream is not None:
                self._writers.discard(upstream[1])
                upstream[1].transport.abort()
            self._writers.discard(cwriter)
            if not cwriter.transport.is_closing():
                cwriter.transport.abort()
            self._tasks.discard(task)

    async def _exchange(
        self, head: bytes, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> tuple[bool, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        await self._gate()
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = [*lines[0].split(" ", 2), "", ""][:3]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        path, _, query = target.partition("?")
        auth = headers.get("authorization", "")
        m = _CREDENTIAL.search(auth) or _QUERY_CREDENTIAL.search(query)
        rule = self._pick(method, path, query)
        with self._lock:
            ev = Event(len(self._events) + 1, method, path, query, m.group(1) if m else None,
                       {k: headers[k] for k in KEPT_HEADERS if k in headers})
            self._events.append(ev)
        if rule is not None:
            ev.action = rule.action
        req_close = headers.get("connection", "").lower() == "close"

        if rule is not None and rule.action == "drop":
            await self._fire(rule)
            ev.error = "dropped"
            _rst(cwriter)
            raise _Abort
        if rule is not None and rule.action == "error":
            if headers.get("expect", "").lower() == "100-continue":
                # The client waits for 100 before sending: answer without it.
                body_done = False
            else:
                await _copy_body(creader, None, headers, method, request=True, gate=self._gate)
                body_done = True
            await self._fire(rule)
            payload = _error_xml(rule.code, rule.status, path)
            cwriter.write(
                f"HTTP/1.1 {rule.status} Injected\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(payload)}\r\nRetry-After: 1\r\n"
                f"x-amz-request-id: FAULTPROXY\r\n"
                f"Connection: {'keep-alive' if body_done and not req_close else 'close'}"
                f"\r\n\r\n".encode() + (b"" if method == "HEAD" else payload))
            await cwriter.drain()
            ev.status, ev.complete = rule.status, True
            return body_done and not req_close, upstream
        if rule is not None and rule.action == "delay":
            await self._fire(rule)
            await self._stall(rule.seconds)  # clear() ends it early

        if upstream is None:
            try:
                upstream = await asyncio.open_connection(*self.target, limit=HEAD_LIMIT)
            except OSError as e:
                ev.error = f"connect: {e}"
                _rst(cwriter)
                raise _Abort from None
            self._writers.add(upstream[1])
        ureader, uwriter = upstream
        uwriter.write(head)

        pump = asyncio.ensure_future(self._pump_request(creader, uwriter, headers, method, rule,
                                                        ev, cwriter))
        try:
            keep = await self._forward_response(ureader, cwriter, method, rule, ev, pump)
        except BaseException:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            raise
        try:
            await pump
        except _Abort:
            raise
        except Exception:
            return False, upstream
        return keep and not req_close, upstream

    async def _fire(self, rule: Rule) -> None:
        if rule.on_fire is not None:
            await asyncio.get_running_loop().run_in_executor(None, rule.on_fire)

    async def _pump_request(self, creader: asyncio.StreamReader, uwriter: asyncio.StreamWriter,
                            headers: dict[str, str], method: str, rule: Rule | None, ev: Event,
                            cwriter: asyncio.StreamWriter) -> None:
        limit = rule.after if rule is not None and rule.action == "reset_request" else None

        async def on_limit() -> None:
            assert rule is not None
            await self._fire(rule)
            ev.error = f"request reset after {ev.request_bytes} bytes"
            _rst(uwriter)
            _rst(cwriter)
            raise _Abort

        ev.request_bytes = 0

        def count(n: int) -> None:
            ev.request_bytes += n

        await _copy_body(creader, uwriter, headers, method, request=True, limit=limit,
                         on_limit=on_limit if limit is not None else None, counter=count,
                         gate=self._gate)

    async def _forward_response(self, ureader: asyncio.StreamReader,
                                cwriter: asyncio.StreamWriter, method: str, rule: Rule | None,
                                ev: Event, pump: asyncio.Future[None]) -> bool:
        while True:
            head_task: asyncio.Future[bytes] = asyncio.ensure_future(ureader.readuntil(b"\r\n\r\n"))
            waiting: list[asyncio.Future[Any]] = [head_task, pump]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if head_task not in done:
                # The request pump finished first (normally: body sent; or a
                # reset_request fault fired): now wait for the head alone.
                if pump.exception() is not None and isinstance(pump.exception(), Exception):
                    head_task.cancel()
                    with contextlib.suppress(BaseException):
                        await head_task
                    raise _Abort
            try:
                rhead = await head_task
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                ev.error = ev.error or f"upstream closed before answering: {e!r}"
                raise _Abort from None
            lines = rhead.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            rheaders: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    rheaders[name.strip().lower()] = value.strip()
            await self._gate()
            cwriter.write(rhead)
            await cwriter.drain()
            if 100 <= status < 200 and status != 101:
                continue
            ev.status = status
            break

        action = rule.action if rule is not None else None
        limit = None
        if rule is not None and action in ("reset_response", "truncate_response",
                                           "stall_response"):
            limit = rule.after

        async def on_limit() -> None:
            assert rule is not None
            await self._fire(rule)
            if action == "stall_response":
                ev.error = f"response stalled after {ev.response_bytes} body bytes"
                await self._stall(rule.seconds)
                return
            if action == "reset_response":
                ev.error = f"response reset after {ev.response_bytes} body bytes"
                _rst(cwriter)
            else:
                ev.error = f"response truncated after {ev.response_bytes} body bytes"
                cwriter.transport.set_write_buffer_limits(0)
                await cwriter.drain()
                cwriter.close()
            raise _Abort

        def count(n: int) -> None:
            ev.response_bytes += n

        no_body = method == "HEAD" or status in (204, 304) or status < 200
        if no_body:
            keep = True
        else:
            keep = await _copy_body(ureader, cwriter, rheaders, method, request=False,
                                    limit=limit, on_limit=on_limit if limit is not None else None,
                                    counter=count, gate=self._gate)
        ev.complete = True
        return keep and rheaders.get("connection", "").lower() != "close"


async def _copy_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None,
                     headers: dict[str, str], method: str, *, request: bool,
                     limit: int | None = None, on_limit: Callable[[], Any] | None = None,
                     counter: Callable[[int], None] | None = None,
                     gate: Callable[[], Awaitable[None]] | None = None) -> bool:
    """Copy one message body from ``reader`` to ``writer`` (None: discard).
    Returns False when the body ends with the connection (no framing).
    After ``limit`` bytes, ``on_limit`` is awaited: it raises `_Abort` (the
    fault broke the exchange) or returns, and the copy goes on. ``gate`` is
    awaited before every write (a partition holds it)."""
    sent = 0

    async def write(data: bytes) -> None:
        nonlocal sent
        if gate is not None:
            await gate()
        if data and writer is not None:
            writer.write(data)
            await writer.drain()
        sent += len(data)
        if counter:
            counter(len(data))

    async def put(data: bytes) -> None:
        nonlocal limit
        if limit is not None and sent + len(data) >= limit:
            head, data = data[: limit - sent], data[limit - sent :]
            await write(head)
            limit = None  # fires once
            assert on_limit is not None
            await on_limit()
        if data:
            await write(data)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            await put(size_line)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = await reader.readuntil(b"\r\n")
                    await put(line)
                    if line == b"\r\n":
                        return True
            left = size + 2
            while left:
                data = await reader.read(min(left, READ_PIECE))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                await put(data)
    if "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            data = await reader.read(min(left, READ_PIECE))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            await put(data)
        return True
    if request:
        return True  # a request without framing has no body
    while True:  # a response without framing ends with the connection
        data = await reader.read(READ_PIECE)
        if not data:
            return False
        await put(data)

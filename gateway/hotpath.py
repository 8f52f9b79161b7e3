"""The hot path: GetObject and HeadObject served on httptools, everything
else handed to aiohttp.

Profiled (bench/RESULTS.md), half of a small GET's CPU went to aiohttp's
machinery around our own code: its request and response objects, router,
application and header serialisation. So every connection starts here, on
httptools (llhttp, Node.js's parser). A GET or HEAD of an object, without a
body, is parsed by httptools and then decided by the very functions
aiohttp's front uses: ``gateway.app`` (``parse_request``,
``check_signature``, ``as_s3_error``, ``error_parts``),
``gateway.routes.resolve``, ``handlers.object.open_read`` and
``gateway.sendfile.send``. This module adds only the framing: the status
line and headers written at once, a small body in the same write, a large
one by sendfile.

Anything else hands the connection to aiohttp (``gateway.conn.GuardedHandler``)
for the rest of its life, with every byte received since the current
request began: a request with a body or an ``Expect``, any other operation
or sub-resource, an admin route, a head that httptools refuses or that is
larger than S3 allows. aiohttp parses those bytes from the start, so it
answers exactly as if it had owned the connection from the first byte, and
every S3 operation keeps exactly one implementation.

Framing. A hot request has no body, so it ends where its head ends, at the
first empty line; that head, whole, is what the parser is given, and a head
it does not finish as a complete message (a body follows) is not hot.
Requests on one connection are served one after the other; pipelined ones
wait in the buffer (at most a head's worth is read ahead).

Limits are ``gateway.conn``'s (``ConnLimits``): a head is complete within
``head_timeout`` of its first byte (of the connection's opening for the
first one), an idle connection is closed after ``idle_timeout``, and a
client that stops reading a response is dropped after ``send_timeout``.
"""

from __future__ import annotations

import asyncio
import http
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import cast

import httptools
from aiohttp import web
from multidict import CIMultiDict

from nearstore.cache.metrics import HANDED_OFF, REFUSED_CONNECTIONS
from nearstore.gateway import errors
from nearstore.gateway.access import decide, requester
from nearstore.gateway.app import (
    MAX_HEADER_BYTES,
    SERVER,
    as_s3_error,
    check_signature,
    error_parts,
    new_request_id,
    parse_request,
)
from nearstore.gateway.conn import ConnLimits, GuardedHandler
from nearstore.gateway.handlers import object as objects
from nearstore.gateway.handlers.common import Ctx
from nearstore.gateway.request import S3Request
from nearstore.gateway.routes import Handler, operation, resolve
from nearstore.gateway.sendfile import (
    ClientStalled,
    send,
    wait_written,
    zero_copy_fd,
)
from nearstore.gateway.state import BACKEND_KEY, CONFIG_KEY, INFLIGHT_KEY

log = logging.getLogger("nearstore")

_HOT: dict[Handler, bool] = {objects.get_object: False, objects.head_object: True}  # handler -> HEAD?
_READ = operation(objects.get_object)
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


class HotPath:
    """What the connections of one listener share, and their shutdown."""

    def __init__(self, app: web.Application, limits: ConnLimits, fallback: Callable[[], asyncio.Protocol],
                 made: Callable[[object], None] = lambda p: None, closed: Callable[[], None] = lambda: None) -> None:
        # A connection of this listener's begins / ends (its count).
        self.made, self.closed = made, closed
        self.cfg = app[CONFIG_KEY]
        self.backend = app[BACKEND_KEY]
        self.inflight = app[INFLIGHT_KEY]
        self.limits = limits
        self.fallback = fallback
        self.connections: set[HotConnection] = set()
        self.closing = False
        self._date = ""
        self._date_at = 0

    def __call__(self) -> HotConnection:
        return HotConnection(self)

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_at:
            self._date, self._date_at = formatdate(now, usegmt=True), now
        return self._date

    def shutdown(self) -> None:
        """Close idle connections now, busy ones after their response."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_if_idle()


class HotConnection(asyncio.Protocol):
    def __init__(self, hot: HotPath) -> None:
        self._hot = hot
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._buf = bytearray()
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._handed_off = False
        # Parser callbacks' results, for the head being parsed.
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._complete = False
        self._method = b""
        self._keep_alive = False
        self._http10 = False
        # Flow control.
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        # The one timer (gateway.conn's phases: head, serving, idle).
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0

    # --- asyncio's hooks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._hot.connections.add(self)
        self._hot.made(self)
        self._since = self._loop.time()
        self._timer = self._loop.call_at(self._since + self._hot.limits.head_timeout, self._check)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._hot.connections.discard(self)
        if not self._handed_off:
            self._hot.closed()
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._wake()

    def data_received(self, data: bytes) -> None:
        if not self._buf and not self._busy:
            self._since = self._loop.time()  # a head begins
        self._buf += data
        if self._busy:
            if len(self._buf) > MAX_HEADER_BYTES and self._transport is not None:
                self._transport.pause_reading()  # pipelined: read ahead no further
            return
        self._next()

    def eof_received(self) -> bool | None:
        return None  # close

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # --- httptools' callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._header_bytes, self._complete = b"", [], 0, False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them, so that signatures see the same strings.
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))
        self._header_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        # Read now: llhttp resets these once the message is complete.
        parser = self._parser
        self._method, self._keep_alive = parser.get_method(), parser.should_keep_alive()
        self._http10 = parser.get_http_version() == "1.0"

    def on_message_complete(self) -> None:
        self._complete = True

    # --- requests -------------------------------------------------------------

    def _next(self) -> None:
        """Serve the request at the head of the buffer, if it is whole."""
        transport = self._transport
        if transport is None or self._handed_off:
            return
        buf = self._buf
        if not buf:
            if self._hot.closing:
                transport.close()
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES or b"\n\n" in buf or buf[:1] in (b"\r", b"\n"):
                self._hand_off()
            return  # the rest of the head is on its way
        # A head over S3's size is never hot: aiohttp's bounds and error.
        hot = self._hot_request(bytes(buf[: end + 4])) if end + 4 <= MAX_HEADER_BYTES else None
        if hot is None:
            self._hand_off()
            return
        del buf[: end + 4]
        self._busy = True
        self._task = self._loop.create_task(self._serve(*hot))

    def _hot_request(self, head: bytes) -> tuple[S3Request, bool, bool] | None:
        """(request, HEAD?, keep-alive?) when ``head`` is a whole GetObject
        or HeadObject; None for anything aiohttp should answer."""
        parser = self._parser
        self._complete = False
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:
            return None
        if not self._complete or parser.should_upgrade() or len(self._headers) > self._hot.limits.max_headers:
            return None  # a body follows, a protocol switch, or too many headers
        url = self._url
        if not url.startswith(b"/") or url.startswith(b"/_nearstore/"):
            return None
        method = self._method
        if method != b"GET" and method != b"HEAD":
            return None
        headers = CIMultiDict(self._headers)
        if "Expect" in headers or "Origin" in headers:
            return None  # 100-continue, or a browser's request with its CORS headers to add
        try:
            req = parse_request(self._hot.cfg, method.decode(), url.decode("utf-8", "surrogateescape"), headers,
                                self._header_bytes, new_request_id())
            is_head = _HOT.get(resolve(req))
        except errors.S3Error:
            return None
        if is_head is None or self._has_policy(req.bucket):
            return None
        keep_alive = self._keep_alive and not self._hot.closing
        return req, is_head, keep_alive

    def _has_policy(self, bucket: str | None) -> bool:
        """A bucket policy's conditions read what only aiohttp's request
        has (the peer's address, TLS): such buckets' requests go there."""
        try:
            return bucket is not None and self._hot.backend.bucket_access(bucket).policy is not None
        except Exception:
            return False  # answered below as it would be anyway (NoSuchBucket ...)

    async def _serve(self, req: S3Request, is_head: bool, keep_alive: bool) -> None:
        hot = self._hot
        hot.inflight.enter()
        try:
            await self._respond(req, is_head, keep_alive)
        except (asyncio.CancelledError, ConnectionError, ClientStalled):
            keep_alive = False
        except Exception:
            log.exception("request %s %s %s failed after its response began", req.request_id, req.method,
                          req.raw_path)
            keep_alive = False
        finally:
            hot.inflight.leave()
            self._busy = False
        transport = self._transport
        if transport is None:
            return
        if not keep_alive or hot.closing:
            transport.close()
            return
        self._since = self._loop.time()
        transport.resume_reading()
        self._next()

    async def _respond(self, req: S3Request, is_head: bool, keep_alive: bool) -> None:
        cfg = self._hot.cfg
        try:
            auth = check_signature(cfg, req)
            assert req.bucket is not None  # the hot path serves objects only
            user = requester(cfg, auth.access_key, auth.scheme == "anonymous")
            access = decide(cfg, self._hot.backend, user, req.bucket, req.key, _READ)
            reading = await objects.open_read(Ctx(self._hot.backend, cfg, auth, access=access), req, head=is_head)
        except Exception as e:
            self._answer_error(e, req, is_head, keep_alive)
            return
        try:
            headers = reading.headers
            rid = req.request_id
            headers.update({"Content-Length": str(reading.length), "x-amz-request-id": rid, "x-amz-id-2": rid,
                            "Server": SERVER})
            sink = _Sink(self, self._head(reading.status, headers, keep_alive))
            if is_head or not reading.length:
                await sink.write_eof()
                return
            try:
                await send(sink, reading.handle, reading.start, reading.length)
            except (asyncio.CancelledError, ConnectionError, ClientStalled):
                raise
            except Exception as e:
                if sink.started:
                    # The client has a status line: all that is left is to
                    # cut the body short, never to send a wrong one.
                    log.warning("request %s aborted mid-response: %s", req.request_id, e)
                    raise ConnectionAbortedError("response aborted") from e
                self._answer_error(e, req, False, keep_alive)
        finally:
            await reading.handle.close()

    def _answer_error(self, e: Exception, req: S3Request, is_head: bool, keep_alive: bool) -> None:
        """A failure before the response began, as S3's error."""
        err = as_s3_error(e, req.request_id, req.method, req.raw_path)
        status, headers, body = error_parts(err, req.request_id, req.raw_path, is_head)
        if body is not None:
            headers["Content-Length"] = str(len(body))  # none for HEAD or 304, as aiohttp
        self._write(self._head(status, headers, keep_alive) + (body or b""))

    def _head(self, status: int, headers: dict[str, str], keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value:
                # What aiohttp's serializer refuses too; open_read already
                # refused the values a client can choose.
                raise errors.InternalError()
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Date: {self._hot.date()}\r\n")
        if not keep_alive:
            lines.append("Connection: close\r\n")
        elif self._http10:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    # --- writing ----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is None:
            raise ConnectionResetError("client went away")
        self._transport.write(data)

    async def drained(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        if not self._paused:
            return
        self._drained = self._loop.create_future()
        try:
            async with asyncio.timeout(self._hot.limits.send_timeout):
                await self._drained
        except TimeoutError:
            raise ClientStalled(f"client did not read for {self._hot.limits.send_timeout:g} s") from None
        if self._transport is None:
            raise ConnectionResetError("client went away")

    def _wake(self) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the rest ---------------------------------------------------------------

    def close_if_idle(self) -> None:
        if not self._busy and not self._buf and self._transport is not None:
            self._transport.close()

    def _hand_off(self) -> None:
        """aiohttp takes the connection, and the bytes of the request so far."""
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            # The client closed while a hot request was served; what it sent
            # after has nobody to answer (aiohttp's handler, started on a
            # closing transport, failed an assertion, logged).
            transport.close()
            return
        self._handed_off = True
        HANDED_OFF.inc()
        self._hot.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        protocol = self._hot.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self._buf = bytes(self._buf), bytearray()
        transport.resume_reading()
        if data:
            protocol.data_received(data)

    def _check(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or self._handed_off:
            return
        limits = self._hot.limits
        now = self._loop.time()
        if self._busy:
            deadline = now + limits.head_timeout  # serving: sends time themselves
        elif self._buf:
            deadline = self._since + limits.head_timeout
        else:
            deadline = self._since + limits.idle_timeout
        if now >= deadline:
            transport.close()
            return
        self._timer = self._loop.call_at(deadline, self._check)


class _Sink:
    """``gateway.sendfile.Sink`` on a hot connection: the head goes out with
    the first bytes of the body (one write for a small object)."""

    def __init__(self, conn: HotConnection, head: bytes) -> None:
        self._conn = conn
        self._head: bytes | None = head
        self.stall_s = conn._hot.limits.send_timeout

    @property
    def started(self) -> bool:
        return self._head is None

    def _take_head(self, data: bytes = b"") -> bytes:
        head, self._head = self._head, None
        return head + data if head is not None else data

    async def write(self, data: bytes) -> None:
        self._conn._write(self._take_head(data))
        await self._conn.drained()

    async def write_eof(self) -> None:
        if self._head is not None:
            self._conn._write(self._take_head())

    async def wait_flushed(self) -> None:
        if self._head is not None:
            self._conn._write(self._take_head())
        await wait_written(self._conn._transport, self.stall_s)

    async def socket_fd(self) -> int | None:
        fd = zero_copy_fd(self._conn._transport)
        if fd is None:
            return None
        await self.wait_flushed()
        return os.dup(fd)


_TOO_MANY_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_TOO_MANY = (
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nRetry-After: 1\r\n"
    f"Server: {SERVER}\r\nConnection: close\r\nContent-Length: {len(_TOO_MANY_BODY)}\r\n\r\n"
).encode() + _TOO_MANY_BODY


class _TooMany(asyncio.Protocol):
    """A connection beyond [server] max_connections: told to slow down and
    closed, before a byte of its request is read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        t.write(_TOO_MANY)
        t.close()
        REFUSED_CONNECTIONS.inc()


async def listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    limits: ConnLimits,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    hot_path: bool = True,
) -> tuple[asyncio.Server, HotPath | None]:
    """Accept connections for ``runner``'s application: each starts on the
    hot path (unless ``hot_path`` is off) and is handed to a
    ``GuardedHandler`` for anything else. The runner tracks the handed-off
    connections (its cleanup shuts them down); ``HotPath.shutdown`` closes
    the others."""
    manager = runner.server
    assert manager is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()

    # Open client connections: those whose connection_made has run, until
    # their connection_lost (a hot-path connection handed to aiohttp is
    # the same connection), and those whose protocol is made but not yet
    # told (the loop accepts a burst of connections, making each one's
    # protocol, before it calls the first connection_made; a TLS handshake
    # that fails never calls it: forgotten after the handshake's timeout).
    live = [0]
    pending: dict[object, float] = {}

    def made(protocol: object) -> None:
        pending.pop(protocol, None)
        live[0] += 1

    def closed() -> None:
        live[0] -= 1

    def fallback(fresh: bool = False) -> GuardedHandler:
        return GuardedHandler(manager, loop=loop, limits=limits, access_log=None,
                              on_made=made if fresh else None, on_close=closed)

    hot = HotPath(runner.app, limits, fallback, made, closed) if hot_path else None

    def admit() -> asyncio.Protocol:
        """A new connection's protocol: SlowDown and close beyond the cap."""
        now = loop.time()
        if pending and live[0] + len(pending) >= limits.max_connections:
            for p in [p for p, t in pending.items() if now - t > limits.head_timeout + 1.0]:
                del pending[p]
        if live[0] + len(pending) >= limits.max_connections:
            return _TooMany()
        protocol: asyncio.Protocol = hot() if hot is not None else fallback(fresh=True)
        pending[protocol] = now
        return protocol

    server = await loop.create_server(
        admit, host, port, ssl=ssl_context, backlog=1024, reuse_address=True, reuse_port=reuse_port or None,
        # The handler (and so the head timeout) starts after the TLS
        # handshake: a handshake gets no longer than a head.
        ssl_handshake_timeout=limits.head_timeout if ssl_context is not None else None,
    )
    return server, hot

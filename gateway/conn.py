"""Connection limits: how much a client may send, and how slowly, before it
has proved who it is.

Before authentication a request costs the node memory and a socket, so
every connection is bounded in bytes and in time:

- **Head size.** A request head (request line and headers) is at most
  ``max_head_bytes`` (32 KiB) in all, one line at most ``max_line_bytes``,
  one header at most ``max_field_bytes``, at most ``max_headers`` headers.
  S3 allows 8 KiB of headers (``gateway.app`` answers anything larger
  RequestHeaderSectionTooLarge); the parser's bounds sit above that so that
  an oversized head still gets an S3 error, and below what would let a few
  thousand connections hold real memory (nginx: 1 KiB + 4 x 8 KiB).
- **Head timeout** (``head_timeout``, 10 s): from a connection's opening
  (its TLS handshake gets as long again), or from the first byte of a
  request after a keep-alive pause, until its head is complete. A
  slow-loris head is closed without an answer.
- **Idle timeout** (``idle_timeout``, 60 s): a kept-alive connection with no
  request in progress. Clients reopen; SDKs retry a request whose pooled
  connection was closed under it.
- **Body stall timeout** (``body_timeout``, 30 s): while a handler waits for
  request body bytes, at most this long between two of them. The read fails
  with :class:`BodyStalled`, which the front answers RequestTimeout, as S3
  does, and the connection closes; an upload cut short this way never
  becomes visible. A client held back by flow control (the node not
  reading) is not stalled.
- **Send stall timeout** (``send_timeout``, 60 s): while a response is
  sent, at most this long without the client taking a byte; then the
  connection is dropped (``gateway.sendfile``: the sinks time their writes,
  sendfile's poll and the final flush). S3 drops slow readers alike.

One timer per connection, moved only when the phase changes; a request
costs a counter and a clock read, nothing more.

The phases come from two counts: requests whose heads were parsed
(aiohttp's ``_request_count``, the one private attribute read here; the
tests of this module fail if it goes) and responses finished
(``finish_response``). While they differ a request is in progress.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import streams, web, web_protocol


@dataclass(frozen=True)
class ConnLimits:
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 30.0
    send_timeout: float = 60.0
    max_head_bytes: int = 32 * 1024
    max_line_bytes: int = 16 * 1024
    max_field_bytes: int = 8 * 1024
    max_headers: int = 100
    max_connections: int = 4096

    def handler_args(self) -> dict[str, Any]:
        """aiohttp's own parser bounds, below the head's total."""
        return {
            "max_line_size": self.max_line_bytes,
            "max_field_size": self.max_field_bytes,
            "max_headers": self.max_headers,
            "keepalive_timeout": self.idle_timeout,
        }


class BodyStalled(asyncio.TimeoutError):
    """No request body byte for ``body_timeout`` seconds while one was awaited.

    A TimeoutError, so that aiohttp's lingering read after the response
    gives up quietly and closes the connection."""


def _head_too_large(limits: ConnLimits) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>RequestHeaderSectionTooLarge</Code>'
        "<Message>Your request header section exceeds the maximum allowed size.</Message>"
        f"<MaxSizeAllowed>{limits.max_head_bytes}</MaxSizeAllowed></Error>"
    ).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


class GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with the limits of the module docstring."""

    def __init__(self, manager: web.Server, *, limits: ConnLimits, on_made: Callable[[object], None] | None = None,
                 on_close: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **{**kwargs, **limits.handler_args()})
        self._limits = limits
        # The connection count's (gateway.hotpath.listen).
        self._on_made, self._on_close = on_made, on_close
        self._watch: asyncio.TimerHandle | None = None
        self._rx_at = 0.0
        self._head_since: float | None = None  # first byte of an incomplete head
        self._head_bytes = 0
        self._idle_since = 0.0
        self._finished = 0
        self._body: streams.StreamReader | None = None
        self._stalled = False

    # --- what the front tells us --------------------------------------------

    def reading(self, body: streams.StreamReader) -> None:
        """The request being handled reads this body: watch it for stalls."""
        self._body = body

    # --- aiohttp's hooks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._on_made is not None:
            self._on_made(self)
        now = self._loop.time()
        self._rx_at = self._idle_since = now
        # A new connection owes its first head within the head timeout.
        self._head_since = now
        self._arm(now + self._limits.head_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._body = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not data:  # aiohttp's resume_reading() feeds b""
            super().data_received(data)
            return
        now = self._loop.time()
        self._rx_at = now
        waiting = self._request_count == self._finished and (self._body is None or self._body.is_eof())
        if waiting:
            if self._head_since is None:
                self._head_since = now
                deadline = now + self._limits.head_timeout
                if self._watch is None or self._watch.when() > deadline:
                    self._arm(deadline)
            self._head_bytes += len(data)
        super().data_received(data)
        if not waiting:
            return
        if self._request_count != self._finished:
            self._head_since, self._head_bytes = None, 0  # the head is complete
        elif self._head_bytes > self._limits.max_head_bytes and self.transport is not None:
            self.transport.write(_head_too_large(self._limits))
            self.force_close()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._finished += 1
            if self._finished >= self._request_count:
                self._idle_since = self._loop.time()
                self._head_since, self._head_bytes = None, 0
                # A body left unread is drained by aiohttp (lingering_time)
                # and still watched for stalls until its end.
                body = request.content
                self._body = body if not body.is_eof() else None

    # --- the watch ----------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._watch = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        limits = self._limits
        now = self._loop.time()
        body = self._body
        if body is not None and not body.is_eof():
            deadline = self._rx_at + limits.body_timeout
            if transport.is_reading() and now >= deadline:
                # The handler's read fails; its answer (RequestTimeout) is
                # the connection's last. Should it not answer within
                # another period, the connection is cut.
                body.set_exception(BodyStalled())
                self._body, self._stalled = None, True
                self.close()
                self._arm(now + limits.body_timeout)
                return
            self._arm(max(deadline, now + 1.0))
            return
        if self._stalled:
            self.force_close()
            return
        if self._request_count != self._finished:
            # A request in progress, not reading a body: nothing to time.
            self._arm(now + limits.body_timeout)
            return
        if self._head_since is not None:
            deadline = self._head_since + limits.head_timeout
        else:
            deadline = self._idle_since + limits.idle_timeout
        if now >= deadline:
            self.force_close()
            return
        self._arm(deadline)

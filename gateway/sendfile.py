"""Zero-copy body sends.

Measured on this machine (shared/MEASURED.md): under uvloop, aiohttp's
``FileResponse`` cannot use ``loop.sendfile`` (uvloop lacks it) and falls
back to copying through Python at ~0.65 GB/s; ``os.sendfile`` on the
socket's own descriptor, run in a worker thread that waits with ``poll`` on
EAGAIN, reaches 1.2 GB/s with one client and 2 GB/s with four, beating nginx.

So: the server writes the status line and headers (aiohttp's response, or
the hot path's own head: a ``Sink`` either way), we flush them, then a
worker thread moves the body from the file to the socket in the kernel. The event
loop does not touch the socket's write side meanwhile (the handler is
awaiting us), and the socket stays non-blocking for the loop's sake, hence
the poll. When zero-copy is impossible (TLS, a transport without a socket)
or fails before sending anything, the body is copied in 1 MiB pieces.

An error after bytes have reached the client cannot become an S3 error: the
caller aborts the connection, so the client sees a short body, never a
silently wrong one.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import threading
from typing import Protocol

from aiohttp import web

from nearstore.metadata.backing import ObjectHandle

# A client that reads nothing for this long is dropped (S3 uses a similar
# idle timeout on slow readers): the default of [server] send_timeout, which
# each sink carries as ``stall_s``.
STALL_TIMEOUT = 60.0
MAX_SENDFILE = 8 * 1024 * 1024
COPY_PIECE = 1024 * 1024
# Bodies up to this size are read on the event loop and written in one go.
SMALL_BODY = 128 * 1024


class ClientStalled(ConnectionError):
    pass


class ResponseAborted(Exception):
    """The body failed after the status line went out: the connection has
    been closed and ``response`` is what the framework should be given."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("response aborted")
        self.response = response


def _sendfile_blocking(out_fd: int, in_fd: int, offset: int, count: int, stop: threading.Event,
                       stall_s: float = STALL_TIMEOUT) -> None:
    poller = select.poll()
    poller.register(out_fd, select.POLLOUT)
    while count > 0:
        if stop.is_set():
            raise ConnectionAbortedError("send cancelled")
        try:
            n = os.sendfile(out_fd, in_fd, offset, min(count, MAX_SENDFILE))
        except BlockingIOError:
            if not poller.poll(stall_s * 1000):
                raise ClientStalled(f"client did not read for {stall_s:g} s") from None
            continue
        except InterruptedError:
            continue
        if n == 0:
            raise OSError(errno.EIO, "object file shorter than its recorded size")
        offset += n
        count -= n


def zero_copy_fd(transport: asyncio.BaseTransport | None) -> int | None:
    """The socket descriptor to sendfile to, or None when the connection
    cannot take it (TLS)."""
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return int(sock.fileno())
    except (OSError, ValueError):
        return None


class Sink(Protocol):
    """Where a body goes: an aiohttp response (``ResponseSink``) or the hot
    path's connection (``gateway.hotpath``). The status line and headers
    are the sink's own; the first ``write`` may carry them with it.
    ``stall_s``: how long a write may wait for the client to read."""

    stall_s: float

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self) -> None: ...

    async def wait_flushed(self) -> None:
        """Everything written so far is on the wire (sendfile writes to the
        socket directly: anything still buffered would come out after it)."""

    async def socket_fd(self) -> int | None:
        """Headers flushed, then a *duplicate* of the socket's descriptor for
        the sending thread, or None if zero-copy is impossible. The duplicate
        matters: if the connection is closed while a thread still sends, the
        original number may already belong to another client's connection;
        the duplicate keeps pointing at this one and fails with EPIPE."""


async def wait_written(transport: asyncio.WriteTransport | None, stall_s: float = STALL_TIMEOUT) -> None:
    """Wait until ``transport``'s write buffer is empty."""
    if transport is None:
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + stall_s
    while transport.get_write_buffer_size() > 0:
        if transport.is_closing():
            raise ConnectionResetError("client went away")
        if loop.time() > deadline:
            raise ClientStalled("client stopped reading")
        await asyncio.sleep(0.001)


class ResponseSink:
    """An aiohttp response, prepared by ``send_body``."""

    def __init__(self, request: web.Request, resp: web.StreamResponse, stall_s: float = STALL_TIMEOUT) -> None:
        self._request = request
        self._resp = resp
        self.stall_s = stall_s

    async def write(self, data: bytes) -> None:
        # aiohttp's drain waits for a reader for ever: a client that stops
        # reading would hold this stream (and its source) open.
        try:
            async with asyncio.timeout(self.stall_s):
                await self._resp.write(data)
        except TimeoutError:
            raise ClientStalled(f"client did not read for {self.stall_s:g} s") from None

    async def write_eof(self) -> None:
        await self._resp.write_eof()

    async def wait_flushed(self) -> None:
        request = self._request
        if request.transport is None:
            raise ConnectionResetError("client went away")
        try:
            async with asyncio.timeout(self.stall_s):
                await request.writer.drain()
        except TimeoutError:
            raise ClientStalled(f"client did not read for {self.stall_s:g} s") from None
        await wait_written(request.transport, self.stall_s)

    async def socket_fd(self) -> int | None:
        request = self._request
        fd = zero_copy_fd(request.transport)
        if fd is None or request.writer is None:
            return None
        send_headers = getattr(request.writer, "send_headers", None)
        if send_headers is not None:
            send_headers()
        await self.wait_flushed()
        return os.dup(fd)


async def send_body(
    request: web.Request,
    resp: web.StreamResponse,
    handle: ObjectHandle,
    start: int,
    length: int,
    stall_s: float = STALL_TIMEOUT,
) -> None:
    """Send ``length`` bytes of ``handle`` from ``start`` as the body of a
    prepared response, then finish the response. A failure once the
    response has started closes the connection and raises ResponseAborted."""
    await resp.prepare(request)
    try:
        await send(ResponseSink(request, resp, stall_s), handle, start, length)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as e:
        if request.transport is not None:
            request.transport.close()
        raise ResponseAborted(resp) from e


async def send(sink: Sink, handle: ObjectHandle, start: int, length: int) -> None:
    """``length`` bytes of ``handle`` from ``start`` into ``sink``, then its end."""
    # The attribute, not isinstance(handle, FileBacked): a runtime-checkable
    # Protocol's isinstance walks the class's attributes, ~4 % of a small GET.
    by_file = getattr(handle, "segments", None)
    segments = by_file(start, length) if by_file is not None else None
    if segments is None:
        async for chunk in handle.read_range(start, length):
            await sink.write(chunk)
        await sink.write_eof()
        return
    if 0 < length <= SMALL_BODY:
        # A small body: one pread on the loop and one write that carries
        # headers and body together beats a thread hop and a second syscall
        # (2x the requests/s on 4-64 KiB objects).
        async for seg in segments:
            if isinstance(seg, bytes):
                await sink.write(seg)
            else:
                await sink.write(_pread_all(seg.fd, seg.length, seg.offset))
        await sink.write_eof()
        return
    out_fd = await sink.socket_fd() if length > 0 else None
    loop = asyncio.get_running_loop()
    if out_fd is None:
        # TLS (or no socket): copy through user space, 1 MiB at a time.
        async for seg in segments:
            if isinstance(seg, bytes):
                await sink.write(seg)
                continue
            pos, end = seg.offset, seg.offset + seg.length
            while pos < end:
                data = await loop.run_in_executor(None, _pread_exact, seg.fd, min(COPY_PIECE, end - pos), pos)
                pos += len(data)
                await sink.write(data)
        await sink.write_eof()
        return
    stop = threading.Event()
    try:
        async for seg in segments:
            if isinstance(seg, bytes):
                # Bytes that no file holds (a cache fault): through the
                # transport, fully flushed before the next zero-copy send.
                await sink.write(seg)
                await sink.wait_flushed()
                continue
            await loop.run_in_executor(None, _sendfile_blocking, out_fd, seg.fd, seg.offset, seg.length, stop,
                                       sink.stall_s)
    except BaseException:
        stop.set()
        raise
    finally:
        os.close(out_fd)
    await sink.write_eof()


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = _pread_exact(fd, n - len(data), offset + len(data))
        data += more
    return data


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if not data:
        raise OSError(errno.EIO, "file shorter than its recorded size")
    return data

"""Short-circuit reads for clients on the same machine.

A training job on a cache node reads its dataset from that node's NVMe.
Over loopback TCP every byte is copied twice by the kernel (file to socket,
socket to the reader) and the stack tops out at ~1.6 GB/s on a small
machine, while the page cache alone gives 6+ GB/s. So a local client may
instead ask over a Unix socket and receive, for each piece of the range,
an open descriptor of the verified chunk (or object) file with the offset
to read: it ``preadv``s straight into its own buffer, one copy, no HTTP.
HDFS's short-circuit local reads work the same way.

Protocol (SOCK_SEQPACKET, so message boundaries hold and a descriptor
travels with exactly one message); every message is JSON unless noted:

    -> {"url": presigned GET URL, "range": [first, last] | null, "if_match": etag | null}
    <- {"status": 200|206, "size": object size, "etag": ..., "start": s, "length": n}
       or {"status": 4xx/5xx, "code": S3 error code, "message": ...} (then the next request)
    <- {"fd": [offset in range, length, offset in file]} + the descriptor (SCM_RIGHTS)
       {"data": [offset in range, length]} followed by raw messages of at most
       64 KiB (bytes no local file holds: a chunk read from a peer)
    <- {"end": true}
    -> next request on the same connection, or close

Authentication is the object's presigned URL (SigV4 or V2, as boto3 makes
it): the same credentials and checks as a GET over HTTP, made by the
gateway's own code (``open_read``, given by the node: auth, bucket and key
rules, conditions); the socket file's mode only adds to that. A descriptor is handed out only for a file
the HTTP path would have sent with sendfile, so the corruption checks are
the same; files are never rewritten in place (a new chunk or object is a
new file), so a reader holding a descriptor sees one version. The
socket is served by the node's owner process only.

Its clients are bounded in time as HTTP clients are: a connection idle for
``idle_s`` is closed, and one that stops taking replies for ``stall_s``
(the node's ``send_timeout``) is dropped, with the object it was reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nearstore.cache import metrics
from nearstore.cache.errors import BadRequest, NotFileBacked
from nearstore.metadata.backing import FileBacked, FileSegment, ObjectHandle, RangeNotSatisfiable

log = logging.getLogger("nearstore.localsock")

MAX_REQUEST = 64 * 1024
DATA_PIECE = 64 * 1024
# sun_path is 108 bytes on Linux, the terminating NUL included.
MAX_PATH = 107


# (presigned URL, inclusive range or None, If-Match or None) -> the open
# object, checked as an HTTP GET of that URL would be; raises what the
# HTTP path would answer.
OpenRead = Callable[[str, "tuple[int, int] | None", "str | None"], Awaitable[ObjectHandle]]
# A failure -> (HTTP status, S3 error code, message), None for a bug.
Describe = Callable[[BaseException], "tuple[int, str, str] | None"]


class LocalSocketServer:
    def __init__(self, path: str, open_read: OpenRead, describe: Describe, *, idle_s: float = 60.0,
                 stall_s: float = 60.0) -> None:
        self.path = path
        self.open_read = open_read
        self.describe = describe
        self.idle_s, self.stall_s = idle_s, stall_s
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        self.conns: set[asyncio.Task[None]] = set()

    async def start(self) -> bool:
        """Listen; False (logged) where the path is unusable."""
        if len(os.fsencode(self.path)) > MAX_PATH:
            log.warning("local socket path too long (%d bytes), short-circuit reads are off: %s",
                        len(os.fsencode(self.path)), self.path)
            return False
        parent = Path(self.path).parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a previous run's
        try:  # SOCK_SEQPACKET on AF_UNIX: Linux (and not every other Unix)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except (OSError, AttributeError) as e:
            log.warning("no Unix seqpacket sockets here, short-circuit reads are off: %s", e)
            return False
        try:
            sock.bind(self.path)
            # The socket keeps group access for the clients meant to use it;
            # its directory (the data directory, 0700) gains group search
            # only: a group member can reach the socket by name and list
            # nothing.
            os.chmod(self.path, 0o660)
            os.chmod(parent, stat.S_IMODE(os.stat(parent).st_mode) | stat.S_IXGRP)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            log.warning("cannot listen on %s, short-circuit reads are off: %s", self.path, e)
            return False
        self.sock = sock
        self.task = asyncio.ensure_future(self._accept())
        return True

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for t in list(self.conns):
            t.cancel()
        if self.conns:
            await asyncio.gather(*self.conns, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            task = asyncio.ensure_future(self._serve(conn))
            self.conns.add(task)
            task.add_done_callback(self.conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_s):
                        msg = await loop.sock_recv(conn, MAX_REQUEST)
                except TimeoutError:
                    return  # idle
                if not msg:
                    return
                try:
                    await self._request(conn, msg)
                except (ConnectionError, BrokenPipeError):
                    raise
                except Exception as e:
                    answer = self.describe(e)
                    if answer is None:
                        raise
                    status, code, message = answer
                    await _send(conn, {"status": status, "code": code, "message": message}, stall_s=self.stall_s)
        except (ConnectionError, BrokenPipeError):
            return  # the client went away mid-reply (or stopped taking it: _send_raw)
        except Exception:
            log.exception("local socket request failed")
        finally:
            conn.close()

    async def _request(self, conn: socket.socket, msg: bytes) -> None:
        try:
            req = json.loads(msg)
            url = req["url"]
            rng = req.get("range")
            if_match = req.get("if_match")
            if not isinstance(url, str):
                raise TypeError("url")
            if rng is not None and not (isinstance(rng, list) and len(rng) == 2
                                        and all(isinstance(x, int) and x >= 0 for x in rng)
                                        and rng[0] <= rng[1]):
                raise ValueError("range")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BadRequest("Malformed local read request") from None
        handle = await self.open_read(url, (rng[0], rng[1]) if rng is not None else None,
                                      str(if_match) if if_match else None)
        try:
            info = handle.info
            if handle.served is not None or not isinstance(handle, FileBacked):
                # A pass-through upstream: no local file holds the bytes.
                raise NotFileBacked("Short-circuit reads need a cached or local bucket")
            if rng is None:
                start, length, status = 0, info.size, 200
            elif rng[0] >= info.size:
                raise RangeNotSatisfiable(info.size)
            else:
                start, status = rng[0], 206
                length = min(rng[1], info.size - 1) - start + 1
            stall = self.stall_s
            await _send(conn, {"status": status, "size": info.size, "etag": info.etag,
                               "start": start, "length": length}, stall_s=stall)
            pos = 0
            async for seg in handle.segments(start, length):
                if isinstance(seg, FileSegment):
                    await _send(conn, {"fd": [pos, seg.length, seg.offset]}, seg.fd, stall_s=stall)
                    pos += seg.length
                else:
                    await _send(conn, {"data": [pos, len(seg)]}, stall_s=stall)
                    view = memoryview(seg)
                    for i in range(0, len(view), DATA_PIECE):
                        await _send_raw(conn, view[i : i + DATA_PIECE], stall_s=stall)
                    pos += len(seg)
            if pos != length:
                raise ConnectionError(f"{info.key}: sent {pos} of {length} bytes")
            await _send(conn, {"end": True}, stall_s=stall)
            metrics.LOCAL_READS.inc()
            metrics.LOCAL_BYTES.inc(length)
        finally:
            await handle.close()


async def _send(conn: socket.socket, obj: dict[str, Any], fd: int | None = None, *,
                stall_s: float = 60.0) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    await _send_raw(conn, data, fd, stall_s=stall_s)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _send_raw(conn: socket.socket, data: bytes | memoryview, fd: int | None = None, *,
                    stall_s: float = 60.0) -> None:
    """One message (with a descriptor); ConnectionError if the client takes
    nothing for ``stall_s``."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            if fd is None:
                conn.send(data)
            else:
                socket.send_fds(conn, [data], [fd])
            return
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(conn.fileno(), _wake, ready)
            try:
                async with asyncio.timeout(stall_s):
                    await ready
            except TimeoutError:
                raise ConnectionError(f"local client took nothing for {stall_s:g} s") from None
            finally:
                loop.remove_writer(conn.fileno())

"""Short-circuit reads from the nearstore node on this machine.

When the node a client talks to runs on the same machine (a cache daemon
on every GPU node), the client can skip HTTP: it asks the node's Unix
socket (``gateway/localsock.py``) for a byte range and receives open
descriptors of the chunk files that hold it, then ``preadv``s them straight
into its buffer from the page cache or NVMe, several at once. Loopback TCP
tops out near 1.6 GB/s on a small machine; this path runs at the speed of
reading local files, which is what the node's cache is.

``LocalNode.discover(s3)`` asks the node's ``/_nearstore/health`` for its
socket and returns a ``LocalNode`` only if that socket exists here and
answers; otherwise None, and callers read over HTTP. Each request carries
the object's presigned URL, so it is authorised exactly like a GET.
Set NEARSTORE_LOCAL_READS=0 to turn the short-circuit off.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import ClientError

MAX_MESSAGE = 64 * 1024
PRESIGN_S = 3600
CHUNK = 16 * 1024 * 1024  # the cache's default chunk size


class LocalUnavailable(Exception):
    """The short-circuit cannot serve this read; read it over HTTP."""


class LocalChanged(Exception):
    """If-Match failed: the object changed."""


def pread_all(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise LocalUnavailable("a chunk file ended early")
        got += n


class LocalNode:
    """The node's short-circuit socket and a small pool of connections."""

    _found: dict[str, tuple[float, LocalNode | None]] = {}
    _found_lock = threading.Lock()

    def __init__(self, path: str, s3: Any) -> None:
        self.path = path
        self.s3 = s3
        self._idle: list[socket.socket] = []
        self._idle_lock = threading.Lock()
        self._urls: dict[tuple[str, str], tuple[float, str]] = {}

    # -- discovery --------------------------------------------------------

    @classmethod
    def discover(cls, s3: Any, *, recheck_s: float = 30.0) -> LocalNode | None:
        """This client's node's socket if it is usable from here, else
        None (remembered for ``recheck_s`` seconds)."""
        if os.environ.get("NEARSTORE_LOCAL_READS", "1").lower() in ("0", "false", "no", "off"):
            return None
        endpoint = str(s3.meta.endpoint_url).rstrip("/")
        # By process too: a forked DataLoader worker must not share the
        # parent's connections.
        key = f"{os.getpid()}:{id(s3)}:{endpoint}"
        now = time.monotonic()
        with cls._found_lock:  # probing is rare; under the lock no two threads race to it
            hit = cls._found.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
            old = hit[1] if hit is not None else None
            node = cls._probe(s3, endpoint)
            if node is not None and old is not None and node.path == old.path:
                node.close()
                node = old  # keep the connections already made
            elif old is not None:
                old.close()
            cls._found[key] = (now + recheck_s, node)
        return node

    @classmethod
    def forget(cls, s3: Any) -> None:
        with cls._found_lock:
            for k in [k for k in cls._found if k.startswith(f"{os.getpid()}:{id(s3)}:")]:
                node = cls._found.pop(k)[1]
                if node is not None:
                    node.close()

    @classmethod
    def _probe(cls, s3: Any, endpoint: str) -> LocalNode | None:
        try:
            with urllib.request.urlopen(f"{endpoint}/_nearstore/health", timeout=2) as resp:
                path = json.loads(resp.read()).get("local_socket")
        except (OSError, ValueError):
            return None
        if not isinstance(path, str) or not os.path.exists(path):
            return None
        node = cls(path, s3)
        try:
            node._checkin(node._connect())
        except OSError:
            return None
        return node

    # -- connection and requests -----------------------------------------

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(60)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def _checkout(self) -> socket.socket:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _checkin(self, sock: socket.socket) -> None:
        with self._idle_lock:
            if len(self._idle) < 16:
                self._idle.append(sock)
                return
        sock.close()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _url(self, bucket: str, key: str) -> str:
        now = time.monotonic()
        hit = self._urls.get((bucket, key))
        if hit is not None and hit[0] > now:
            return hit[1]
        url: str = self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_S)
        if len(self._urls) > 10_000:
            self._urls.clear()
        self._urls[(bucket, key)] = (now + PRESIGN_S / 2, url)
        return url

    def read_into(
        self,
        bucket: str,
        key: str,
        out: bytearray | memoryview | None = None,
        *,
        start: int = 0,
        end: int | None = None,
        if_match: str | None = None,
        streams: int = 4,
        chunk: int = CHUNK,
    ) -> tuple[memoryview, int, str]:
        """Bytes start..end (exclusive; None: to the end) into ``out``
        (allocated when None). Returns (view of the bytes, object size,
        ETag). A range over one ``chunk`` is read as chunk-aligned pieces on
        ``streams`` connections at once, every piece pinned to the ETag the
        first one saw, so cold chunks fill in parallel and warm ones are
        read by several threads. Raises LocalUnavailable (read over HTTP
        instead), LocalChanged (the object changed) or ClientError."""
        if end is not None and end <= start:
            raise ValueError("empty range")
        first_end = (start // chunk + 1) * chunk
        if end is not None:
            first_end = min(first_end, end)
        if out is None and end is not None:
            out = bytearray(end - start)
        # The first piece tells the size and pins the ETag.
        try:
            view, size, etag = self._read(bucket, key, out, start, first_end, if_match)
        except ClientError as e:
            if start != 0 or end is not None or e.response["Error"]["Code"] != "InvalidRange":
                raise
            # An empty object has no byte 0: ask for the whole (empty) object.
            view, size, etag = self._read(bucket, key, out, 0, None, if_match)
        stop = size if end is None else min(end, size)
        if first_end >= stop:
            return view, size, etag
        if out is None:
            out = bytearray(stop - start)
            out[: len(view)] = view
        buf = memoryview(out).cast("B")
        if len(buf) < stop - start:
            raise ValueError(f"buffer of {len(buf)} bytes for {stop - start}")
        spans = [(lo, min(stop, lo + chunk)) for lo in range(first_end, stop, chunk)]

        def one(span: tuple[int, int]) -> None:
            lo, hi = span
            self._read(bucket, key, buf[lo - start : hi - start], lo, hi, etag)

        if streams <= 1 or len(spans) == 1:
            for span in spans:
                one(span)
        else:
            with ThreadPoolExecutor(min(streams, len(spans)), thread_name_prefix="nearstore-local") as pool:
                list(pool.map(one, spans))
        return buf[: stop - start], size, etag

    def _read(
        self, bucket: str, key: str, out: bytearray | memoryview | None, start: int,
        end: int | None, if_match: str | None,
    ) -> tuple[memoryview, int, str]:
        rng = None if start == 0 and end is None else [start, (end if end is not None else 2**62) - 1]
        req = json.dumps({"url": self._url(bucket, key), "range": rng, "if_match": if_match}).encode()
        try:
            sock = self._checkout()
        except OSError as e:
            raise LocalUnavailable(f"{self.path}: {e}") from e
        try:
            result = self._exchange(sock, req, out)
        except (LocalChanged, ClientError):
            self._checkin(sock)  # a whole answer was read: the stream is in step
            raise
        except BaseException as e:
            sock.close()  # the stream is in an unknown state
            if isinstance(e, (OSError, ValueError, KeyError)):
                raise LocalUnavailable(f"{bucket}/{key}: {e}") from e
            raise
        self._checkin(sock)
        return result

    def _exchange(self, sock: socket.socket, req: bytes,
                  out: bytearray | memoryview | None) -> tuple[memoryview, int, str]:
        sock.sendall(req)
        head = json.loads(sock.recv(MAX_MESSAGE))
        status = int(head["status"])
        if status >= 300:
            code = str(head.get("code", ""))
            if status == 412:
                raise LocalChanged(head.get("message", ""))
            if code == "NotImplemented":
                raise LocalUnavailable(head.get("message", ""))
            raise ClientError({"Error": {"Code": code, "Message": head.get("message", "")},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
        length, size, etag = int(head["length"]), int(head["size"]), str(head["etag"])
        buf = memoryview(out if out is not None else bytearray(length)).cast("B")
        if len(buf) < length:
            raise LocalUnavailable(f"buffer of {len(buf)} bytes for {length}")  # caller's bug; HTTP will say so
        fds: list[int] = []
        try:
            while True:
                msg, got_fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
                fds += got_fds
                if not msg:
                    raise LocalUnavailable("the node closed the socket mid-read")
                part = json.loads(msg)
                if "fd" in part:
                    pos, n, file_off = part["fd"]
                    if len(got_fds) != 1 or pos + n > length:
                        raise LocalUnavailable("bad segment")
                    pread_all(got_fds[0], buf[pos : pos + n], file_off)
                elif "data" in part:
                    pos, n = part["data"]
                    if pos + n > length:
                        raise LocalUnavailable("bad segment")
                    done = 0
                    while done < n:
                        piece = min(MAX_MESSAGE, n - done)
                        if sock.recv_into(buf[pos + done : pos + done + piece], piece) != piece:
                            raise LocalUnavailable("short data message")
                        done += piece
                elif part.get("end"):
                    break
                else:
                    raise LocalUnavailable(f"unexpected message {msg[:100]!r}")
        finally:
            for fd in fds:
                os.close(fd)
        return buf[:length], size, etag

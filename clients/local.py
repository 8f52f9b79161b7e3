"""Short-circuit reads from the nearstore node on this machine.

When the node a client talks to runs on the same machine (a cache daemon
on every GPU node), the client can skip HTTP: it asks the node's Unix
socket (``cache/localsock.py``) for a byte range and receives open
descriptors of the chunk files that hold it, then ``preadv``s them straight
into its buffer from the page cache or NVMe, several at once. Loopback TCP
tops out near 1.6 GB/s on a small machine; this path runs at the speed of
reading local files, which is what the node's cache is.

``LocalNode.discover(s3)`` asks the node's ``/_nearstore/health`` for its
socket and returns a ``LocalNode`` only if that socket exists here and
answers; otherwise None, and callers read over HTTP. Each request carries
the object's presigned URL, so it is authorised exactly like a GET.
Set NEARSTORE_LOCAL_READS=0 to turn the short-circuit off.

The socket's path comes from an unauthenticated HTTP answer, and every
request on it carries a presigned URL: before the first one, the process
listening on it must run as a user this client trusts (``SO_PEERCRED``):
its own user or root, and those listed in NEARSTORE_LOCAL_UIDS (comma
separated, for a node that runs as a service user). Any other socket is
not used (reads go over HTTP).

``LocalNode.map`` maps an object (or a range) instead of copying it: the
chunk files' pages are mapped, copy-on-write, at consecutive addresses of
one region, so a load costs what ``mmap`` of a local file costs (see
``LocalMapping`` for how, and why that is safe).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import ClientError

from nearstore.metadata.defaults import DEFAULT_CHUNK_SIZE

MAX_MESSAGE = 64 * 1024
PRESIGN_S = 3600
CHUNK = DEFAULT_CHUNK_SIZE


class LocalUnavailable(Exception):
    """The short-circuit cannot serve this read; read it over HTTP."""


class LocalNotServed(LocalUnavailable):
    """The node serves this bucket over HTTP only (a pass-through bucket:
    no local file holds its bytes). The socket itself is fine."""


class LocalChanged(Exception):
    """If-Match failed: the object changed."""


def pread_all(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise LocalUnavailable("a chunk file ended early")
        got += n


def trusted_uids() -> set[int]:
    """The users whose sockets this client hands presigned URLs to."""
    extra = os.environ.get("NEARSTORE_LOCAL_UIDS", "")
    return {os.getuid(), 0} | {int(u) for u in extra.split(",") if u.strip().isdigit()}


def check_peer(sock: socket.socket, trusted: set[int]) -> None:
    """PermissionError unless the process at the other end of a connected
    Unix socket runs as one of ``trusted`` (where the OS says: Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return
    import struct

    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    if uid not in trusted:
        raise PermissionError(f"the socket's server runs as uid {uid}, which this client does not trust "
                              "(NEARSTORE_LOCAL_UIDS)")


class LocalNode:
    """The node's short-circuit socket and a small pool of connections."""

    _found: dict[str, tuple[float, LocalNode | None]] = {}
    _found_lock = threading.Lock()

    def __init__(self, path: str, s3: Any) -> None:
        self.path = path
        self.s3 = s3
        self._idle: list[socket.socket] = []
        # Buckets the node answered NotImplemented for (served over HTTP only);
        # cleared when discovery looks at the node again.
        self.http_only: set[str] = set()
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
                old.http_only.clear()  # the node may have been reconfigured
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
            check_peer(sock, trusted_uids())
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

        def sink(total: int, first: int) -> _Sink:
            if out is None:
                return _Sink(memoryview(bytearray(total)))
            buf = memoryview(out).cast("B")
            if len(buf) < first:
                raise LocalUnavailable(f"buffer of {len(buf)} bytes for {first}")  # caller's bug; HTTP will say so
            if len(buf) < total:
                raise ValueError(f"buffer of {len(buf)} bytes for {total}")
            return _Sink(buf[:total])

        got, size, etag = self._transfer(bucket, key, start, end, if_match, streams, chunk, sink)
        return got.buf[: got.total], size, etag

    def map(
        self,
        bucket: str,
        key: str,
        *,
        start: int = 0,
        end: int | None = None,
        if_match: str | None = None,
        streams: int = 4,
        chunk: int = CHUNK,
        populate: bool = False,
    ) -> LocalMapping:
        """Bytes start..end of the object mapped, not copied: see
        ``LocalMapping``. ``populate``: the page tables are filled at once
        (MADV_POPULATE_READ), not on first use: no faster here for a load
        that then touches every page (a warm 1 GiB object, map and touch:
        69 ms populated, 66 ms not). Same pieces, pinning and errors as
        ``read_into``."""
        if not _MAP_OK:
            raise LocalUnavailable("mapping chunk files needs Linux on a 64-bit machine")

        def sink(total: int, first: int) -> _Sink:
            return _MapSink(start, total, populate)

        got, size, etag = self._transfer(bucket, key, start, end, if_match, streams, chunk, sink)
        return LocalMapping(got, size, etag)

    def _transfer(
        self, bucket: str, key: str, start: int, end: int | None, if_match: str | None,
        streams: int, chunk: int, make: Callable[[int, int], _Sink],
    ) -> tuple[_Sink, int, str]:
        """The range into the sink ``make(range length, first piece's
        length)`` makes once the first piece's answer tells the size."""
        if end is not None and end <= start:
            raise ValueError("empty range")
        first_end = (start // chunk + 1) * chunk
        if end is not None:
            first_end = min(first_end, end)
        made: list[_Sink] = []

        def first_sink(length: int, size: int) -> _Sink:
            if not made:
                stop = size if end is None else min(end, size)
                made.append(make(max(0, stop - start), length))
            return made[0]

        # The first piece tells the size and pins the ETag.
        try:
            size, etag = self._read(bucket, key, first_sink, 0, start, first_end, if_match)
        except ClientError as e:
            if start != 0 or end is not None or e.response["Error"]["Code"] != "InvalidRange":
                raise
            # An empty object has no byte 0: ask for the whole (empty) object.
            size, etag = self._read(bucket, key, first_sink, 0, 0, None, if_match)
        target = made[0]
        stop = start + target.total
        spans = [(lo, min(stop, lo + chunk)) for lo in range(first_end, stop, chunk)]

        def one(span: tuple[int, int]) -> None:
            lo, hi = span
            self._read(bucket, key, lambda _n, _s: target, lo - start, lo, hi, etag)

        if streams <= 1 or len(spans) <= 1:
            for span in spans:
                one(span)
        else:
            with ThreadPoolExecutor(min(streams, len(spans)), thread_name_prefix="nearstore-local") as pool:
                list(pool.map(one, spans))
        return target, size, etag

    def _read(
        self, bucket: str, key: str, sink: Callable[[int, int], _Sink], base: int, start: int,
        end: int | None, if_match: str | None,
    ) -> tuple[int, str]:
        if bucket in self.http_only:
            raise LocalNotServed(bucket)  # known: no request needed
        rng = None if start == 0 and end is None else [start, (end if end is not None else 2**62) - 1]
        req = json.dumps({"url": self._url(bucket, key), "range": rng, "if_match": if_match}).encode()
        try:
            sock = self._checkout()
        except OSError as e:
            raise LocalUnavailable(f"{self.path}: {e}") from e
        try:
            result = self._exchange(sock, req, sink, base)
        except (LocalChanged, LocalNotServed, ClientError) as e:
            self._checkin(sock)  # a whole answer was read: the stream is in step
            if isinstance(e, LocalNotServed):
                self.http_only.add(bucket)
            raise
        except BaseException as e:
            sock.close()  # the stream is in an unknown state
            if isinstance(e, (OSError, KeyError)) or (isinstance(e, ValueError)
                                                      and not isinstance(e, _BufferTooSmall)):
                raise LocalUnavailable(f"{bucket}/{key}: {e}") from e
            raise
        self._checkin(sock)
        return result

    def _exchange(self, sock: socket.socket, req: bytes, make: Callable[[int, int], _Sink],
                  base: int) -> tuple[int, str]:
        sock.sendall(req)
        head = json.loads(sock.recv(MAX_MESSAGE))
        status = int(head["status"])
        if status >= 300:
            code = str(head.get("code", ""))
            if status == 412:
                raise LocalChanged(head.get("message", ""))
            if code == "NotImplemented":
                raise LocalNotServed(head.get("message", ""))
            raise ClientError({"Error": {"Code": code, "Message": head.get("message", "")},
                               "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
        length, size, etag = int(head["length"]), int(head["size"]), str(head["etag"])
        try:
            sink = make(length, size)
        except ValueError as e:
            raise _BufferTooSmall(str(e)) from None
        if base + length > sink.total:
            raise LocalUnavailable(f"{length} bytes at {base} of a range of {sink.total}")
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
                    sink.put_fd(base + pos, n, got_fds[0], file_off)
                elif "data" in part:
                    pos, n = part["data"]
                    if pos + n > length:
                        raise LocalUnavailable("bad segment")
                    buf = sink.buf
                    done = 0
                    while done < n:
                        piece = min(MAX_MESSAGE, n - done)
                        at = base + pos + done
                        if sock.recv_into(buf[at : at + piece], piece) != piece:
                            raise LocalUnavailable("short data message")
                        done += piece
                elif part.get("end"):
                    break
                else:
                    raise LocalUnavailable(f"unexpected message {msg[:100]!r}")
        finally:
            for fd in fds:
                os.close(fd)
        return size, etag


class _BufferTooSmall(ValueError):
    """The caller's buffer cannot hold the range (raised as it is)."""


class _Sink:
    """Where a read's bytes go: ``buf`` (writable, the range's bytes from
    offset 0) and ``total``, the range's length."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.total = buf, len(buf)

    def put_fd(self, pos: int, n: int, fd: int, file_off: int) -> None:
        pread_all(fd, self.buf[pos : pos + n], file_off)


# -- mapping chunk files

PAGE = mmap.PAGESIZE
ALIGN = 2 * 1024 * 1024  # a huge page (PMD) on x86-64 and arm64 with 4 KiB pages
PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_PRIVATE, MAP_FIXED = 0x02, 0x10
MADV_POPULATE_READ = 22  # Linux 5.14: fill the page tables, reading (no copy-on-write break)
_MAP_OK = sys.platform == "linux" and ctypes.sizeof(ctypes.c_void_p) == 8
_libc: Any = None


def _mmap_fn() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int64]
        libc.madvise.restype = ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = libc
    return _libc


class _MapSink(_Sink):
    """One anonymous private region (Python's ``mmap``, so that it is
    unmapped, sub-mappings and all, only when the last view of it goes),
    the range's bytes from ``shift``; chunk files' pages mapped over it
    with MAP_FIXED where they line up, the rest copied into it."""

    def __init__(self, start: int, total: int, populate: bool) -> None:
        self.total, self.populate = total, populate
        self.mapped = 0
        self._lock = threading.Lock()
        self.mm: mmap.mmap | None = None
        self.shift = 0
        if total == 0:
            self.buf = memoryview(bytearray(0))
            return
        # Addresses congruent to the object's offsets modulo ALIGN (2 MiB),
        # as the kernel places a file mapping: then the page cache's large
        # folios can be mapped whole (measured: touching every page of a
        # mapped GiB took 85 ms at 4 KiB alignment, as little as the local
        # file's own mmap once 2 MiB-aligned).
        span = -(-(start % ALIGN + total) // PAGE) * PAGE + ALIGN
        self.mm = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=PROT_READ | PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(anchor)
        del anchor  # its export of the mmap ends with it
        self.shift = (-self.addr) % ALIGN + start % ALIGN  # where the range's first byte goes
        self.buf = memoryview(self.mm)[self.shift : self.shift + total]

    def put_fd(self, pos: int, n: int, fd: int, file_off: int) -> None:
        if n == 0:
            return
        a = self.shift + pos  # where the bytes go in the region
        lead = a % PAGE
        # The pages mapped hold nothing but this segment's bytes, save bytes
        # before the range (lead of the first) or after it (tail of the last).
        if (lead == file_off % PAGE and (pos == 0 or lead == 0)
                and (pos + n == self.total or (a + n) % PAGE == 0)
                and file_off + n <= os.fstat(fd).st_size):  # fmt: skip
            at, length = a - lead, -(-(n + lead) // PAGE) * PAGE
            libc = _mmap_fn()
            want = self.addr + at
            got = libc.mmap(want, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd,
                            file_off - lead)  # fmt: skip
            if got != want:
                err = ctypes.get_errno()
                raise LocalUnavailable(f"mmap of a chunk file: {os.strerror(err)}")
            if self.populate:
                libc.madvise(want, length, MADV_POPULATE_READ)  # best effort (older kernels: EINVAL)
            with self._lock:
                self.mapped += n
            return
        pread_all(fd, self.buf[pos : pos + n], file_off)


class LocalMapping:
    """An object's bytes (or a range's) mapped from the node's chunk files.

    ``view`` is a writable memoryview of them; numpy arrays and torch
    tensors made from it (``np.frombuffer(m.view, np.uint8)``) keep the
    region alive through it: it is unmapped when ``close`` is called with
    no view left, or else when the last view goes.

    How: one anonymous private region is reserved for the range (placed so
    that addresses and object offsets agree modulo 2 MiB, as the kernel
    places a file's own mapping, so large page-cache folios map whole), then
    each chunk file's pages are mapped over their place in it (MAP_FIXED |
    MAP_PRIVATE, PROT_READ | PROT_WRITE): the page cache's pages appear in
    the region, no byte copied. A piece whose file offset does not line up
    with its place modulo the page size, whose length ends mid-page
    before the range's end, or bytes sent inline (a chunk from a peer, one
    still being filled that ends mid-page) are copied into the region's
    anonymous pages instead; ``mapped`` and ``copied`` count the bytes of
    each. With the default 16 MiB chunks, whole warm objects map entirely.

    Why it is safe: a descriptor is handed out only for a verified chunk
    (or object) file, and the node never rewrites or truncates such a file
    in place: a new chunk or version is a new file, eviction unlinks, and a
    mapping keeps its inode, so the bytes stay those that were verified
    (as with ``read_into``'s descriptors). MAP_PRIVATE is copy-on-write:
    writes to the tensors stay in this process and never reach the file,
    so the tensors are writable like those of safetensors' own mmap-backed
    loader. What a mapping does not guard against is the disk corrupting a
    page after the check (an in-place write by someone else): pages not yet
    written are the file's page-cache pages, as with any ``mmap``."""

    def __init__(self, sink: _Sink, size: int, etag: str) -> None:
        self.view: memoryview = sink.buf
        self.size, self.etag = size, etag
        self.mapped = getattr(sink, "mapped", 0)
        self.copied = sink.total - self.mapped  # read into the region: inline, or not lined up
        self._mm = getattr(sink, "mm", None)

    def __len__(self) -> int:
        return len(self.view)

    def close(self) -> None:
        """Unmap now if nothing else uses the bytes (else when the last
        view goes)."""
        try:
            self.view.release()
        except BufferError:
            return  # arrays over it: they keep it
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # other views of the region keep it

    def __enter__(self) -> LocalMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

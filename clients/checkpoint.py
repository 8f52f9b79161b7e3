"""Save and load large checkpoints: parallel multipart up, ranged reads down.

    from nearstore.clients.connect import connect
    from nearstore.clients import checkpoint
    s3 = connect()
    checkpoint.save(s3, "ckpt", "run7/step-1000.pt", "/scratch/step-1000.pt")
    checkpoint.load(s3, "ckpt", "run7/step-1000.pt", "/scratch/restored.pt")
    checkpoint.save_state_dict(s3, "ckpt", "run7/model.pt", model.state_dict())
    model.load_state_dict(checkpoint.load_state_dict(s3, "ckpt", "run7/model.pt"))

``save`` cuts the source into parts of ``part_size`` and uploads ``streams``
of them at once (CreateMultipartUpload, UploadPart, CompleteMultipartUpload).
Memory stays bounded whatever the size: at most ``streams`` part buffers,
reused; a file is read with ``pread`` by each upload thread at its own
offset, a buffer is copied part by part, a stream is read in order. Any
failure (the source, the network, the store, Ctrl-C) aborts the upload, so
no partial object ever becomes visible and no parts are left behind; the
previous version of the key, if any, stays as it was.

Sources smaller than one part are one PutObject. Parts carry CRC32
checksums when the client computes them (boto3's default), as with
``upload_file``.

``load`` reads with ``clients.ranged``'s parallel ranged reader, pinned to
one ETag: never a mix of two versions.
"""

from __future__ import annotations

import io
import os
import queue
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from nearstore.clients import ranged

MiB = 1024 * 1024
PART_SIZE = 32 * MiB
MIN_PART = 5 * MiB  # S3's smallest part but the last
MAX_PARTS = 10_000
STREAMS = 8

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | io.IOBase


def _part_size(size: int | None, part_size: int) -> int:
    if part_size < MIN_PART:
        raise ValueError(f"part_size must be at least {MIN_PART} bytes (S3's minimum)")
    if size is not None and -(-size // part_size) > MAX_PARTS:
        part_size = -(-size // MAX_PARTS)
        part_size = -(-part_size // MiB) * MiB
    return part_size


def _fill(read: Callable[[memoryview], int | None], view: memoryview) -> int:
    """Read into ``view`` until it is full or the source ends."""
    got = 0
    while got < len(view):
        n = read(view[got:])
        if not n:
            break
        got += n
    return got


class _Upload:
    """One multipart upload: parts go up from a pool of ``streams``
    threads, each with its own part buffer; the first failure stops it."""

    def __init__(self, s3: Any, bucket: str, key: str, part_size: int, streams: int,
                 extra: dict[str, Any]) -> None:  # fmt: skip
        self.s3, self.bucket, self.key = s3, bucket, key
        self.part_size = part_size
        self.streams = max(1, streams)
        self.checksum = s3.meta.config.request_checksum_calculation == "when_supported"
        if self.checksum:
            extra = {"ChecksumAlgorithm": "CRC32", **extra}
        self.upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, **extra)["UploadId"]
        self.parts: dict[int, dict[str, str]] = {}
        self.failed = threading.Event()
        self.buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.allocated = 0
        self.lock = threading.Lock()

    def buffer(self) -> bytearray:
        """A free part buffer; at most ``streams`` are ever made."""
        with self.lock:
            if self.buffers.empty() and self.allocated < self.streams:
                self.allocated += 1
                return bytearray(self.part_size)
        return self.buffers.get()

    def put(self, number: int, buf: bytearray, n: int) -> None:
        """Upload ``buf[:n]`` as part ``number``; the buffer goes back to the pool."""
        try:
            if self.failed.is_set():
                return
            body = buf if n == len(buf) else bytes(memoryview(buf)[:n])
            kw = {"ChecksumAlgorithm": "CRC32"} if self.checksum else {}
            resp = self.s3.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                       PartNumber=number, Body=body, **kw)  # fmt: skip
            part = {"PartNumber": number, "ETag": resp["ETag"]}
            if self.checksum and "ChecksumCRC32" in resp:
                part["ChecksumCRC32"] = resp["ChecksumCRC32"]
            self.parts[number] = part
        except BaseException:
            self.failed.set()
            raise
        finally:
            self.buffers.put(buf)

    def complete(self) -> str:
        parts = [self.parts[n] for n in sorted(self.parts)]
        resp = self.s3.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
            MultipartUpload={"Parts": parts})  # fmt: skip
        return str(resp["ETag"])

    def abort(self) -> None:
        self.s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)


def _run(upload: _Upload, submit_all: Callable[[Callable[..., Future[None]]], None]) -> str:
    """Let ``submit_all`` queue the parts, wait for them, complete; on any
    failure wait for the parts in flight, then abort and re-raise."""
    futures: list[Future[None]] = []
    try:
        with ThreadPoolExecutor(upload.streams, thread_name_prefix="checkpoint-up") as pool:

            def submit(fn: Callable[..., None], *args: Any) -> Future[None]:
                if upload.failed.is_set():
                    raise _Stop
                f = pool.submit(fn, *args)
                futures.append(f)
                return f

            try:
                submit_all(submit)
            except _Stop:
                pass
            except BaseException:
                upload.failed.set()
                raise
        for f in futures:
            f.result()  # the first part's failure
        if not upload.parts:
            raise ValueError("nothing to upload")
        return upload.complete()
    except BaseException:
        upload.failed.set()
        upload.abort()
        raise


class _Stop(Exception):
    pass


def save(
    s3: Any,
    bucket: str,
    key: str,
    src: Source,
    *,
    part_size: int = PART_SIZE,
    streams: int = STREAMS,
    content_type: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write ``src`` (a path, a bytes-like buffer, or a binary file object)
    to ``s3://bucket/key`` with parallel multipart; returns the ETag."""
    extra: dict[str, Any] = {}
    if content_type:
        extra["ContentType"] = content_type
    if metadata:
        extra["Metadata"] = metadata
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            return _save_fd(s3, bucket, key, f.fileno(), 0, os.fstat(f.fileno()).st_size,
                            part_size, streams, extra)  # fmt: skip
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _save_buffer(s3, bucket, key, memoryview(src).cast("B"), part_size, streams, extra)
    fd = _seekable_fd(src)
    if fd is not None:
        start = src.tell()
        size = os.fstat(fd).st_size - start
        etag = _save_fd(s3, bucket, key, fd, start, size, part_size, streams, extra)
        src.seek(start + size)
        return etag
    return _save_stream(s3, bucket, key, src, part_size, streams, extra)


def _seekable_fd(f: Any) -> int | None:
    """The descriptor of a regular file opened for reading, else None."""
    try:
        fd = int(f.fileno())
        if f.seekable() and stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _save_fd(s3: Any, bucket: str, key: str, fd: int, start: int, size: int, part_size: int,
             streams: int, extra: dict[str, Any]) -> str:  # fmt: skip
    part_size = _part_size(size, part_size)
    if size <= part_size:
        data = os.pread(fd, size, start) if size else b""
        if len(data) != size:
            raise OSError(f"{key}: the source file ended at {len(data)} of {size} bytes")
        return str(s3.put_object(Bucket=bucket, Key=key, Body=data, **extra)["ETag"])
    upload = _Upload(s3, bucket, key, part_size, streams, extra)

    def one(number: int, offset: int, n: int) -> None:
        if upload.failed.is_set():
            return
        buf = upload.buffer()
        try:
            got = _fill(lambda v: os.preadv(fd, [v], offset + (n - len(v))), memoryview(buf)[:n])
            if got != n:
                raise OSError(f"{key}: the source file ended at {offset + got - start} "
                              f"of {size} bytes")  # fmt: skip
        except BaseException:
            upload.failed.set()
            upload.buffers.put(buf)
            raise
        upload.put(number, buf, n)

    def submit_all(submit: Callable[..., Future[None]]) -> None:
        for i, offset in enumerate(range(start, start + size, part_size)):
            submit(one, i + 1, offset, min(part_size, start + size - offset))

    return _run(upload, submit_all)


def _save_buffer(s3: Any, bucket: str, key: str, view: memoryview, part_size: int,
                 streams: int, extra: dict[str, Any]) -> str:  # fmt: skip
    size = len(view)
    part_size = _part_size(size, part_size)
    if size <= part_size:
        return str(s3.put_object(Bucket=bucket, Key=key, Body=bytes(view), **extra)["ETag"])
    upload = _Upload(s3, bucket, key, part_size, streams, extra)

    def one(number: int, offset: int, n: int) -> None:
        buf = upload.buffer()
        buf[:n] = view[offset : offset + n]
        upload.put(number, buf, n)

    def submit_all(submit: Callable[..., Future[None]]) -> None:
        for i, offset in enumerate(range(0, size, part_size)):
            submit(one, i + 1, offset, min(part_size, size - offset))

    return _run(upload, submit_all)


def _save_stream(s3: Any, bucket: str, key: str, src: Any, part_size: int, streams: int,
                 extra: dict[str, Any]) -> str:  # fmt: skip
    """A source read in order (a pipe, a socket, an in-memory stream)."""
    part_size = _part_size(None, part_size)
    reader: Callable[[memoryview], int | None]
    if hasattr(src, "readinto"):
        reader = src.readinto
    else:

        def reader(v: memoryview) -> int:
            data = src.read(len(v))
            v[: len(data)] = data
            return len(data)

    first = bytearray(part_size)
    n = _fill(reader, memoryview(first))
    if n < part_size:  # the whole source fits in one part
        return str(s3.put_object(Bucket=bucket, Key=key, Body=bytes(first[:n]), **extra)["ETag"])
    upload = _Upload(s3, bucket, key, part_size, streams, extra)
    upload.allocated = 1  # ``first`` is one of the pool's buffers

    def submit_all(submit: Callable[..., Future[None]]) -> None:
        buf, got, number = first, n, 1
        while True:
            submit(upload.put, number, buf, got)
            if got < part_size:
                return
            buf = upload.buffer()  # blocks while every buffer is in flight
            try:
                got = _fill(reader, memoryview(buf))
            except BaseException:
                upload.buffers.put(buf)
                raise
            if got == 0:
                upload.buffers.put(buf)
                return
            number += 1

    return _run(upload, submit_all)


def load(
    s3: Any,
    bucket: str,
    key: str,
    dst: str | os.PathLike[str] | bytearray | memoryview | None = None,
    *,
    streams: int = STREAMS,
    chunk: int = ranged.CHUNK,
) -> Any:
    """Read ``s3://bucket/key`` with parallel ranged GETs: into the file
    ``dst`` (returns its size), into the buffer ``dst`` (returns a view of
    the object's bytes in it), or, with no ``dst``, into a new buffer
    (returns a memoryview of it)."""
    if isinstance(dst, (str, os.PathLike)):
        return ranged.download(s3, bucket, key, dst, streams=streams, chunk=chunk)
    return ranged.read_into(s3, bucket, key, dst, streams=streams, chunk=chunk)


# ------------------------------------------------------------------- torch


def require_torch(what: str) -> Any:
    """The torch module, or an ImportError that says what needs it and how
    to install it (torch is imported only when a torch helper is used)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{what} needs PyTorch: pip install torch "
                          "(or nearstore[torch])") from e  # fmt: skip
    return torch


def save_state_dict(s3: Any, bucket: str, key: str, state_dict: Any, **kw: Any) -> str:
    """``torch.save`` of ``state_dict`` into memory, then ``save``; returns the ETag."""
    torch = require_torch("save_state_dict")
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return save(s3, bucket, key, buf.getbuffer(), **kw)


class _ViewReader(io.RawIOBase):
    """A read-only, seekable file over a memoryview (no copy of the whole)."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._view) - self._pos)
        if n <= 0:
            return 0
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def load_state_dict(s3: Any, bucket: str, key: str, *, map_location: Any = None,
                    streams: int = STREAMS, **kw: Any) -> Any:  # fmt: skip
    """``load`` into memory, then ``torch.load(weights_only=True)``: plain
    tensors and containers only, never arbitrary pickled objects."""
    torch = require_torch("load_state_dict")
    view = load(s3, bucket, key, streams=streams)
    reader = io.BufferedReader(_ViewReader(view), buffer_size=MiB)
    return torch.load(reader, map_location=map_location, weights_only=True, **kw)

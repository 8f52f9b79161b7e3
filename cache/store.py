"""The node-local chunk store: immutable chunk files on local disk.

Layout under the cache directory::

    chunks/ab/cd/<id>.<xxh3>   one immutable file per chunk
    tmp/<random>               fills in progress; emptied at start-up

A chunk's id is a hash of (backing store, bucket, key, ETag, chunk size,
index): an overwritten object can never be served from old chunks, and old
chunks age out by eviction. The file name carries the XXH3-64 checksum
recorded at fill, so the store needs no separate index to survive a
restart: the index is rebuilt from a directory scan (a warm cache stays
warm), and a file is complete by construction once renamed into place.

Fill: write a temporary file while hashing, then rename. No fsync: a chunk
that lost its data in a crash fails its checksum and is refilled, which is
cheaper than an fsync per chunk and as safe.

Integrity: every read verifies the checksum right before the bytes are
sent, hashing the page-cache pages through mmap (no copy into Python) and
then sending the same file with sendfile. A chunk that fails is dropped and
the caller refills it: a flipped bit, on disk or in the page cache, is never
served. Measured cost: see bench/RESULTS.md ("verify").

Capacity is a byte budget. The store accounts bytes; the eviction policy
only picks victims. Eviction runs after each admission until the store is
within budget, so the budget is exceeded at most by the chunks being filled.
Pinned chunks are never evicted. An open file stays readable after its chunk
is evicted (unlink), so a reader in flight is never cut off.

Errors: the store raises ``CacheError`` subclasses, never S3 errors; a cache
fault is a miss for the caller (served from the backing store).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import mmap
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from nearstore.cache.errors import ChunkCorrupt, ChunkMissing
from nearstore.cache.eviction import EvictionPolicy, make_policy

log = logging.getLogger(__name__)

WRITE_PIECE = 1024 * 1024


@dataclass
class Chunk:
    id: str
    size: int
    checksum: str  # xxh3-64 hex

    def rel(self) -> str:
        return f"chunks/{self.id[:2]}/{self.id[2:4]}/{self.id}.{self.checksum}"


@dataclass
class StoreStats:
    """What the store itself counts (hits, misses and failures are counted
    where they happen, in cache.metrics)."""

    fills: int = 0
    evictions: int = 0


class ChunkStore:
    """Chunk files plus an in-memory index rebuilt from the directory.

    Not thread-safe: its methods run on the event loop's thread; the
    blocking parts (hashing, writing, scanning) are separate functions the
    caller runs in an executor.
    """

    def __init__(self, root: str | os.PathLike[str], capacity: int, policy: str = "sieve") -> None:
        self.root = Path(root)
        self._root = os.fspath(self.root)
        self.capacity = capacity
        self.policy: EvictionPolicy = make_policy(policy, capacity)
        self.index: dict[str, Chunk] = {}
        self.used = 0
        self.pinned: set[str] = set()
        self.pinned_bytes = 0
        # Chunks the cache keeps from eviction for a while (prefetched and
        # not read yet), apart from users' pins: neither undoes the other.
        self.protected: dict[str, int] = {}
        self.protected_bytes = 0
        self.stats = StoreStats()
        # Told of every chunk dropped (evicted, corrupt, not ours): the
        # prefetch accounting (cache.readpath) counts those never read.
        self.on_drop: list[Callable[[str], None]] = []

    # --- start-up -----------------------------------------------------------

    def load(self) -> int:
        """Rebuild the index from disk (blocking). Returns chunks found."""
        # Private to the node's user (chunks are tenants' bytes); an older
        # version's 0755 directories are tightened too.
        for d in (self.root, self.root / "chunks", self.root / "tmp"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        tmp = self.root / "tmp"
        for entry in os.scandir(tmp):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        found: list[tuple[float, Chunk]] = []
        for dirpath, _dirs, files in os.walk(self.root / "chunks"):
            for name in files:
                cid, dot, checksum = name.partition(".")
                path = os.path.join(dirpath, name)
                if not dot or len(cid) != 32 or len(checksum) != 16:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found.append((st.st_atime, Chunk(cid, st.st_size, checksum)))
        # Oldest first, so the policy's notion of age roughly survives.
        found.sort(key=lambda t: t[0])
        for _, c in found:
            self._add(c)
        self._evict()
        return len(found)

    # --- index --------------------------------------------------------------

    def _add(self, c: Chunk) -> None:
        old = self.index.get(c.id)
        if old is not None:
            self.used -= old.size
            self.policy.remove(c.id)
        self.index[c.id] = c
        self.used += c.size
        self.policy.admit(c.id, c.size)

    def lookup(self, cid: str) -> Chunk | None:
        c = self.index.get(cid)
        if c is not None:
            self.policy.touch(cid)
        return c

    def path(self, c: Chunk) -> str:
        # A string join: pathlib's was ~5 us of every cache hit.
        return f"{self._root}/{c.rel()}"

    def find(self, cid: str) -> Chunk | None:
        """Look a chunk up on disk rather than in the index (blocking, one
        small directory listing): how worker processes, which hold no index,
        find the chunks the owner filled."""
        d = self.root / "chunks" / cid[:2] / cid[2:4]
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return None
        prefix = cid + "."
        for name in names:
            if name.startswith(prefix):
                checksum = name[len(prefix):]
                try:
                    size = os.stat(d / name).st_size
                except FileNotFoundError:
                    return None
                return Chunk(cid, size, checksum)
        return None

    def drop(self, cid: str) -> None:
        """Forget a chunk and remove its file (corrupt, or evicted)."""
        c = self.index.pop(cid, None)
        if c is None:
            return
        for listener in self.on_drop:
            listener(cid)
        if cid in self.pinned:
            self.pinned.discard(cid)
            self.pinned_bytes -= c.size
        self.protected_bytes -= self.protected.pop(cid, 0)
        self.used -= c.size
        self.policy.remove(cid)
        _verified.pop(self.path(c), None)
        with contextlib.suppress(OSError):
            os.unlink(self.path(c))

    def drop_unless(self, keep: Callable[[str], bool]) -> int:
        """Drop every unpinned chunk whose id ``keep`` refuses (a cluster's
        node, of the chunks it no longer owns); returns how many."""
        gone = [cid for cid in self.index if cid not in self.pinned and not keep(cid)]
        for cid in gone:
            self.drop(cid)
        return len(gone)

    # Pins may take at most this share of the budget, so that eviction can
    # always make room and the budget holds.
    MAX_PINNED_SHARE = 0.8

    def discard(self, c: Chunk) -> None:
        """Remove a chunk known to be bad, indexed here or not (a worker
        process holds no index but must not leave a corrupt file behind)."""
        if c.id in self.index:
            self.drop(c.id)
        else:
            _verified.pop(self.path(c), None)
            with contextlib.suppress(OSError):
                os.unlink(self.path(c))

    def pin(self, cid: str) -> bool:
        """Protect a chunk from eviction. False when it is not cached or
        pinning it would take pins (and the cache's own protections) past
        MAX_PINNED_SHARE of the budget."""
        c = self.index.get(cid)
        if c is None:
            return False
        if cid in self.pinned:
            return True
        if not self._may_hold(c.size):
            return False
        self.pinned.add(cid)
        self.pinned_bytes += c.size
        self.policy.pin(cid)
        return True

    def unpin(self, cid: str) -> None:
        c = self.index.get(cid)
        if cid in self.pinned:
            self.pinned.discard(cid)
            self.pinned_bytes -= c.size if c else 0
            if cid not in self.protected:
                self.policy.unpin(cid)

    def protect(self, cid: str) -> bool:
        """Keep a chunk from eviction until `unprotect` (the cache's own
        hold, apart from users' pins). False when it is not cached, or when
        pins and protections would pass MAX_PINNED_SHARE of the budget."""
        c = self.index.get(cid)
        if c is None:
            return False
        if cid in self.protected:
            return True
        if not self._may_hold(c.size):
            return False
        self.protected[cid] = c.size
        self.protected_bytes += c.size
        self.policy.pin(cid)
        return True

    def _may_hold(self, size: int) -> bool:
        """Whether pins and protections may take ``size`` more bytes."""
        return self.pinned_bytes + self.protected_bytes + size <= self.capacity * self.MAX_PINNED_SHARE

    def unprotect(self, cid: str) -> None:
        size = self.protected.pop(cid, None)
        if size is None:
            return
        self.protected_bytes -= size
        if cid not in self.pinned:
            self.policy.unpin(cid)

    def _evict(self) -> None:
        while self.used > self.capacity:
            victim = self.policy.victim()
            if victim is None:
                break
            self.drop(victim)
            self.stats.evictions += 1

    # --- fill ---------------------------------------------------------------

    def new_temp(self) -> Path:
        return self.root / "tmp" / uuid.uuid4().hex

    def commit(self, cid: str, tmp: Path, size: int, checksum: str) -> Chunk:
        """Rename a filled temp file into place (blocking, fast) and admit it."""
        c = Chunk(cid, size, checksum)
        dest = self.path(c)
        try:
            os.rename(tmp, dest)
        except FileNotFoundError:
            Path(dest).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.rename(tmp, dest)
        self._add(c)
        self.stats.fills += 1
        self._evict()
        return c


class ChunkWriter:
    """Writes one chunk's bytes to a temp file while hashing (blocking
    calls, run in an executor). One lock orders writes against ``close``
    and ``abort``: a fill that is cancelled while a write is still running
    in its thread must not close the descriptor under it (the number could
    already name another file when the write reaches the kernel).

    ``direct``: with O_DIRECT where the filesystem has it (prefetch fills
    with ``[cache] hint_direct``: no reader waits for those bytes now).
    Copying new bytes into the page cache was half of a filling node's CPU
    on the machine measured (perf: ``copy_folio_from_iter_atomic``); with
    O_DIRECT a first epoch with hints ran 13 % faster on 30 % less node
    CPU. Not the default: a file read into memory after an O_DIRECT write
    is re-read at 1.7x the CPU per byte of one written through the page
    cache (5 against 8.7 GB/s; its pages come in small), so every warm epoch
    of a dataset that fits in memory pays (bench/RESULTS.md). Bytes are
    staged in an aligned buffer (reused: ``_STAGES``) and written a block at
    a time; ``written`` is how much of the file a reader may read (a temp
    file is read while it grows). The last, partial block is written
    padded and the file cut to size. Without O_DIRECT (tmpfs): plain
    writes."""

    BLOCK = 1 << 20
    ALIGN = 4096

    def __init__(self, path: Path, *, direct: bool = False) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self._stage: mmap.mmap | None = None
        self._staged = 0
        fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o600)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here; anything else is real
                    raise
            else:
                self._stage = _take_stage(self.BLOCK)
        self.fd = fd if fd >= 0 else os.open(path, flags, 0o600)
        self.hash = xxhash.xxh3_64()
        self.size = 0  # bytes given
        self.written = 0  # bytes in the file, readable
        self._lock = threading.Lock()
        self._closed = False

    @property
    def direct(self) -> bool:
        return self._stage is not None

    def write(self, data: bytes | memoryview) -> None:
        self.write_many([data])

    def write_many(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Append ``pieces`` in order: one writev per up to IOV_MAX of them
        (with O_DIRECT, one write per full block)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "chunk writer closed")
            for piece in pieces:
                self.hash.update(piece)
            if self._stage is not None:
                self._stage_many(pieces)
                return
            views = collections.deque(memoryview(p) for p in pieces if len(p))
            while views:
                n = os.writev(self.fd, list(itertools.islice(views, _IOV_MAX)))
                self.size += n
                while n:
                    if n >= len(views[0]):
                        n -= len(views.popleft())
                    else:
                        views[0] = views[0][n:]
                        n = 0
            self.written = self.size

    def _stage_many(self, pieces: Sequence[bytes | memoryview]) -> None:
        stage = self._stage
        assert stage is not None
        for piece in pieces:
            view = memoryview(piece).cast("B")
            self.size += len(view)
            while view:
                n = min(len(view), self.BLOCK - self._staged)
                stage[self._staged : self._staged + n] = view[:n]
                self._staged += n
                view = view[n:]
                if self._staged == self.BLOCK:
                    self._flush()

    def _flush(self) -> None:
        """Write the staged bytes at ``written``, padded to the alignment."""
        assert self._stage is not None
        n = self._staged
        padded = -(-n // self.ALIGN) * self.ALIGN
        if padded != n:
            self._stage[n:padded] = bytes(padded - n)
        with memoryview(self._stage) as whole, whole[:padded] as block:
            done = 0
            while done < padded:
                done += os.pwrite(self.fd, block[done:], self.written + done)
        self.written += n
        self._staged = 0

    def close(self) -> str:
        with self._lock:
            self._closed = True
            try:
                if self._stage is not None:
                    if self._staged:
                        self._flush()
                    os.ftruncate(self.fd, self.size)  # the last block's padding
            finally:
                self._give_back()
                os.close(self.fd)
        return self.hash.hexdigest()

    def abort(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._give_back()
                with contextlib.suppress(OSError):
                    os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _give_back(self) -> None:
        if self._stage is not None:
            _give_stage(self._stage)
            self._stage = None


# Staging buffers of O_DIRECT writers, kept for the next fill: memory touched
# for the first time is slow on the machines measured (0.2-0.5 GB/s,
# ../shared/MEASURED.md), and a new 1 MiB buffer per fill pays it each time.
_STAGES: list[mmap.mmap] = []
_STAGES_KEPT = 64
_stages_lock = threading.Lock()


def _take_stage(size: int) -> mmap.mmap:
    with _stages_lock:
        while _STAGES:
            m = _STAGES.pop()
            if len(m) == size:
                return m
            m.close()
    return mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs


def _give_stage(m: mmap.mmap) -> None:
    with _stages_lock:
        if len(_STAGES) < _STAGES_KEPT:
            _STAGES.append(m)
            return
    m.close()


_IOV_MAX = 1024


# Chunks already hashed, by path: (inode, size, mtime_ns, ctime_ns, checksum,
# when). A chunk file is never rewritten in place, so while these are the
# same the bytes are the ones that were hashed: any write through the file
# system (a bit flipped by a stray process, a truncation, a replaced file)
# changes mtime or ctime or the inode and forces a new hash. What the memo
# cannot see is media corruption under the page cache; ``memo_s`` bounds how
# long a hash is trusted for that. Rejected: hashing every open (what this
# replaced) costs ~0.8 ms per 16 MiB chunk on every read, most of a warm
# short-circuit read's time; trusting a hash forever leaves silent rot to
# the next restart.
#
# Bounded twice: an entry goes with its chunk (``drop``, ``discard``), and
# the memo is emptied past _VERIFIED_MAX entries (~455 bytes each: 30 MiB),
# which only worker processes reach (they hold no index and hear of no
# eviction) or a cache of more than 65,536 chunks (1 TiB of 16 MiB chunks),
# where the cost is one more hash per chunk. Measured by the soak (bench/
# RESULTS.md): before entries left with their chunks, the memo grew with
# churn toward 2^20 entries (430 MiB).
_verified: dict[str, tuple[int, int, int, int, str, float]] = {}
_VERIFIED_MAX = 1 << 16


def _ident(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _vouched(path: Path | str, st: os.stat_result, checksum: str, memo_s: float) -> bool:
    """Whether the memo says this open file is the one hashed lately."""
    seen = _verified.get(str(path)) if memo_s > 0 else None
    return (seen is not None and seen[:4] == _ident(st) and seen[4] == checksum
            and time.monotonic() - seen[5] < memo_s)


def _open(path: Path | str) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ChunkMissing(str(path)) from None


def open_if_verified(path: Path | str, checksum: str, size: int, memo_s: float) -> int | None:
    """A descriptor of the chunk file if the memo vouches for it (a few
    microseconds: open and fstat, no hashing, so callers may run it on an
    event loop); else None and the caller runs `open_verified`."""
    name = str(path)
    if memo_s <= 0 or name not in _verified:
        return None
    try:
        fd = _open(name)
    except ChunkMissing:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size == size and _vouched(name, st, checksum, memo_s):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def range_digest(fd: int, start: int, end: int) -> str:
    """XXH3-64 (hex) of bytes start..end of an open chunk file (blocking),
    hashed through mmap: the peer API's answer for part of a chunk."""
    if end <= start:
        return xxhash.xxh3_64(b"").hexdigest()
    base = start - start % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, end - base, prot=mmap.PROT_READ, offset=base) as m, memoryview(m) as view:
        return xxhash.xxh3_64(view[start - base:]).hexdigest()


def open_verified(path: Path | str, checksum: str | None, size: int, memo_s: float = 0.0) -> int:
    """Open a chunk file and verify its checksum (blocking). Returns an open
    descriptor positioned nowhere in particular (use pread/sendfile with
    offsets). Raises ChunkCorrupt or ChunkMissing. With ``memo_s`` > 0 a
    file hashed less than that many seconds ago and not changed since (same
    inode, size, mtime and ctime) is not hashed again."""
    fd = _open(path)
    try:
        st = os.fstat(fd)
        if st.st_size != size:
            raise ChunkCorrupt(f"{path}: size {st.st_size} != {size}")
        if checksum is None or _vouched(path, st, checksum, memo_s):
            return fd  # checksum None: verification turned off (measurement only)
        if size == 0:
            digest = xxhash.xxh3_64(b"").hexdigest()
        else:
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                digest = xxhash.xxh3_64(m).hexdigest()
        if digest != checksum:
            _verified.pop(str(path), None)
            raise ChunkCorrupt(f"{path}: checksum {digest} != {checksum}")
        # Only a file last written over a second ago: file times come from a
        # coarse clock (a few ms), and a write within the same tick as the
        # hashed one would leave mtime as it was.
        if memo_s > 0 and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > 1_000_000_000:
            if len(_verified) >= _VERIFIED_MAX:
                _verified.clear()
            _verified[str(path)] = (*_ident(st), checksum, time.monotonic())
    except BaseException:
        os.close(fd)
        raise
    return fd

"""Datasets over a bucket and prefix, for training loops.

Three datasets, one set of rules:

- ``ObjectDataset``: map-style, one sample per object (``len``, ``[i]``).
- ``ObjectStream``: iterable, one sample per object, read ahead.
- ``TarDataset``: iterable over tar shards in the WebDataset layout; the
  shard is the unit of reading (one large sequential read, the fast path
  for an object store), a sample is a group of members.

Where the bytes come from is a ``Source``: ``S3Source`` (a nearstore node,
or any S3, through ``nearstore.connect()``) or ``LocalSource`` (a directory;
the same code reading local disk, which is how the bench measures the
limit). A dataset is given a source or a URL: ``s3://bucket/prefix`` or a
local path.

Sharding: an iterable dataset splits its items (objects or shards) first
by distributed rank (``rank``/``world_size``: given, else from
``torch.distributed`` when initialised, else the RANK and WORLD_SIZE
environment variables), then by DataLoader worker. Every item goes to
exactly one (rank, worker) per epoch. With ``shuffle=True`` the item order
is a permutation seeded by ``(seed, epoch)``, identical on every rank, so
the split stays a partition; call ``set_epoch(n)`` before each epoch, as
with torch's DistributedSampler. ``even=True`` drops the last
``len % world_size`` items so every rank sees as many items (distributed
training hangs when one rank runs out first).

Read-ahead is bounded: at most ``prefetch`` items (objects, or whole
shards) are in flight or buffered per iterator. Shards larger than
``max_buffer`` are streamed instead of buffered, so memory stays flat
whatever the shard size.

Read-ahead hints (``clients.hints``): as an iterable dataset reads, it
tells the node the next keys of its epoch order (a window of about 30 s
of reading, sent in the background every half window), so that the node
fills them before they are asked for: a first epoch at nearly warm speed.
``ObjectDataset`` is map-style: the sampler, not the dataset, knows the
order, so it hints only when given the order (``hint(indices)``) or when
read in key order. ``hints=False`` or ``NEARSTORE_HINTS=0`` turns them
off; a local directory, or an endpoint that refuses the first hint (a
plain S3), reads on without them.

``decode`` turns a raw sample into what the training step wants; it runs
in the loader worker. Without torch these are plain Python iterables; with
torch installed they are ``torch.utils.data`` datasets and work with
``DataLoader(num_workers=N)`` (each worker opens its own connections).
"""

from __future__ import annotations

import bisect
import os
import random
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar

from nearstore.clients import hints as _hints
from nearstore.clients import ranged
from nearstore.clients.connect import connect
from nearstore.clients.local import LocalUnavailable, pread_all
from nearstore.clients.tar import Sample, buffer_reader, group_samples, iter_members, stream_reader

T = TypeVar("T")
U = TypeVar("U")

try:  # torch is optional: subclass its dataset types when it is there
    from torch.utils.data import Dataset as _MapBase
    from torch.utils.data import IterableDataset as _IterBase
except ImportError:  # without torch: plain classes, plain iterables

    class _MapBase:  # type: ignore[no-redef]
        pass

    class _IterBase:  # type: ignore[no-redef]
        pass


@dataclass(frozen=True)
class Entry:
    name: str  # the object key (or path relative to the local root)
    size: int


class Source(Protocol):
    """Where a dataset's bytes come from."""

    url: str

    def list(self, prefix: str) -> list[Entry]: ...

    def read(self, entry: Entry) -> bytes | bytearray | memoryview: ...

    def read_into(self, entry: Entry, buf: bytearray) -> memoryview:
        """The whole object into ``buf`` (at least ``entry.size`` long)."""
        ...

    def open(self, entry: Entry) -> IO[bytes]: ...


class S3Source:
    """A bucket on a nearstore node (or any S3). Shards are read through
    the node's short-circuit socket when it runs on this machine
    (``clients.local``; ``local=False`` turns that off), else with
    parallel ranged GETs. The boto3 client is made
    lazily in each process: a dataset pickled into a DataLoader worker
    opens its own connections."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        client: Callable[[], Any] | None = None,
        streams: int = 8,
        chunk: int = ranged.CHUNK,
        local: bool = True,
    ) -> None:
        self.bucket = bucket
        self.local = local
        self.endpoint = endpoint
        self.factory = client
        self.streams = streams
        self.chunk = chunk
        self.url = f"s3://{bucket}"
        self._s3: Any = None
        self._pid = 0
        self.hints_off = False  # set when the endpoint refused a hint (in this process)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_s3"], state["_pid"] = None, 0
        return state

    def send_hint(self, stream: str, keys: list[str]) -> dict[str, Any]:
        """Tell the node ``stream`` reads ``keys`` next (``clients.hints``)."""
        return _hints.post(self.s3, self.bucket, stream, keys)

    @property
    def s3(self) -> Any:
        if self._s3 is None or self._pid != os.getpid():
            self._s3 = self.factory() if self.factory else connect(self.endpoint)
            self._pid = os.getpid()
        return self._s3

    def list(self, prefix: str) -> list[Entry]:
        out: list[Entry] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out += [Entry(o["Key"], int(o["Size"])) for o in page.get("Contents", ())]
        return out

    def read(self, entry: Entry) -> bytes | bytearray | memoryview:
        if entry.size > self.chunk:
            return self.read_into(entry, bytearray(entry.size))
        body = self.s3.get_object(Bucket=self.bucket, Key=entry.name)["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data

    def read_into(self, entry: Entry, buf: bytearray) -> memoryview:
        view = ranged.read_into(self.s3, self.bucket, entry.name, buf, streams=self.streams,
                                chunk=self.chunk, local=self.local)
        if len(view) != entry.size:  # replaced since the listing: a whole other object
            raise ranged.ObjectChanged(entry.name)
        return view

    def open(self, entry: Entry) -> IO[bytes]:
        body: IO[bytes] = self.s3.get_object(Bucket=self.bucket, Key=entry.name)["Body"]
        return body


class LocalSource:
    """A local directory laid out like a bucket (names use '/')."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = self.root.as_uri() if self.root.is_absolute() else str(self.root)

    def list(self, prefix: str) -> list[Entry]:
        out: list[Entry] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    out.append(Entry(rel, os.path.getsize(os.path.join(dirpath, f))))
        out.sort(key=lambda e: e.name)
        return out

    def read(self, entry: Entry) -> bytes:
        with open(self.root / entry.name, "rb") as f:
            return f.read()

    def read_into(self, entry: Entry, buf: bytearray) -> memoryview:
        """Pieces of 16 MiB read by up to 4 threads at once (preadv drops
        the GIL): the same way the short-circuit path reads chunk files,
        so the bench compares like with like."""
        view = memoryview(buf)[: entry.size]
        fd = os.open(self.root / entry.name, os.O_RDONLY)
        try:
            spans = [(lo, min(entry.size, lo + ranged.CHUNK)) for lo in range(0, entry.size, ranged.CHUNK)]

            def one(span: tuple[int, int]) -> None:
                try:
                    pread_all(fd, view[span[0] : span[1]], span[0])
                except LocalUnavailable:
                    raise ranged.ObjectChanged(entry.name) from None  # shorter than listed

            if len(spans) <= 1:
                for span in spans:
                    one(span)
            else:
                with ThreadPoolExecutor(min(4, len(spans))) as pool:
                    list(pool.map(one, spans))
        finally:
            os.close(fd)
        return view

    def open(self, entry: Entry) -> IO[bytes]:
        return open(self.root / entry.name, "rb")


def open_source(url: str | Source, prefix: str = "") -> tuple[Source, str]:
    """(source, prefix) for ``s3://bucket/prefix``, a local path, or a
    ready source (then ``prefix`` is used as given)."""
    if not isinstance(url, str):
        return url, prefix
    if url.startswith("s3://"):
        bucket, _, key_prefix = url[5:].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {url!r}")
        return S3Source(bucket), key_prefix + prefix
    if url.startswith("file://"):
        url = url[7:]
    return LocalSource(url), prefix


# -- sharding -----------------------------------------------------------------


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size): torch.distributed when initialised, else the
    RANK/WORLD_SIZE environment variables, else (0, 1)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def loader_worker() -> tuple[int, int]:
    """(worker id, number of workers) inside a torch DataLoader worker,
    else (0, 1). Looks only if torch is already imported."""
    data = sys.modules.get("torch.utils.data")
    info = data.get_worker_info() if data is not None else None
    return (int(info.id), int(info.num_workers)) if info is not None else (0, 1)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """0..n-1, permuted by (seed, epoch) when shuffling: the same on every
    rank and worker, so splitting it partitions the items."""
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def split(
    items: Sequence[T], *, rank: int, world_size: int, worker: int = 0, workers: int = 1,
    even: bool = False,
) -> list[T]:
    """This (rank, worker)'s share: items[rank::world_size], then every
    ``workers``-th of that. ``even`` first drops the ``len % world_size``
    tail so every rank gets as many."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} outside {workers} workers")
    if even:
        items = items[: len(items) - len(items) % world_size]
    return list(items[rank::world_size])[worker::workers]


def prefetched(fn: Callable[[T], U], items: Iterable[T], depth: int, threads: int) -> Iterator[U]:
    """fn over items, in order, with at most ``depth`` calls running or
    finished but not yet taken. Stopping early cancels what has not started."""
    depth = max(1, depth)
    pool = ThreadPoolExecutor(max(1, min(threads, depth)), thread_name_prefix="nearstore-prefetch")
    pending: deque[Future[U]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                break
        while pending:
            done = pending.popleft()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            yield done.result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _default_decode(sample: T) -> T:
    return sample


# -- datasets -----------------------------------------------------------------


class EmptyDataset(UserWarning):
    """A dataset whose prefix holds no objects (of the wanted suffixes): a
    wrong bucket or prefix, most likely, that would otherwise train on
    nothing in silence."""


class _Listed:
    """A source, a prefix and the sorted list of entries under it (listed
    once, when the dataset is made, so every rank sees the same list)."""

    def __init__(self, url: str | Source, prefix: str, suffixes: Sequence[str] | None) -> None:
        self.source, self.prefix = open_source(url, prefix)
        entries = self.source.list(self.prefix)
        if suffixes:
            entries = [e for e in entries if e.name.endswith(tuple(suffixes))]
        self.entries = sorted(entries, key=lambda e: e.name)
        if not self.entries:
            where = url if isinstance(url, str) else type(url).__name__
            wanted = f" ending in {', '.join(suffixes)}" if suffixes else ""
            warnings.warn(f"no objects{wanted} under {where} (prefix {self.prefix!r}): the dataset is empty",
                          EmptyDataset, stacklevel=3)


class ObjectDataset(_MapBase, Generic[T]):
    """Map-style: ``ds[i]`` is ``decode((key, data))`` of the i-th object
    under the prefix, in key order. Sharding and shuffling are the
    sampler's job (torch's DistributedSampler, or ``split`` and
    ``epoch_order`` here).

    Hints: the sampler's order is not the dataset's to see, so it hints
    (a) the order given to ``hint(indices)``: the indices this process's
    loader will ask for, in order (e.g. ``order = list(sampler)``, then
    ``DataLoader(ds, sampler=order)``; called before the DataLoader's
    workers start, which is every epoch unless ``persistent_workers``);
    or (b) key order, once it sees 4 consecutive indices asked in a row
    (plain iteration, a SequentialSampler), until an index goes back."""

    SEQUENTIAL_RUN = 4  # consecutive indices before key order is hinted

    def __init__(
        self,
        url: str | Source,
        prefix: str = "",
        *,
        decode: Callable[[tuple[str, bytes]], T] = _default_decode,  # type: ignore[assignment]
        suffixes: Sequence[str] | None = None,
        hints: bool | None = None,
    ) -> None:
        self._listed = _Listed(url, prefix, suffixes)
        self.decode = decode
        self.hints = hints
        self._job = _hints.job_token(f"{self._listed.source.url}/{self._listed.prefix}")
        self._plan: list[int] | None = None
        self._reset_hints()

    def _reset_hints(self) -> None:
        self._hinter: _hints.Hinter | None = None
        self._hint_pid = os.getpid()
        self._where: dict[int, list[int]] = {}  # index -> its positions in the plan
        self._last = -2
        self._run = 0
        self._no_hints = False  # nothing to tell here (hints off, a local source, refused): stop trying

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_hinter"], state["_hint_pid"], state["_where"] = None, 0, {}
        return state

    def hint(self, indices: Iterable[int]) -> None:
        """The indices this process's loader will read, in that order: hint
        their keys ahead of the reads (replaces an earlier plan)."""
        if self._hinter is not None:
            self._hinter.close()
        self._reset_hints()
        self._plan = [int(i) for i in indices]

    def _hint_at(self, index: int) -> None:
        if os.getpid() != self._hint_pid:
            self._reset_hints()  # a DataLoader worker: its own thread and position
        if self._no_hints:
            return
        if self._plan is not None:
            self._hint_planned(index)
            return
        self._run = self._run + 1 if index == self._last + 1 else (self._run if index > self._last else 0)
        self._last = index
        if self._run < self.SEQUENTIAL_RUN - 1:
            if self._hinter is not None and self._run == 0:
                self._hinter.close()  # went back: not key order any more
                self._hinter = None
            return
        if self._hinter is None:
            self._hinter = self._make_hinter(_Keys(self._listed.entries, range(len(self))))
            if self._hinter is None:
                return
        self._hinter.at(index)

    def _hint_planned(self, index: int) -> None:
        plan = self._plan or []
        if self._hinter is None:
            if not self._where:
                for pos, i in enumerate(plan):
                    self._where.setdefault(i, []).append(pos)
            self._hinter = self._make_hinter(_Keys(self._listed.entries, plan))
            if self._hinter is None:
                return
        positions = self._where.get(index)
        if positions:
            at = bisect.bisect_right(positions, self._hinter.position)
            if at < len(positions):
                self._hinter.at(positions[at])

    def _make_hinter(self, plan: Sequence[str]) -> _hints.Hinter | None:
        rank, _ = distributed_rank()
        worker, _ = loader_worker()
        hinter = _hints.for_source(self._listed.source, self.hints, _hints.stream_id(self._job, rank, worker), plan)
        self._no_hints = hinter is None
        return hinter

    @property
    def keys(self) -> list[str]:
        return [e.name for e in self._listed.entries]

    def __len__(self) -> int:
        return len(self._listed.entries)

    def __getitem__(self, index: int) -> T:
        entry = self._listed.entries[index]
        if self.hints is not False:
            self._hint_at(index if index >= 0 else index + len(self))
        return self.decode((entry.name, bytes(self._listed.source.read(entry))))


class _Keys(Sequence[str]):
    """The keys of ``entries`` in ``order``, made as sliced (a plan of a
    million indices is not a million strings up front)."""

    def __init__(self, entries: Sequence[Entry], order: Sequence[int]) -> None:
        self.entries, self.order = entries, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.entries[j].name for j in self.order[i]]
        return self.entries[self.order[i]].name


class _Iterable(_IterBase, Generic[T]):
    def __init__(
        self,
        url: str | Source,
        prefix: str,
        *,
        suffixes: Sequence[str] | None,
        shuffle: bool,
        seed: int,
        rank: int | None,
        world_size: int | None,
        even: bool,
        prefetch: int,
        hints: bool | None,
    ) -> None:
        self._listed = _Listed(url, prefix, suffixes)
        self.hints = hints
        # Made once, here: pickled into every DataLoader worker of this dataset.
        self._job = _hints.job_token(f"{self._listed.source.url}/{self._listed.prefix}")
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size
        self.even = even
        self.prefetch = prefetch

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration uses (when shuffling)."""
        self.epoch = epoch

    def _mine(self) -> list[Entry]:
        """This rank's and loader worker's entries for the current epoch."""
        return self._share()[0]

    def _share(self) -> tuple[list[Entry], _hints.Hinter | None]:
        """This rank's and loader worker's entries for the current epoch, and
        a hinter over their keys (None when not hinting)."""
        if self.rank is None or self.world_size is None:
            rank, world = distributed_rank()
        else:
            rank, world = self.rank, self.world_size
        worker, workers = loader_worker()
        entries = self._listed.entries
        order = epoch_order(len(entries), shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        mine = [entries[i] for i in split(order, rank=rank, world_size=world, worker=worker,
                                          workers=workers, even=self.even)]
        stream = _hints.stream_id(self._job, rank, worker)
        return mine, _hints.for_source(self._listed.source, self.hints, stream, [e.name for e in mine])

    def _read(self, fn: Callable[[Entry], U]) -> Iterator[U]:
        """fn over this share's entries, ``prefetch`` ahead, hinting as each
        read starts; an early stop closes the hinter (the node drops the
        stream's window)."""
        mine, hinter = self._share()
        if hinter is None:
            yield from prefetched(fn, mine, self.prefetch, self.prefetch)
            return

        def one(item: tuple[int, Entry]) -> U:
            hinter.at(item[0])
            return fn(item[1])

        try:
            yield from prefetched(one, enumerate(mine), self.prefetch, self.prefetch)
        finally:
            hinter.close()


class ObjectStream(_Iterable[T]):
    """Iterable: ``decode((key, data))`` of each object of this rank and
    worker's share, reading ``prefetch`` objects ahead on as many threads."""

    def __init__(
        self,
        url: str | Source,
        prefix: str = "",
        *,
        decode: Callable[[tuple[str, bytes]], T] = _default_decode,  # type: ignore[assignment]
        suffixes: Sequence[str] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        even: bool = False,
        prefetch: int = 16,
        hints: bool | None = None,
    ) -> None:
        super().__init__(url, prefix, suffixes=suffixes, shuffle=shuffle, seed=seed, rank=rank,
                         world_size=world_size, even=even, prefetch=prefetch, hints=hints)
        self.decode = decode

    def __len__(self) -> int:
        return len(self._listed.entries)

    def __iter__(self) -> Iterator[T]:
        source = self._listed.source

        def one(entry: Entry) -> T:
            return self.decode((entry.name, bytes(source.read(entry))))

        return self._read(one)


class TarDataset(_Iterable[T]):
    """Iterable over the samples of tar shards (WebDataset layout): each
    sample is ``{"__key__", "__url__", field: bytes ...}`` passed through
    ``decode``. Shards are split across ranks and workers and shuffled per
    epoch; ``shuffle_buffer`` > 0 also shuffles samples within a window of
    that many (seeded by seed, epoch, rank and worker). ``prefetch`` whole
    shards are read ahead when a shard is at most ``max_buffer`` bytes;
    larger shards are streamed."""

    def __init__(
        self,
        url: str | Source,
        prefix: str = "",
        *,
        decode: Callable[[Sample], T] = _default_decode,  # type: ignore[assignment]
        suffixes: Sequence[str] | None = (".tar",),
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        even: bool = False,
        prefetch: int = 2,
        max_buffer: int = 512 * 1024 * 1024,
        hints: bool | None = None,
    ) -> None:
        super().__init__(url, prefix, suffixes=suffixes, shuffle=shuffle, seed=seed, rank=rank,
                         world_size=world_size, even=even, prefetch=prefetch, hints=hints)
        self.decode = decode
        self.shuffle_buffer = shuffle_buffer
        self.max_buffer = max_buffer

    @property
    def shards(self) -> list[str]:
        return [e.name for e in self._listed.entries]

    def _samples(self, entry: Entry, data: bytes | bytearray | memoryview | None) -> Iterator[Sample]:
        url = f"{self._listed.source.url}/{entry.name}"
        if data is not None:
            yield from group_samples(iter_members(buffer_reader(data)), url)
            return
        with self._listed.source.open(entry) as f:
            yield from group_samples(iter_members(stream_reader(f)), url)

    def _raw(self) -> Iterator[Sample]:
        source = self._listed.source
        # Shard buffers are reused: a fresh 100 MiB bytearray costs more in
        # page faults than reading the shard from a warm node. At most
        # prefetch + 1 exist (read ahead, plus the one being parsed); the
        # samples handed out are copies, so a parsed shard's buffer is free.
        free: list[bytearray] = []
        lock = threading.Lock()

        def fetch(entry: Entry) -> tuple[Entry, bytearray | None, memoryview | None]:
            if entry.size > self.max_buffer:
                return entry, None, None
            with lock:
                fits = [b for b in free if len(b) >= entry.size]
                buf = min(fits, key=len) if fits else None
                if buf is not None:
                    free.remove(buf)
            if buf is None:
                buf = bytearray(entry.size)
            return entry, buf, source.read_into(entry, buf)

        for entry, buf, data in self._read(fetch):
            yield from self._samples(entry, data)
            if buf is not None:
                del data
                with lock:
                    free.append(buf)

    def __iter__(self) -> Iterator[T]:
        samples = self._raw()
        if self.shuffle_buffer > 0:
            rank, _ = (self.rank, 0) if self.rank is not None else distributed_rank()
            worker, _ = loader_worker()
            rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}")
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for sample in samples:
            yield self.decode(sample)


def _shuffled(items: Iterator[T], size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer: fill ``size`` items, then emit a random one for each new one."""
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf

"""Load safetensors checkpoints through nearstore, for inference cold starts.

The format (https://huggingface.co/docs/safetensors): an unsigned 64-bit
little-endian N, then N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
tensor bytes; offsets are relative to the start of the data, 8 + N.

A load reads each file's header with one small ranged GET (its first
256 KiB, which also gives the size and the ETag), validates it, then reads
the tensor bytes in parallel, one GET per 16 MiB cache chunk, straight into
one destination buffer per file (from the socket into the buffer, no copy
in between); the tensors are zero-copy views of that buffer:

- a file wanted whole (all its tensors: the usual cold start) is read by
  ``reader``: ``clients.ranged.read_into`` (asyncio, the least CPU per
  byte), or ``clients.direct.read_into`` in a cluster (each chunk from the
  node that caches it). It pins the version it finds; if that is not the
  one whose header was read, the load raises ``ObjectChanged``.
- a file wanted whole when the node runs on this machine (and no
  ``reader`` is given, nor ``pin_memory``) is not read but mapped from
  the node's chunk files (``clients.local.LocalNode.map``: copy-on-write
  pages of the page cache, as ``safetensors.torch.load_file`` maps a local
  file): the tensors are writable views of the mapping, which lives as
  long as they do.
- a subset (``names=``), ``load_into`` and a forced ``transport`` go range
  by range with ``clients.rangeget``, pinned with If-Match to the version
  whose header was read. Neighbouring tensors are read together; a gap of
  more than 1 MiB between wanted tensors is skipped.

Never less than a chunk per GET: a cache node verifies a chunk's checksum
for every request, so two GETs in one chunk cost it two verifications of
the whole chunk (4 MiB pieces took 1.7x the node's CPU of whole 16 MiB
chunks, for no gain in throughput).

``load_into`` reads into tensors that exist already (a model's parameters,
an adapter swapped in and out): no fresh memory to fault in, which on a
warm node is most of a load's CPU (measured in bench/models.py).

    from nearstore.clients.connect import connect
    from nearstore.clients import safetensors as nst
    s3 = connect()
    weights = nst.load(s3, "models", "llama/model.safetensors.index.json")  # numpy
    weights = nst.load_torch(s3, "models", "llama/")                       # torch
    nst.load_into(s3, "models", "lora/adapter_model.safetensors", adapter)  # in place

``key`` is one ``.safetensors`` file, a list of them, an index
(``*.safetensors.index.json``: its ``weight_map`` names the files, relative
to the index, and which tensors each holds), or a prefix ending in ``/``
(its index if it has exactly one, else every ``*.safetensors`` directly
under it).

numpy has no bfloat16 or float8: those load as raw ``uint16`` / ``uint8``
views of the same bytes (``bf16_to_float32`` widens bf16; ``load_torch``
gives the real dtypes). Sub-byte types (F4, F6) are refused.

A header is untrusted input: at most ``MAX_HEADER`` bytes, JSON that must
be an object of well-formed entries (other fields in an entry are ignored, as
the safetensors package does), known dtypes, shape x dtype == byte
count, offsets inside the file, no two tensors overlapping. Anything else
raises ``SafetensorsError`` naming the file and the fault.
"""

from __future__ import annotations

import bisect
import json
import math
import posixpath
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nearstore.clients import ranged
from nearstore.clients.checkpoint import require_torch
from nearstore.clients.local import LocalChanged, LocalNode, LocalUnavailable
from nearstore.clients.ranged import CHUNK, ObjectChanged
from nearstore.clients.rangeget import (
    ObjectVersion,
    RangeGetter,
    Transport,
    read_ranges,
    split_range,
)

MAX_HEADER = 100 * 1024 * 1024
FIRST_READ = 256 * 1024
GAP = 1024 * 1024  # wanted tensors this close are read as one range
STREAMS = 16

# dtype -> (bytes per element, numpy dtype of the loaded array, torch dtype name)
DTYPES: dict[str, tuple[int, str, str]] = {
    "BOOL": (1, "bool", "bool"),
    "U8": (1, "u1", "uint8"),
    "I8": (1, "i1", "int8"),
    "F8_E4M3": (1, "u1", "float8_e4m3fn"),
    "F8_E5M2": (1, "u1", "float8_e5m2"),
    "F8_E4M3FNUZ": (1, "u1", "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "u1", "float8_e5m2fnuz"),
    "F8_E8M0": (1, "u1", "float8_e8m0fnu"),
    "I16": (2, "<i2", "int16"),
    "U16": (2, "<u2", "uint16"),
    "F16": (2, "<f2", "float16"),
    "BF16": (2, "<u2", "bfloat16"),
    "I32": (4, "<i4", "int32"),
    "U32": (4, "<u4", "uint32"),
    "F32": (4, "<f4", "float32"),
    "C64": (8, "<c8", "complex64"),
    "I64": (8, "<i8", "int64"),
    "U64": (8, "<u8", "uint64"),
    "F64": (8, "<f8", "float64"),
}
RAW_IN_NUMPY = frozenset({"BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"})

Framework = Literal["np", "numpy", "pt", "torch"]
# clients.ranged.read_into's shape: (s3, bucket, key, out, *, streams, chunk) -> view
Reader = Callable[..., Any]


class SafetensorsError(ValueError):
    """A file is not a valid safetensors file (or the index is broken)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A file's parsed, validated header and the version it was read from."""

    obj: ObjectVersion
    data_start: int
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    first: bytes  # the file's first bytes, as read with the header

    @property
    def key(self) -> str:
        return self.obj.key

    @property
    def size(self) -> int:
        return self.obj.size


# --------------------------------------------------------------------- header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header(raw: bytes, file_size: int, *, name: str = "") -> tuple[
        dict[str, TensorInfo], dict[str, str]]:  # fmt: skip
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes;
    returns the tensors (absolute offsets, in file order) and the metadata."""
    where = f"{name}: " if name else ""

    def bad(why: str) -> SafetensorsError:
        return SafetensorsError(f"{where}invalid safetensors header: {why}")

    data_start = 8 + len(raw)
    if data_start > file_size:
        raise bad(f"header of {len(raw)} bytes in a file of {file_size}")
    if not raw.startswith(b"{"):
        raise bad("does not start with '{'")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except SafetensorsError as e:
        raise bad(str(e)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"not JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):  # fmt: skip
        raise bad("__metadata__ must map strings to strings")
    data_size = file_size - data_start
    tensors: list[TensorInfo] = []
    for tname, entry in doc.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise bad(f"tensor {tname!r}: an entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"tensor {tname!r}: unsupported dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise bad(f"tensor {tname!r}: shape must be a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_uint(o) for o in offsets)):  # fmt: skip
            raise bad(f"tensor {tname!r}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if begin > end or end > data_size:
            raise bad(f"tensor {tname!r}: data_offsets {begin}-{end} outside the "
                      f"{data_size} bytes of data")  # fmt: skip
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        if nbytes != end - begin:
            raise bad(f"tensor {tname!r}: {dtype} {shape} is {nbytes} bytes, "
                      f"data_offsets hold {end - begin}")  # fmt: skip
        tensors.append(TensorInfo(tname, dtype, tuple(shape), data_start + begin,
                                  data_start + end))  # fmt: skip
    tensors.sort(key=lambda t: (t.begin, t.end))
    prev: TensorInfo | None = None
    for t in tensors:
        if t.begin == t.end:
            continue
        if prev is not None and t.begin < prev.end:
            raise bad(f"tensors {prev.name!r} and {t.name!r} overlap")
        prev = t
    return {t.name: t for t in tensors}, meta


def _open(getter: RangeGetter, bucket: str, key: str) -> Header:
    obj, first = getter.open(bucket, key, FIRST_READ)
    if obj.size < 8 or len(first) < 8:
        raise SafetensorsError(f"{key}: {obj.size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER:
        raise SafetensorsError(f"{key}: header of {n} bytes is over the {MAX_HEADER} limit")
    if 8 + n > obj.size:
        raise SafetensorsError(f"{key}: header of {n} bytes in a file of {obj.size}")
    if 8 + n > len(first):  # a large header: one more read for the rest
        rest = bytearray(8 + n - len(first))
        getter.read_into(obj, len(first), memoryview(rest))
        first = first + bytes(rest)
    tensors, meta = parse_header(first[8 : 8 + n], obj.size, name=key)
    return Header(obj, 8 + n, tensors, meta, first)


def read_header(s3: Any, bucket: str, key: str, *, transport: Transport = "auto") -> Header:
    """A file's header (tensors, metadata, size, ETag), one small GET."""
    return _open(RangeGetter(s3, transport=transport), bucket, key)


# ------------------------------------------------------------- which files


def _list(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"):  # fmt: skip
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _read_small(getter: RangeGetter, bucket: str, key: str, limit: int = MAX_HEADER) -> bytes:
    obj, first = getter.open(bucket, key, FIRST_READ)
    if obj.size > limit:
        raise SafetensorsError(f"{key}: {obj.size} bytes is over the {limit} limit for an index")
    if obj.size > len(first):
        rest = bytearray(obj.size - len(first))
        getter.read_into(obj, len(first), memoryview(rest))
        first += bytes(rest)
    return first


def _index(getter: RangeGetter, bucket: str, key: str) -> dict[str, list[str]]:
    """An index's files (keys) and the tensors each is to give."""
    try:
        doc = json.loads(_read_small(getter, bucket, key))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"{key}: index is not JSON: {str(e)[:200]}") from None
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):  # fmt: skip
        raise SafetensorsError(f"{key}: index has no weight_map of tensor names to files")
    base = posixpath.dirname(key)
    files: dict[str, list[str]] = {}
    for tname, fname in wmap.items():
        if not fname or fname.startswith("/") or ".." in fname.split("/"):
            raise SafetensorsError(f"{key}: weight_map names the file {fname!r}")
        files.setdefault(posixpath.join(base, fname) if base else fname, []).append(tname)
    return files


def _plan(s3: Any, getter: RangeGetter, bucket: str,
          key: str | Sequence[str]) -> dict[str, list[str] | None]:  # fmt: skip
    """{file key: tensor names wanted (None: all)}."""
    if not isinstance(key, str):
        return dict.fromkeys(key)
    if key.endswith(".json"):
        return dict(_index(getter, bucket, key))
    if key.endswith("/") or key == "":
        keys = _list(s3, bucket, key)
        indexes = [k for k in keys if k.endswith(".safetensors.index.json")]
        if len(indexes) == 1:
            return dict(_index(getter, bucket, indexes[0]))
        files = sorted(k for k in keys if k.endswith(".safetensors"))
        if not files:
            raise SafetensorsError(f"no .safetensors file under s3://{bucket}/{key}")
        return dict.fromkeys(files)
    return {key: None}


# ------------------------------------------------------------------ loading


@dataclass
class _FilePlan:
    header: Header
    tensors: list[TensorInfo]
    spans: list[tuple[int, int, int]]  # (file start, file end, buffer offset)
    nbytes: int


def _spans(tensors: list[TensorInfo]) -> tuple[list[tuple[int, int, int]], int]:
    spans: list[list[int]] = []
    for t in sorted(tensors, key=lambda t: t.begin):
        if t.nbytes == 0:
            continue
        if spans and t.begin - spans[-1][1] <= GAP:
            spans[-1][1] = max(spans[-1][1], t.end)
        else:
            spans.append([t.begin, t.end])
    out, off = [], 0
    for a, b in spans:
        out.append((a, b, off))
        off += b - a
    return out, off


def _prepare(header: Header, names: list[str] | None) -> _FilePlan:
    if names is None:
        tensors = list(header.tensors.values())
    else:
        missing = [n for n in names if n not in header.tensors]
        if missing:
            raise SafetensorsError(f"{header.key}: no tensor {missing[0]!r} in this file "
                                   f"({len(missing)} missing)")  # fmt: skip
        tensors = [header.tensors[n] for n in names]
    spans, nbytes = _spans(tensors)
    return _FilePlan(header, tensors, spans, nbytes)


def _jobs(plan: _FilePlan, buf: memoryview,
          chunk: int) -> list[tuple[ObjectVersion, int, memoryview]]:  # fmt: skip
    """Ranged reads that fill ``buf``; bytes already read with the header
    are copied from it instead."""
    first = plan.header.first
    jobs = []
    for a, b, off in plan.spans:
        if a < len(first):
            cut = min(b, len(first))
            buf[off : off + cut - a] = first[a:cut]
            off += cut - a
            a = cut
        for s, e in split_range(a, b, chunk):
            jobs.append((plan.header.obj, s, buf[off + s - a : off + e - a]))
    return jobs


def _plans(s3: Any, bucket: str, key: str | Sequence[str], names: Iterable[str] | None,
           streams: int, transport: Transport) -> tuple[RangeGetter, list[_FilePlan]]:  # fmt: skip
    """Open every file of the checkpoint (headers in parallel) and plan the
    reads of the wanted tensors."""
    getter = RangeGetter(s3, transport=transport)
    files = _plan(s3, getter, bucket, key)
    wanted = None if names is None else set(names)
    if wanted is not None and any(v is not None for v in files.values()):
        # An index says which file holds what: only those files are opened.
        files = {k: [n for n in v or [] if n in wanted] for k, v in files.items()}
        files = {k: v for k, v in files.items() if v}
    keys = list(files)
    with ThreadPoolExecutor(max(1, min(streams, len(keys)))) as pool:
        headers = list(pool.map(lambda k: _open(getter, bucket, k), keys))
    if wanted is not None:
        files = {h.key: [n for n in (files[h.key] or h.tensors) if n in wanted]
                 for h in headers}  # fmt: skip
    plans = [_prepare(h, files[h.key]) for h in headers]
    seen: dict[str, str] = {}
    for p in plans:
        for t in p.tensors:
            if t.name in seen:
                raise SafetensorsError(f"tensor {t.name!r} is in both {seen[t.name]} "
                                       f"and {p.header.key}")  # fmt: skip
            seen[t.name] = p.header.key
    if wanted is not None:
        missing = sorted(wanted - set(seen))
        if missing:
            raise SafetensorsError(f"no tensor {missing[0]!r} in s3://{bucket}/{key} "
                                   f"({len(missing)} missing)")  # fmt: skip
    return getter, plans


def _read_all(s3: Any, bucket: str, key: str | Sequence[str], names: Iterable[str] | None,
              streams: int, chunk: int, transport: Transport, reader: Reader | None,
              alloc: Callable[[int], tuple[Any, memoryview]],
              adopt: Callable[[memoryview], Any] | None = None) -> list[tuple[_FilePlan, Any]]:
    """Read the wanted tensors of every file, each file into a buffer from
    ``alloc(nbytes) -> (owner, writable byte view)``; [(plan, owner)].

    A file whose wanted tensors are all of it but the header (and at most
    ``GAP`` bytes) is read whole by ``reader`` (``clients.ranged.read_into``
    by default) into a buffer of the file's size; the others, and every file
    when a ``transport`` is forced, range by range with ``clients.rangeget``.
    When the node is on this machine and no ``reader`` is given, a whole
    file is mapped from its chunk files instead (``clients.local.LocalNode.map``,
    copy-on-write: no copy) and ``adopt(view of the mapping)`` is its owner."""
    getter, plans = _plans(s3, bucket, key, names, streams, transport)
    wholes = [p for p in plans if transport == "auto" and p.header.data_start % 8 == 0
              and p.header.size - p.header.data_start - p.nbytes <= GAP]  # fmt: skip
    for p in wholes:
        p.spans, p.nbytes = [(0, p.header.size, 0)], p.header.size
    whole_ids = {id(p) for p in wholes}
    mapped: dict[int, memoryview | None] = {}
    node = getter.local
    if adopt is not None and reader is None and node is not None and wholes:
        # Mapped, the files at once: the node's work per chunk overlaps.
        with ThreadPoolExecutor(len(wholes)) as pool:
            views = list(pool.map(lambda p: _map_whole(node, bucket, p.header, streams), wholes))
        mapped = {id(p): v for p, v in zip(wholes, views, strict=True)}
    out, jobs, whole = [], [], []
    for p in plans:
        view = mapped.get(id(p))
        if adopt is not None and view is not None:
            owner = adopt(view)
        elif id(p) in whole_ids:
            owner, view = alloc(p.nbytes)
            whole.append((p, view))
        else:
            owner, view = alloc(p.nbytes)
            jobs += _jobs(p, view, chunk)
        out.append((p, owner))
    read_ranges(getter, jobs, streams=streams)
    for p, view in whole:
        _read_whole(s3, bucket, p.header, view, streams, chunk, reader or ranged.read_into)
    return out


MAP_PIECE = 256 * 1024 * 1024  # bytes per request on the node's socket when mapping


def _map_whole(node: LocalNode, bucket: str, h: Header, streams: int) -> memoryview | None:
    """The whole file mapped from the node's chunk files (None: read it
    instead). Like ``reader``, it pins the version it finds, which must
    have the header the load was planned from."""
    try:
        # Pieces of several chunks: fewer requests (measured, a warm GiB
        # mapped and touched: 31 ms with 16 MiB pieces, 21 ms with 64 MiB,
        # 18 ms with 256 MiB; the streams hardly matter).
        m = node.map(bucket, h.key, streams=min(streams, 4), chunk=MAP_PIECE)
    except LocalChanged as e:
        raise ObjectChanged(f"{h.key}: changed while being loaded") from e
    except LocalUnavailable:
        return None
    if m.size != h.size or bytes(m.view[: h.data_start]) != h.first[: h.data_start]:
        m.close()
        raise ObjectChanged(f"{h.key}: changed while being loaded")
    return m.view


def _read_whole(s3: Any, bucket: str, h: Header, view: memoryview, streams: int, chunk: int,
                reader: Reader) -> None:  # fmt: skip
    """The whole file into ``view``. The reader pins the version it finds
    (If-Match) and reads it whole; the header it read must be the one the
    load was planned from, else the file changed in between."""
    try:
        got = reader(s3, bucket, h.key, view, streams=streams, chunk=chunk)
    except ValueError as e:  # the buffer is too small: a larger version now
        raise ObjectChanged(f"{h.key}: changed while being loaded ({e})") from e
    if len(got) != h.size or bytes(view[: h.data_start]) != h.first[: h.data_start]:
        raise ObjectChanged(f"{h.key}: changed while being loaded")


def _scatter_jobs(plan: _FilePlan, dests: dict[str, memoryview], chunk: int,
                  discard: memoryview) -> list[tuple[ObjectVersion, int, list[memoryview]]]:
    """Ranged reads (one per cache chunk) that fill each tensor's own
    destination; the bytes of gaps inside a range go to ``discard``, those
    already read with the header are copied from it."""
    first = plan.header.first
    tensors = sorted((t for t in plan.tensors if t.nbytes), key=lambda t: t.begin)
    jobs: list[tuple[ObjectVersion, int, list[memoryview]]] = []
    i = 0
    for a, b, _ in plan.spans:
        segs: list[tuple[int, memoryview]] = []
        pos = a
        while i < len(tensors) and tensors[i].end <= b:
            t = tensors[i]
            if t.begin > pos:
                segs.append((pos, discard[: t.begin - pos]))
            segs.append((t.begin, dests[t.name]))
            pos, i = t.end, i + 1
        cuts = sorted({x for x in (len(first), *range((a // chunk + 1) * chunk, b, chunk))
                       if a < x < b} | {b})  # fmt: skip
        groups: list[list[memoryview]] = [[] for _ in cuts]
        g = 0
        for s0, view in segs:
            off = 0
            while off < len(view):
                while s0 + off >= cuts[g]:
                    g += 1
                take = min(len(view) - off, cuts[g] - (s0 + off))
                groups[g].append(view[off : off + take])
                off += take
        for start, end, views in zip([a, *cuts[:-1]], cuts, groups, strict=True):
            if end <= len(first):
                p = start
                for v in views:
                    v[:] = first[p : p + len(v)]
                    p += len(v)
            else:
                jobs.append((plan.header.obj, start, views))
    return jobs


def _dest_view(t: TensorInfo, x: Any) -> memoryview:
    """The bytes of a caller's tensor or array that ``t`` is to be read
    into, after checking that it can hold it exactly."""
    _, np_dtype, torch_dtype = DTYPES[t.dtype]
    if isinstance(x, np.ndarray):
        if x.dtype != np.dtype(np_dtype) or x.shape != t.shape:
            raise ValueError(f"{t.name}: the file has {t.dtype} {list(t.shape)}, the array is "
                             f"{x.dtype} {list(x.shape)}")  # fmt: skip
        if not (x.flags.c_contiguous and x.flags.writeable):
            raise ValueError(f"{t.name}: the array must be C-contiguous and writable")
        return memoryview(x.reshape(-1).view(np.uint8).data)
    torch = require_torch("load_into with torch tensors")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{t.name}: a numpy array or a torch tensor, not {type(x).__name__}")
    if x.dtype != getattr(torch, torch_dtype, None) or tuple(x.shape) != t.shape:
        raise ValueError(f"{t.name}: the file has {t.dtype} {list(t.shape)}, the tensor is "
                         f"{x.dtype} {list(x.shape)}")  # fmt: skip
    if x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"{t.name}: the tensor must be contiguous, in CPU memory")
    flat = x.detach().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().data) if t.nbytes else memoryview(b"")


def _offsets(plan: _FilePlan) -> dict[str, int]:
    """Each wanted tensor's offset in its file's buffer."""
    starts = [a for a, _, _ in plan.spans]
    res: dict[str, int] = {}
    for t in plan.tensors:
        if t.nbytes == 0:
            res[t.name] = 0
            continue
        i = bisect.bisect_right(starts, t.begin) - 1
        a, _, off = plan.spans[i]
        res[t.name] = off + t.begin - a
    return res


def _empty(n: int) -> np.ndarray:
    """A destination buffer. numpy's, not torch's: numpy asks for huge pages
    (madvise) on large allocations, and the first write to fresh memory
    faults 4x faster so (measured: 0.1 s against 0.4 s per GiB here, a
    third of a warm load's client CPU)."""
    return np.empty(n, dtype=np.uint8)


def load(
    s3: Any,
    bucket: str,
    key: str | Sequence[str],
    *,
    framework: Framework = "np",
    names: Iterable[str] | None = None,
    streams: int = STREAMS,
    chunk: int = CHUNK,
    transport: Transport = "auto",
    reader: Reader | None = None,
) -> dict[str, Any]:
    """Every tensor of a checkpoint (or those in ``names``) as numpy arrays
    (``framework="pt"``: torch tensors, see ``load_torch``)."""
    if framework in ("pt", "torch"):
        return load_torch(s3, bucket, key, names=names, streams=streams, chunk=chunk,
                          transport=transport, reader=reader)  # fmt: skip
    if framework not in ("np", "numpy"):
        raise ValueError(f"framework must be 'np' or 'pt', not {framework!r}")
    def alloc(n: int) -> tuple[Any, memoryview]:
        buf = _empty(n)
        return buf, memoryview(buf.data)

    def adopt(view: memoryview) -> Any:
        return np.frombuffer(view, dtype=np.uint8)

    loaded = _read_all(s3, bucket, key, names, streams, chunk, transport, reader, alloc, adopt)
    result: dict[str, Any] = {}
    for plan, buf in loaded:
        offs = _offsets(plan)
        for t in plan.tensors:
            dt = np.dtype(DTYPES[t.dtype][1])
            o = offs[t.name]
            result[t.name] = buf[o : o + t.nbytes].view(dt).reshape(t.shape)
    return result


def load_torch(
    s3: Any,
    bucket: str,
    key: str | Sequence[str],
    *,
    names: Iterable[str] | None = None,
    streams: int = STREAMS,
    chunk: int = CHUNK,
    transport: Transport = "auto",
    reader: Reader | None = None,
    pin_memory: bool = False,
    device: Any = None,
) -> dict[str, Any]:
    """Every tensor of a checkpoint as torch tensors: zero-copy views of
    one uint8 buffer per file (``pin_memory``: page-locked, for fast copies
    to a GPU); ``device``: then moved there, file by file."""
    torch = require_torch("load_torch")
    dtypes = {}
    for name, (_, _, tname) in DTYPES.items():
        dtypes[name] = getattr(torch, tname, None)

    def alloc(n: int) -> tuple[Any, memoryview]:
        if pin_memory:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            return buf, memoryview(buf.numpy())
        arr = _empty(n)
        return torch.from_numpy(arr), memoryview(arr.data)

    def adopt(view: memoryview) -> Any:
        return torch.from_numpy(np.frombuffer(view, dtype=np.uint8))

    loaded = _read_all(s3, bucket, key, names, streams, chunk, transport, reader, alloc,
                       None if pin_memory else adopt)  # fmt: skip
    result: dict[str, Any] = {}
    for plan, base in loaded:
        offs = _offsets(plan)
        for t in plan.tensors:
            dt = dtypes[t.dtype]
            if dt is None:
                raise SafetensorsError(f"{plan.header.key}: tensor {t.name!r}: this torch "
                                       f"has no {t.dtype}")  # fmt: skip
            o = offs[t.name]
            if t.nbytes == 0:
                ten = torch.empty(t.shape, dtype=dt)
            else:
                raw = base[o : o + t.nbytes]
                if o % DTYPES[t.dtype][0]:
                    raw = raw.clone()  # misaligned for its dtype: a copy of its own
                ten = raw.view(dt).reshape(t.shape)
            if device is not None:
                ten = ten.to(device, non_blocking=pin_memory)
            result[t.name] = ten
    return result


def load_into(
    s3: Any,
    bucket: str,
    key: str | Sequence[str],
    out: Mapping[str, Any],
    *,
    streams: int = STREAMS,
    chunk: int = CHUNK,
    transport: Transport = "auto",
) -> Mapping[str, Any]:
    """Read the tensors named in ``out`` straight into them, in place: torch
    tensors or numpy arrays, contiguous, in CPU memory, of the file's dtype
    (numpy: BF16 as uint16, float8 as uint8) and shape. Nothing is
    allocated: swapping adapters in and out of the same tensors, or loading
    a model whose parameters exist already (``model.to_empty(device="cpu")``,
    then ``load_into(..., model.state_dict())``), reads at the speed of
    reused memory, without the page faults of fresh buffers. Every name in
    ``out`` must be in the checkpoint. Returns ``out``."""
    getter, plans = _plans(s3, bucket, key, list(out), streams, transport)
    discard = memoryview(bytearray(GAP))
    jobs: list[tuple[ObjectVersion, int, list[memoryview]]] = []
    for p in plans:
        dests = {t.name: _dest_view(t, out[t.name]) for t in p.tensors}
        jobs += _scatter_jobs(p, dests, chunk, discard)
    read_ranges(getter, jobs, streams=streams)
    return out


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """A BF16 tensor loaded with numpy (raw uint16) as float32 (a copy)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)

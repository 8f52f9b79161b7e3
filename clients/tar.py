"""Streaming tar parsing for dataset shards (the WebDataset layout).

A WebDataset shard is a plain tar file whose members are grouped into
samples by name: ``train/0001.jpg`` and ``train/0001.cls`` are the fields
``jpg`` and ``cls`` of the sample whose key is ``train/0001`` (the key is
the path up to the first dot of the file name; the rest is the field).
Members of one sample are consecutive in the archive.

Why not ``tarfile``: its stream mode copies every member through its own
buffers and builds a TarInfo object per member, which costs more than the
read at 100 KiB per sample. Here the parser walks 512-byte headers over any
``read(n)`` source: over a shard held in memory it hands out zero-copy
slices; over a network stream it reads each member once. It understands
ustar (name + prefix), POSIX pax headers (``path``, ``size``) and GNU long
names, verifies each header's checksum, and raises ``TarError`` for a
truncated or corrupt archive instead of yielding garbage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import IO

BLOCK = 512
ReadFn = Callable[[int], "bytes | memoryview"]


class TarError(ValueError):
    """The archive is corrupt or truncated."""


def _octal(field: bytes | memoryview) -> int:
    raw = bytes(field)
    if raw and raw[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        n = raw[0] & 0x7F
        for b in raw[1:]:
            n = (n << 8) | b
        return n
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"bad number field {raw!r}") from None


def _cstr(field: bytes | memoryview) -> str:
    return bytes(field).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes | memoryview) -> bool:
    stored = _octal(header[148:156])
    raw = bytes(header)
    unsigned = sum(raw) - sum(raw[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = unsigned - 2 * sum(b for b in raw if b > 127)  # old tars summed signed bytes
    return stored == signed


def _pax(data: bytes | memoryview) -> dict[str, str]:
    """Records "<len> <key>=<value>\\n" (the length counts the whole record)."""
    out: dict[str, str] = {}
    raw = bytes(data)
    pos = 0
    while pos < len(raw):
        space = raw.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(raw[pos:space])
        except ValueError:
            raise TarError("bad pax record") from None
        if length <= 0 or pos + length > len(raw):
            raise TarError("bad pax record length")
        key, _, value = raw[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def iter_members(read: ReadFn) -> Iterator[tuple[str, bytes | memoryview]]:
    """(name, data) of each regular file, in archive order. ``read(n)``
    returns the next n bytes (fewer only at the end of the source).
    Directories, links and devices are skipped."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = read(BLOCK)
        if len(header) == 0:
            return  # end of source without the end-of-archive blocks: accepted
        if len(header) < BLOCK:
            raise TarError("truncated header")
        if not any(bytes(header)):
            return  # end-of-archive marker
        if not _checksum_ok(header):
            raise TarError("header checksum mismatch")
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
        kind = bytes(header[156:157])
        body = read(_padded(size))
        if len(body) < size:
            raise TarError("truncated member")
        data = body[:size]
        if kind in (b"x", b"g", b"L", b"K"):
            if kind == b"x":
                pax = _pax(data)
            elif kind == b"L":
                long_name = _cstr(data)
            continue  # global pax headers and long link names change nothing here
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        else:
            name = _cstr(header[0:100])
            if bytes(header[257:262]) == b"ustar":
                prefix = _cstr(header[345:500])
                if prefix:
                    name = f"{prefix}/{name}"
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def buffer_reader(buf: bytes | bytearray | memoryview) -> ReadFn:
    """``read(n)`` over an in-memory archive: zero-copy slices."""
    view = memoryview(buf).cast("B")
    pos = 0

    def read(n: int) -> memoryview:
        nonlocal pos
        out = view[pos : pos + n]
        pos += len(out)
        return out

    return read


def stream_reader(f: IO[bytes]) -> ReadFn:
    """``read(n)`` over a file-like object (a response body, a file)."""

    def read(n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            piece = f.read(n - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    return read


def split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's (key, field): the key is the path up to the first dot
    of the file name. None for names without a field (no dot)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:  # no dot, or a hidden file such as ".keep"
        return None
    return name[:dot], name[dot + 1 :]


Sample = dict[str, object]


def group_samples(members: Iterable[tuple[str, bytes | memoryview]], url: str) -> Iterator[Sample]:
    """Consecutive members with one key become one sample dict:
    ``{"__key__": key, "__url__": url, field: bytes, ...}``."""
    current: Sample | None = None
    for name, data in members:
        parts = split_name(name)
        if parts is None:
            continue
        key, field = parts
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        elif field in current:
            raise TarError(f"{url}: {name} appears twice in one sample")
        current[field] = bytes(data)
    if current is not None:
        yield current

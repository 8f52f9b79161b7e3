"""The bytes every peer serves: files written once per run.

Files live at ``DATA/<bucket>/<key>``, so the directory is nginx's root as is
and a plain URL ``/<bucket>/<key>`` names the same bytes as the S3 peers'
path-style URL. Content is pseudo-random (incompressible) and deterministic:
a 4 MiB random block repeated, each MiB stamped with its offset so that no
two MiB of an object are equal.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from nearstore.bench.scenarios import ObjectSpec

_BLOCK = 4 << 20
_STAMP_EVERY = 1 << 20


def _block(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(min(_BLOCK, size))


def write_object(path: Path, size: int, seed: int = 1) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    block = bytearray(_block(seed, size))
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        off = 0
        while off < size:
            n = min(len(block), size - off)
            for stamp in range(0, n, _STAMP_EVERY):
                block[stamp : stamp + 8] = struct.pack(">Q", off + stamp)
            f.write(memoryview(block)[:n])
            off += n
    tmp.rename(path)


def build(data_dir: Path, bucket: str, objects: list[ObjectSpec]) -> dict[str, Path]:
    """Write every object under data_dir/bucket; key -> file path."""
    out: dict[str, Path] = {}
    for i, obj in enumerate(objects):
        path = data_dir / bucket / obj.key
        write_object(path, obj.size, seed=i + 1)
        out[obj.key] = path
    return out

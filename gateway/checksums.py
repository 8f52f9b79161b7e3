"""The checksum algorithms S3 supports, as incremental hashers.

S3 lets a client send one extra checksum with an upload, as an
``x-amz-checksum-<alg>`` header or an aws-chunked trailer, and stores it
with the object (AWS "Checking object integrity in Amazon S3"). Values on the
wire are always the base64 of the big-endian digest: 4 bytes for CRC32 and
CRC32C, 8 for CRC64NVME, 20 for SHA1, 32 for SHA256.

Invariants:

- ``ALGORITHMS`` holds the names exactly as S3 writes them (upper case); every
  function here takes a name in any case and answers with that spelling.
- ``new_checksum(alg).update(...)`` over a body, in any split, gives the same
  ``digest()`` as one call over the whole body; ``digest()`` does not end
  the hasher.
- Parsing a client value (``decode_value``) raises the S3 error S3 gives
  (``InvalidRequest``) and never returns a digest of the wrong length.

Implementations: CRC32 via ``zlib`` (6.6 GB/s here, twice awscrt's CRC32),
CRC32C and CRC64NVME via ``awscrt.checksums`` (the AWS C library the SDKs
use, hardware accelerated: ~60 GB/s; a table CRC in Python would be some
10 MB/s), SHA via ``hashlib``. zlib and hashlib release the GIL on large
buffers, awscrt does not, which at 60 GB/s costs nothing.

Multipart uploads: a COMPOSITE checksum is the checksum of the concatenated
binary part checksums, written ``base64-N`` with N the part count; CRC
algorithms also have FULL_OBJECT checksums, which ``combine_crc`` computes
from the part CRCs and lengths without reading the data again (AWS
"Checking object integrity": "Using part-level checksums for multipart
uploads").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from awscrt import checksums as crt

from nearstore.gateway.errors import BadDigest, InvalidRequest

ALGORITHMS: Final = ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")

DIGEST_SIZES: Final[dict[str, int]] = {
    "CRC32": 4,
    "CRC32C": 4,
    "CRC64NVME": 8,
    "SHA1": 20,
    "SHA256": 32,
}

CRC_ALGORITHMS: Final = ("CRC32", "CRC32C", "CRC64NVME")

# Headers that start like a checksum value but carry something else: the
# multipart checksum type, CreateMultipartUpload's algorithm, GetObject's mode.
NOT_VALUE_HEADERS: Final = frozenset(
    {"x-amz-checksum-type", "x-amz-checksum-algorithm", "x-amz-checksum-mode"}
)
HEADER_PREFIX: Final = "x-amz-checksum-"


class Checksum(Protocol):
    algorithm: str

    def update(self, data: bytes | memoryview) -> None: ...

    def digest(self) -> bytes: ...

    def b64(self) -> str: ...


class _Crc:
    """A running CRC: an int state and the library function that extends it."""

    __slots__ = ("_fn", "_size", "_value", "algorithm")

    def __init__(self, algorithm: str, fn: Callable[[bytes | memoryview, int], int]) -> None:
        self.algorithm = algorithm
        self._fn = fn
        self._size = DIGEST_SIZES[algorithm]
        self._value = 0

    def update(self, data: bytes | memoryview) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._size, "big")

    def b64(self) -> str:
        return base64.b64encode(self.digest()).decode("ascii")


class _Hash:
    __slots__ = ("_h", "algorithm")

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._h = hashlib.new(algorithm.lower())

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()

    def b64(self) -> str:
        return base64.b64encode(self._h.digest()).decode("ascii")


def _zlib_crc32(data: bytes | memoryview, value: int) -> int:
    return zlib.crc32(data, value)


# awscrt's functions are annotated ``bytes`` but read any buffer (the C side
# takes the buffer protocol), so memoryviews of received blocks pass uncopied.
def _crt_crc32c(data: bytes | memoryview, value: int) -> int:
    return crt.crc32c(data, value)


def _crt_crc64nvme(data: bytes | memoryview, value: int) -> int:
    return crt.crc64nvme(data, value)


_CRC_FUNCTIONS: Final[dict[str, Callable[[bytes | memoryview, int], int]]] = {
    "CRC32": _zlib_crc32,
    "CRC32C": _crt_crc32c,
    "CRC64NVME": _crt_crc64nvme,
}

_COMBINE: Final[dict[str, Callable[[int, int, int], int]]] = {
    "CRC32": crt.combine_crc32,
    "CRC32C": crt.combine_crc32c,
    "CRC64NVME": crt.combine_crc64nvme,
}


def normalize(algorithm: str) -> str | None:
    """The S3 spelling of an algorithm name in any case, or None if S3 has no such one."""
    upper = algorithm.strip().upper()
    return upper if upper in DIGEST_SIZES else None


def new_checksum(algorithm: str) -> Checksum:
    """A fresh hasher; ``ValueError`` for a name not in ``ALGORITHMS``."""
    name = normalize(algorithm)
    if name is None:
        raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
    fn = _CRC_FUNCTIONS.get(name)
    return _Crc(name, fn) if fn is not None else _Hash(name)


def header_name(algorithm: str) -> str:
    """``x-amz-checksum-crc32`` for ``CRC32``: the header and trailer name."""
    return HEADER_PREFIX + algorithm.lower()


def algorithm_of_header(name: str) -> str | None:
    """``CRC32`` for ``x-amz-checksum-crc32`` (any case); None for other names."""
    lower = name.lower()
    if not lower.startswith(HEADER_PREFIX) or lower in NOT_VALUE_HEADERS:
        return None
    return normalize(lower[len(HEADER_PREFIX) :])


def decode_value(algorithm: str, value: str) -> bytes:
    """The digest a client sent, checked: base64 of exactly the digest size.

    S3 answers a malformed value, the empty one included, with
    ``InvalidRequest: Value for x-amz-checksum-crc32 header is invalid.``
    whether it came as a header or a trailer.
    """
    name = normalize(algorithm)
    if name is None:
        raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
    try:
        raw = base64.b64decode(value.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != DIGEST_SIZES[name]:
        raise InvalidRequest(f"Value for {header_name(name)} header is invalid.")
    return raw


def mismatch(algorithm: str) -> BadDigest:
    """The error S3 gives when a supplied checksum does not match the body."""
    return BadDigest(
        f"The {algorithm.upper()} you specified did not match the calculated checksum."
    )


def composite(algorithm: str, part_digests: Iterable[bytes]) -> str:
    """S3's COMPOSITE multipart checksum: ``base64(H(d1 || d2 || ...))-N``."""
    h = new_checksum(algorithm)
    count = 0
    for digest in part_digests:
        h.update(digest)
        count += 1
    return f"{h.b64()}-{count}"


def combine_crc(algorithm: str, parts: Iterable[tuple[bytes, int]]) -> bytes:
    """The FULL_OBJECT CRC of concatenated parts, from each part's (CRC digest, length).

    The CRC of an empty body is 0, so no parts gives the empty body's CRC.
    """
    name = normalize(algorithm)
    if name not in _COMBINE:
        raise ValueError(f"{algorithm!r} is not a CRC algorithm")
    combine = _COMBINE[name]
    value = 0
    for digest, length in parts:
        value = combine(value, int.from_bytes(digest, "big"), length)
    return value.to_bytes(DIGEST_SIZES[name], "big")

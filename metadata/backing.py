"""The backing-store interface: what the gateway's handlers and the
cache's fill path need from a place that holds objects.

Implementations live in ``gateway.backends``: ``local.LocalStore`` (the
embedded default, a directory plus SQLite), the S3 upstream, and the router
that picks one per bucket; the cache's read path (``cache.readpath``) wraps
one. The interface is deliberately narrow and speaks S3 semantics, not
storage mechanics.

Failures: a store refuses a request with a ``StoreError`` (the gateway's S3
errors are StoreErrors, so an upstream's error reaches the client
unchanged); one whose If-Match no longer holds raises a ``ConditionFailed``;
an unsatisfiable byte range is a ``RangeNotSatisfiable``. A StoreError is
the client's answer, never a cache fault: the cache passes it on rather
than retrying elsewhere. Everything here is below the gateway and the
cache: it imports neither.

Invariants every backend keeps:

- A write is visible only once complete: ``put_object`` consumes the whole
  body (whose iterator raises if any integrity check fails) before the object
  replaces the previous version. A failed or interrupted write leaves the old
  version, or nothing, visible.
- A reader sees one version whole: an ``ObjectHandle`` pins the version it
  was opened on, whatever is written afterwards.
- Keys are opaque strings; no backend derives a filesystem path from one.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    """A store's refusal of the request (no such key, a condition, a bad
    range ...): the client's answer, to be passed on."""


class ConditionFailed(StoreError):
    """A read's precondition (If-Match ...) does not hold: the object is
    not the version the reader asked for."""


class RangeNotSatisfiable(StoreError):
    """A byte range that starts past the end of the object (or an empty
    suffix): HTTP 416."""

    def __init__(self, size: int, requested: str | None = None) -> None:
        self.size, self.requested = size, requested
        super().__init__(f"range {requested or ''} not satisfiable for {size} bytes")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A ``Range`` header (``ReadOptions.range_header``) against an object
    of ``size`` bytes: (first, last) inclusive, or None for "the whole
    object" (no header, or one S3 ignores: not bytes=, several ranges,
    malformed). Raises RangeNotSatisfiable where S3 answers 416."""
    if header is None:
        return None
    value = header.strip()
    if not value.lower().startswith("bytes="):
        return None
    spec = value[6:].strip()
    if "," in spec:
        return None
    first_s, dash, last_s = spec.partition("-")
    first_s, last_s = first_s.strip(), last_s.strip()
    if not dash or not (first_s or last_s):
        return None
    try:
        if not first_s:
            n = int(last_s)
            if n < 0:
                return None
            if n == 0 or size == 0:
                raise RangeNotSatisfiable(size, header)
            return max(0, size - n), size - 1
        first = int(first_s)
        last = int(last_s) if last_s else None
    except ValueError:
        return None
    if first < 0 or (last is not None and last < first):
        return None
    if first >= size:
        raise RangeNotSatisfiable(size, header)
    return first, size - 1 if last is None else min(last, size - 1)


@dataclass(frozen=True)
class BucketInfo:
    name: str
    created: float  # epoch seconds
    region: str = ""
    owner: str = ""  # the owner's canonical user id; "" the node's first user


@dataclass(frozen=True)
class BucketAccess:
    """What access to a bucket is decided from (``gateway.access``): its
    owner and its access documents, each as stored (None: none set)."""

    owner: str = ""  # canonical user id; "" the node's first user
    acl: str | None = None  # JSON, as gateway.acl records it; None: private
    policy: str | None = None  # the bucket policy, JSON as the client sent it
    public_access_block: str | None = None  # JSON of the four flags


ACCESS_DOCUMENTS = ("acl", "policy", "public_access_block")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # quoted, as S3 returns it: '"9b2cf535f27731c974343645a3985328"'
    last_modified: float  # epoch seconds
    content_type: str = "binary/octet-stream"
    # Standard headers stored verbatim (Content-Encoding, Cache-Control, ...),
    # lower-case names.
    headers: Mapping[str, str] = field(default_factory=dict)
    # x-amz-meta-* without the prefix, lower-case names.
    user_meta: Mapping[str, str] = field(default_factory=dict)
    # (algorithm, base64 value, "FULL_OBJECT" | "COMPOSITE") or None.
    checksum: tuple[str, str, str] | None = None
    # Sizes of the parts of a multipart object, in order; () for a simple PUT.
    parts: tuple[int, ...] = ()
    # Per-part checksums of a multipart object (same order as parts).
    part_checksums: tuple[str, ...] = ()
    tag_count: int = 0
    storage_class: str = "STANDARD"
    # The object's ACL as ``gateway.acl`` records it (JSON: owner and grants);
    # None: owned by the bucket's owner, private (the common case, decided
    # without reading it).
    acl: str | None = None
    # The version's id where the bucket has (ever had) versioning, "null"
    # for the null version; None for a bucket that never had it.
    version_id: str | None = None
    delete_marker: bool = False  # a listing's delete marker (ListObjectVersions)


@dataclass(frozen=True)
class ObjectMeta:
    """What a client sets on an object at write time."""

    content_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    user_meta: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    checksum_algorithm: str | None = None  # multipart: declared at create
    acl: str | None = None  # see ObjectInfo.acl


@dataclass(frozen=True)
class WriteConditions:
    """Conditional writes (``If-Match`` / ``If-None-Match: *`` on PUT and
    CompleteMultipartUpload); for the latter also the whole object's
    checksum the client expects, ``(algorithm, base64 value)``."""

    if_match: str | None = None
    if_none_match: str | None = None
    checksum: tuple[str, str] | None = None
    checksum_type: str | None = None  # Complete's x-amz-checksum-type: must be the upload's


class UploadBody(Protocol):
    """A streaming, verified request body (see ``gateway.payload.Payload``).

    Iterating ``chunks()`` to the end means every integrity check passed; it
    raises an S3 error otherwise, and the backend must then discard what it
    wrote.
    """

    def chunks(self) -> AsyncIterator[bytes | memoryview]: ...

    @property
    def declared_size(self) -> int | None:
        """The length the client announced before sending (Content-Length,
        or the decoded length of an aws-chunked body); None where it is
        known only at the end (a browser POST form's file)."""
        ...

    @property
    def size(self) -> int: ...

    @property
    def md5_hex(self) -> str: ...

    @property
    def checksum(self) -> tuple[str, str] | None: ...


@dataclass(frozen=True)
class ReadOptions:
    """What the client asked of a read, for backends that delegate the
    decision to a store that can make it (the S3 upstream forwards these and
    reports what it served); the local store lets the handler decide."""

    range_header: str | None = None
    part_number: int | None = None
    # If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since.
    conditions: Mapping[str, str] = field(default_factory=dict)
    checksum_mode: bool = False
    version_id: str | None = None  # a version other than the current one


@dataclass(frozen=True)
class Served:
    """What a delegating backend served: status and the inclusive byte
    range of the body (end < start for an empty body), plus headers to pass
    on (x-amz-mp-parts-count ...)."""

    status: int
    start: int
    end: int
    headers: Mapping[str, str] = field(default_factory=dict)


class ObjectHandle(Protocol):
    """An open object version; readable until closed, whatever happens after."""

    info: ObjectInfo
    # None: the handler evaluates range and conditions itself from ``info``.
    served: Served | None

    def read_range(self, start: int, length: int) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class FileSegment:
    """A byte range of an open file: what a zero-copy send needs."""

    fd: int
    offset: int
    length: int


READ_PIECE = 1024 * 1024


async def read_segments(segments: AsyncIterator[FileSegment | bytes]) -> AsyncIterator[bytes]:
    """The bytes of a ``FileBacked.segments`` iteration: each file range
    read with ``pread`` in 1 MiB pieces off the event loop, before the next
    segment is asked for (a segment's descriptor is valid only until then).
    A file shorter than its range raises, never pads: the caller aborts the
    response."""
    loop = asyncio.get_running_loop()
    async for seg in segments:
        if isinstance(seg, bytes):
            yield seg
            continue
        pos, end = seg.offset, seg.offset + seg.length
        while pos < end:
            data = await loop.run_in_executor(None, os.pread, seg.fd, min(READ_PIECE, end - pos), pos)
            if not data:
                raise OSError(errno.EIO, "file shorter than its recorded size")
            pos += len(data)
            yield data


@runtime_checkable
class FileBacked(Protocol):
    """A handle whose bytes lie in local files: sent with sendfile.

    ``segments`` yields, in order, the file ranges that make up the
    requested byte range (or, where no file holds them, the bytes
    themselves); each descriptor stays valid until the next segment is
    requested (or the iteration ends)."""

    def segments(self, start: int, length: int) -> AsyncIterator[FileSegment | bytes]: ...


@dataclass(frozen=True)
class ListPage:
    objects: Sequence[ObjectInfo]
    common_prefixes: Sequence[str]
    is_truncated: bool
    # The last key or common prefix returned; the next page starts after it.
    next_marker: str | None


@dataclass(frozen=True)
class UploadInfo:
    upload_id: str
    key: str
    initiated: float
    meta: ObjectMeta = field(default_factory=ObjectMeta)


@dataclass(frozen=True)
class PartInfo:
    part_number: int
    size: int
    etag: str
    last_modified: float
    checksum: str | None = None  # base64 value, of the upload's algorithm


@dataclass(frozen=True)
class Deleted:
    """What a DeleteObject did: the version it removed or the delete marker
    it made (``delete_marker``), by id; None for a bucket without versioning."""

    version_id: str | None = None
    delete_marker: bool = False


@dataclass(frozen=True)
class VersionEntry:
    info: ObjectInfo  # key, version_id, size, etag ...; delete_marker for a marker
    is_latest: bool


@dataclass(frozen=True)
class VersionPage:
    entries: Sequence[VersionEntry]
    common_prefixes: Sequence[str]
    is_truncated: bool
    next_key_marker: str | None = None
    next_version_id_marker: str | None = None


VERSIONING_STATES = ("Enabled", "Suspended")


@dataclass(frozen=True)
class CompletedPart:
    part_number: int
    etag: str
    checksum: str | None = None
    checksum_algorithm: str | None = None


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    # Buckets
    async def list_buckets(self) -> list[BucketInfo]: ...

    async def create_bucket(self, bucket: str, region: str = "", owner: str = "") -> None: ...

    async def head_bucket(self, bucket: str) -> BucketInfo: ...

    async def get_bucket_tags(self, bucket: str) -> dict[str, str]:
        """The bucket's tag set; NoSuchTagSet where it has none."""
        ...

    async def put_bucket_tags(self, bucket: str, tags: Mapping[str, str]) -> None:
        """Replace the bucket's tag set; an empty one removes it."""
        ...

    async def get_bucket_cors(self, bucket: str) -> bytes:
        """The bucket's CORSConfiguration document; NoSuchCORSConfiguration
        where it has none."""
        ...

    async def put_bucket_cors(self, bucket: str, document: bytes | None) -> None:
        """Store the bucket's CORSConfiguration document (None removes it)."""
        ...

    def bucket_owner(self, bucket: str) -> str:
        """The canonical id of the user who owns ``bucket`` ("" for the
        node's first user), without waiting: access is decided from it
        before every request, so a store answers from memory or a local
        index read. A store that keeps no owners answers ""; one that knows
        the bucket does not exist raises NoSuchBucket."""
        ...

    def bucket_access(self, bucket: str) -> BucketAccess:
        """``bucket_owner`` and the bucket's access documents, under the
        same rule: from memory or a local index read, never a wait."""
        ...

    async def put_bucket_access(self, bucket: str, name: str, document: str | None) -> None:
        """Store one of the bucket's ACCESS_DOCUMENTS (None removes it)."""
        ...

    async def put_object_acl(self, bucket: str, key: str, acl: str | None, version_id: str | None = None) -> None:
        """Replace the object's ACL (see ObjectInfo.acl), of the current
        version or the one named."""
        ...

    async def delete_bucket(self, bucket: str) -> None: ...

    # Objects
    async def head_object(self, bucket: str, key: str) -> ObjectInfo: ...

    async def open_object(
        self, bucket: str, key: str, opts: ReadOptions | None = None, *, head: bool = False
    ) -> ObjectHandle:
        """Open the current version. ``head``: metadata only, no body will be
        read. Raises NotModified / PreconditionFailed / InvalidRange when the
        backend evaluates ``opts`` itself."""
        ...

    async def put_object(
        self,
        bucket: str,
        key: str,
        body: UploadBody,
        meta: ObjectMeta,
        conditions: WriteConditions | None = None,
    ) -> ObjectInfo: ...

    async def copy_object(
        self,
        src_bucket: str,
        src_key: str,
        dst_bucket: str,
        dst_key: str,
        meta: ObjectMeta | None,
        expected_etag: str | None = None,
        src_version: str | None = None,
    ) -> ObjectInfo:
        """Copy server-side. ``meta`` None keeps the source's metadata
        (directive COPY). ``expected_etag`` pins the source version that the
        caller's copy-source conditions were evaluated against;
        ``src_version`` names a version other than the current one."""
        ...

    async def delete_object(
        self, bucket: str, key: str, if_match: str | None = None, version_id: str | None = None
    ) -> Deleted:
        """Remove the key (in a versioned bucket: make a delete marker), or
        with ``version_id`` that version for good; with ``if_match``, only
        while its ETag is that one (PreconditionFailed otherwise, NoSuchKey
        if there is none)."""
        ...

    async def get_bucket_versioning(self, bucket: str) -> str | None:
        """"Enabled", "Suspended", or None for a bucket that never had it."""
        ...

    async def put_bucket_versioning(self, bucket: str, status: str) -> None: ...

    async def list_versions(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        key_marker: str = "",
        version_id_marker: str = "",
        max_keys: int = 1000,
    ) -> VersionPage:
        """Every version and delete marker, by key, newest first."""
        ...

    async def list_objects(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        start_after: str = "",
        max_keys: int = 1000,
    ) -> ListPage: ...

    # Tagging
    async def get_tags(self, bucket: str, key: str, version_id: str | None = None) -> dict[str, str]: ...

    async def put_tags(
        self, bucket: str, key: str, tags: Mapping[str, str], version_id: str | None = None
    ) -> None: ...

    # Multipart
    async def create_upload(self, bucket: str, key: str, meta: ObjectMeta) -> str: ...

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: UploadBody
    ) -> PartInfo: ...

    async def upload_part_copy(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        src_bucket: str,
        src_key: str,
        src_range: tuple[int, int] | None,
        expected_etag: str | None = None,
        src_version: str | None = None,
    ) -> PartInfo: ...

    async def complete_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[CompletedPart],
        conditions: WriteConditions | None = None,
    ) -> ObjectInfo:
        """Make the upload the key's object; ``conditions`` (If-Match,
        If-None-Match: *) are checked against the key's object as the new
        one takes its place."""
        ...

    async def abort_upload(self, bucket: str, key: str, upload_id: str) -> None: ...

    async def list_parts(
        self, bucket: str, key: str, upload_id: str, *, marker: int = 0, max_parts: int = 1000
    ) -> tuple[UploadInfo, list[PartInfo], bool]: ...

    async def list_uploads(
        self,
        bucket: str,
        *,
        prefix: str = "",
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> tuple[list[UploadInfo], bool]: ...

"""Which backend serves a bucket: the configured [[buckets]] mappings
first (by name, then a "*" wildcard), the local store for the rest.

A copy between two backends cannot be done server-side: it streams the
source through this node into the destination (bounded memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence

from nearstore.gateway import errors
from nearstore.gateway.backends.local import LocalStore
from nearstore.metadata.backing import (
    Backend,
    BucketAccess,
    BucketInfo,
    CompletedPart,
    Deleted,
    ListPage,
    ObjectHandle,
    ObjectInfo,
    ObjectMeta,
    PartInfo,
    ReadOptions,
    UploadBody,
    UploadInfo,
    VersionPage,
    WriteConditions,
)

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _copy_source(src: Backend, bucket: str, key: str, expected_etag: str | None,
                       version: str | None) -> AsyncIterator[ObjectHandle]:
    """The source of a copy between two stores, open and pinned to the
    version the caller's copy-source conditions were evaluated against."""
    handle = await src.open_object(bucket, key, ReadOptions(version_id=version))
    try:
        if expected_etag is not None and handle.info.etag != expected_etag:
            raise errors.PreconditionFailed(Condition="x-amz-copy-source-if-match")
        yield handle
    finally:
        await handle.close()


class _Stream:
    """An open object as an UploadBody, for cross-backend copies."""

    def __init__(self, handle: ObjectHandle, start: int, length: int) -> None:
        import hashlib

        self._handle, self._start, self._length = handle, start, length
        self._md5 = hashlib.md5()
        self.size = 0
        self.declared_size = length
        self.checksum: tuple[str, str] | None = None

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        async for piece in self._handle.read_range(self._start, self._length):
            self._md5.update(piece)
            self.size += len(piece)
            yield piece

    @property
    def md5_hex(self) -> str:
        return self._md5.hexdigest()


class Router:
    name = "router"

    def __init__(
        self, local: LocalStore, mapped: Mapping[str, Backend], wildcard: Backend | None,
        owners: Mapping[str, str] | None = None,
    ) -> None:
        self.local = local
        self.mapped = dict(mapped)
        self.wildcard = wildcard
        # Who owns a mapped bucket, by its name ("*": every bucket of the
        # wildcard's store): the user the config names; "" the first user.
        self.owners = dict(owners or {})
        # A mapped bucket's creation date is its backing store's, which the
        # node's keys may not be allowed to list: the mapping's start here
        # stands in (never 1970).
        self.mapped_since = time.time()

    def pick(self, bucket: str) -> Backend:
        b = self.mapped.get(bucket)
        if b is not None:
            return b
        return self.wildcard or self.local

    def _all(self) -> list[Backend]:
        out = [self.local, *self.mapped.values()]
        if self.wildcard is not None:
            out.append(self.wildcard)
        return out

    async def start(self) -> None:
        for b in self._all():
            await b.start()

    async def close(self) -> None:
        for b in self._all():
            await b.close()

    async def list_buckets(self) -> list[BucketInfo]:
        found: dict[str, BucketInfo] = {}
        if self.wildcard is not None:
            owner = self.owners.get("*", "")
            found.update((b.name, dataclasses.replace(b, owner=owner)) for b in await self.wildcard.list_buckets())
        else:
            found.update((b.name, b) for b in await self.local.list_buckets())
        for name in self.mapped:
            seen = found.get(name) or BucketInfo(name, self.mapped_since)
            found[name] = dataclasses.replace(seen, owner=self.owners.get(name, ""))
        return sorted(found.values(), key=lambda b: b.name)

    async def create_bucket(self, bucket: str, region: str = "", owner: str = "") -> None:
        await self.pick(bucket).create_bucket(bucket, region, owner)

    def _fronted_owner(self, bucket: str) -> str | None:
        """Who owns ``bucket`` when a backing store holds it; None when it
        is the local store's."""
        if bucket in self.mapped:
            return self.owners.get(bucket, "")
        if self.wildcard is not None:
            return self.owners.get("*", "")
        return None

    def bucket_owner(self, bucket: str) -> str:
        return self.bucket_access(bucket).owner

    def bucket_access(self, bucket: str) -> BucketAccess:
        # A fronted bucket's access documents are this node's, kept in the
        # local store's index: the backing store's own are its business
        # (its principals are not ours, and a public grant passed on would
        # open the backing bucket itself).
        owner = self._fronted_owner(bucket)
        if owner is None:
            return self.local.bucket_access(bucket)
        return self.local.fronted_access(bucket, owner)

    async def put_bucket_access(self, bucket: str, name: str, document: str | None) -> None:
        await self.local.put_bucket_access(bucket, name, document, fronted=self._fronted_owner(bucket) is not None)

    async def put_object_acl(self, bucket: str, key: str, acl: str | None, version_id: str | None = None) -> None:
        await self.pick(bucket).put_object_acl(bucket, key, acl, version_id)

    async def head_bucket(self, bucket: str) -> BucketInfo:
        return await self.pick(bucket).head_bucket(bucket)

    async def get_bucket_tags(self, bucket: str) -> dict[str, str]:
        return await self.pick(bucket).get_bucket_tags(bucket)

    async def put_bucket_tags(self, bucket: str, tags: Mapping[str, str]) -> None:
        await self.pick(bucket).put_bucket_tags(bucket, tags)

    async def get_bucket_cors(self, bucket: str) -> bytes:
        return await self.pick(bucket).get_bucket_cors(bucket)

    async def put_bucket_cors(self, bucket: str, document: bytes | None) -> None:
        await self.pick(bucket).put_bucket_cors(bucket, document)

    async def delete_bucket(self, bucket: str) -> None:
        await self.pick(bucket).delete_bucket(bucket)
        if self._fronted_owner(bucket) is not None:
            # A bucket made again under this name starts with none of these.
            await self.local.forget_access(bucket)

    async def head_object(self, bucket: str, key: str) -> ObjectInfo:
        return await self.pick(bucket).head_object(bucket, key)

    async def open_object(
        self, bucket: str, key: str, opts: ReadOptions | None = None, *, head: bool = False
    ) -> ObjectHandle:
        return await self.pick(bucket).open_object(bucket, key, opts, head=head)

    async def put_object(
        self, bucket: str, key: str, body: UploadBody, meta: ObjectMeta, conditions: WriteConditions | None = None
    ) -> ObjectInfo:
        return await self.pick(bucket).put_object(bucket, key, body, meta, conditions)

    async def copy_object(
        self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str, meta: ObjectMeta | None,
        expected_etag: str | None = None, src_version: str | None = None,
    ) -> ObjectInfo:
        src, dst = self.pick(src_bucket), self.pick(dst_bucket)
        if src is dst:
            return await src.copy_object(src_bucket, src_key, dst_bucket, dst_key, meta, expected_etag, src_version)
        async with _copy_source(src, src_bucket, src_key, expected_etag, src_version) as handle:
            info = handle.info
            if meta is None:
                meta = ObjectMeta(info.content_type, info.headers, info.user_meta,
                                  await src.get_tags(src_bucket, src_key, src_version))
            return await dst.put_object(dst_bucket, dst_key, _Stream(handle, 0, info.size), meta)

    async def delete_object(
        self, bucket: str, key: str, if_match: str | None = None, version_id: str | None = None
    ) -> Deleted:
        return await self.pick(bucket).delete_object(bucket, key, if_match, version_id)

    async def get_bucket_versioning(self, bucket: str) -> str | None:
        return await self.pick(bucket).get_bucket_versioning(bucket)

    async def put_bucket_versioning(self, bucket: str, status: str) -> None:
        await self.pick(bucket).put_bucket_versioning(bucket, status)

    async def list_versions(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", key_marker: str = "",
        version_id_marker: str = "", max_keys: int = 1000,
    ) -> VersionPage:
        return await self.pick(bucket).list_versions(
            bucket, prefix=prefix, delimiter=delimiter, key_marker=key_marker, version_id_marker=version_id_marker,
            max_keys=max_keys)

    async def list_objects(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", start_after: str = "", max_keys: int = 1000
    ) -> ListPage:
        return await self.pick(bucket).list_objects(
            bucket, prefix=prefix, delimiter=delimiter, start_after=start_after, max_keys=max_keys
        )

    async def get_tags(self, bucket: str, key: str, version_id: str | None = None) -> dict[str, str]:
        return await self.pick(bucket).get_tags(bucket, key, version_id)

    async def put_tags(
        self, bucket: str, key: str, tags: Mapping[str, str], version_id: str | None = None
    ) -> None:
        await self.pick(bucket).put_tags(bucket, key, tags, version_id)

    async def create_upload(self, bucket: str, key: str, meta: ObjectMeta) -> str:
        return await self.pick(bucket).create_upload(bucket, key, meta)

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: UploadBody
    ) -> PartInfo:
        return await self.pick(bucket).upload_part(bucket, key, upload_id, part_number, body)

    async def upload_part_copy(
        self, bucket: str, key: str, upload_id: str, part_number: int, src_bucket: str, src_key: str,
        src_range: tuple[int, int] | None, expected_etag: str | None = None, src_version: str | None = None,
    ) -> PartInfo:
        src, dst = self.pick(src_bucket), self.pick(bucket)
        if src is dst:
            return await dst.upload_part_copy(
                bucket, key, upload_id, part_number, src_bucket, src_key, src_range, expected_etag, src_version
            )
        async with _copy_source(src, src_bucket, src_key, expected_etag, src_version) as handle:
            size = handle.info.size
            start, end = src_range if src_range else (0, size - 1)
            if end >= size or start > end:
                raise errors.InvalidRange(ActualObjectSize=str(size))
            return await dst.upload_part(bucket, key, upload_id, part_number, _Stream(handle, start, end - start + 1))

    async def complete_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[CompletedPart],
        conditions: WriteConditions | None = None,
    ) -> ObjectInfo:
        return await self.pick(bucket).complete_upload(bucket, key, upload_id, parts, conditions)

    async def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        await self.pick(bucket).abort_upload(bucket, key, upload_id)

    async def list_parts(
        self, bucket: str, key: str, upload_id: str, *, marker: int = 0, max_parts: int = 1000
    ) -> tuple[UploadInfo, list[PartInfo], bool]:
        return await self.pick(bucket).list_parts(bucket, key, upload_id, marker=marker, max_parts=max_parts)

    async def list_uploads(
        self, bucket: str, *, prefix: str = "", key_marker: str = "", upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> tuple[list[UploadInfo], bool]:
        return await self.pick(bucket).list_uploads(
            bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=upload_id_marker,
            max_uploads=max_uploads,
        )

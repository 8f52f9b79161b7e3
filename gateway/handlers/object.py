"""Object-level operations: GET/HEAD/PUT/DELETE, copy, tagging, ACL."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from nearstore.gateway import acl, errors
from nearstore.gateway.access import Access, Op, check_new_acl, decide
from nearstore.gateway.conditions import (
    check_copy_source_conditions,
    check_read_conditions,
    http_date,
    iso8601,
)
from nearstore.gateway.handlers.common import (
    Ctx,
    meta_from_headers,
    payload,
    read_body,
    require_key,
    user_meta_headers,
    validate_tags,
    xml_response,
)
from nearstore.gateway.request import S3Request, check_key, validate_bucket_name
from nearstore.gateway.sendfile import send_body
from nearstore.gateway.xml import Node, child_text, parse, tagging
from nearstore.metadata.backing import (
    ObjectHandle,
    ObjectInfo,
    ObjectMeta,
    ReadOptions,
    WriteConditions,
    parse_range,
)

log = logging.getLogger(__name__)

# response-* query parameters and the header each overrides (GetObject).
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


def _bucket(req: S3Request) -> str:
    assert req.bucket is not None
    return req.bucket


def version_of(req: S3Request) -> str | None:
    """The ``versionId`` a request names (None: the current version)."""
    v = req.query.get("versionId")
    if v == "":
        raise errors.InvalidArgument("Version id cannot be the empty string", ArgumentName="versionId",
                                     ArgumentValue=v)
    return v




def object_headers(info: ObjectInfo, req: S3Request) -> dict[str, str]:
    h: dict[str, str] = {
        "ETag": info.etag,
        "Last-Modified": http_date(info.last_modified),
        "Content-Type": info.content_type,
        "Accept-Ranges": "bytes",
    }
    for name, value in info.headers.items():
        h[name.title() if not name.startswith("x-amz-") else name] = value
    h.update(user_meta_headers(info.user_meta))
    if info.version_id is not None:
        h["x-amz-version-id"] = info.version_id
    if info.tag_count:
        h["x-amz-tagging-count"] = str(info.tag_count)
    if info.storage_class != "STANDARD":
        h["x-amz-storage-class"] = info.storage_class
    for param, header in RESPONSE_OVERRIDES.items():
        if param in req.query:
            value = req.query[param]
            if "\r" in value or "\n" in value:
                # It would end the header and start another one.
                raise errors.InvalidArgument("Header value cannot contain a line break", ArgumentName=param,
                                             ArgumentValue=value)
            h[header] = value
    return h


def _checksum_headers(info: ObjectInfo, req: S3Request, whole: bool) -> dict[str, str]:
    if not info.checksum or (req.header("x-amz-checksum-mode") or "").upper() != "ENABLED" or not whole:
        return {}
    alg, value, kind = info.checksum
    return {f"x-amz-checksum-{alg.lower()}": value, "x-amz-checksum-type": kind}


def _part_range(info: ObjectInfo, req: S3Request) -> tuple[int, int] | None:
    raw = req.query.get("partNumber")
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise errors.InvalidArgument("Part number must be an integer between 1 and 10000, inclusive",
                                     ArgumentName="partNumber", ArgumentValue=raw) from None
    if not 1 <= n <= 10000:
        raise errors.InvalidArgument("Part number must be an integer between 1 and 10000, inclusive",
                                     ArgumentName="partNumber", ArgumentValue=raw)
    parts = info.parts or (info.size,)
    if n > len(parts):
        raise errors.InvalidPartNumber(PartNumberRequested=str(n), ActualPartCount=str(len(parts)))
    start = sum(parts[: n - 1])
    return start, start + parts[n - 1] - 1


async def get_object(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    return await _read_object(ctx, req, head=False)


async def head_object(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    return await _read_object(ctx, req, head=True)


def read_options(req: S3Request) -> ReadOptions:
    h = req.headers
    part = req.query.get("partNumber")
    return ReadOptions(
        range_header=h.get("Range"),
        part_number=int(part) if part is not None and part.isdigit() else None,
        conditions={n: h[n] for n in ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since") if n in h},
        checksum_mode=(h.get("x-amz-checksum-mode") or "").upper() == "ENABLED",
        version_id=version_of(req),
    )


@dataclass
class Reading:
    """A GET or HEAD decided: what to answer, and the open handle whose
    ``length`` bytes from ``start`` are the body. The caller sends it (the
    aiohttp handler below, or the hot path, ``gateway.hotpath``) and closes
    the handle."""

    status: int
    headers: dict[str, str]
    handle: ObjectHandle
    start: int
    length: int


async def open_read(ctx: Ctx, req: S3Request, *, head: bool) -> Reading:
    """GetObject and HeadObject up to the first byte: version, part and
    range, conditions, the response headers."""
    key = require_key(req)
    if req.query.get("partNumber") is not None and req.header("Range") is not None:
        raise errors.InvalidRequest("Cannot specify both Range header and partNumber query parameter")
    access = ctx.decided
    try:
        handle = await ctx.backend.open_object(_bucket(req), key, read_options(req), head=head)
    except errors.NoSuchKey as e:
        raise access.missing(e) from None
    try:
        info = handle.info
        access.check(info)
        check_read_conditions(req.headers, info.etag, info.last_modified)
        headers = object_headers(info, req)
        served = handle.served
        if served is not None:
            # The backing store evaluated range and part itself.
            status, start, length = served.status, served.start, served.end - served.start + 1
            headers.update(served.headers)
            if status == 206:
                headers["Content-Range"] = f"bytes {served.start}-{served.end}/{info.size}"
            whole = status == 200
        else:
            part = _part_range(info, req)
            rng = part or parse_range(req.header("Range"), info.size)
            if part is not None:
                headers["x-amz-mp-parts-count"] = str(len(info.parts) or 1)
            if rng is None:
                start, length, status = 0, info.size, 200
            else:
                start, length, status = rng[0], rng[1] - rng[0] + 1, 206
                headers["Content-Range"] = f"bytes {rng[0]}-{rng[1]}/{info.size}"
            if part is not None and not info.parts:
                # partNumber=1 of a single-part object is the whole object.
                status = 206 if info.size else 200
            whole = rng is None or (part is not None and not info.parts)
        headers.update(_checksum_headers(info, req, whole=whole))
    except BaseException:
        await handle.close()
        raise
    return Reading(status, headers, handle, start, max(length, 0))


async def _read_object(ctx: Ctx, req: S3Request, *, head: bool) -> web.StreamResponse:
    reading = await open_read(ctx, req, head=head)
    try:
        resp = web.StreamResponse(status=reading.status, headers=reading.headers)
        resp.content_length = reading.length
        if head:
            await resp.prepare(req.body())
            await resp.write_eof()
            return resp
        await send_body(req.body(), resp, reading.handle, reading.start, reading.length,
                        ctx.config.send_timeout)
        return resp
    finally:
        await reading.handle.close()


def write_conditions(req: S3Request) -> WriteConditions:
    inm = req.header("If-None-Match")
    if inm is not None and inm.strip() != "*":
        raise errors.NotImplemented("If-None-Match on writes supports only '*'", Header="If-None-Match")
    return WriteConditions(if_match=req.header("If-Match"), if_none_match=inm)


async def put_object(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    if req.header("x-amz-copy-source") is not None:
        return await copy_object(ctx, req)
    key = require_key(req)
    check_key(key)
    meta = dataclasses.replace(meta_from_headers(req), acl=ctx.new_acl(req.headers, _bucket(req)))
    body = payload(ctx, req)
    info = await ctx.backend.put_object(_bucket(req), key, body, with_encoding(meta, body.content_encoding),
                                        write_conditions(req))
    headers = {"ETag": info.etag, **version_header(info)}
    if body.checksum:
        headers[f"x-amz-checksum-{body.checksum[0].lower()}"] = body.checksum[1]
        headers["x-amz-checksum-type"] = "FULL_OBJECT"
    return web.Response(status=200, headers=headers)


def version_header(info: ObjectInfo) -> dict[str, str]:
    return {"x-amz-version-id": info.version_id} if info.version_id is not None else {}


def with_encoding(meta: ObjectMeta, content_encoding: str | None) -> ObjectMeta:
    """Store the Content-Encoding minus the aws-chunked transfer token."""
    headers = dict(meta.headers)
    if content_encoding:
        headers["content-encoding"] = content_encoding
    else:
        headers.pop("content-encoding", None)
    return dataclasses.replace(meta, headers=headers)


def parse_copy_source(value: str) -> tuple[str, str, str | None]:
    """x-amz-copy-source: "bucket/key" or "/bucket/key", URL-encoded,
    optionally "?versionId=...": (bucket, key, version or None)."""
    src, _, query = value.partition("?")
    version = None
    if query:
        name, _, raw_version = query.partition("=")
        version = unquote(raw_version)
        if name != "versionId" or not version:
            raise errors.InvalidArgument("Invalid version id specified", ArgumentName="x-amz-copy-source")
    src = unquote(src)
    if src.startswith("/"):
        src = src[1:]
    bucket, slash, key = src.partition("/")
    if not slash or not key or not bucket:
        raise errors.InvalidArgument(
            "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            ArgumentName="x-amz-copy-source", ArgumentValue=value,
        )
    validate_bucket_name(bucket)
    check_key(key)
    return bucket, key, version


async def copy_object(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    key = require_key(req)
    check_key(key)
    src_bucket, src_key, src_version = parse_copy_source(req.header("x-amz-copy-source") or "")
    directive = (req.header("x-amz-metadata-directive") or "COPY").upper()
    tag_directive = (req.header("x-amz-tagging-directive") or "COPY").upper()
    if directive not in ("COPY", "REPLACE") or tag_directive not in ("COPY", "REPLACE"):
        raise errors.InvalidArgument("Unknown metadata directive.", ArgumentName="x-amz-metadata-directive")
    new_acl = ctx.new_acl(req.headers, _bucket(req))
    src = await copy_source(ctx, src_bucket, src_key, src_version)
    check_copy_source_conditions(req.headers, src.etag, src.last_modified)
    if (
        (src_bucket, src_key) == (_bucket(req), key)
        and directive == "COPY"
        and "x-amz-storage-class" not in req.headers
    ):
        raise errors.InvalidRequest(
            "This copy request is illegal because it is trying to copy an object to itself without "
            "changing the object's metadata, storage class, website redirect location or encryption attributes."
        )
    new_meta = meta_from_headers(req, with_tags=tag_directive == "REPLACE")
    meta: ObjectMeta | None
    if directive == "REPLACE":
        meta = dataclasses.replace(new_meta, acl=new_acl)
    elif tag_directive == "REPLACE":
        meta = ObjectMeta(src.content_type, src.headers, src.user_meta, new_meta.tags, acl=new_acl)
    else:
        meta = None
    info = await ctx.backend.copy_object(src_bucket, src_key, _bucket(req), key, meta, expected_etag=src.etag,
                                         src_version=src_version)
    if meta is None and new_acl is not None:
        # A copy's ACL is the request's, never the source's (S3): the copy
        # kept its source's metadata, and is private to the bucket owner
        # until this sets its own.
        await ctx.backend.put_object_acl(_bucket(req), key, new_acl)
    resp = xml_response(
        "CopyObjectResult",
        [
            ("LastModified", iso8601(info.last_modified)),
            ("ETag", info.etag),
            (f"Checksum{info.checksum[0]}", info.checksum[1]) if info.checksum else None,
        ],
    )
    resp.headers.update(version_header(info))
    if src.version_id is not None:
        resp.headers["x-amz-copy-source-version-id"] = src.version_id
    return resp


async def delete_object(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    key = require_key(req)
    done = await ctx.backend.delete_object(_bucket(req), key, req.header("If-Match"), version_of(req))
    headers = {"x-amz-version-id": done.version_id} if done.version_id is not None else {}
    if done.delete_marker:
        headers["x-amz-delete-marker"] = "true"
    return web.Response(status=204, headers=headers)


async def copy_source(ctx: Ctx, bucket: str, key: str, version: str | None = None) -> ObjectInfo:
    """The source of a copy, once the requester may read it (the source's
    bucket decides, as for a GetObject of it)."""
    user = None if ctx.decided.requester is None else ctx.user
    access = decide(ctx.config, ctx.backend, user, bucket, key, READ_SOURCE if version is None else READ_VERSION)
    return await checked_head(ctx, bucket, key, access, version)


READ_SOURCE = Op("s3:GetObject", on_object=True, permission="READ")
READ_VERSION = Op("s3:GetObjectVersion", on_object=True, permission="READ")


async def checked_head(ctx: Ctx, bucket: str, key: str, access: Access | None = None,
                       version: str | None = None) -> ObjectInfo:
    """The object's metadata (of ``version``: another than the current
    one), once the request may act on the object."""
    access = access or ctx.decided
    try:
        if version is None:
            info = await ctx.backend.head_object(bucket, key)
        else:
            handle = await ctx.backend.open_object(bucket, key, ReadOptions(version_id=version), head=True)
            info = handle.info
            await handle.close()
    except errors.NoSuchKey as e:
        raise access.missing(e) from None
    access.check(info)
    return info


async def get_object_tagging(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    bucket, key, version = _bucket(req), require_key(req), version_of(req)
    info = await checked_head(ctx, bucket, key, version=version)
    resp = tagging_response(await ctx.backend.get_tags(bucket, key, version))
    resp.headers.update(version_header(info))
    return resp


async def read_tagging(ctx: Ctx, req: S3Request, *, bucket: bool = False) -> dict[str, str]:
    """A Tagging document's tag set, checked as S3 checks it."""
    root = parse(await read_body(ctx, req, limit=64 * 1024))
    tagset = root.find("TagSet")
    if root.tag != "Tagging" or tagset is None:
        raise errors.MalformedXML()
    tags: dict[str, str] = {}
    for tag in tagset.findall("Tag"):
        k, v = child_text(tag, "Key"), child_text(tag, "Value")
        if k is None or v is None:
            raise errors.MalformedXML()
        if k in tags:
            raise errors.InvalidTag("Cannot provide multiple Tags with the same key")
        tags[k] = v
    validate_tags(tags, bucket=bucket)
    return tags


def tagging_response(tags: Mapping[str, str]) -> web.Response:
    return web.Response(body=tagging(tags), content_type="application/xml")


async def put_object_tagging(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    tags = await read_tagging(ctx, req)
    return await _set_tags(ctx, req, tags, 200)


async def _set_tags(ctx: Ctx, req: S3Request, tags: Mapping[str, str], status: int) -> web.Response:
    bucket, key, version = _bucket(req), require_key(req), version_of(req)
    info = await checked_head(ctx, bucket, key, version=version)
    await ctx.backend.put_tags(bucket, key, tags, version)
    return web.Response(status=status, headers=version_header(info))


async def delete_object_tagging(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    return await _set_tags(ctx, req, {}, 204)


ATTRIBUTES = ("ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize")


async def get_object_attributes(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    """GetObjectAttributes: what ``x-amz-object-attributes`` names, from the
    object's metadata (no body is read). Parts are listed for a multipart
    object whose part sizes the store knows (the local store; a backing
    store's HEAD does not tell them)."""
    wanted = [a.strip() for a in (req.header("x-amz-object-attributes") or "").split(",") if a.strip()]
    if not wanted:
        raise errors.InvalidArgument("The x-amz-object-attributes header specifying the attributes to be "
                                     "retrieved is either missing or empty", ArgumentName="x-amz-object-attributes")
    for name in wanted:
        if name not in ATTRIBUTES:
            raise errors.InvalidArgument("Invalid attribute name specified.", ArgumentName="x-amz-object-attributes",
                                         ArgumentValue=name)
    max_parts = _bounded(req, "x-amz-max-parts", 1000)
    marker = _bounded(req, "x-amz-part-number-marker", 0)
    info = await checked_head(ctx, _bucket(req), require_key(req), version=version_of(req))
    out: list[Node | None] = []
    if "ETag" in wanted:
        out.append(("ETag", info.etag.strip('"')))
    if "Checksum" in wanted and info.checksum:
        alg, value, kind = info.checksum
        out.append(("Checksum", [(f"Checksum{alg.upper()}", value), ("ChecksumType", kind)]))
    if "ObjectParts" in wanted and info.parts:
        listed = list(enumerate(info.parts, 1))[marker:marker + max_parts]
        truncated = marker + len(listed) < len(info.parts)
        part_alg = info.checksum[0].upper() if info.checksum and info.part_checksums else None
        parts: list[Node | None] = [
            ("Part", [(f"Checksum{part_alg}", info.part_checksums[n - 1]) if part_alg else None,
                      ("PartNumber", n), ("Size", size)])
            for n, size in listed
        ]
        out.append(("ObjectParts", [
            ("IsTruncated", truncated), ("MaxParts", max_parts),
            ("NextPartNumberMarker", listed[-1][0] if listed else marker),
            ("PartNumberMarker", marker), *parts, ("PartsCount", len(info.parts)),
        ]))
    if "StorageClass" in wanted:
        out.append(("StorageClass", info.storage_class))
    if "ObjectSize" in wanted:
        out.append(("ObjectSize", info.size))
    resp = xml_response("GetObjectAttributesResponse", out)
    resp.headers["Last-Modified"] = http_date(info.last_modified)
    resp.headers.update(version_header(info))
    return resp


def _bounded(req: S3Request, header: str, default: int) -> int:
    raw = req.header(header)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) > 2**31 - 1:
        raise errors.InvalidArgument(f"Invalid value for {header}", ArgumentName=header, ArgumentValue=raw)
    return int(raw)


async def get_object_acl(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    info = await checked_head(ctx, _bucket(req), require_key(req), version=version_of(req))
    return web.Response(body=acl.of(info.acl, ctx.decided.owner).render(ctx.config), content_type="application/xml")


async def put_object_acl(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    """PutObjectAcl: a canned ACL, grant headers or a document; the object
    keeps its owner."""
    bucket, key, version = _bucket(req), require_key(req), version_of(req)
    info = await checked_head(ctx, bucket, key, version=version)
    owner = acl.of(info.acl, ctx.decided.owner).owner
    new = await acl_of_request(ctx, req, owner)
    check_new_acl(ctx.backend, bucket, new)
    await ctx.backend.put_object_acl(bucket, key, acl.recorded(new, ctx.decided.owner), version)
    return web.Response(status=200, headers=version_header(info))


async def acl_of_request(ctx: Ctx, req: S3Request, owner: str) -> acl.Acl:
    """The ACL a Put*Acl request sets: its headers' or its body's, one of
    the two (S3: UnexpectedContent for both)."""
    from_headers = acl.from_headers(ctx.config, req.headers, owner, ctx.decided.owner)
    body = await read_body(ctx, req, limit=256 * 1024)
    if from_headers is not None:
        if body.strip():
            raise errors.UnexpectedContent("This request does not support content")
        return from_headers
    if not body.strip():
        raise errors.MissingSecurityHeader("Your request was missing a required header", MissingHeaderName="x-amz-acl")
    return acl.from_document(ctx.config, body, owner)

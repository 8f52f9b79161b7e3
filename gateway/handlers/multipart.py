"""Multipart uploads: create, upload part (and part copy), complete, abort,
list parts. Listing uploads is a bucket operation (handlers.bucket)."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from nearstore.gateway import errors
from nearstore.gateway.checksums import ALGORITHMS
from nearstore.gateway.conditions import check_copy_source_conditions, iso8601
from nearstore.gateway.handlers.common import (
    Ctx,
    meta_from_headers,
    payload,
    read_body,
    require_key,
    xml_response,
)
from nearstore.gateway.handlers.object import (
    copy_source,
    parse_copy_source,
    version_header,
    with_encoding,
    write_conditions,
)
from nearstore.gateway.request import S3Request, check_key
from nearstore.gateway.xml import child_text, parse
from nearstore.metadata.backing import CompletedPart, ObjectMeta

MAX_PART_NUMBER = 10000


def _bucket(req: S3Request) -> str:
    assert req.bucket is not None
    return req.bucket


def _upload_id(req: S3Request) -> str:
    upload_id = req.query.get("uploadId", "")
    if not upload_id:
        raise errors.NoSuchUpload(UploadId=upload_id)
    return upload_id


def _part_number(req: S3Request) -> int:
    raw = req.query.get("partNumber", "")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_PART_NUMBER:
        raise errors.InvalidArgument(
            "Part number must be an integer between 1 and 10000, inclusive",
            ArgumentName="partNumber", ArgumentValue=raw,
        )
    return n


async def create_multipart_upload(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    key = require_key(req)
    check_key(key)
    meta = meta_from_headers(req)
    alg = req.header("x-amz-checksum-algorithm")
    kind = req.header("x-amz-checksum-type")
    headers = dict(meta.headers)
    if alg is not None:
        alg = alg.upper()
        if alg not in ALGORITHMS:
            raise errors.InvalidRequest("Checksum algorithm provided is unsupported.")
    if kind is not None:
        kind = kind.upper()
        if kind not in ("COMPOSITE", "FULL_OBJECT") or alg is None:
            raise errors.InvalidRequest("The x-amz-checksum-type header can only be used with the x-amz-checksum-algorithm header.")
        if kind == "FULL_OBJECT" and alg in ("SHA1", "SHA256"):
            raise errors.InvalidRequest(f"The FULL_OBJECT checksum type cannot be used with the {alg.lower()} checksum algorithm.")
        if kind == "COMPOSITE" and alg == "CRC64NVME":
            raise errors.InvalidRequest("The COMPOSITE checksum type cannot be used with the crc64nvme checksum algorithm.")
        headers["x-amz-checksum-type"] = kind
    elif alg == "CRC64NVME":
        headers["x-amz-checksum-type"] = "FULL_OBJECT"
    encoding = headers.get("content-encoding")
    meta = ObjectMeta(meta.content_type, headers, meta.user_meta, meta.tags, alg, acl=ctx.new_acl(req.headers, _bucket(req)))
    if encoding:
        meta = with_encoding(meta, encoding)
    upload_id = await ctx.backend.create_upload(_bucket(req), key, meta)
    resp = xml_response(
        "InitiateMultipartUploadResult",
        [("Bucket", _bucket(req)), ("Key", key), ("UploadId", upload_id)],
    )
    if alg:
        resp.headers["x-amz-checksum-algorithm"] = alg
        resp.headers["x-amz-checksum-type"] = headers.get("x-amz-checksum-type", "COMPOSITE")
    return resp


async def upload_part(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    if req.header("x-amz-copy-source") is not None:
        return await upload_part_copy(ctx, req)
    key = require_key(req)
    number = _part_number(req)
    body = payload(ctx, req)
    part = await ctx.backend.upload_part(_bucket(req), key, _upload_id(req), number, body)
    headers = {"ETag": part.etag}
    if body.checksum:
        headers[f"x-amz-checksum-{body.checksum[0].lower()}"] = body.checksum[1]
    return web.Response(status=200, headers=headers)


def _copy_range(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    v = value.strip()
    try:
        if not v.startswith("bytes="):
            raise ValueError
        first, _, last = v[6:].partition("-")
        start, end = int(first), int(last)
    except ValueError:
        raise errors.InvalidArgument(
            "The x-amz-copy-source-range value must be of the form bytes=first-last where first and last are "
            "the zero-based offsets of the first and last bytes to copy",
            ArgumentName="x-amz-copy-source-range", ArgumentValue=value,
        ) from None
    if start < 0 or end < start:
        raise errors.InvalidArgument(
            "The x-amz-copy-source-range value must be of the form bytes=first-last",
            ArgumentName="x-amz-copy-source-range", ArgumentValue=value,
        )
    return start, end


async def upload_part_copy(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    key = require_key(req)
    number = _part_number(req)
    src_bucket, src_key, src_version = parse_copy_source(req.header("x-amz-copy-source") or "")
    rng = _copy_range(req.header("x-amz-copy-source-range"))
    src = await copy_source(ctx, src_bucket, src_key, src_version)
    check_copy_source_conditions(req.headers, src.etag, src.last_modified)
    part = await ctx.backend.upload_part_copy(
        _bucket(req), key, _upload_id(req), number, src_bucket, src_key, rng, expected_etag=src.etag,
        src_version=src_version,
    )
    resp = xml_response("CopyPartResult", [("LastModified", iso8601(part.last_modified)), ("ETag", part.etag)])
    if src.version_id is not None:
        resp.headers["x-amz-copy-source-version-id"] = src.version_id
    return resp


async def complete_multipart_upload(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    key = require_key(req)
    upload_id = _upload_id(req)
    root = parse(await read_body(ctx, req, object_checksum=True))
    if root.tag != "CompleteMultipartUpload":
        raise errors.MalformedXML()
    parts: list[CompletedPart] = []
    for el in root.findall("Part"):
        num, etag = child_text(el, "PartNumber"), child_text(el, "ETag")
        if num is None or etag is None:
            raise errors.MalformedXML()
        try:
            n = int(num)
        except ValueError:
            raise errors.MalformedXML() from None
        checksum = checksum_alg = None
        for alg in ALGORITHMS:
            value = child_text(el, f"Checksum{alg}")
            if value is not None:
                checksum, checksum_alg = value, alg
        parts.append(CompletedPart(n, etag.strip(), checksum, checksum_alg))
    sent = [(alg, req.header(f"x-amz-checksum-{alg.lower()}")) for alg in ALGORITHMS]
    expected = next(((alg, v) for alg, v in reversed(sent) if v is not None), None)
    conditions = dataclasses.replace(write_conditions(req), checksum=expected,
                                     checksum_type=req.header("x-amz-checksum-type"))
    info = await ctx.backend.complete_upload(_bucket(req), key, upload_id, parts, conditions)
    host = req.header("Host") or "localhost"
    resp = xml_response(
        "CompleteMultipartUploadResult",
        [
            ("Location", f"http://{host}/{_bucket(req)}/{key}"),
            ("Bucket", _bucket(req)),
            ("Key", key),
            ("ETag", info.etag),
            (f"Checksum{info.checksum[0]}", info.checksum[1]) if info.checksum else None,
            ("ChecksumType", info.checksum[2]) if info.checksum else None,
        ],
    )
    resp.headers.update(version_header(info))
    return resp


async def abort_multipart_upload(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    await ctx.backend.abort_upload(_bucket(req), require_key(req), _upload_id(req))
    return web.Response(status=204)


async def list_parts(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    key = require_key(req)
    upload_id = _upload_id(req)
    try:
        marker = int(req.query.get("part-number-marker", "0") or 0)
        max_parts = min(int(req.query.get("max-parts", "1000")), 1000)
    except ValueError:
        raise errors.InvalidArgument("Invalid part number marker or max parts", ArgumentName="max-parts") from None
    if max_parts < 0 or marker < 0:
        raise errors.InvalidArgument("Invalid part number marker or max parts", ArgumentName="max-parts")
    upload, parts, truncated = await ctx.backend.list_parts(
        _bucket(req), key, upload_id, marker=marker, max_parts=max_parts
    )
    alg = upload.meta.checksum_algorithm
    return xml_response(
        "ListPartsResult",
        [
            ("Bucket", _bucket(req)),
            ("Key", key),
            ("UploadId", upload_id),
            ctx.bucket_owner("Initiator"),
            ctx.bucket_owner(),
            ("StorageClass", "STANDARD"),
            ("PartNumberMarker", marker),
            ("NextPartNumberMarker", parts[-1].part_number if parts else 0),
            ("MaxParts", max_parts),
            ("IsTruncated", truncated),
            ("ChecksumAlgorithm", alg) if alg else None,
            *[
                (
                    "Part",
                    [
                        ("PartNumber", p.part_number),
                        ("LastModified", iso8601(p.last_modified)),
                        ("ETag", p.etag),
                        ("Size", p.size),
                        (f"Checksum{alg}", p.checksum) if alg and p.checksum else None,
                    ],
                )
                for p in parts
            ],
        ],
    )

"""Service- and bucket-level operations."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from nearstore.gateway import acl, cors, errors, policy
from nearstore.gateway.access import (
    Op,
    PublicAccessBlock,
    block_of,
    check_new_acl,
    decide_request,
    owner_of,
    recorded,
)
from nearstore.gateway.conditions import iso8601
from nearstore.gateway.handlers.common import Ctx, encode_key, read_body, xml_response
from nearstore.gateway.handlers.object import acl_of_request, read_tagging, tagging_response
from nearstore.gateway.request import S3Request, check_key, validate_bucket_name
from nearstore.gateway.xml import S3_NS, XML_DECL, Node, child_text, escape, parse
from nearstore.metadata.backing import VERSIONING_STATES, ListPage, VersionEntry

MAX_KEYS = 1000


def _bucket(req: S3Request) -> str:
    assert req.bucket is not None
    return req.bucket


async def list_buckets(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    mine = recorded(ctx.config, ctx.user)
    buckets = [b for b in await ctx.backend.list_buckets() if b.owner == mine]
    return xml_response(
        "ListAllMyBucketsResult",
        [
            ctx.owner(),
            (
                "Buckets",
                [("Bucket", [("Name", b.name), ("CreationDate", iso8601(b.created))]) for b in buckets],
            ),
        ],
    )


async def create_bucket(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    bucket = _bucket(req)
    validate_bucket_name(bucket)
    body = await read_body(ctx, req, limit=64 * 1024)
    region = ""
    if body.strip():
        root = parse(body)
        if root.tag != "CreateBucketConfiguration":
            raise errors.MalformedXML()
        region = child_text(root, "LocationConstraint") or ""
        if region == "us-east-1":
            # S3: us-east-1 is the default and may not be named explicitly.
            raise errors.InvalidLocationConstraint(
                "The specified location-constraint is not valid", LocationConstraint=region
            )
    try:
        taken = owner_of(ctx.config, ctx.backend, bucket)
    except errors.NoSuchBucket:
        taken = None
    if taken is not None and taken != ctx.user.id:
        raise errors.BucketAlreadyExists(BucketName=bucket)
    asked = acl.from_headers(ctx.config, req.headers, ctx.user.id, ctx.user.id)
    try:
        await ctx.backend.create_bucket(bucket, region, recorded(ctx.config, ctx.user))
    except errors.BucketAlreadyOwnedByYou:
        # S3 in us-east-1 answers the owner's re-create without a location
        # constraint with 200 (legacy); every other region with 409.
        if region or ctx.config.region != "us-east-1":
            raise
        return web.Response(status=200, headers={"Location": f"/{bucket}"})
    recorded_acl = acl.recorded(asked, ctx.user.id)
    if recorded_acl is not None:
        await ctx.backend.put_bucket_access(bucket, "acl", recorded_acl)
    return web.Response(status=200, headers={"Location": f"/{bucket}"})


async def head_bucket(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    info = await ctx.backend.head_bucket(_bucket(req))
    return web.Response(
        status=200,
        headers={"x-amz-bucket-region": info.region or ctx.config.region, "x-amz-access-point-alias": "false"},
    )


async def delete_bucket(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    await ctx.backend.delete_bucket(_bucket(req))
    return web.Response(status=204)


async def get_bucket_location(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    info = await ctx.backend.head_bucket(_bucket(req))
    # us-east-1 buckets answer an empty LocationConstraint (S3 legacy). The
    # region is the creator's text: escaped like any other (it was not).
    if info.region in ("", "us-east-1"):
        return xml_response("LocationConstraint", [])
    body = f'{XML_DECL}<LocationConstraint xmlns="{S3_NS}">{escape(info.region)}</LocationConstraint>'
    return web.Response(body=body.encode(), content_type="application/xml")


async def get_bucket_acl(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    bucket = _bucket(req)
    await ctx.backend.head_bucket(bucket)
    recorded_acl = ctx.backend.bucket_access(bucket).acl
    return web.Response(body=acl.of(recorded_acl, ctx.decided.owner).render(ctx.config), content_type="application/xml")


async def put_bucket_acl(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    bucket = _bucket(req)
    await ctx.backend.head_bucket(bucket)
    new = await acl_of_request(ctx, req, ctx.decided.owner)
    check_new_acl(ctx.backend, bucket, new)
    await ctx.backend.put_bucket_access(bucket, "acl", acl.recorded(new, ctx.decided.owner))
    return web.Response(status=200)


async def _stored(ctx: Ctx, req: S3Request, name: str, missing: type[errors.S3Error]) -> tuple[str, str]:
    """(bucket, one of its access documents as stored); ``missing`` where
    it has none."""
    bucket = _bucket(req)
    await ctx.backend.head_bucket(bucket)
    text: str | None = getattr(ctx.backend.bucket_access(bucket), name)
    if text is None:
        raise missing(BucketName=bucket)
    return bucket, text


async def _store(ctx: Ctx, req: S3Request, name: str, document: str | None, status: int) -> web.Response:
    await ctx.backend.put_bucket_access(_bucket(req), name, document)
    return web.Response(status=status)


async def get_bucket_policy(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    _, text = await _stored(ctx, req, "policy", errors.NoSuchBucketPolicy)
    return web.Response(body=text.encode(), content_type="application/json")


async def put_bucket_policy(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    """PutBucketPolicy: kept as sent once it parses; a public one is refused
    under BlockPublicPolicy."""
    bucket = _bucket(req)
    await ctx.backend.head_bucket(bucket)
    body = await read_body(ctx, req, limit=policy.MAX_POLICY_BYTES + 1)
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise errors.MalformedPolicy("Policies must be valid JSON and the first byte must be '{'") from None
    parsed = policy.parse_policy(text, bucket)
    if parsed.public and block_of(ctx.backend, bucket).block_public_policy:
        raise errors.AccessDenied()
    return await _store(ctx, req, "policy", text, 204)


async def delete_bucket_policy(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    await ctx.backend.head_bucket(_bucket(req))
    return await _store(ctx, req, "policy", None, 204)


async def get_bucket_policy_status(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    bucket, text = await _stored(ctx, req, "policy", errors.NoSuchBucketPolicy)
    return xml_response("PolicyStatus", [("IsPublic", policy.parsed(text, bucket).public)])


async def get_public_access_block(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    _, text = await _stored(ctx, req, "public_access_block", errors.NoSuchPublicAccessBlockConfiguration)
    return web.Response(body=PublicAccessBlock.from_json(text).document(), content_type="application/xml")


async def put_public_access_block(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    await ctx.backend.head_bucket(_bucket(req))
    block = PublicAccessBlock.from_document(await read_body(ctx, req, limit=64 * 1024))
    return await _store(ctx, req, "public_access_block", block.to_json(), 200)


async def delete_public_access_block(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    await ctx.backend.head_bucket(_bucket(req))
    return await _store(ctx, req, "public_access_block", None, 204)


async def get_bucket_versioning(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    status = await ctx.backend.get_bucket_versioning(_bucket(req))
    return xml_response("VersioningConfiguration", [("Status", status) if status else None])


async def put_bucket_versioning(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    root = parse(await read_body(ctx, req, limit=64 * 1024))
    status = (child_text(root, "Status") or "").strip()
    if root.tag != "VersioningConfiguration" or status not in VERSIONING_STATES:
        raise errors.MalformedXML()
    if (child_text(root, "MfaDelete") or "Disabled").strip() == "Enabled":
        raise errors.NotImplemented("MFA delete is not implemented", Header="x-amz-mfa")
    await ctx.backend.put_bucket_versioning(_bucket(req), status)
    return web.Response(status=200)


def _max_keys(req: S3Request, name: str = "max-keys") -> int:
    raw = req.query.get(name)
    if raw is None:
        return MAX_KEYS
    try:
        n = int(raw)
    except ValueError:
        raise errors.InvalidArgument(
            "Provided max-keys not an integer or within integer range", ArgumentName=name, ArgumentValue=raw
        ) from None
    if n < 0:
        raise errors.InvalidArgument(
            "Argument maxKeys must be an integer between 0 and 2147483647", ArgumentName=name, ArgumentValue=raw
        )
    return min(n, MAX_KEYS)


def _encoding(req: S3Request) -> str | None:
    enc = req.query.get("encoding-type")
    if enc is not None and enc != "url":
        raise errors.InvalidArgument("Invalid Encoding Method specified in Request", ArgumentName="encoding-type", ArgumentValue=enc)
    return enc


def _contents(ctx: Ctx, page: ListPage, enc: str | None, owner: bool) -> list[Node]:
    out: list[Node] = []
    for o in page.objects:
        out.append(
            (
                "Contents",
                [
                    ("Key", encode_key(o.key, enc)),
                    ("LastModified", iso8601(o.last_modified)),
                    ("ETag", o.etag),
                    ("ChecksumAlgorithm", o.checksum[0]) if o.checksum else None,
                    ("ChecksumType", o.checksum[2]) if o.checksum else None,
                    ("Size", o.size),
                    ctx.object_owner(o) if owner else None,
                    ("StorageClass", o.storage_class),
                ],
            )
        )
    return out


def _prefixes(page: ListPage, enc: str | None) -> list[Node]:
    return [("CommonPrefixes", [("Prefix", encode_key(p, enc))]) for p in page.common_prefixes]


async def _page(ctx: Ctx, req: S3Request, after: str, max_keys: int) -> ListPage:
    """One page of a listing (v1 and v2 alike). max-keys=0 lists nothing
    but still answers NoSuchBucket for a bucket that is not there."""
    if max_keys == 0:
        await ctx.backend.head_bucket(_bucket(req))
        return ListPage([], [], False, None)
    return await ctx.backend.list_objects(
        _bucket(req), prefix=req.query.get("prefix", ""), delimiter=req.query.get("delimiter", ""),
        start_after=after, max_keys=max_keys,
    )


async def list_objects(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    q = req.query
    enc = _encoding(req)
    max_keys = _max_keys(req)
    prefix, delimiter, marker = q.get("prefix", ""), q.get("delimiter", ""), q.get("marker", "")
    page = await _page(ctx, req, marker, max_keys)
    return xml_response(
        "ListBucketResult",
        [
            ("Name", _bucket(req)),
            ("Prefix", encode_key(prefix, enc)),
            ("Marker", encode_key(marker, enc)),
            ("MaxKeys", max_keys if "max-keys" not in q else q["max-keys"]),
            ("Delimiter", encode_key(delimiter, enc)) if delimiter else None,
            ("IsTruncated", page.is_truncated),
            # S3 returns NextMarker only when a delimiter was given; without
            # one, clients use the last key.
            ("NextMarker", encode_key(page.next_marker, enc))
            if page.is_truncated and delimiter and page.next_marker
            else None,
            ("EncodingType", enc) if enc else None,
            *_contents(ctx, page, enc, owner=True),
            *_prefixes(page, enc),
        ],
    )


def _encode_token(marker: str) -> str:
    return base64.urlsafe_b64encode(b"v1:" + marker.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token.encode())
        if not token or not raw.startswith(b"v1:"):
            raise ValueError
        return raw[3:].decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument(
            "The continuation token provided is incorrect", ArgumentName="continuation-token"
        ) from None


async def list_objects_v2(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    q = req.query
    enc = _encoding(req)
    max_keys = _max_keys(req)
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    token = q.get("continuation-token")
    start_after = q.get("start-after", "")
    page = await _page(ctx, req, _decode_token(token) if token is not None else start_after, max_keys)
    fetch_owner = q.get("fetch-owner", "false").lower() == "true"
    return xml_response(
        "ListBucketResult",
        [
            ("Name", _bucket(req)),
            ("Prefix", encode_key(prefix, enc)),
            ("MaxKeys", max_keys if "max-keys" not in q else q["max-keys"]),
            ("Delimiter", encode_key(delimiter, enc)) if delimiter else None,
            ("IsTruncated", page.is_truncated),
            ("ContinuationToken", token) if token is not None else None,
            ("NextContinuationToken", _encode_token(page.next_marker))
            if page.is_truncated and page.next_marker
            else None,
            ("StartAfter", encode_key(start_after, enc)) if start_after else None,
            ("KeyCount", len(page.objects) + len(page.common_prefixes)),
            ("EncodingType", enc) if enc else None,
            *_contents(ctx, page, enc, owner=fetch_owner),
            *_prefixes(page, enc),
        ],
    )


def _version(ctx: Ctx, v: VersionEntry, enc: str | None) -> Node:
    o = v.info
    head: list[Node | None] = [
        ("Key", encode_key(o.key, enc)),
        ("VersionId", o.version_id or "null"),
        ("IsLatest", v.is_latest),
        ("LastModified", iso8601(o.last_modified)),
    ]
    if o.delete_marker:
        return "DeleteMarker", [*head, ctx.object_owner(o)]
    return "Version", [*head, ("ETag", o.etag), ("Size", o.size), ctx.object_owner(o),
                       ("StorageClass", o.storage_class)]


async def list_object_versions(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    """Every version and delete marker, by key and newest first (a bucket
    that never had versioning: each object its one version, "null")."""
    q = req.query
    enc = _encoding(req)
    max_keys = _max_keys(req)
    prefix, delimiter, marker = q.get("prefix", ""), q.get("delimiter", ""), q.get("key-marker", "")
    version_marker = q.get("version-id-marker", "")
    if version_marker and not marker:
        raise errors.InvalidArgument("A version-id marker cannot be specified without a key marker.",
                                     ArgumentName="version-id-marker", ArgumentValue=version_marker)
    page = await ctx.backend.list_versions(_bucket(req), prefix=prefix, delimiter=delimiter, key_marker=marker,
                                           version_id_marker=version_marker, max_keys=max(max_keys, 1))
    entries, prefixes = (page.entries, page.common_prefixes) if max_keys else ((), ())
    return xml_response(
        "ListVersionsResult",
        [
            ("Name", _bucket(req)),
            ("Prefix", encode_key(prefix, enc)),
            ("KeyMarker", encode_key(marker, enc)),
            ("VersionIdMarker", version_marker),
            ("MaxKeys", max_keys),
            ("Delimiter", encode_key(delimiter, enc)) if delimiter else None,
            ("IsTruncated", page.is_truncated and bool(max_keys)),
            ("NextKeyMarker", encode_key(page.next_key_marker, enc))
            if page.is_truncated and page.next_key_marker else None,
            ("NextVersionIdMarker", page.next_version_id_marker)
            if page.is_truncated and page.next_version_id_marker else None,
            ("EncodingType", enc) if enc else None,
            *[_version(ctx, v, enc) for v in entries],
            *[("CommonPrefixes", [("Prefix", encode_key(p, enc))]) for p in prefixes],
        ],
    )


DELETE = Op("s3:DeleteObject", permission="WRITE")
DELETE_VERSION = Op("s3:DeleteObjectVersion", permission="WRITE")


async def delete_objects(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    h = req.headers
    if "Content-MD5" not in h and not any(n.lower().startswith("x-amz-checksum-") for n in h) and (
        "x-amz-sdk-checksum-algorithm" not in h and "x-amz-trailer" not in h
    ):
        # S3 requires an integrity check on this (destructive) request.
        raise errors.InvalidRequest("Missing required header for this request: Content-MD5")
    root = parse(await read_body(ctx, req))
    if root.tag != "Delete":
        raise errors.MalformedXML()
    quiet = (child_text(root, "Quiet") or "false").strip().lower() == "true"
    objects = root.findall("Object")
    if not objects or len(objects) > 1000:
        raise errors.MalformedXML()
    bucket = _bucket(req)
    await ctx.backend.head_bucket(bucket)
    results: list[Node] = []
    for obj in objects:
        key = child_text(obj, "Key")
        version = child_text(obj, "VersionId")
        if key is None:
            raise errors.MalformedXML()
        try:
            check_key(key)
            # Each key is decided on its own, as S3 does: a policy may
            # allow or deny some keys of the bucket and not others.
            decide_request(ctx.config, ctx.backend, req, ctx.auth, DELETE_VERSION if version else DELETE, key)
            if version == "":
                raise errors.InvalidArgument("Version id cannot be the empty string", ArgumentName="versionId")
            done = await ctx.backend.delete_object(bucket, key, version_id=version)
        except errors.S3Error as e:
            results.append(("Error", [("Key", key), ("VersionId", version) if version else None, ("Code", e.code),
                                      ("Message", e.text)]))
            continue
        if not quiet:
            results.append(("Deleted", [
                ("Key", key),
                ("VersionId", version) if version else None,
                ("DeleteMarker", True) if done.delete_marker else None,
                ("DeleteMarkerVersionId", done.version_id) if done.delete_marker and done.version_id else None,
            ]))
    return xml_response("DeleteResult", results)


async def list_multipart_uploads(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    q = req.query
    enc = _encoding(req)
    max_uploads = _max_keys(req, "max-uploads")
    prefix = q.get("prefix", "")
    delimiter = q.get("delimiter", "")
    key_marker = q.get("key-marker", "")
    upload_id_marker = q.get("upload-id-marker", "") if key_marker else ""
    uploads, truncated = await ctx.backend.list_uploads(
        _bucket(req), prefix=prefix, key_marker=key_marker, upload_id_marker=upload_id_marker,
        max_uploads=max_uploads,
    )
    prefixes: list[str] = []
    listed = []
    for u in uploads:
        if delimiter:
            idx = u.key.find(delimiter, len(prefix))
            if idx >= 0:
                cp = u.key[: idx + len(delimiter)]
                if cp not in prefixes:
                    prefixes.append(cp)
                continue
        listed.append(u)
    last = uploads[-1] if uploads else None
    return xml_response(
        "ListMultipartUploadsResult",
        [
            ("Bucket", _bucket(req)),
            ("KeyMarker", encode_key(key_marker, enc)),
            ("UploadIdMarker", upload_id_marker),
            ("NextKeyMarker", encode_key(last.key, enc) if truncated and last else ""),
            ("NextUploadIdMarker", last.upload_id if truncated and last else ""),
            ("Delimiter", encode_key(delimiter, enc)) if delimiter else None,
            ("Prefix", encode_key(prefix, enc)),
            ("MaxUploads", max_uploads),
            ("IsTruncated", truncated),
            ("EncodingType", enc) if enc else None,
            *[
                (
                    "Upload",
                    [
                        ("Key", encode_key(u.key, enc)),
                        ("UploadId", u.upload_id),
                        ctx.bucket_owner("Initiator"),
                        ctx.bucket_owner(),
                        ("StorageClass", "STANDARD"),
                        ("Initiated", iso8601(u.initiated)),
                        ("ChecksumAlgorithm", u.meta.checksum_algorithm) if u.meta.checksum_algorithm else None,
                    ],
                )
                for u in listed
            ],
            *[("CommonPrefixes", [("Prefix", encode_key(p, enc))]) for p in prefixes],
        ],
    )


async def get_bucket_cors(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    document = await ctx.backend.get_bucket_cors(_bucket(req))
    return web.Response(body=document, content_type="application/xml")


async def put_bucket_cors(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    rules = cors.parse_configuration(await read_body(ctx, req, limit=256 * 1024))
    await ctx.backend.put_bucket_cors(_bucket(req), cors.render(rules))
    if ctx.cors is not None:
        ctx.cors.forget(_bucket(req))
    return web.Response(status=200)


async def delete_bucket_cors(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    await ctx.backend.put_bucket_cors(_bucket(req), None)
    if ctx.cors is not None:
        ctx.cors.forget(_bucket(req))
    return web.Response(status=204)


async def get_bucket_tagging(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    return tagging_response(await ctx.backend.get_bucket_tags(_bucket(req)))


async def put_bucket_tagging(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    tags = await read_tagging(ctx, req, bucket=True)
    await ctx.backend.put_bucket_tags(_bucket(req), tags)
    return web.Response(status=204)


async def delete_bucket_tagging(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    await ctx.backend.put_bucket_tags(_bucket(req), {})
    return web.Response(status=204)


def not_configured(error: type[errors.S3Error]) -> object:
    """GET of a bucket sub-resource we never store (policy, CORS, lifecycle,
    encryption, tagging): S3 answers "no such configuration", which tools
    like the AWS CLI and Terraform handle gracefully."""

    async def handler(ctx: Ctx, req: S3Request) -> web.StreamResponse:
        await ctx.backend.head_bucket(_bucket(req))
        raise error(BucketName=_bucket(req))

    return handler

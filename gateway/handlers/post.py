"""Browser POST uploads: an HTML form with a signed policy (AWS "Browser-
Based Uploads Using POST").

The form is read as a stream: fields before the ``file`` part are collected
(bounded in size), the policy's signature and conditions are checked, and
only then does the file part stream into the backend, its size checked
against the policy's content-length-range as it goes. Fields after the file
are ignored, as S3 does.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from nearstore.gateway import errors
from nearstore.gateway.access import Op, decide, requester
from nearstore.gateway.auth import PostPolicy, authenticate_post
from nearstore.gateway.handlers.common import (
    MAX_USER_META,
    STORED_HEADERS,
    Ctx,
    check_unsupported_headers,
    xml_response,
)
from nearstore.gateway.handlers.object import version_header
from nearstore.gateway.request import S3Request, check_key
from nearstore.metadata.backing import ObjectMeta

# Everything before the file part, field names and each part's headers
# included, is read before the signature can be checked: bounded in bytes
# and in count. A legitimate form has a dozen fields and a few x-amz-meta-*.
MAX_FIELDS_BYTES = 64 * 1024
MAX_FIELDS = 100
READ_SIZE = 256 * 1024


class FormFile:
    """The file part as an ``UploadBody``, size-checked against the policy."""

    def __init__(self, part: BodyPartReader, policy: PostPolicy, fields: dict[str, str], bucket: str) -> None:
        self._part = part
        self._policy = policy
        self._fields = fields
        self._bucket = bucket
        self._md5 = hashlib.md5()
        self._size = 0
        limits = policy.content_length_range
        self._max = limits[1] if limits else None

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        while True:
            data = await self._part.read_chunk(READ_SIZE)
            if not data:
                break
            self._size += len(data)
            if self._max is not None and self._size > self._max:
                # Stop early: the policy can never be met.
                self._policy.check(self._fields, bucket=self._bucket, content_length=self._size)
            self._md5.update(data)
            yield data
        self._policy.check(self._fields, bucket=self._bucket, content_length=self._size)

    @property
    def declared_size(self) -> int | None:
        return None  # the form's length includes the other fields

    @property
    def size(self) -> int:
        return self._size

    @property
    def md5_hex(self) -> str:
        return self._md5.hexdigest()

    @property
    def checksum(self) -> tuple[str, str] | None:
        return None


def _part_overhead(part: BodyPartReader) -> int:
    # The part's header lines as sent, with their separators and the
    # boundary line before them.
    return 64 + sum(len(k) + len(v) + 4 for k, v in part.headers.items())


async def read_fields(reader: MultipartReader) -> tuple[dict[str, str], BodyPartReader]:
    """The form's fields before the file part, by lower-cased name, and the
    file part. A name that repeats in any case is refused: the policy, the
    signature and the write must all read the same value."""
    fields: dict[str, str] = {}
    budget = MAX_FIELDS_BYTES
    while True:
        try:
            part = await reader.next()
        except (ValueError, HttpProcessingError):
            # A part header over its bounds (8 KiB a line, 100 lines) or
            # garbage where a part should be.
            raise errors.MalformedPOSTRequest() from None
        if part is None:
            raise errors.InvalidArgument(
                "POST requires exactly one file upload per request.", ArgumentName="file", ArgumentValue="0"
            )
        if not isinstance(part, BodyPartReader):
            raise errors.MalformedPOSTRequest()
        name = (part.name or "").lower()
        if name == "file":
            return fields, part
        budget -= _part_overhead(part)
        if budget < 0 or len(fields) >= MAX_FIELDS:
            raise errors.MaxPostPreDataLengthExceededError()
        if name in fields:
            raise errors.InvalidArgument(
                f"POST form field {part.name!r} appears more than once.",
                ArgumentName=part.name or "", ArgumentValue="",
            )
        value = await _read_field(part, budget)
        budget -= len(value)
        fields[name] = value


async def _read_field(part: BodyPartReader, budget: int) -> str:
    out = bytearray()
    while True:
        try:
            data = await part.read_chunk(8192)
        except ValueError:
            # aiohttp's reader: the field does not end where its part's
            # Content-Length (or the boundary) says it does.
            raise errors.MalformedPOSTRequest() from None
        if not data:
            break
        out += data
        if len(out) > budget:
            raise errors.MaxPostPreDataLengthExceededError()
    return out.decode("utf-8", errors="replace")


def _meta(lower: dict[str, str]) -> ObjectMeta:
    user_meta = {k[len("x-amz-meta-"):]: v for k, v in lower.items() if k.startswith("x-amz-meta-")}
    if sum(len(k) + len(v) for k, v in user_meta.items()) > MAX_USER_META:
        raise errors.MetadataTooLarge()
    headers = {n: lower[n] for n in STORED_HEADERS if n in lower}
    return ObjectMeta(content_type=lower.get("content-type"), headers=headers, user_meta=user_meta)


WRITE = Op("s3:PutObject", permission="WRITE")


async def post_object(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    assert req.bucket is not None
    bucket = req.bucket
    check_unsupported_headers(req)
    try:
        reader = await req.body().multipart()
    except (ValueError, AssertionError, KeyError, HttpProcessingError):
        raise errors.MalformedPOSTRequest() from None
    # One case-folded view of the form, read by the signature, the policy
    # and the write alike.
    lower, part = await read_fields(reader)
    auth, policy = authenticate_post(lower, ctx.config.credentials)
    user = requester(ctx.config, auth.access_key, auth.scheme == "anonymous")
    ctx = dataclasses.replace(ctx, auth=auth, access=decide(ctx.config, ctx.backend, user, bucket, None, WRITE))
    if "key" not in lower:
        raise errors.InvalidArgument(
            "Bucket POST must contain a field named 'key'.  If it is specified, please check the order of the fields.",
            ArgumentName="key", ArgumentValue="",
        )
    key = lower["key"].replace("${filename}", part.filename or "")
    if not key:
        raise errors.InvalidArgument("User key must have a length greater than 0.", ArgumentName="key")
    check_key(key)
    policy.check(lower, bucket=bucket, content_length=None)
    body = FormFile(part, policy, lower, bucket)
    # The form's "acl" field is the canned ACL, as x-amz-acl is elsewhere.
    acl_headers = {"x-amz-acl": lower["acl"]} if "acl" in lower else {}
    acl_headers.update({k: v for k, v in lower.items() if k.startswith("x-amz-grant-")})
    meta = dataclasses.replace(_meta(lower), acl=ctx.new_acl(acl_headers, bucket))
    info = await ctx.backend.put_object(bucket, key, body, meta)

    redirect = lower.get("success_action_redirect") or lower.get("redirect")
    if redirect:
        parts = urlsplit(redirect)
        if parts.scheme in ("http", "https"):
            query = urlencode({"bucket": bucket, "key": key, "etag": info.etag})
            location = urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))
            return web.Response(status=303, headers={"Location": location, "ETag": info.etag})
    status = lower.get("success_action_status", "204")
    location = f"/{bucket}/{key}"
    headers = {"ETag": info.etag, "Location": location, **version_header(info)}
    if status == "201":
        resp = xml_response(
            "PostResponse",
            [("Location", location), ("Bucket", bucket), ("Key", key), ("ETag", info.etag)],
            status=201,
        )
        resp.headers.update(headers)
        return resp
    return web.Response(status=200 if status == "200" else 204, headers=headers)

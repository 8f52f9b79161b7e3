"""The one dispatch: (method, target, sub-resource) -> S3 operation.

Sub-resources are the query parameters that select an operation
(``?uploads``, ``?tagging`` ...). A known S3 sub-resource we do not
implement answers NotImplemented; unknown query parameters are ignored, as
S3 does (newer SDKs add ``x-id=GetObject`` and the like).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from nearstore.gateway import errors
from nearstore.gateway.handlers import bucket as b
from nearstore.gateway.handlers import multipart as mp
from nearstore.gateway.handlers import object as o
from nearstore.gateway.handlers import post
from nearstore.gateway.handlers.common import Ctx
from nearstore.gateway.request import S3Request

Handler = Callable[[Ctx, S3Request], Awaitable[web.StreamResponse]]

S3_SUBRESOURCES = frozenset(
    """accelerate acl analytics attributes cors delete encryption intelligent-tiering inventory
    legal-hold lifecycle location logging metadataTable metrics notification object-lock
    ownershipControls partNumber policy policyStatus publicAccessBlock replication requestPayment
    restore retention select session tagging torrent uploadId uploads versioning versions website
    renameObject""".split()
)

_NOT_CONFIGURED: dict[str, Handler] = {
    "policy": b.not_configured(errors.NoSuchBucketPolicy),  # type: ignore[dict-item]
    "lifecycle": b.not_configured(errors.NoSuchLifecycleConfiguration),  # type: ignore[dict-item]
    "encryption": b.not_configured(errors.ServerSideEncryptionConfigurationNotFoundError),  # type: ignore[dict-item]
}

# Bucket operations, by (method, sub-resource); "" = none.
_BUCKET: dict[tuple[str, str], Handler] = {
    ("PUT", ""): b.create_bucket,
    ("HEAD", ""): b.head_bucket,
    ("DELETE", ""): b.delete_bucket,
    ("GET", ""): b.list_objects,
    ("GET", "location"): b.get_bucket_location,
    ("GET", "acl"): b.get_bucket_acl,
    ("GET", "versioning"): b.get_bucket_versioning,
    ("GET", "cors"): b.get_bucket_cors,
    ("PUT", "cors"): b.put_bucket_cors,
    ("DELETE", "cors"): b.delete_bucket_cors,
    ("GET", "tagging"): b.get_bucket_tagging,
    ("PUT", "tagging"): b.put_bucket_tagging,
    ("DELETE", "tagging"): b.delete_bucket_tagging,
    ("GET", "versions"): b.list_object_versions,
    ("GET", "uploads"): b.list_multipart_uploads,
    ("POST", "delete"): b.delete_objects,
    ("POST", ""): post.post_object,
    **{("GET", name): h for name, h in _NOT_CONFIGURED.items()},
}

# Object operations, by (method, sub-resource).
_OBJECT: dict[tuple[str, str], Handler] = {
    ("GET", ""): o.get_object,
    ("HEAD", ""): o.head_object,
    ("PUT", ""): o.put_object,
    ("DELETE", ""): o.delete_object,
    ("GET", "tagging"): o.get_object_tagging,
    ("PUT", "tagging"): o.put_object_tagging,
    ("DELETE", "tagging"): o.delete_object_tagging,
    ("GET", "acl"): o.get_object_acl,
    ("GET", "attributes"): o.get_object_attributes,
    ("POST", "uploads"): mp.create_multipart_upload,
    ("POST", "uploadId"): mp.complete_multipart_upload,
    ("PUT", "uploadId"): mp.upload_part,
    ("DELETE", "uploadId"): mp.abort_multipart_upload,
    ("GET", "uploadId"): mp.list_parts,
    # GET/HEAD ?partNumber=N read one part of the object.
    ("GET", "partNumber"): o.get_object,
    ("HEAD", "partNumber"): o.head_object,
}

_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})

# Operations on a bucket that decide access themselves (gateway.access):
# creating one (the name may be free, or another user's), and a browser
# POST (signed in its form, read by the handler).
SELF_AUTHORIZED: frozenset[Handler] = frozenset({b.create_bucket, post.post_object})


def _subresource(req: S3Request, table: dict[tuple[str, str], Handler]) -> str:
    found = [name for name in req.query if name in S3_SUBRESOURCES]
    if not found:
        return ""
    # uploadId wins over partNumber (UploadPart carries both); otherwise the
    # first sub-resource that names an operation for this method.
    if "uploadId" in found:
        return "uploadId"
    for name in found:
        if (req.method, name) in table:
            return name
    return found[0]


def resolve(req: S3Request) -> Handler:
    if req.method not in _METHODS:
        raise errors.MethodNotAllowed(Method=req.method, ResourceType="OBJECT" if req.key else "BUCKET")
    if req.bucket is None:
        if req.method == "GET":
            return b.list_buckets
        raise errors.MethodNotAllowed(Method=req.method, ResourceType="SERVICE")
    if req.key is None:
        sub = _subresource(req, _BUCKET)
        if sub == "" and req.method == "GET" and req.query.get("list-type") == "2":
            return b.list_objects_v2
        table, kind = _BUCKET, "BUCKET"
    else:
        sub = _subresource(req, _OBJECT)
        table, kind = _OBJECT, "OBJECT"
    handler = table.get((req.method, sub))
    if handler is not None:
        return handler
    if sub:
        raise errors.NotImplemented(
            f"The {sub} sub-resource is not implemented for {req.method} on a {kind.lower()}"
        )
    raise errors.MethodNotAllowed(Method=req.method, ResourceType=kind)

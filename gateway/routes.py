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
from nearstore.gateway.access import Op
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
    ("PUT", "acl"): b.put_bucket_acl,
    ("GET", "policy"): b.get_bucket_policy,
    ("PUT", "policy"): b.put_bucket_policy,
    ("DELETE", "policy"): b.delete_bucket_policy,
    ("GET", "policyStatus"): b.get_bucket_policy_status,
    ("GET", "publicAccessBlock"): b.get_public_access_block,
    ("PUT", "publicAccessBlock"): b.put_public_access_block,
    ("DELETE", "publicAccessBlock"): b.delete_public_access_block,
    ("GET", "versioning"): b.get_bucket_versioning,
    ("PUT", "versioning"): b.put_bucket_versioning,
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
    ("PUT", "acl"): o.put_object_acl,
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

# What each operation needs (gateway.access): its policy action, whether
# the object's ACL decides, and the ACL permission that grants it.
_READ, _WRITE = "READ", "WRITE"
OPERATIONS: dict[Handler, Op] = {
    b.head_bucket: Op("s3:ListBucket", permission=_READ),
    b.list_objects: Op("s3:ListBucket", permission=_READ),
    b.list_objects_v2: Op("s3:ListBucket", permission=_READ),
    b.list_object_versions: Op("s3:ListBucketVersions", permission=_READ),
    b.list_multipart_uploads: Op("s3:ListBucketMultipartUploads", permission=_READ),
    b.delete_bucket: Op("s3:DeleteBucket"),
    b.get_bucket_location: Op("s3:GetBucketLocation"),
    b.get_bucket_acl: Op("s3:GetBucketAcl", permission="READ_ACP"),
    b.put_bucket_acl: Op("s3:PutBucketAcl", permission="WRITE_ACP"),
    b.get_bucket_policy: Op("s3:GetBucketPolicy"),
    b.put_bucket_policy: Op("s3:PutBucketPolicy"),
    b.delete_bucket_policy: Op("s3:DeleteBucketPolicy"),
    b.get_bucket_policy_status: Op("s3:GetBucketPolicyStatus"),
    b.get_public_access_block: Op("s3:GetBucketPublicAccessBlock"),
    b.put_public_access_block: Op("s3:PutBucketPublicAccessBlock"),
    b.delete_public_access_block: Op("s3:PutBucketPublicAccessBlock"),
    b.get_bucket_versioning: Op("s3:GetBucketVersioning"),
    b.put_bucket_versioning: Op("s3:PutBucketVersioning"),
    b.get_bucket_cors: Op("s3:GetBucketCORS"),
    b.put_bucket_cors: Op("s3:PutBucketCORS"),
    b.delete_bucket_cors: Op("s3:PutBucketCORS"),
    b.get_bucket_tagging: Op("s3:GetBucketTagging"),
    b.put_bucket_tagging: Op("s3:PutBucketTagging"),
    b.delete_bucket_tagging: Op("s3:PutBucketTagging"),
    _NOT_CONFIGURED["lifecycle"]: Op("s3:GetLifecycleConfiguration"),
    _NOT_CONFIGURED["encryption"]: Op("s3:GetEncryptionConfiguration"),
    o.get_object: Op("s3:GetObject", on_object=True, permission=_READ),
    o.head_object: Op("s3:GetObject", on_object=True, permission=_READ),
    o.get_object_attributes: Op("s3:GetObjectAttributes", on_object=True, permission=_READ),
    o.get_object_tagging: Op("s3:GetObjectTagging", on_object=True, permission=_READ),
    o.put_object_tagging: Op("s3:PutObjectTagging", on_object=True, permission="FULL_CONTROL"),
    o.delete_object_tagging: Op("s3:DeleteObjectTagging", on_object=True, permission="FULL_CONTROL"),
    o.get_object_acl: Op("s3:GetObjectAcl", on_object=True, permission="READ_ACP"),
    o.put_object_acl: Op("s3:PutObjectAcl", on_object=True, permission="WRITE_ACP"),
    o.put_object: Op("s3:PutObject", permission=_WRITE),
    o.delete_object: Op("s3:DeleteObject", permission=_WRITE),
    mp.create_multipart_upload: Op("s3:PutObject", permission=_WRITE),
    mp.upload_part: Op("s3:PutObject", permission=_WRITE),
    mp.complete_multipart_upload: Op("s3:PutObject", permission=_WRITE),
    mp.abort_multipart_upload: Op("s3:AbortMultipartUpload", permission=_WRITE),
    mp.list_parts: Op("s3:ListMultipartUploadParts", permission=_WRITE),
    post.post_object: Op("s3:PutObject", permission=_WRITE),
}
OWNER_ONLY = Op("s3:Unlisted")


def operation(handler: Handler) -> Op:
    return OPERATIONS.get(handler, OWNER_ONLY)


_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})

# Operations on a bucket that decide access themselves (gateway.access):
# creating one (the name may be free, or another user's), a browser POST
# (signed in its form, read by the handler), and DeleteObjects (each key
# on its own).
SELF_AUTHORIZED: frozenset[Handler] = frozenset({b.create_bucket, post.post_object, b.delete_objects})


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

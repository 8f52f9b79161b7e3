"""Who may do what: the bucket owner, bucket policies, ACLs and Public
Access Block, decided before a byte is served.

Decided once per request, after the signature and before the operation
touches a store, by every front that serves S3 (aiohttp's, the hot path,
the short-circuit socket, browser POSTs, the source of a copy). So no
byte of another tenant's bucket is served, whether it would come from
the local store, the backing store or the chunk cache; peers are asked for
chunks only by a node that has already decided.

The order is AWS's: an explicit Deny of the bucket policy refuses; an Allow
grants (unless RestrictPublicBuckets and the policy is public, for anyone
but the owner); otherwise the bucket's ACL decides what it grants (READ:
list; WRITE: write and delete objects; READ_ACP, WRITE_ACP), for the owner
too (who always keeps READ_ACP and WRITE_ACP), with public grants ignored
under IgnorePublicAcls; the rest of the bucket is its owner's alone. Operations on an object are
decided against the object's ACL once it is open (``Access.check``), before
its first byte; ``Access.missing`` keeps a key's absence from those who may
not list the bucket, as S3 does.

Everything comes from ``Backend.bucket_access`` without a wait (the local
store's memo, dropped on any index write; the config's owner for buckets
that front a backing store) and policies are parsed once per text
(``policy.parsed``), so the owner's request with no policy is decided by a
dictionary lookup and a comparison. Ownership is recorded as a canonical
user id, "" for the node's first user (the keys of the environment and
``[[credentials]]``), so a node whose first key changes keeps its buckets.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from nearstore.gateway import acl, errors, policy
from nearstore.gateway.auth import AuthContext
from nearstore.gateway.config import Config, User
from nearstore.gateway.request import S3Request
from nearstore.gateway.xml import child_text, document, parse
from nearstore.metadata.backing import Backend, ObjectInfo


@dataclass(frozen=True)
class Op:
    """What an S3 operation needs: its policy action, whether it acts on an
    object (decided against the object's ACL) or the bucket, and the ACL
    permission that grants it (None: the owner's, or a policy's, alone)."""

    action: str
    on_object: bool = False
    permission: str | None = None


def recorded(cfg: Config, user: User) -> str:
    """``user`` as bucket ownership records it."""
    return "" if user.id == cfg.first_user.id else user.id


def owner_of(cfg: Config, backend: Backend, bucket: str) -> str:
    """The canonical id of ``bucket``'s owner; NoSuchBucket where the store
    knows there is none."""
    return backend.bucket_owner(bucket) or cfg.first_user.id


def requester(cfg: Config, access_key: str, anonymous: bool) -> User | None:
    """The user of an authenticated key; None for an anonymous request.
    A key no user holds cannot get here authenticated, but a slip elsewhere
    must fail closed."""
    if anonymous:
        return None
    try:
        return cfg.user_of(access_key)
    except KeyError:
        raise errors.AccessDenied() from None


@dataclass(frozen=True)
class PublicAccessBlock:
    block_public_acls: bool = False
    ignore_public_acls: bool = False
    block_public_policy: bool = False
    restrict_public_buckets: bool = False

    FIELDS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")

    @classmethod
    def from_json(cls, text: str | None) -> PublicAccessBlock:
        return _NO_BLOCK if text is None else cls(*json.loads(text))

    def to_json(self) -> str:
        return json.dumps(self.flags)

    @property
    def flags(self) -> list[bool]:
        return [self.block_public_acls, self.ignore_public_acls, self.block_public_policy,
                self.restrict_public_buckets]

    @classmethod
    def from_document(cls, body: bytes) -> PublicAccessBlock:
        root = parse(body)
        if root.tag != "PublicAccessBlockConfiguration":
            raise errors.MalformedXML()
        values = []
        for name in cls.FIELDS:
            text = (child_text(root, name) or "false").strip().lower()
            if text not in ("true", "false"):
                raise errors.MalformedXML()
            values.append(text == "true")
        return cls(*values)

    def document(self) -> bytes:
        return document("PublicAccessBlockConfiguration", list(zip(self.FIELDS, self.flags, strict=True)))


_NO_BLOCK = PublicAccessBlock()


@dataclass
class Access:
    """One request's decision. ``settled``: allowed whatever the object;
    otherwise ``check`` decides against the object's ACL."""

    requester: str | None  # canonical id; None anonymous
    owner: str  # the bucket owner's canonical id
    settled: bool
    permission: str | None = None
    ignore_public: bool = False
    may_list: Callable[[], bool] | None = None

    def check(self, info: ObjectInfo) -> None:
        """AccessDenied unless the requester may do the operation to this
        object (its ACL; none recorded: the bucket owner's, private)."""
        if self.settled or (info.acl is None and self.requester == self.owner):
            return
        if self.permission is None or not acl.of(info.acl, self.owner).allows(
                self.requester, self.permission, ignore_public=self.ignore_public):
            raise errors.AccessDenied()

    def missing(self, err: errors.S3Error) -> errors.S3Error:
        """What to answer for an object that is not there: S3 says so only
        to whom may list the bucket (AccessDenied to the rest)."""
        if self.requester == self.owner or (self.may_list is not None and self.may_list()):
            return err
        return errors.AccessDenied()


def context(**values: str | None) -> dict[str, list[str]]:
    """A policy's request context (policy.Context) from the values a front
    knows; None values are left out (the key is absent)."""
    now = time.time()
    ctx = {"aws:currenttime": [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))],
           "aws:epochtime": [str(int(now))]}
    for k, v in values.items():
        if v is not None:
            ctx[k.lower()] = [v]
    return ctx


def authorize_owner(cfg: Config, backend: Backend, auth: AuthContext, bucket: str) -> None:
    """AccessDenied unless the request is signed by the bucket's owner (the
    node's own routes on a bucket: warm)."""
    user = requester(cfg, auth.access_key, auth.scheme == "anonymous")
    if user is None or owner_of(cfg, backend, bucket) != user.id:
        raise errors.AccessDenied()


# s3:signatureversion and s3:authType of each way of signing.
_SCHEMES = {
    "v4": ("AWS4-HMAC-SHA256", "REST-HEADER"), "v4-query": ("AWS4-HMAC-SHA256", "REST-QUERY-STRING"),
    "post-v4": ("AWS4-HMAC-SHA256", "POST"), "v2": ("AWS", "REST-HEADER"), "v2-query": ("AWS", "REST-QUERY-STRING"),
    "post-v2": ("AWS", "POST"),
}


def request_context(req: S3Request, auth: AuthContext, user: User | None) -> dict[str, list[str]]:
    """The condition keys a request supplies to a bucket policy."""
    h, q = req.headers, req.query
    http = req.http
    signature, auth_type = _SCHEMES.get(auth.scheme, (None, None))
    ctx = context(**{
        "aws:SourceIp": http.remote if http is not None else None,
        "aws:SecureTransport": ("true" if http.secure else "false") if http is not None else None,
        "aws:UserAgent": h.get("User-Agent"),
        "aws:Referer": h.get("Referer"),
        "aws:username": user.name if user is not None else None,
        "aws:userid": user.id if user is not None else None,
        "aws:PrincipalType": "User" if user is not None else "Anonymous",
        "s3:prefix": q.get("prefix"),
        "s3:delimiter": q.get("delimiter"),
        "s3:max-keys": q.get("max-keys"),
        "s3:x-amz-acl": h.get("x-amz-acl"),
        "s3:x-amz-content-sha256": h.get("x-amz-content-sha256"),
        "s3:x-amz-copy-source": h.get("x-amz-copy-source"),
        "s3:x-amz-server-side-encryption": h.get("x-amz-server-side-encryption"),
        "s3:x-amz-storage-class": h.get("x-amz-storage-class"),
        "s3:VersionId": q.get("versionId"),
        "s3:signatureversion": signature,
        "s3:authType": auth_type,
        "s3:x-amz-metadata-directive": h.get("x-amz-metadata-directive"),
        **{f"s3:{name}": h.get(name) for name in acl.GRANT_HEADERS},
    })
    tags = parse_qsl(h.get("x-amz-tagging") or "", keep_blank_values=True)
    for k, v in tags:
        ctx[f"s3:requestobjecttag/{k.lower()}"] = [v]
    if tags:
        ctx["s3:requestobjecttagkeys"] = [k for k, _ in tags]
    return ctx


# The policy action of an operation on a version named by id (S3's names).
_OF_A_VERSION = {
    "s3:GetObject": "s3:GetObjectVersion",
    "s3:DeleteObject": "s3:DeleteObjectVersion",
    "s3:GetObjectAcl": "s3:GetObjectVersionAcl",
    "s3:PutObjectAcl": "s3:PutObjectVersionAcl",
    "s3:GetObjectTagging": "s3:GetObjectVersionTagging",
    "s3:PutObjectTagging": "s3:PutObjectVersionTagging",
    "s3:DeleteObjectTagging": "s3:DeleteObjectVersionTagging",
    "s3:GetObjectAttributes": "s3:GetObjectVersionAttributes",
}


def decide_request(cfg: Config, backend: Backend, req: S3Request, auth: AuthContext, op: Op,
                   key: str | None = None) -> Access:
    """``decide`` for an S3 request on a bucket (on ``key`` of it, where the
    request names several: DeleteObjects)."""
    assert req.bucket is not None
    user = requester(cfg, auth.access_key, auth.scheme == "anonymous")
    if "versionId" in req.query and op.action in _OF_A_VERSION:
        op = dataclasses.replace(op, action=_OF_A_VERSION[op.action])
    return decide(cfg, backend, user, req.bucket, key if key is not None else req.key, op,
                  lambda: request_context(req, auth, user))


def decide(
    cfg: Config,
    backend: Backend,
    user: User | None,
    bucket: str,
    key: str | None,
    op: Op,
    request_context: Callable[[], dict[str, list[str]]] = context,
) -> Access:
    """Whether ``user`` (None: anonymous) may do ``op`` to ``bucket``
    (``key``): an Access, or AccessDenied. NoSuchBucket where the bucket
    does not exist, for everyone."""
    ba = backend.bucket_access(bucket)
    owner = ba.owner or cfg.first_user.id
    me = user.id if user is not None else None
    if ba.policy is None and ba.public_access_block is None and ba.acl is None:
        # The common case: only the owner, and grants on objects.
        if me == owner and not op.on_object:
            return Access(me, owner, True)
        if not op.on_object:
            raise errors.AccessDenied()
        return Access(me, owner, False, op.permission)

    def may_list() -> bool:
        try:
            decide(cfg, backend, user, bucket, None, LIST, request_context)
        except errors.AccessDenied:
            return False
        return True

    block = PublicAccessBlock.from_json(ba.public_access_block)
    if ba.policy is not None and not (me == owner and op.action in _OWNERS_ALWAYS):
        pol = policy.parsed(ba.policy, bucket)
        resource = policy.ARN_PREFIX + bucket + (f"/{key}" if key is not None else "")
        who = policy.Principal(me, user.name if user is not None else "")
        verdict = pol.evaluate(who, op.action, resource, request_context())
        if verdict == "Deny":
            raise errors.AccessDenied()
        if verdict == "Allow" and not (block.restrict_public_buckets and pol.public and me != owner):
            return Access(me, owner, True, may_list=may_list)
    bucket_acl = acl.of(ba.acl, owner)
    ignore = block.ignore_public_acls
    if op.on_object:
        return Access(me, owner, False, op.permission, ignore, may_list)
    # What an ACL grants, it grants the owner too, who may therefore take it
    # away (S3: an owner whose ACL lost WRITE cannot write until it puts one
    # back); what no ACL grants is the owner's alone.
    if (me == owner and op.permission is None) or (
            op.permission is not None and bucket_acl.allows(me, op.permission, ignore_public=ignore)):
        return Access(me, owner, True)
    raise errors.AccessDenied()


LIST = Op("s3:ListBucket", permission="READ")  # who may hear that a key is missing

# What the bucket's owner may always do, whatever its policy says (AWS
# keeps the account's root from locking itself out the same way).
_OWNERS_ALWAYS = frozenset({"s3:GetBucketPolicy", "s3:PutBucketPolicy", "s3:DeleteBucketPolicy"})


def block_of(backend: Backend, bucket: str) -> PublicAccessBlock:
    return PublicAccessBlock.from_json(backend.bucket_access(bucket).public_access_block)


def check_new_acl(backend: Backend, bucket: str, new: acl.Acl | None) -> None:
    """BlockPublicAcls: a public ACL may not be set on the bucket or its
    objects."""
    if new is not None and new.public and block_of(backend, bucket).block_public_acls:
        raise errors.AccessDenied()

"""What every handler shares: the per-request context, XML responses,
reading small request bodies, and object metadata from headers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from aiohttp import web

from nearstore.gateway import acl, errors
from nearstore.gateway.access import Access, check_new_acl
from nearstore.gateway.auth import AuthContext
from nearstore.gateway.config import Config, User
from nearstore.gateway.cors import Rules
from nearstore.gateway.payload import Payload
from nearstore.gateway.request import S3Request
from nearstore.gateway.xml import Node, document
from nearstore.metadata.backing import Backend, ObjectInfo, ObjectMeta

# Standard headers S3 stores with an object and returns on GET/HEAD.
STORED_HEADERS = (
    "content-encoding",
    "content-disposition",
    "cache-control",
    "content-language",
    "expires",
    "x-amz-website-redirect-location",
)
MAX_USER_META = 2048  # bytes of x-amz-meta-* names and values (AWS limit)
STORAGE_CLASSES = {
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
    "GLACIER", "DEEP_ARCHIVE", "OUTPOSTS", "GLACIER_IR", "SNOW", "EXPRESS_ONEZONE",
}


@dataclass(frozen=True)
class Ctx:
    backend: Backend
    config: Config
    auth: AuthContext
    # The node's memo of buckets' CORS rules, told of changes made here.
    cors: Rules | None = None
    # The request's access decision (gateway.access): set for every request
    # on a bucket, before its handler runs.
    access: Access | None = None

    @property
    def user(self) -> User:
        """Who signed the request; AccessDenied for an anonymous one (what
        only a signed requester may do)."""
        try:
            return self.config.user_of(self.auth.access_key)
        except KeyError:
            raise errors.AccessDenied() from None

    @property
    def decided(self) -> Access:
        assert self.access is not None, "a bucket request is decided before its handler runs"
        return self.access

    def owner(self, tag: str = "Owner") -> Node:
        """The requester as an Owner element (ListBuckets)."""
        return self.person(self.user.id, tag)

    def bucket_owner(self, tag: str = "Owner") -> Node:
        """The bucket's owner as an Owner (or Initiator) element."""
        return self.person(self.decided.owner, tag)

    def object_owner(self, info: ObjectInfo) -> Node:
        """Who owns an object: its writer, as its ACL records it."""
        owner = self.decided.owner
        return self.person(owner if info.acl is None else acl.Acl.from_json(info.acl).owner)

    def person(self, user_id: str, tag: str = "Owner") -> Node:
        user = self.config.user_by_id(user_id)
        return (tag, [("ID", user_id), ("DisplayName", user.display_name if user is not None else user_id)])

    @property
    def requester_id(self) -> str:
        """The canonical id of who sent the request, as an owner of what it
        writes (S3's id for anonymous writers)."""
        return self.decided.requester or acl.ANONYMOUS_ID

    def new_acl(self, headers: Mapping[str, str], bucket: str) -> str | None:
        """The ACL a write asks for with ``x-amz-acl`` / ``x-amz-grant-*``,
        as the store records it (None: private, the bucket owner's). Public
        ones are refused under BlockPublicAcls."""
        owner = self.decided.owner
        asked = acl.from_headers(self.config, headers, self.requester_id, owner)
        check_new_acl(self.backend, bucket, asked)
        if asked is None:
            asked = acl.private(self.requester_id)
        return acl.recorded(asked, owner)


def xml_response(root: str, children: Iterable[Node | None], status: int = 200) -> web.Response:
    return web.Response(body=document(root, children), status=status, content_type="application/xml")


def payload(ctx: Ctx, req: S3Request) -> Payload:
    return Payload(req.body().content, req.headers, ctx.auth)


async def read_body(ctx: Ctx, req: S3Request, limit: int = 2 * 1024 * 1024, *,
                    object_checksum: bool = False) -> bytes:
    """A small request body (XML), verified like any upload; none at all
    when the request has neither Content-Length nor chunked framing. With
    ``object_checksum`` the x-amz-checksum-* headers describe the object the
    request makes (CompleteMultipartUpload), not this body: not checked here."""
    headers: Mapping[str, str] = req.headers
    if object_checksum:
        headers = {k: v for k, v in req.headers.items() if not k.lower().startswith("x-amz-checksum-")}
    body = Payload(req.body().content, headers, ctx.auth, unsized_is_empty=True)
    out = bytearray()
    async for chunk in body.chunks():
        out += chunk
        if len(out) > limit:
            raise errors.MalformedXML()
    return bytes(out)


def require_key(req: S3Request) -> str:
    assert req.key is not None
    return req.key


def encode_key(value: str, encoding: str | None) -> str:
    return quote(value, safe="/") if encoding == "url" else value


def parse_tagging_header(value: str | None) -> dict[str, str]:
    if not value:
        return {}
    tags = dict(parse_qsl(value, keep_blank_values=True))
    validate_tags(tags)
    return tags


def validate_tags(tags: Mapping[str, str], *, bucket: bool = False) -> None:
    if bucket and len(tags) > 50:
        raise errors.InvalidTag("Bucket tag count cannot be greater than 50")
    if not bucket and len(tags) > 10:
        raise errors.InvalidTag("Object tags cannot be greater than 10")
    for k, v in tags.items():
        if not k or len(k) > 128:
            raise errors.InvalidTag("The TagKey you have provided is invalid")
        if len(v) > 256:
            raise errors.InvalidTag("The TagValue you have provided is too long")
        if k.startswith("aws:"):
            raise errors.InvalidTag("Your TagKey cannot be prefixed with aws:")


def meta_from_headers(req: S3Request, *, with_tags: bool = True) -> ObjectMeta:
    h = req.headers
    user_meta: dict[str, str] = {}
    size = 0
    for name, value in h.items():
        lname = name.lower()
        if lname.startswith("x-amz-meta-"):
            short = lname[len("x-amz-meta-"):]
            if short in user_meta:
                # S3 joins repeated metadata headers with commas.
                user_meta[short] += "," + value
            else:
                user_meta[short] = value
            size += len(short.encode()) + len(value.encode())
    if size > MAX_USER_META:
        raise errors.MetadataTooLarge(Size=str(size), MaxSizeAllowed=str(MAX_USER_META))
    headers = {n: h[n] for n in STORED_HEADERS if n in h}
    storage_class = h.get("x-amz-storage-class")
    if storage_class is not None and storage_class not in STORAGE_CLASSES:
        raise errors.InvalidStorageClass(StorageClassRequested=storage_class)
    check_unsupported_headers(req)
    content_type = h.get("Content-Type") or None
    tags = parse_tagging_header(h.get("x-amz-tagging")) if with_tags else {}
    return ObjectMeta(content_type=content_type, headers=headers, user_meta=user_meta, tags=tags)


def check_unsupported_headers(req: S3Request) -> None:
    """Features we do not implement must be refused, not silently ignored:
    a client that asked for encryption or object lock must not believe it
    got it."""
    h = req.headers
    sse = h.get("x-amz-server-side-encryption")
    if sse is not None or "x-amz-server-side-encryption-customer-algorithm" in h:
        raise errors.NotImplemented("Server-side encryption is not implemented", Header="x-amz-server-side-encryption")
    for name in ("x-amz-object-lock-mode", "x-amz-object-lock-retain-until-date", "x-amz-object-lock-legal-hold"):
        if name in h:
            raise errors.NotImplemented("Object Lock is not implemented", Header=name)


def user_meta_headers(meta: Mapping[str, str]) -> dict[str, str]:
    return {f"x-amz-meta-{k}": v for k, v in meta.items()}

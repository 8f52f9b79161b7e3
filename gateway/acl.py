"""Access control lists of buckets and objects, as S3 has them.

An ACL is an owner and up to 100 grants; a grant gives one permission
(READ, WRITE, READ_ACP, WRITE_ACP, FULL_CONTROL) to a canonical user or to
a group (everyone, or every signed request). A client sets one with a
canned name (``x-amz-acl``), with ``x-amz-grant-*`` headers, or with an
AccessControlPolicy document (``?acl``); they are read back exactly as set.

Recorded as compact JSON (``Acl.to_json``) in the store's index, next to
what it governs; ``None`` stands for the commonest ACL, "private, owned by
the bucket's owner", so that the owner's requests are decided without
reading one (``gateway.access``).

Where AWS's answer is not obvious: email grantees answer
UnresolvableGrantByEmailAddress (no user here has an address on record),
an unknown canonical id InvalidArgument, as S3 does; the resource's owner
always holds READ_ACP and WRITE_ACP (S3's rule), whatever the grants say.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from nearstore.gateway import errors
from nearstore.gateway.config import Config
from nearstore.gateway.xml import Node, document, parse

ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
AUTHENTICATED_USERS = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"
LOG_DELIVERY = "http://acs.amazonaws.com/groups/s3/LogDelivery"
GROUPS = frozenset({ALL_USERS, AUTHENTICATED_USERS, LOG_DELIVERY})
PUBLIC_GROUPS = frozenset({ALL_USERS, AUTHENTICATED_USERS})

PERMISSIONS = ("FULL_CONTROL", "WRITE", "WRITE_ACP", "READ", "READ_ACP")
MAX_GRANTS = 100

# The canonical id S3 records as the owner of what an anonymous request
# writes (into a bucket whose ACL lets everyone write).
ANONYMOUS_ID = "65a011a29cdf8ec533ec3d1ccaae921c"

GRANT_HEADERS = {
    "x-amz-grant-read": "READ",
    "x-amz-grant-write": "WRITE",
    "x-amz-grant-read-acp": "READ_ACP",
    "x-amz-grant-write-acp": "WRITE_ACP",
    "x-amz-grant-full-control": "FULL_CONTROL",
}

_XSI = 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'


@dataclass(frozen=True)
class Grant:
    kind: str  # "CanonicalUser" | "Group"
    grantee: str  # a canonical id, or a group's URI
    permission: str

    def matches(self, requester: str | None, ignore_public: bool) -> bool:
        if self.kind == "CanonicalUser":
            # Anonymous requests are S3's anonymous user (who owns what
            # they write).
            return self.grantee == (requester if requester is not None else ANONYMOUS_ID)
        if self.grantee == ALL_USERS:
            return not ignore_public
        if self.grantee == AUTHENTICATED_USERS:
            return requester is not None and not ignore_public
        return False


@dataclass(frozen=True)
class Acl:
    owner: str
    grants: tuple[Grant, ...]

    def allows(self, requester: str | None, permission: str, *, ignore_public: bool = False) -> bool:
        if (requester or ANONYMOUS_ID) == self.owner and permission in ("READ_ACP", "WRITE_ACP"):
            return True
        return any(
            g.permission in (permission, "FULL_CONTROL") and g.matches(requester, ignore_public) for g in self.grants
        )

    @property
    def public(self) -> bool:
        """Grants anything to everyone or to every signed request (what
        Public Access Block's BlockPublicAcls refuses)."""
        return any(g.kind == "Group" and g.grantee in PUBLIC_GROUPS for g in self.grants)

    def to_json(self) -> str:
        return json.dumps([self.owner, [[g.kind, g.grantee, g.permission] for g in self.grants]],
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Acl:
        owner, grants = json.loads(text)
        return cls(owner, tuple(Grant(*g) for g in grants))

    def render(self, cfg: Config) -> bytes:
        """The AccessControlPolicy document GetBucketAcl / GetObjectAcl answer."""
        def name(user_id: str) -> str:
            user = cfg.user_by_id(user_id)
            return user.display_name if user is not None else user_id

        def grantee(g: Grant) -> Node:
            if g.kind == "Group":
                return (f'Grantee {_XSI} xsi:type="Group"', [("URI", g.grantee)])
            return (f'Grantee {_XSI} xsi:type="CanonicalUser"', [("ID", g.grantee), ("DisplayName", name(g.grantee))])

        return document("AccessControlPolicy", [
            ("Owner", [("ID", self.owner), ("DisplayName", name(self.owner))]),
            ("AccessControlList", [("Grant", [grantee(g), ("Permission", g.permission)]) for g in self.grants]),
        ])


def private(owner: str) -> Acl:
    return Acl(owner, (Grant("CanonicalUser", owner, "FULL_CONTROL"),))


def canned(name: str, owner: str, bucket_owner: str) -> Acl:
    """The ACL a canned name stands for; InvalidArgument for an unknown one."""
    base = [Grant("CanonicalUser", owner, "FULL_CONTROL")]
    extra: list[Grant]
    if name in ("private", "aws-exec-read"):
        # aws-exec-read's second grant is to an AWS service account, which
        # has no user here: the owner alone remains.
        extra = []
    elif name == "public-read":
        extra = [Grant("Group", ALL_USERS, "READ")]
    elif name == "public-read-write":
        extra = [Grant("Group", ALL_USERS, "READ"), Grant("Group", ALL_USERS, "WRITE")]
    elif name == "authenticated-read":
        extra = [Grant("Group", AUTHENTICATED_USERS, "READ")]
    elif name in ("bucket-owner-read", "bucket-owner-full-control"):
        perm = "READ" if name == "bucket-owner-read" else "FULL_CONTROL"
        extra = [] if bucket_owner == owner else [Grant("CanonicalUser", bucket_owner, perm)]
    elif name == "log-delivery-write":
        extra = [Grant("Group", LOG_DELIVERY, "WRITE"), Grant("Group", LOG_DELIVERY, "READ_ACP")]
    else:
        raise errors.InvalidArgument(None, ArgumentName="x-amz-acl", ArgumentValue=name)
    return Acl(owner, tuple(base + extra))


_GRANTEE = re.compile(r'\s*(id|uri|emailAddress)\s*=\s*"([^"]*)"\s*(?:,|$)', re.IGNORECASE)


def _grantee(cfg: Config, kind: str, value: str, argument: str) -> tuple[str, str]:
    """(kind, grantee) of a grantee as a client names one; S3's errors for
    those that name nobody here."""
    kind = kind.lower()
    if kind == "emailaddress":
        raise errors.UnresolvableGrantByEmailAddress(EmailAddress=value)
    if kind == "uri":
        if value not in GROUPS:
            raise errors.InvalidArgument("Invalid group uri", ArgumentName=argument, ArgumentValue=value)
        return "Group", value
    if cfg.user_by_id(value) is None and value != ANONYMOUS_ID:
        raise errors.InvalidArgument("Invalid id", ArgumentName=argument, ArgumentValue=value)
    return "CanonicalUser", value


def _header_grants(cfg: Config, headers: Mapping[str, str]) -> list[Grant]:
    grants: list[Grant] = []
    for header, permission in GRANT_HEADERS.items():
        value = headers.get(header)
        if value is None:
            continue
        pos = 0
        value = value.strip()
        while pos < len(value):
            m = _GRANTEE.match(value, pos)
            if m is None:
                raise errors.InvalidArgument(None, ArgumentName=header, ArgumentValue=value)
            kind, grantee = _grantee(cfg, m.group(1), m.group(2), header)
            grants.append(Grant(kind, grantee, permission))
            pos = m.end()
    return grants


def from_headers(cfg: Config, headers: Mapping[str, str], owner: str, bucket_owner: str) -> Acl | None:
    """The ACL a write's ``x-amz-acl`` or ``x-amz-grant-*`` headers ask
    for; None when they ask for none."""
    name = headers.get("x-amz-acl")
    grants = _header_grants(cfg, headers)
    if name is not None and grants:
        raise errors.InvalidRequest("Specifying both Canned ACLs and Header Grants is not allowed")
    if name is not None:
        return canned(name.strip(), owner, bucket_owner)
    if grants:
        if len(grants) > MAX_GRANTS:
            raise errors.InvalidRequest(f"An ACL may have at most {MAX_GRANTS} grants")
        return Acl(owner, tuple(grants))
    return None


def from_document(cfg: Config, body: bytes, owner: str) -> Acl:
    """An AccessControlPolicy document for a resource that ``owner`` owns:
    its Owner, where it names one, must be that owner (S3 does not change
    owners through an ACL)."""
    root = parse(body)
    if root.tag != "AccessControlPolicy":
        raise errors.MalformedACLError()
    named = root.find("Owner/ID")
    if named is not None and (named.text or "").strip() != owner:
        raise errors.AccessDenied()
    grants: list[Grant] = []
    listed = root.find("AccessControlList")
    for g in listed.findall("Grant") if listed is not None else ():
        who, permission = g.find("Grantee"), (g.findtext("Permission") or "").strip()
        if who is None or permission not in PERMISSIONS:
            raise errors.MalformedACLError()
        for tag, kind in (("ID", "id"), ("URI", "uri"), ("EmailAddress", "emailAddress")):
            value = who.findtext(tag)
            if value is not None:
                grants.append(Grant(*_grantee(cfg, kind, value.strip(), "Grantee"), permission))
                break
        else:
            raise errors.MalformedACLError()
    if len(grants) > MAX_GRANTS:
        raise errors.MalformedACLError(f"An ACL may have at most {MAX_GRANTS} grants")
    return Acl(owner, tuple(grants))


def recorded(acl: Acl | None, default_owner: str) -> str | None:
    """What the store records: None for "private, owned by
    ``default_owner``" (the bucket's owner), the JSON otherwise."""
    if acl is None or acl == private(default_owner):
        return None
    return acl.to_json()


def of(text: str | None, default_owner: str) -> Acl:
    """A recorded ACL (see ``recorded``) back."""
    return private(default_owner) if text is None else Acl.from_json(text)


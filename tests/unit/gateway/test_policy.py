"""Bucket policies (gateway.policy) and ACLs (gateway.acl), pure."""

from __future__ import annotations

import json

import pytest

from nearstore.gateway import acl, errors
from nearstore.gateway.config import Config, User
from nearstore.gateway.policy import Principal, parse_policy, wild_match

BUCKET = "data"
VISION = Principal("v" * 64, "vision")
AUDIO = Principal("a" * 64, "audio")
ANON = Principal()


def policy(*statements: dict[str, object]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def stmt(effect: str = "Allow", principal: object = "*", action: object = "s3:GetObject",
         resource: object = f"arn:aws:s3:::{BUCKET}/*", **extra: object) -> dict[str, object]:
    return {"Effect": effect, "Principal": principal, "Action": action, "Resource": resource, **extra}


def test_wildcards() -> None:
    assert wild_match("s3:Get*", "s3:getobject", fold=True)
    assert not wild_match("s3:Get*", "s3:getobject")
    assert wild_match("arn:aws:s3:::data/a?c/*", "arn:aws:s3:::data/abc/d/e")
    assert not wild_match("arn:aws:s3:::data/a?c/*", "arn:aws:s3:::data/abbc/d")
    assert wild_match("a.b*", "a.bc") and not wild_match("a.b*", "axbc")  # regex characters are literal


def test_deny_beats_allow_beats_nothing() -> None:
    p = parse_policy(policy(stmt(), stmt("Deny", {"AWS": "audio"})), BUCKET)
    obj = f"arn:aws:s3:::{BUCKET}/k"
    assert p.evaluate(VISION, "s3:GetObject", obj, {}) == "Allow"
    assert p.evaluate(AUDIO, "s3:GetObject", obj, {}) == "Deny"
    assert p.evaluate(ANON, "s3:GetObject", obj, {}) == "Allow"
    assert p.evaluate(VISION, "s3:PutObject", obj, {}) is None
    assert p.evaluate(VISION, "s3:GetObject", f"arn:aws:s3:::{BUCKET}", {}) is None  # the bucket is not an object


@pytest.mark.parametrize("named", ["audio", "a" * 64, "arn:aws:iam::123456789012:user/audio",
                                   f"arn:aws:iam::{'a' * 64}:root"])
def test_a_user_is_named_as_aws_principals_name_them(named: str) -> None:
    p = parse_policy(policy(stmt(principal={"AWS": [named]})), BUCKET)
    assert p.evaluate(AUDIO, "s3:GetObject", f"arn:aws:s3:::{BUCKET}/k", {}) == "Allow"
    assert p.evaluate(VISION, "s3:GetObject", f"arn:aws:s3:::{BUCKET}/k", {}) is None
    assert p.evaluate(ANON, "s3:GetObject", f"arn:aws:s3:::{BUCKET}/k", {}) is None
    assert not p.public


def test_not_principal_not_action_not_resource() -> None:
    p = parse_policy(policy({"Effect": "Deny", "NotPrincipal": {"CanonicalUser": "v" * 64},
                             "NotAction": ["s3:List*"], "NotResource": f"arn:aws:s3:::{BUCKET}/open/*"}), BUCKET)
    obj = f"arn:aws:s3:::{BUCKET}/k"
    assert p.evaluate(AUDIO, "s3:GetObject", obj, {}) == "Deny"
    assert p.evaluate(ANON, "s3:GetObject", obj, {}) == "Deny"
    assert p.evaluate(VISION, "s3:GetObject", obj, {}) is None
    assert p.evaluate(AUDIO, "s3:ListBucket", obj, {}) is None
    assert p.evaluate(AUDIO, "s3:GetObject", f"arn:aws:s3:::{BUCKET}/open/x", {}) is None


@pytest.mark.parametrize("condition, context, holds", [
    ({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {"aws:sourceip": ["10.1.2.3"]}, True),
    ({"IpAddress": {"aws:SourceIp": ["10.0.0.0/8", "::1/128"]}}, {"aws:sourceip": ["::1"]}, True),
    ({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {"aws:sourceip": ["127.0.0.1"]}, False),
    ({"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {"aws:sourceip": ["127.0.0.1"]}, True),
    ({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, {}, False),  # a missing key: positive operators fail
    ({"StringNotEquals": {"s3:prefix": "x"}}, {}, True),  # ... and negated ones hold
    ({"StringEqualsIfExists": {"s3:prefix": "x"}}, {}, True),
    ({"StringLike": {"s3:prefix": ["home/*", "public/*"]}}, {"s3:prefix": ["public/a"]}, True),
    ({"StringNotLike": {"s3:prefix": "home/*"}}, {"s3:prefix": ["home/a"]}, False),
    ({"StringEqualsIgnoreCase": {"aws:UserAgent": "BOTO3"}}, {"aws:useragent": ["boto3"]}, True),
    ({"Bool": {"aws:SecureTransport": False}}, {"aws:securetransport": ["false"]}, True),
    ({"Bool": {"aws:SecureTransport": "true"}}, {"aws:securetransport": ["false"]}, False),
    ({"NumericLessThanEquals": {"s3:max-keys": 10}}, {"s3:max-keys": ["10"]}, True),
    ({"NumericGreaterThan": {"s3:max-keys": "10"}}, {"s3:max-keys": ["10"]}, False),
    ({"DateLessThan": {"aws:CurrentTime": "2100-01-01T00:00:00Z"}}, {"aws:currenttime": ["2026-12-07T00:00:00Z"]},
     True),
    ({"Null": {"s3:prefix": "true"}}, {}, True),
    ({"Null": {"s3:prefix": "false"}}, {}, False),
    ({"ForAnyValue:StringEquals": {"s3:prefix": ["a", "b"]}}, {"s3:prefix": ["b"]}, True),
    ({"StringEquals": {"s3:prefix": "a"}, "IpAddress": {"aws:SourceIp": "0.0.0.0/0"}},
     {"s3:prefix": ["a"], "aws:sourceip": ["1.2.3.4"]}, True),  # every operator must hold
])
def test_conditions(condition: dict[str, object], context: dict[str, list[str]], holds: bool) -> None:
    p = parse_policy(policy(stmt(Condition=condition)), BUCKET)
    got = p.evaluate(VISION, "s3:GetObject", f"arn:aws:s3:::{BUCKET}/k", context)
    assert got == ("Allow" if holds else None)


def test_public_means_everyone_unrestricted() -> None:
    assert parse_policy(policy(stmt()), BUCKET).public
    assert parse_policy(policy(stmt(principal={"AWS": "*"})), BUCKET).public
    assert not parse_policy(policy(stmt("Deny")), BUCKET).public
    assert not parse_policy(policy(stmt(Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}})), BUCKET).public
    assert parse_policy(policy(stmt(Condition={"StringLike": {"s3:prefix": "x"}})), BUCKET).public


@pytest.mark.parametrize("text", [
    "[]", "{", policy(stmt(resource="arn:aws:s3:::other/*")), policy(stmt(action="iam:PassRole")),
    json.dumps({"Version": "2099-01-01", "Statement": [stmt()]}),
    policy({**stmt(), "NotAction": "s3:PutObject"}),
    policy(stmt(principal={"Service": "ec2.amazonaws.com"})),
    policy(stmt(Condition={"StringEquals": "x"})),
    policy(stmt(Condition={"Foo:StringEquals": {"k": "v"}})),
    "{" + " " * (21 * 1024) + "}",
])
def test_malformed_policies(text: str) -> None:
    with pytest.raises(errors.MalformedPolicy):
        parse_policy(text, BUCKET)


def config() -> Config:
    cfg = Config(credentials={"k": "s"})
    cfg.users = [User("vision", "v" * 64, "Vision"), User("audio", "a" * 64, "Audio")]
    return cfg


def test_canned_acls_and_what_they_allow() -> None:
    owner, other = "v" * 64, "a" * 64
    private = acl.canned("private", owner, owner)
    assert private == acl.private(owner) and acl.recorded(private, owner) is None
    assert private.allows(owner, "READ") and not private.allows(other, "READ") and not private.allows(None, "READ")
    public = acl.canned("public-read", owner, owner)
    assert public.public and public.allows(None, "READ") and not public.allows(None, "WRITE")
    assert not public.allows(None, "READ", ignore_public=True)
    authenticated = acl.canned("authenticated-read", owner, owner)
    assert authenticated.allows(other, "READ") and not authenticated.allows(None, "READ")
    # The writer owns what it writes; bucket-owner-* add the bucket's owner.
    mine = acl.canned("bucket-owner-full-control", other, owner)
    assert mine.owner == other and mine.allows(owner, "READ") and mine.allows(owner, "WRITE_ACP")
    assert acl.canned("bucket-owner-read", other, owner).allows(owner, "READ")
    assert not acl.canned("bucket-owner-read", other, owner).allows(owner, "WRITE_ACP")
    # An owner always reads and writes its resource's ACL.
    assert acl.Acl(owner, ()).allows(owner, "WRITE_ACP") and not acl.Acl(owner, ()).allows(owner, "READ")
    assert acl.Acl.from_json(public.to_json()) == public
    with pytest.raises(errors.InvalidArgument):
        acl.canned("nope", owner, owner)


def test_grant_headers_and_documents() -> None:
    cfg = config()
    got = acl.from_headers(cfg, {"x-amz-grant-read": f'id="{"a" * 64}", uri="{acl.ALL_USERS}"',
                                 "x-amz-grant-write-acp": f'ID = "{"v" * 64}"'}, "v" * 64, "v" * 64)
    assert got is not None and [(g.grantee, g.permission) for g in got.grants] == [
        ("a" * 64, "READ"), (acl.ALL_USERS, "READ"), ("v" * 64, "WRITE_ACP")]
    assert acl.from_headers(cfg, {}, "v" * 64, "v" * 64) is None
    for headers, error in [
        ({"x-amz-grant-read": 'emailAddress="x@example.com"'}, errors.UnresolvableGrantByEmailAddress),
        ({"x-amz-grant-read": 'id="nobody"'}, errors.InvalidArgument),
        ({"x-amz-grant-read": 'id=unquoted'}, errors.InvalidArgument),
        ({"x-amz-acl": "private", "x-amz-grant-read": f'id="{"a" * 64}"'}, errors.InvalidRequest),
    ]:
        with pytest.raises(error):
            acl.from_headers(cfg, headers, "v" * 64, "v" * 64)

    doc = acl.Acl("v" * 64, (acl.Grant("CanonicalUser", "a" * 64, "READ"), acl.Grant("Group", acl.ALL_USERS, "READ")))
    assert acl.from_document(cfg, doc.render(cfg), "v" * 64) == doc  # what Get answers, Put takes back
    with pytest.raises(errors.AccessDenied):
        acl.from_document(cfg, doc.render(cfg), "a" * 64)  # another owner
    with pytest.raises(errors.MalformedACLError):
        acl.from_document(cfg, doc.render(cfg).replace(b"READ<", b"READING<"), "v" * 64)
    with pytest.raises(errors.MalformedXML):
        acl.from_document(cfg, b"<AccessControlPolicy>", "v" * 64)

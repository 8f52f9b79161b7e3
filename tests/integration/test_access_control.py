"""Access control: ACLs, Public Access Block, bucket policies, anonymous
requests.

Two users besides the first and an anonymous HTTP client (no signature at
all, as curl sends), on a node with the local store and on a node whose
``shared`` bucket fronts moto through the chunk cache. Every rule is
checked both ways: what it allows works, what it does not is AccessDenied.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.s3util import post_form
from tests.helpers.servers import S3Server, start_server, upstream_mapping
from tests.integration.test_tenants import AUDIO, USERS, VISION, as_user, code, new_name
from tests.integration.test_tenants import node as node  # a node of its own for this module

VISION_ID = hashlib.sha256(b"vision").hexdigest()
AUDIO_ID = "a" * 64
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
AUTHENTICATED = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"


def anonymous(server: S3Server, method: str, bucket: str, key: str | None = None, body: bytes = b"",
              query: str = "") -> rawhttp.Response:
    """A request with no signature at all (what curl sends)."""
    path = key_path(bucket, key) if key is not None else f"/{bucket}"
    return rawhttp.send(server, method, path + (f"?{query}" if query else ""), {}, body)


def denied(attempt: Any) -> None:
    with pytest.raises(ClientError) as e:
        attempt()
    assert code(e) in (("AccessDenied", 403), ("403", 403)), e.value


def grants(acl: dict[str, Any]) -> set[tuple[str, str]]:
    return {(g["Grantee"].get("ID") or g["Grantee"].get("URI"), g["Permission"]) for g in acl["Grants"]}


@pytest.fixture
def bucket(node: S3Server) -> str:
    name = new_name("acl")
    as_user(node, VISION).create_bucket(Bucket=name)
    as_user(node, VISION).put_object(Bucket=name, Key="obj", Body=b"vision's bytes")
    return name


def test_anonymous_requests_get_only_what_is_public(node: S3Server, bucket: str) -> None:
    vision = as_user(node, VISION)
    # Private: everything denied, and a missing key is not told apart from
    # a present one (AccessDenied, not NoSuchKey) to whom may not list.
    for method, key in (("GET", "obj"), ("HEAD", "obj"), ("GET", "missing"), ("GET", None), ("PUT", "new")):
        resp = anonymous(node, method, bucket, key, b"x" if method == "PUT" else b"")
        assert resp.status == 403, (method, key, resp)
        if method != "HEAD":
            assert b"<Code>AccessDenied</Code>" in resp.body
    assert rawhttp.send(node, "GET", "/", {}).status == 403  # ListBuckets
    assert anonymous(node, "PUT", new_name("anon")).status == 403  # CreateBucket

    vision.put_object_acl(Bucket=bucket, Key="obj", ACL="public-read")
    for _ in range(2):  # the hot path serves anonymous GETs too, from its memo the second time
        resp = anonymous(node, "GET", bucket, "obj")
        assert resp.status == 200 and resp.body == b"vision's bytes"
    assert anonymous(node, "HEAD", bucket, "obj").status == 200
    assert anonymous(node, "GET", bucket, "obj", query="acl").status == 403  # READ is not READ_ACP
    assert anonymous(node, "GET", bucket, None).status == 403  # the bucket is still private
    assert anonymous(node, "GET", bucket, "missing").status == 403
    assert anonymous(node, "PUT", bucket, "obj", b"overwrite").status == 403

    vision.put_bucket_acl(Bucket=bucket, ACL="public-read")
    listing = anonymous(node, "GET", bucket, None, query="list-type=2")
    assert listing.status == 200 and b"<Key>obj</Key>" in listing.body
    assert anonymous(node, "GET", bucket, "missing").status == 404  # may list: told it is missing

    vision.put_object_acl(Bucket=bucket, Key="obj", ACL="private")
    assert anonymous(node, "GET", bucket, "obj").status == 403  # a memo of the old ACL is never used
    assert vision.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"vision's bytes"


def test_canned_acls_read_back_as_s3_writes_them(node: S3Server, bucket: str) -> None:
    vision = as_user(node, VISION)
    owner = (VISION_ID, "FULL_CONTROL")
    expected = {
        "private": {owner},
        "public-read": {owner, (ALL_USERS, "READ")},
        "public-read-write": {owner, (ALL_USERS, "READ"), (ALL_USERS, "WRITE")},
        "authenticated-read": {owner, (AUTHENTICATED, "READ")},
    }
    for canned, want in expected.items():
        vision.put_bucket_acl(Bucket=bucket, ACL=canned)
        got = vision.get_bucket_acl(Bucket=bucket)
        assert got["Owner"] == {"ID": VISION_ID, "DisplayName": "Vision team"}
        assert grants(got) == want, canned
        vision.put_object(Bucket=bucket, Key=f"o-{canned}", Body=b"x", ACL=canned)
        assert grants(vision.get_object_acl(Bucket=bucket, Key=f"o-{canned}")) == want, canned
    with pytest.raises(ClientError) as e:
        vision.put_bucket_acl(Bucket=bucket, ACL="no-such-acl")  # type: ignore[arg-type]
    assert code(e) == ("InvalidArgument", 400)

    made = new_name("made-public")
    vision.create_bucket(Bucket=made, ACL="public-read")  # the ACL a bucket is created with
    assert grants(vision.get_bucket_acl(Bucket=made)) == expected["public-read"]
    assert anonymous(node, "GET", made, None).status == 200
    vision.delete_bucket(Bucket=made)
    vision.create_bucket(Bucket=made)  # made again: none of the old name's documents
    assert grants(vision.get_bucket_acl(Bucket=made)) == expected["private"]
    assert anonymous(node, "GET", made, None).status == 403


def test_authenticated_read_is_every_signed_user_but_not_anonymous(node: S3Server, bucket: str) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    denied(lambda: audio.get_object(Bucket=bucket, Key="obj"))
    vision.put_object_acl(Bucket=bucket, Key="obj", ACL="authenticated-read")
    assert audio.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"vision's bytes"
    assert anonymous(node, "GET", bucket, "obj").status == 403
    denied(lambda: audio.put_object_acl(Bucket=bucket, Key="obj", ACL="public-read"))  # READ is not WRITE_ACP
    denied(lambda: audio.get_object_tagging(Bucket=bucket, Key="obj") and audio.put_object_tagging(
        Bucket=bucket, Key="obj", Tagging={"TagSet": []}))


def test_explicit_grants_by_document_and_by_header(node: S3Server, bucket: str) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    policy = {
        "Owner": {"ID": VISION_ID},
        "Grants": [
            {"Grantee": {"Type": "CanonicalUser", "ID": VISION_ID}, "Permission": "FULL_CONTROL"},
            {"Grantee": {"Type": "CanonicalUser", "ID": AUDIO_ID}, "Permission": "READ"},
            {"Grantee": {"Type": "CanonicalUser", "ID": AUDIO_ID}, "Permission": "READ_ACP"},
        ],
    }
    vision.put_object_acl(Bucket=bucket, Key="obj", AccessControlPolicy=policy)
    got = audio.get_object_acl(Bucket=bucket, Key="obj")  # READ_ACP
    assert [(g["Grantee"]["ID"], g["Permission"]) for g in got["Grants"]] == [
        (VISION_ID, "FULL_CONTROL"), (AUDIO_ID, "READ"), (AUDIO_ID, "READ_ACP")]
    assert got["Grants"][1]["Grantee"]["DisplayName"] == "audio"
    assert audio.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"vision's bytes"
    assert audio.head_object(Bucket=bucket, Key="obj")["ContentLength"] == 14
    denied(lambda: audio.put_object_acl(Bucket=bucket, Key="obj", ACL="private"))  # no WRITE_ACP
    denied(lambda: audio.list_objects_v2(Bucket=bucket))  # an object grant is not a bucket grant

    vision.put_bucket_acl(Bucket=bucket, GrantRead=f'id="{AUDIO_ID}"', GrantFullControl=f'id="{VISION_ID}"')
    assert grants(vision.get_bucket_acl(Bucket=bucket)) == {(AUDIO_ID, "READ"), (VISION_ID, "FULL_CONTROL")}
    assert [o["Key"] for o in audio.list_objects_v2(Bucket=bucket)["Contents"]] == ["obj"]
    denied(lambda: audio.put_object(Bucket=bucket, Key="w", Body=b"x"))  # READ is not WRITE

    vision.put_object(Bucket=bucket, Key="g", Body=b"granted", GrantRead=f'uri="{ALL_USERS}"')
    assert anonymous(node, "GET", bucket, "g").body == b"granted"

    bad = [
        (lambda: vision.put_object_acl(Bucket=bucket, Key="obj", GrantRead='emailAddress="a@example.com"'),
         ("UnresolvableGrantByEmailAddress", 400)),
        (lambda: vision.put_object_acl(Bucket=bucket, Key="obj", GrantRead='id="' + "b" * 64 + '"'),
         ("InvalidArgument", 400)),
        (lambda: vision.put_object_acl(Bucket=bucket, Key="obj", GrantRead='uri="http://example.com/group"'),
         ("InvalidArgument", 400)),
        (lambda: vision.put_object(Bucket=bucket, Key="both", Body=b"", ACL="private", GrantRead=f'id="{AUDIO_ID}"'),
         ("InvalidRequest", 400)),
        # Another owner named in the document: owners do not change by ACL.
        (lambda: vision.put_object_acl(Bucket=bucket, Key="obj", AccessControlPolicy={
            "Owner": {"ID": AUDIO_ID}, "Grants": []}), ("AccessDenied", 403)),
    ]
    for attempt, want in bad:
        with pytest.raises(ClientError) as e:
            attempt()
        assert code(e) == want
    raw = rawhttp.send(node, "PUT", key_path(bucket, "obj") + "?acl", {}, b"")
    assert raw.status == 403  # unsigned: nobody's to change


def test_a_public_write_bucket_and_who_owns_what_others_write(node: S3Server, bucket: str) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    vision.put_bucket_acl(Bucket=bucket, ACL="public-read-write")
    audio.put_object(Bucket=bucket, Key="from-audio", Body=b"audio's")
    audio.put_object(Bucket=bucket, Key="shared-with-owner", Body=b"for vision", ACL="bucket-owner-full-control")
    assert anonymous(node, "PUT", bucket, "from-anon", b"anon's").status == 200

    owners = {o["Key"]: o["Owner"]["ID"] for o in vision.list_objects_v2(Bucket=bucket, FetchOwner=True)["Contents"]}
    assert owners["from-audio"] == AUDIO_ID and owners["obj"] == VISION_ID
    assert owners["from-anon"] == "65a011a29cdf8ec533ec3d1ccaae921c"
    # The writer owns its object: the bucket's owner reads it only if granted,
    # but may delete it (WRITE on the bucket), as S3's ACLs have it.
    denied(lambda: vision.get_object(Bucket=bucket, Key="from-audio"))
    assert vision.get_object(Bucket=bucket, Key="shared-with-owner")["Body"].read() == b"for vision"
    assert grants(audio.get_object_acl(Bucket=bucket, Key="shared-with-owner")) == {
        (AUDIO_ID, "FULL_CONTROL"), (VISION_ID, "FULL_CONTROL")}
    assert audio.get_object(Bucket=bucket, Key="from-audio")["Body"].read() == b"audio's"
    vision.delete_object(Bucket=bucket, Key="from-audio")
    assert "from-audio" not in {o["Key"] for o in vision.list_objects_v2(Bucket=bucket)["Contents"]}
    # Bucket configuration stays the owner's.
    denied(lambda: audio.put_bucket_acl(Bucket=bucket, ACL="private"))
    denied(lambda: audio.delete_bucket(Bucket=bucket))
    denied(lambda: audio.put_bucket_policy(Bucket=bucket, Policy="{}"))


def test_acls_on_copies_multipart_uploads_and_browser_posts(node: S3Server, bucket: str) -> None:
    vision = as_user(node, VISION)
    vision.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "obj"}, ACL="public-read")
    assert anonymous(node, "GET", bucket, "copy").body == b"vision's bytes"
    vision.put_object_acl(Bucket=bucket, Key="obj", ACL="public-read")
    vision.copy_object(Bucket=bucket, Key="copy2", CopySource={"Bucket": bucket, "Key": "obj"})
    assert anonymous(node, "GET", bucket, "copy2").status == 403  # a copy's ACL is never its source's

    up = vision.create_multipart_upload(Bucket=bucket, Key="mp", ACL="public-read")["UploadId"]
    etag = vision.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=1, Body=b"part")["ETag"]
    vision.complete_multipart_upload(Bucket=bucket, Key="mp", UploadId=up,
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert anonymous(node, "GET", bucket, "mp").body == b"part"

    post = vision.generate_presigned_post(bucket, "posted", Fields={"acl": "public-read"},
                                          Conditions=[{"acl": "public-read"}], ExpiresIn=300)
    body, ctype = post_form(post["fields"].items(), b"posted bytes")
    assert rawhttp.send(node, "POST", f"/{bucket}", {"Content-Type": ctype}, body).status == 204
    assert anonymous(node, "GET", bucket, "posted").body == b"posted bytes"

    # An unsigned form: allowed only where everyone may write.
    body, ctype = post_form([("key", "anon-post")], b"anon")
    assert rawhttp.send(node, "POST", f"/{bucket}", {"Content-Type": ctype}, body).status == 403
    vision.put_bucket_acl(Bucket=bucket, ACL="public-read-write")
    assert rawhttp.send(node, "POST", f"/{bucket}", {"Content-Type": ctype}, body).status == 204
    assert anonymous(node, "GET", bucket, "anon-post").body == b"anon"  # the anonymous writer's: private to it


def test_public_access_block(node: S3Server, bucket: str) -> None:
    vision = as_user(node, VISION)
    with pytest.raises(ClientError) as e:
        vision.get_public_access_block(Bucket=bucket)
    assert code(e) == ("NoSuchPublicAccessBlockConfiguration", 404)
    vision.put_object_acl(Bucket=bucket, Key="obj", ACL="public-read")
    assert anonymous(node, "GET", bucket, "obj").status == 200

    config = {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
              "RestrictPublicBuckets": False}
    vision.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=config)
    assert vision.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"] == config
    assert anonymous(node, "GET", bucket, "obj").status == 403  # IgnorePublicAcls
    for attempt in (lambda: vision.put_bucket_acl(Bucket=bucket, ACL="public-read"),
                    lambda: vision.put_object(Bucket=bucket, Key="p", Body=b"", ACL="public-read"),
                    lambda: vision.put_object_acl(Bucket=bucket, Key="obj", GrantRead=f'uri="{ALL_USERS}"'),
                    lambda: vision.put_bucket_policy(Bucket=bucket, Policy=public_read_policy(bucket))):
        denied(attempt)
    vision.put_object(Bucket=bucket, Key="p", Body=b"", ACL="private")  # what is not public is fine

    vision.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={"RestrictPublicBuckets": True})
    vision.put_bucket_policy(Bucket=bucket, Policy=public_read_policy(bucket))
    assert anonymous(node, "GET", bucket, "p").status == 403  # a public policy, restricted
    assert anonymous(node, "GET", bucket, "obj").status == 200  # the ACL is no longer ignored
    vision.delete_public_access_block(Bucket=bucket)
    assert anonymous(node, "GET", bucket, "p").status == 200
    with pytest.raises(ClientError) as e:
        vision.get_public_access_block(Bucket=bucket)
    assert code(e) == ("NoSuchPublicAccessBlockConfiguration", 404)


def public_read_policy(bucket: str, prefix: str = "") -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/{prefix}*"}]})


def test_bucket_policies(node: S3Server, bucket: str) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    with pytest.raises(ClientError) as e:
        vision.get_bucket_policy(Bucket=bucket)
    assert code(e) == ("NoSuchBucketPolicy", 404)
    vision.put_object(Bucket=bucket, Key="public/a", Body=b"public a")
    vision.put_object(Bucket=bucket, Key="audio/b", Body=b"for audio")

    text = public_read_policy(bucket, "public/")
    vision.put_bucket_policy(Bucket=bucket, Policy=text)
    assert vision.get_bucket_policy(Bucket=bucket)["Policy"] == text  # read back as sent
    assert vision.get_bucket_policy_status(Bucket=bucket)["PolicyStatus"]["IsPublic"] is True
    assert anonymous(node, "GET", bucket, "public/a").body == b"public a"
    assert anonymous(node, "GET", bucket, "audio/b").status == 403
    assert audio.get_object(Bucket=bucket, Key="public/a")["Body"].read() == b"public a"

    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "audio-reads-its-prefix", "Effect": "Allow", "Principal": {"AWS": "audio"},
         "Action": ["s3:GetObject"], "Resource": f"arn:aws:s3:::{bucket}/audio/*"},
        {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::000000000000:user/audio"},
         "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
         "Condition": {"StringLike": {"s3:prefix": "audio/*"}}},
        {"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": f"arn:aws:s3:::{bucket}/*",
         "Condition": {"IpAddress": {"aws:SourceIp": "127.0.0.0/8"}}},
    ]}
    vision.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    assert vision.get_bucket_policy_status(Bucket=bucket)["PolicyStatus"]["IsPublic"] is False
    assert audio.get_object(Bucket=bucket, Key="audio/b")["Body"].read() == b"for audio"
    denied(lambda: audio.get_object(Bucket=bucket, Key="public/a"))
    assert [o["Key"] for o in audio.list_objects_v2(Bucket=bucket, Prefix="audio/")["Contents"]] == ["audio/b"]
    denied(lambda: audio.list_objects_v2(Bucket=bucket))
    denied(lambda: audio.list_objects_v2(Bucket=bucket, Prefix="public/"))
    # An explicit deny beats the owner's own rights (from 127.0.0.1, as here).
    denied(lambda: vision.delete_object(Bucket=bucket, Key="public/a"))
    assert vision.get_object(Bucket=bucket, Key="public/a")["Body"].read() == b"public a"
    # ... but never locks the owner out of the policy itself.
    vision.delete_bucket_policy(Bucket=bucket)
    vision.delete_object(Bucket=bucket, Key="public/a")
    with pytest.raises(ClientError) as e:
        vision.get_bucket_policy_status(Bucket=bucket)
    assert code(e) == ("NoSuchBucketPolicy", 404)

    deny_all = {"Statement": [{"Effect": "Deny", "NotPrincipal": {"AWS": "vision"}, "NotAction": "s3:ListBucket",
                               "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
    vision.put_bucket_acl(Bucket=bucket, ACL="public-read")
    vision.put_bucket_policy(Bucket=bucket, Policy=json.dumps(deny_all))
    assert audio.list_objects_v2(Bucket=bucket)["KeyCount"] >= 1  # ListBucket is not denied: the ACL grants it
    denied(lambda: audio.get_bucket_acl(Bucket=bucket))
    assert vision.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"vision's bytes"


@pytest.mark.parametrize("document, message", [
    ("not json", "JSON"),
    ('{"Statement": []}', "Statement"),
    ('{"Statement": [{"Effect": "Maybe", "Principal": "*", "Action": "s3:*", "Resource": "*"}]}', "effect"),
    ('{"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}', "Principal"),
    ('{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "ec2:Run", "Resource": "*"}]}', "action"),
    ('{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:*", '
     '"Resource": "arn:aws:s3:::another-bucket/*"}]}', "resource"),
    ('{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:*", "Resource": "*", '
     '"Condition": {"NoSuchOperator": {"aws:SourceIp": "1.2.3.4"}}}]}', "Condition"),
])
def test_a_malformed_policy_is_refused(node: S3Server, bucket: str, document: str, message: str) -> None:
    with pytest.raises(ClientError) as e:
        as_user(node, VISION).put_bucket_policy(Bucket=bucket, Policy=document)
    assert code(e) == ("MalformedPolicy", 400)
    assert message.lower() in e.value.response["Error"]["Message"].lower()


@pytest.fixture(scope="module")
def cache_node(tmp_path_factory: pytest.TempPathFactory, servers: Any) -> Iterator[S3Server]:
    moto = servers.get("moto")
    upstream_bucket = new_name("acl-up")
    servers.client("moto").create_bucket(Bucket=upstream_bucket)
    mapping = upstream_mapping(moto, "shared", bucket=upstream_bucket, owner="vision")
    server = start_server("nearstore", tmp_path_factory.mktemp("acl-cache"), config_text=USERS, buckets=[mapping])
    try:
        yield server
    finally:
        server.stop()


def test_access_through_the_cache_cache_hits_included(cache_node: S3Server) -> None:
    node = cache_node
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    data = b"cached bytes" * 20_000
    vision.put_object(Bucket="shared", Key="pub/x", Body=data)
    vision.put_object(Bucket="shared", Key="priv/y", Body=data)
    for key in ("pub/x", "priv/y"):
        assert vision.get_object(Bucket="shared", Key=key)["Body"].read() == data  # warm the cache
    assert anonymous(node, "GET", "shared", "pub/x").status == 403

    vision.put_bucket_policy(Bucket="shared", Policy=public_read_policy("shared", "pub/"))
    for _ in range(2):
        resp = anonymous(node, "GET", "shared", "pub/x")
        assert resp.status == 200 and resp.body == data
    assert anonymous(node, "GET", "shared", "priv/y").status == 403
    denied(lambda: audio.get_object(Bucket="shared", Key="priv/y"))

    vision.put_bucket_acl(Bucket="shared", ACL="authenticated-read")
    assert {o["Key"] for o in audio.list_objects_v2(Bucket="shared")["Contents"]} >= {"pub/x", "priv/y"}
    assert grants(vision.get_bucket_acl(Bucket="shared")) == {(VISION_ID, "FULL_CONTROL"), (AUTHENTICATED, "READ")}
    # Object ACLs ride with the objects in the backing store (every node
    # reads them with the metadata), hidden from clients, never forged.
    vision.put_object_acl(Bucket="shared", Key="priv/y", ACL="public-read")
    for _ in range(2):
        resp = anonymous(node, "GET", "shared", "priv/y")
        assert resp.status == 200 and resp.body == data
    assert grants(vision.get_object_acl(Bucket="shared", Key="priv/y")) == {(VISION_ID, "FULL_CONTROL"),
                                                                          (ALL_USERS, "READ")}
    assert vision.head_object(Bucket="shared", Key="priv/y")["Metadata"] == {}
    vision.copy_object(Bucket="shared", Key="priv/copy", CopySource={"Bucket": "shared", "Key": "priv/y"})
    assert anonymous(node, "GET", "shared", "priv/copy").status == 403  # a copy's ACL is its own
    vision.put_object_acl(Bucket="shared", Key="priv/y", ACL="private")
    assert anonymous(node, "GET", "shared", "priv/y").status == 403
    forged = json.dumps(["x", [["Group", ALL_USERS, "READ"]]])
    vision.put_object(Bucket="shared", Key="forged", Body=b"x", Metadata={"nearstore-acl": forged})
    assert anonymous(node, "GET", "shared", "forged").status == 403
    vision.put_object(Bucket="shared", Key="owned", Body=b"x", ACL="authenticated-read")
    assert audio.get_object(Bucket="shared", Key="owned")["Body"].read() == b"x"
    assert grants(vision.get_object_acl(Bucket="shared", Key="owned")) == {(VISION_ID, "FULL_CONTROL"),
                                                                         (AUTHENTICATED, "READ")}

    vision.delete_bucket_policy(Bucket="shared")
    vision.put_bucket_acl(Bucket="shared", ACL="private")
    assert anonymous(node, "GET", "shared", "pub/x").status == 403
    denied(lambda: audio.list_objects_v2(Bucket="shared"))


def test_delete_objects_decides_each_key_as_its_own_delete(node: S3Server, bucket: str) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    for key in ("protected/a", "free/b", "free/c"):
        vision.put_object(Bucket=bucket, Key=key, Body=b"x")
    vision.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject",
         "Resource": f"arn:aws:s3:::{bucket}/protected/*"},
        {"Effect": "Allow", "Principal": {"AWS": "audio"}, "Action": "s3:DeleteObject",
         "Resource": f"arn:aws:s3:::{bucket}/free/c"}]}))
    result = vision.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "protected/a"}, {"Key": "free/b"}]})
    assert [(e["Key"], e["Code"]) for e in result["Errors"]] == [("protected/a", "AccessDenied")]
    assert [d["Key"] for d in result["Deleted"]] == ["free/b"]
    result = audio.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "free/c"}, {"Key": "obj"}]})
    assert [d["Key"] for d in result["Deleted"]] == ["free/c"]
    assert [(e["Key"], e["Code"]) for e in result["Errors"]] == [("obj", "AccessDenied")]
    left = {o["Key"] for o in vision.list_objects_v2(Bucket=bucket)["Contents"]}
    assert left == {"obj", "protected/a"}


def test_an_acl_binds_its_owner_too(node: S3Server, bucket: str) -> None:
    """As S3: an ACL with no grants leaves the owner its ACL rights and its
    objects' own ACLs, not the bucket's READ and WRITE."""
    vision = as_user(node, VISION)
    vision.put_bucket_acl(Bucket=bucket, AccessControlPolicy={"Owner": {"ID": VISION_ID}, "Grants": []})
    assert vision.get_bucket_acl(Bucket=bucket)["Grants"] == []
    assert vision.get_object(Bucket=bucket, Key="obj")["Body"].read() == b"vision's bytes"  # the object's ACL
    denied(lambda: vision.put_object(Bucket=bucket, Key="new", Body=b"x"))
    denied(lambda: vision.list_objects_v2(Bucket=bucket))
    vision.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": []})  # the owner's alone, ACL or not
    vision.put_bucket_acl(Bucket=bucket, ACL="private")
    vision.put_object(Bucket=bucket, Key="new", Body=b"x")


def test_a_policy_can_require_what_writers_send(node: S3Server, bucket: str) -> None:
    """The common cross-tenant pattern: others may write only objects that
    hand the bucket's owner full control, and only with a tag."""
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    vision.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "audio"}, "Action": "s3:PutObject",
         "Resource": f"arn:aws:s3:::{bucket}/drop/*"},
        {"Effect": "Deny", "Principal": {"AWS": "audio"}, "Action": "s3:PutObject",
         "Resource": f"arn:aws:s3:::{bucket}/*",
         "Condition": {"StringNotEquals": {"s3:x-amz-acl": "bucket-owner-full-control"}}},
        {"Effect": "Deny", "Principal": {"AWS": "audio"}, "Action": "s3:PutObject",
         "Resource": f"arn:aws:s3:::{bucket}/*", "Condition": {"Null": {"s3:RequestObjectTag/team": "true"}}},
    ]}))
    denied(lambda: audio.put_object(Bucket=bucket, Key="drop/a", Body=b"x", Tagging="team=audio"))
    denied(lambda: audio.put_object(Bucket=bucket, Key="drop/a", Body=b"x", ACL="bucket-owner-full-control"))
    denied(lambda: audio.put_object(Bucket=bucket, Key="elsewhere", Body=b"x", ACL="bucket-owner-full-control",
                                    Tagging="team=audio"))
    audio.put_object(Bucket=bucket, Key="drop/a", Body=b"dropped", ACL="bucket-owner-full-control", Tagging="team=audio")
    assert vision.get_object(Bucket=bucket, Key="drop/a")["Body"].read() == b"dropped"


@pytest.fixture(scope="module")
def apart_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A node whose control plane does not trust its own machine: as a
    request from another host sees it."""
    config = ("[server]\ncontrol_from_loopback = false\noperators = [\"audio\"]\nmetrics_token = \"scrape-me\"\n"
              + USERS)
    server = start_server("nearstore", tmp_path_factory.mktemp("apart"), config_text=config)
    try:
        yield server
    finally:
        server.stop()


def test_the_control_plane_answers_signed_users_and_operators(apart_node: S3Server) -> None:
    """Issue 16, planes apart: metrics for operators, the ring for any
    user, health for every probe; anonymous requests get nothing."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    def get(path: str, who: tuple[str, str] | None) -> int:
        url = f"{apart_node.url}{path}"
        headers: dict[str, str] = {}
        if who is not None:
            req = AWSRequest(method="GET", url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
            S3SigV4Auth(Credentials(*who), "s3", apart_node.region).add_auth(req)
            headers = dict(req.headers.items())
        return rawhttp.send(apart_node, "GET", path, headers).status

    assert get("/_nearstore/health", None) == 200
    assert get("/_nearstore/metrics", None) == 403
    assert get("/_nearstore/ring", None) == 403
    assert get("/_nearstore/metrics", VISION) == 403  # a user, not an operator
    assert get("/_nearstore/metrics", AUDIO) == 200
    assert get("/_nearstore/ring?bucket=x", VISION) == 200
    bad = (VISION[0], "not the secret")
    assert get("/_nearstore/ring", bad) == 403
    # A scraper's bearer token: metrics, nothing else.
    for token, path, status in (("scrape-me", "/_nearstore/metrics", 200), ("wrong", "/_nearstore/metrics", 403),
                                ("scrape-me", "/_nearstore/ring", 403)):
        assert rawhttp.send(apart_node, "GET", path, {"Authorization": f"Bearer {token}"}).status == status


def test_a_direct_client_signs_its_ring_request(apart_node: S3Server) -> None:
    from nearstore.clients.direct import ClusterView

    view = ClusterView(as_user(apart_node, VISION))
    assert view.fetch("anything")["bucket"] == {"name": "anything", "cached": False}

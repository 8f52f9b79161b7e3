"""Tenants: each user's buckets are its own.

Two users besides the first (whose keys are the environment's), on a node
with the local store and on a node whose ``shared`` bucket fronts moto
through the chunk cache. A user other than a bucket's owner gets
AccessDenied from every way in: the aiohttp front, the hot path (GET and
HEAD of an object), a presigned URL, a browser POST, the source of a copy,
the short-circuit socket, and cache hits another user warmed.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from nearstore.clients.local import LocalNode
from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.s3util import post_form
from tests.helpers.servers import ACCESS_KEY, S3Server, start_server, upstream_mapping

USERS = """
[[users]]
name = "vision"
display_name = "Vision team"
keys = [{ access_key = "VISIONKEY00000000001", secret_key = "vision/secret/key/0123456789" },
        { access_key = "VISIONKEY00000000002", secret_key = "vision/second/key/0123456789" }]

[[users]]
name = "audio"
id = "%s"
keys = [{ access_key = "AUDIOKEY000000000001", secret_key = "audio/secret/key/0123456789" }]
""" % ("a" * 64)

VISION = ("VISIONKEY00000000001", "vision/secret/key/0123456789")
VISION_2 = ("VISIONKEY00000000002", "vision/second/key/0123456789")
AUDIO = ("AUDIOKEY000000000001", "audio/secret/key/0123456789")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_server("nearstore", tmp_path_factory.mktemp("tenants"), config_text=USERS)
    try:
        yield server
    finally:
        server.stop()


def as_user(server: S3Server, who: tuple[str, str]) -> Any:
    return server.client(access_key=who[0], secret_key=who[1])


def code(e: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    err = e.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_each_user_lists_its_own_buckets_with_its_own_owner(node: S3Server) -> None:
    vision, vision_2, audio, first = as_user(node, VISION), as_user(node, VISION_2), as_user(node, AUDIO), node.client()
    vb, ab, fb = new_name("vision"), new_name("audio"), new_name("first")
    vision.create_bucket(Bucket=vb)
    audio.create_bucket(Bucket=ab)
    first.create_bucket(Bucket=fb)

    def names(client: Any) -> set[str]:
        return {b["Name"] for b in client.list_buckets()["Buckets"]}

    assert vb in names(vision) and vb in names(vision_2)  # one user, two keys
    assert not {ab, fb} & names(vision)
    assert ab in names(audio) and not {vb, fb} & names(audio)
    assert fb in names(first) and not {vb, ab} & names(first)

    listing = vision.list_buckets()
    assert listing["Owner"] == {"ID": hashlib.sha256(b"vision").hexdigest(), "DisplayName": "Vision team"}
    assert audio.list_buckets()["Owner"]["ID"] == "a" * 64
    # The first user keeps the id every Owner field showed before there were users.
    assert first.list_buckets()["Owner"]["ID"] == hashlib.sha256(ACCESS_KEY.encode()).hexdigest()

    vision.put_object(Bucket=vb, Key="k", Body=b"v")
    objects = vision.list_objects_v2(Bucket=vb, FetchOwner=True)["Contents"]
    assert objects[0]["Owner"]["ID"] == hashlib.sha256(b"vision").hexdigest()
    assert vision.get_bucket_acl(Bucket=vb)["Owner"]["DisplayName"] == "Vision team"


def test_another_users_bucket_is_denied_whatever_the_operation(node: S3Server) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    vb, ab = new_name("vision"), new_name("audio")
    vision.create_bucket(Bucket=vb)
    audio.create_bucket(Bucket=ab)
    vision.put_object(Bucket=vb, Key="secret", Body=b"vision's data")

    denied = [
        lambda: audio.head_bucket(Bucket=vb),
        lambda: audio.list_objects_v2(Bucket=vb),
        lambda: audio.list_objects(Bucket=vb),
        lambda: audio.get_object(Bucket=vb, Key="secret"),  # the hot path
        lambda: audio.get_object(Bucket=vb, Key="secret", Range="bytes=0-3"),
        lambda: audio.head_object(Bucket=vb, Key="secret"),
        lambda: audio.get_object(Bucket=vb, Key="secret", ResponseContentType="text/plain"),
        lambda: audio.put_object(Bucket=vb, Key="new", Body=b"x"),
        lambda: audio.delete_object(Bucket=vb, Key="secret"),
        lambda: audio.get_object_tagging(Bucket=vb, Key="secret"),
        lambda: audio.create_multipart_upload(Bucket=vb, Key="mp"),
        lambda: audio.list_multipart_uploads(Bucket=vb),
        lambda: audio.get_bucket_location(Bucket=vb),
        lambda: audio.get_bucket_acl(Bucket=vb),
        lambda: audio.delete_bucket(Bucket=vb),
        # A copy out of another user's bucket into one's own.
        lambda: audio.copy_object(Bucket=ab, Key="stolen", CopySource={"Bucket": vb, "Key": "secret"}),
    ]
    for attempt in denied:
        with pytest.raises(ClientError) as e:
            attempt()
        assert code(e) in (("AccessDenied", 403), ("403", 403)), e.value
    # DeleteObjects decides each key on its own (a policy may allow some), as S3.
    result = audio.delete_objects(Bucket=vb, Delete={"Objects": [{"Key": "secret"}, {"Key": "other"}]})
    assert [(e["Key"], e["Code"]) for e in result["Errors"]] == [("secret", "AccessDenied"), ("other", "AccessDenied")]
    assert "Deleted" not in result
    up = audio.create_multipart_upload(Bucket=ab, Key="mp")["UploadId"]
    with pytest.raises(ClientError) as e:
        audio.upload_part_copy(Bucket=ab, Key="mp", UploadId=up, PartNumber=1,
                               CopySource={"Bucket": vb, "Key": "secret"})
    assert code(e) == ("AccessDenied", 403)

    # Presigned by the wrong user: refused before a byte, with an S3 error body.
    url = audio.generate_presigned_url("get_object", Params={"Bucket": vb, "Key": "secret"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(url, timeout=10)
    assert http_err.value.code == 403 and b"<Code>AccessDenied</Code>" in http_err.value.read()
    head_url = audio.generate_presigned_url("head_object", Params={"Bucket": vb, "Key": "secret"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(urllib.request.Request(head_url, method="HEAD"), timeout=10)
    assert http_err.value.code == 403

    # Nothing changed, and the owner still does everything.
    assert vision.get_object(Bucket=vb, Key="secret")["Body"].read() == b"vision's data"
    assert [o["Key"] for o in vision.list_objects_v2(Bucket=vb)["Contents"]] == ["secret"]
    assert "Contents" not in audio.list_objects_v2(Bucket=ab)
    as_user(node, VISION_2).copy_object(Bucket=vb, Key="copy", CopySource={"Bucket": vb, "Key": "secret"})


def test_a_bucket_name_taken_by_another_user(node: S3Server) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    vb = new_name("vision")
    vision.create_bucket(Bucket=vb)
    with pytest.raises(ClientError) as e:
        audio.create_bucket(Bucket=vb)
    assert code(e) == ("BucketAlreadyExists", 409)
    # The owner's re-create: 200 in us-east-1, as S3 answers there.
    assert vision.create_bucket(Bucket=vb)["ResponseMetadata"]["HTTPStatusCode"] == 200
    # A missing bucket is missing for everyone (404, not 403).
    with pytest.raises(ClientError) as e:
        audio.head_bucket(Bucket=new_name("nobody"))
    assert code(e) == ("404", 404)


def test_a_browser_post_needs_the_bucket_owners_key(node: S3Server) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    vb = new_name("vision")
    vision.create_bucket(Bucket=vb)
    for client, status in ((audio, 403), (vision, 204)):
        post = client.generate_presigned_post(vb, "upload.bin", ExpiresIn=300)
        body, ctype = post_form(post["fields"].items(), b"posted")
        resp = rawhttp.send(node, "POST", key_path(vb), {"Content-Type": ctype}, body)
        assert resp.status == status, resp
    assert vision.get_object(Bucket=vb, Key="upload.bin")["Body"].read() == b"posted"


def test_the_short_circuit_socket_decides_as_http_does(node: S3Server) -> None:
    vision, audio = as_user(node, VISION), as_user(node, AUDIO)
    vb = new_name("vision")
    vision.create_bucket(Bucket=vb)
    vision.put_object(Bucket=vb, Key="obj", Body=b"local bytes" * 1000)
    try:
        mine = LocalNode.discover(vision)
        theirs = LocalNode.discover(audio)
        assert mine is not None and theirs is not None, "the node's socket should be usable here"
        assert bytes(mine.read_into(vb, "obj")[0]) == b"local bytes" * 1000
        with pytest.raises(ClientError) as e:
            theirs.read_into(vb, "obj")
        assert code(e) == ("AccessDenied", 403)
    finally:
        LocalNode.forget(vision)
        LocalNode.forget(audio)


def warm(node: S3Server, who: tuple[str, str], bucket: str) -> int:
    """A signed POST /_nearstore/warm of ``bucket`` by ``who``: its status."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = f"{node.url}/_nearstore/warm?bucket={bucket}&prefix="
    req = AWSRequest(method="POST", url=url, data=b"", headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials(*who), "s3", node.region).add_auth(req)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST",
                                                           headers=dict(req.headers.items())), timeout=60) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def cache_node(tmp_path_factory: pytest.TempPathFactory, servers: Any) -> Iterator[tuple[S3Server, Any]]:
    moto = servers.get("moto")
    backing = servers.client("moto")
    upstream_bucket = new_name("tenants-up")
    backing.create_bucket(Bucket=upstream_bucket)
    mapping = upstream_mapping(moto, "shared", bucket=upstream_bucket, owner="vision")
    server = start_server("nearstore", tmp_path_factory.mktemp("tenants-cache"), config_text=USERS,
                          buckets=[mapping])
    try:
        yield server, backing
    finally:
        server.stop()


def test_a_fronted_bucket_is_its_configured_owners_cache_hits_included(
        cache_node: tuple[S3Server, Any], tmp_path: Path) -> None:
    node, _ = cache_node
    vision, audio, first = as_user(node, VISION), as_user(node, AUDIO), node.client()
    data = b"cached" * 50_000
    vision.put_object(Bucket="shared", Key="warm", Body=data)
    for _ in range(2):  # the second read is a cache hit
        assert vision.get_object(Bucket="shared", Key="warm")["Body"].read() == data
    metrics = urllib.request.urlopen(f"{node.url}/_nearstore/metrics", timeout=10).read().decode()
    hits = [line for line in metrics.splitlines() if line.startswith("nearstore_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 1, hits
    for client in (audio, first):
        for attempt in (lambda c=client: c.get_object(Bucket="shared", Key="warm"),
                        lambda c=client: c.head_object(Bucket="shared", Key="warm"),
                        lambda c=client: c.list_objects_v2(Bucket="shared"),
                        lambda c=client: c.put_object(Bucket="shared", Key="x", Body=b"x")):
            with pytest.raises(ClientError) as e:
                attempt()
            assert code(e) in (("AccessDenied", 403), ("403", 403))
    # Warming (a signed control-plane request) is the owner's too.
    assert warm(node, AUDIO, "shared") == 403
    assert warm(node, VISION, "shared") == 200
    assert "shared" in {b["Name"] for b in vision.list_buckets()["Buckets"]}
    assert "shared" not in {b["Name"] for b in audio.list_buckets()["Buckets"]}
    assert "shared" not in {b["Name"] for b in first.list_buckets()["Buckets"]}

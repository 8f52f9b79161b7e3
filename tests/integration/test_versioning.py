"""Versioning: Put/GetBucketVersioning, version ids on every write, reads,
deletes and copies by version, delete markers, the null version when
suspended, ListObjectVersions with paging, DeleteObjects with versions.

The semantics are asserted on the local store, which keeps the versions
itself. A bucket that fronts a backing store passes the sub-resources
through: the backing store keeps its versions, and its own answers are
the reference (moto and SeaweedFS differ from S3 and from each other in
places: the suspended null version, markers in DeleteObjects results), so
the same scenario is run straight against it and through the node, cache
included, and must look the same.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import UPSTREAM_API_KINDS, unique_bucket_name
from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.servers import S3Server

pytestmark = pytest.mark.gateway_only


def code(e: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    err = e.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def versions(s3: Any, bucket: str, **kw: Any) -> list[tuple[str, str, bool, bool]]:
    """(key, version id, latest?, delete marker?) in the order S3 lists
    them (boto3 splits versions from markers: read from the XML itself)."""
    raw: list[bytes] = []

    def keep(http_response: Any, **_: Any) -> None:
        raw.append(http_response.content)

    s3.meta.events.register("after-call.s3.ListObjectVersions", keep)
    try:
        s3.list_object_versions(Bucket=bucket, **kw)
    finally:
        s3.meta.events.unregister("after-call.s3.ListObjectVersions", keep)
    root = ET.fromstring(raw[0])
    out = []
    for el in root:
        tag = el.tag.rsplit("}", 1)[-1]
        if tag in ("Version", "DeleteMarker"):
            def text(name: str, el: ET.Element = el) -> str:
                return next(c.text or "" for c in el if c.tag.rsplit("}", 1)[-1] == name)
            out.append((text("Key"), text("VersionId"), text("IsLatest") == "true", tag == "DeleteMarker"))
    return out


def test_versions_by_id_delete_markers_and_the_null_version(s3: Any, bucket: str) -> None:
    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket)
    first = s3.put_object(Bucket=bucket, Key="k", Body=b"v0 before versioning")
    assert "VersionId" not in first  # never versioned: no version ids
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"

    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"v1")["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key="k", Body=b"v2 latest")["VersionId"]
    assert len({v1, v2, "null"}) == 3
    got = s3.get_object(Bucket=bucket, Key="k")
    assert got["Body"].read() == b"v2 latest" and got["VersionId"] == v2
    assert s3.get_object(Bucket=bucket, Key="k", VersionId=v1)["Body"].read() == b"v1"
    assert s3.get_object(Bucket=bucket, Key="k", VersionId="null")["Body"].read() == b"v0 before versioning"
    assert s3.head_object(Bucket=bucket, Key="k", VersionId=v1)["ContentLength"] == 2
    assert s3.get_object(Bucket=bucket, Key="k", VersionId=v1, Range="bytes=1-1")["Body"].read() == b"1"
    assert versions(s3, bucket) == [("k", v2, True, False), ("k", v1, False, False), ("k", "null", False, False)]

    # A delete makes a marker: the key is gone for plain reads and listings.
    gone = s3.delete_object(Bucket=bucket, Key="k")
    assert gone["DeleteMarker"] is True
    marker = gone["VersionId"]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="k")
    assert code(e) == ("NoSuchKey", 404)
    assert e.value.response["ResponseMetadata"]["HTTPHeaders"].get("x-amz-delete-marker") == "true"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="k", VersionId=marker)
    assert code(e) == ("MethodNotAllowed", 405)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
    assert versions(s3, bucket)[0] == ("k", marker, True, True)
    assert s3.get_object(Bucket=bucket, Key="k", VersionId=v2)["Body"].read() == b"v2 latest"

    # Deleting the marker brings the key back; deleting a version for good
    # makes the one before current.
    assert s3.delete_object(Bucket=bucket, Key="k", VersionId=marker)["DeleteMarker"] is True
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v2 latest"
    assert s3.delete_object(Bucket=bucket, Key="k", VersionId=v2)["VersionId"] == v2
    assert s3.get_object(Bucket=bucket, Key="k")["VersionId"] == v1
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="k", VersionId=v2)
    assert code(e)[1] in (400, 404)  # NoSuchVersion (moto: InvalidArgument)

    # A copy names its source's version.
    copied = s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "k", "VersionId": "null"})
    assert copied["CopySourceVersionId"] == "null" and copied["VersionId"] not in (None, "null")
    assert s3.get_object(Bucket=bucket, Key="copy")["Body"].read() == b"v0 before versioning"


def test_suspended_versioning_keeps_one_null_version(s3: Any, bucket: str) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    kept = s3.put_object(Bucket=bucket, Key="k", Body=b"kept")["VersionId"]
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Suspended"
    assert s3.put_object(Bucket=bucket, Key="k", Body=b"null 1").get("VersionId", "null") == "null"
    assert s3.put_object(Bucket=bucket, Key="k", Body=b"null 2").get("VersionId", "null") == "null"
    assert versions(s3, bucket) == [("k", "null", True, False), ("k", kept, False, False)]
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"null 2"
    # A delete while suspended: a null delete marker, in the null version's place.
    assert s3.delete_object(Bucket=bucket, Key="k")["DeleteMarker"] is True
    assert versions(s3, bucket) == [("k", "null", True, True), ("k", kept, False, False)]
    assert s3.get_object(Bucket=bucket, Key="k", VersionId=kept)["Body"].read() == b"kept"


def test_list_object_versions_pages_prefixes_and_delete_objects(s3: Any, bucket: str) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for key in ("a/1", "a/2", "b", "c"):
        for n in range(2):
            s3.put_object(Bucket=bucket, Key=key, Body=f"{key} {n}".encode())
    s3.delete_object(Bucket=bucket, Key="c")
    whole = versions(s3, bucket)
    assert [r[0] for r in whole] == ["a/1"] * 2 + ["a/2"] * 2 + ["b"] * 2 + ["c"] * 3

    paged: list[tuple[str, str]] = []
    kw: dict[str, Any] = {"Bucket": bucket, "MaxKeys": 2}
    for _ in range(20):
        page = s3.list_object_versions(**kw)
        entries = page.get("Versions", []) + page.get("DeleteMarkers", [])
        assert 1 <= len(entries) <= 2
        paged += [(v["Key"], v["VersionId"]) for v in entries]
        if not page["IsTruncated"]:
            break
        kw.update(KeyMarker=page["NextKeyMarker"], VersionIdMarker=page["NextVersionIdMarker"])
    assert sorted(paged) == sorted((r[0], r[1]) for r in whole) and len(paged) == len(whole)

    grouped = s3.list_object_versions(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in grouped["CommonPrefixes"]] == ["a/"]
    assert {v["Key"] for v in grouped["Versions"]} == {"b", "c"}
    assert {v["Key"] for v in s3.list_object_versions(Bucket=bucket, Prefix="a/")["Versions"]} == {"a/1", "a/2"}

    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket=bucket)
    assert code(e) == ("BucketNotEmpty", 409)
    doomed = [{"Key": k, "VersionId": v} for k, v, _, _ in whole]
    result = s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed})
    assert sorted((d["Key"], d["VersionId"]) for d in result["Deleted"]) == sorted((o["Key"], o["VersionId"])
                                                                                    for o in doomed)
    assert [d for d in result["Deleted"] if d.get("DeleteMarker")] == [
        d for d in result["Deleted"] if d["Key"] == "c" and d["VersionId"] == whole[6][1]]
    assert versions(s3, bucket) == []
    s3.delete_bucket(Bucket=bucket)


def test_each_version_has_its_own_tags_and_acl(server: S3Server, s3: Any, bucket: str) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"old", Tagging="gen=1")["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key="k", Body=b"new", Tagging="gen=2")["VersionId"]
    resp = rawhttp.send(server, "GET", key_path(bucket, "k") + f"?versionId={v1}", {})
    assert resp.status == 403  # anonymous: nothing public yet
    assert rawhttp.send(server, "GET", f"/{bucket}?versions", {}).status == 403

    assert s3.get_object_tagging(Bucket=bucket, Key="k", VersionId=v1)["TagSet"] == [{"Key": "gen", "Value": "1"}]
    s3.put_object_tagging(Bucket=bucket, Key="k", VersionId=v1, Tagging={"TagSet": [{"Key": "old", "Value": "y"}]})
    assert s3.get_object_tagging(Bucket=bucket, Key="k", VersionId=v1)["TagSet"] == [{"Key": "old", "Value": "y"}]
    assert s3.get_object_tagging(Bucket=bucket, Key="k")["TagSet"] == [{"Key": "gen", "Value": "2"}]
    s3.delete_object_tagging(Bucket=bucket, Key="k", VersionId=v2)
    assert s3.get_object_tagging(Bucket=bucket, Key="k")["TagSet"] == []

    s3.put_object_acl(Bucket=bucket, Key="k", VersionId=v1, ACL="public-read")
    resp = rawhttp.send(server, "GET", key_path(bucket, "k") + f"?versionId={v1}", {})
    assert resp.status == 200 and resp.body == b"old"
    assert rawhttp.send(server, "GET", key_path(bucket, "k"), {}).status == 403  # the current one is still private
    assert len(s3.get_object_acl(Bucket=bucket, Key="k", VersionId=v1)["Grants"]) == 2
    assert len(s3.get_object_acl(Bucket=bucket, Key="k")["Grants"]) == 1
    marker = s3.delete_object(Bucket=bucket, Key="k")["VersionId"]
    with pytest.raises(ClientError) as e:
        s3.get_object_tagging(Bucket=bucket, Key="k", VersionId=marker)
    assert code(e) == ("MethodNotAllowed", 405)


def scenario(s3: Any, bucket: str) -> list[tuple[str, Any]]:
    """What a versioning client sees, version ids replaced by their order
    of appearance (each store makes its own)."""
    names: dict[str, str] = {"null": "null"}

    def vid(v: str | None) -> str | None:
        return None if v is None else names.setdefault(v, f"v{len(names)}")

    out: list[tuple[str, Any]] = []

    def see(label: str, fn: Any) -> Any:
        try:
            got = fn()
        except ClientError as e:
            headers = e.response["ResponseMetadata"].get("HTTPHeaders", {})
            status = (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
            out.append((label, (status, headers.get("x-amz-delete-marker"), vid(headers.get("x-amz-version-id")))))
            return None
        body = got["Body"].read() if "Body" in got else None
        out.append((label, (vid(got.get("VersionId")), got.get("DeleteMarker"), body)))
        return got

    out.append(("status before", s3.get_bucket_versioning(Bucket=bucket).get("Status")))
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    out.append(("status", s3.get_bucket_versioning(Bucket=bucket).get("Status")))
    ids = [see(f"put {n}", lambda n=n: s3.put_object(Bucket=bucket, Key="k", Body=f"body {n}".encode()))["VersionId"]
           for n in range(3)]
    for _ in range(2):  # the second read of the current version is a cache hit
        see("get", lambda: s3.get_object(Bucket=bucket, Key="k"))
    see("get v0", lambda: s3.get_object(Bucket=bucket, Key="k", VersionId=ids[0]))
    see("head v1", lambda: s3.head_object(Bucket=bucket, Key="k", VersionId=ids[1]))
    marker = see("delete", lambda: s3.delete_object(Bucket=bucket, Key="k"))["VersionId"]
    # HEAD: moto's GET leaves out the delete-marker headers its HEAD sends
    # (and S3 sends on both, as the node does).
    see("head deleted", lambda: s3.head_object(Bucket=bucket, Key="k"))
    see("get v2", lambda: s3.get_object(Bucket=bucket, Key="k", VersionId=ids[2]))
    out.append(("versions", [(v["Key"], vid(v["VersionId"]), v["IsLatest"]) for v in
                             s3.list_object_versions(Bucket=bucket).get("Versions", [])]))
    see("undelete", lambda: s3.delete_object(Bucket=bucket, Key="k", VersionId=marker))
    see("get again", lambda: s3.get_object(Bucket=bucket, Key="k"))
    see("drop v2", lambda: s3.delete_object(Bucket=bucket, Key="k", VersionId=ids[2]))
    see("get after drop", lambda: s3.get_object(Bucket=bucket, Key="k"))
    s3.put_object_tagging(Bucket=bucket, Key="k", VersionId=ids[0], Tagging={"TagSet": [{"Key": "v", "Value": "0"}]})
    out.append(("tags v0", s3.get_object_tagging(Bucket=bucket, Key="k", VersionId=ids[0])["TagSet"]))
    out.append(("tags current", s3.get_object_tagging(Bucket=bucket, Key="k")["TagSet"]))
    see("copy v0", lambda: s3.copy_object(Bucket=bucket, Key="c", CopySource={"Bucket": bucket, "Key": "k",
                                                                              "VersionId": ids[0]}))
    see("get copy", lambda: s3.get_object(Bucket=bucket, Key="c"))
    deleted = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "k", "VersionId": ids[0]}, {"Key": "c"}]})
    out.append(("delete objects", sorted((d["Key"], vid(d.get("VersionId")), d.get("DeleteMarker"))
                                         for d in deleted.get("Deleted", []))))
    out.append(("final", [(v["Key"], vid(v["VersionId"]), v["IsLatest"]) for v in
                          s3.list_object_versions(Bucket=bucket).get("Versions", [])]))
    return out


@pytest.mark.parametrize("kind", UPSTREAM_API_KINDS)
def test_a_fronted_bucket_versions_as_its_backing_store_does(kind: str, servers: Any) -> None:
    node = servers.get(kind)
    upstream = node.extra["upstream"]
    direct, through = servers.client(upstream.kind), servers.client(kind)
    seen = []
    for client, name in ((direct, unique_bucket_name("ver-direct")), (through, unique_bucket_name("ver-through"))):
        client.create_bucket(Bucket=name)
        seen.append(scenario(client, name))
    assert seen[1] == seen[0]
    assert ("status", "Enabled") in seen[1] and ("get v0", ("v1", None, b"body 0")) in seen[1]


def test_the_local_store_versions_as_moto_does(servers: Any) -> None:
    """The same scenario against moto (which follows S3 here) and the local
    store: identical, version ids aside."""
    seen = []
    for kind in ("moto", "nearstore"):
        client, name = servers.client(kind), unique_bucket_name("ver-diff")
        client.create_bucket(Bucket=name)
        seen.append(scenario(client, name))
    # Where moto departs from S3: deleting a delete marker by its id, S3
    # says it was one (x-amz-delete-marker: true); moto says nothing.
    assert dict(seen[1])["undelete"][1] is True
    for observed in seen:
        observed[:] = [(label, (got[0], None, got[2]) if label == "undelete" else got) for label, got in observed]
    assert seen[1] == seen[0]

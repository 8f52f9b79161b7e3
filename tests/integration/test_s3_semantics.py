"""S3 behaviours where moto differs from S3, asserted on nearstore only (each
test says what moto does instead). The rest of the S3 semantics are in
test_s3_api.py and the differential tests."""

from __future__ import annotations

from typing import Any

from tests.helpers import rawhttp
from tests.helpers.rawhttp import S3_NS, key_path
from tests.helpers.servers import S3Server


def _put(s3: Any, bucket: str, keys: list[str]) -> None:
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")


def test_v1_next_marker_only_with_delimiter(s3: Any, bucket: str) -> None:
    # S3 returns NextMarker only when a delimiter is given; moto puts an ETag there.
    _put(s3, bucket, ["a", "b", "c"])
    r = s3.list_objects(Bucket=bucket, MaxKeys=2)
    assert r["IsTruncated"] is True
    assert "NextMarker" not in r


def test_v1_delimiter_max_keys_truncation(s3: Any, bucket: str) -> None:
    # moto reports IsTruncated=false here.
    _put(s3, bucket, ["a.txt", "b/1", "b/2", "c/x", "d"])
    r = s3.list_objects(Bucket=bucket, Delimiter="/", MaxKeys=2)
    assert r["IsTruncated"] is True
    assert [o["Key"] for o in r["Contents"]] == ["a.txt"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["b/"]
    assert r["NextMarker"] == "b/"
    r = s3.list_objects(Bucket=bucket, Delimiter="/", Marker="b/")
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["c/"]
    assert [o["Key"] for o in r["Contents"]] == ["d"]


def test_v1_plus_in_common_prefix_is_url_encoded(server: S3Server, s3: Any, bucket: str) -> None:
    # moto leaves '+' unencoded in v1 url-encoded CommonPrefixes; boto3 then reads a space.
    _put(s3, bucket, ["a+b/1", "a b/2"])
    r = s3.list_objects(Bucket=bucket, Delimiter="/")
    assert sorted(p["Prefix"] for p in r["CommonPrefixes"]) == ["a b/", "a+b/"]
    raw = rawhttp.request(server, "GET", key_path(bucket), "delimiter=%2F&encoding-type=url")
    prefixes = [e.text for e in raw.xml().iter(f"{S3_NS}Prefix")]
    assert "a%2Bb/" in prefixes and "a%20b/" in prefixes


def test_v1_echoes_empty_prefix_and_marker(server: S3Server, bucket: str) -> None:
    # S3 always sends <Prefix/> and <Marker/> in ListObjects v1; moto omits them.
    root = rawhttp.request(server, "GET", key_path(bucket)).xml()
    assert root.find(f"{S3_NS}Prefix") is not None
    assert root.find(f"{S3_NS}Marker") is not None


def test_quiet_delete_reports_only_errors(s3: Any, bucket: str) -> None:
    # moto lists deleted keys in quiet mode.
    _put(s3, bucket, ["a"])
    r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a"}], "Quiet": True})
    assert "Deleted" not in r


def test_copy_source_if_match_enforced(s3: Any, bucket: str) -> None:
    # moto ignores x-amz-copy-source-if-match / -if-modified-since / -if-unmodified-since.
    s3.put_object(Bucket=bucket, Key="src", Body=b"x")
    try:
        s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"},
                       CopySourceIfMatch='"00000000000000000000000000000000"')
    except s3.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == "PreconditionFailed"
    else:
        raise AssertionError("copy with a failing x-amz-copy-source-if-match succeeded")

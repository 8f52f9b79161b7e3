"""The [[buckets]] mapping itself: nearstore fronting buckets of moto and
SeaweedFS (which checks SigV4 signatures), side by side with local buckets.

One nearstore (module-wide) maps:

    datasets     -> moto     bucket real-datasets-*   prefix "pfx/"
    renamed      -> moto     bucket other-name-*      (a different upstream name)
    sw-data      -> seaweed  bucket sw-real-*
    ghost        -> moto     bucket missing-*         (never created upstream)
    sw-badkey    -> seaweed  sw-real-*, wrong secret key
    sw-readonly  -> seaweed  sw-real-*, an identity that may only read and list
    proxied      -> moto through a FaultProxy (to see what the upstream receives)

Everything else is local.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import ServerPool
from tests.helpers.faultproxy import FaultProxy
from tests.helpers.s3util import checksum_b64, error_of, md5_hex, multipart_etag, pattern
from tests.helpers.servers import (
    ACCESS_KEY,
    MOTO_ACCESS_KEY,
    SEAWEED_ACCESS_KEY,
    SEAWEED_READONLY_ACCESS_KEY,
    SEAWEED_READONLY_SECRET_KEY,
    SECRET_KEY,
    S3Server,
    free_port,
    make_tls_files,
    toml_tables,
    toml_value,
    upstream_mapping,
)

MiB = 1024 * 1024
AWS = str(Path(sys.executable).parent / "aws")
PREFIX = "pfx/"


@dataclass
class Mapped:
    ns: S3Server
    s3: Any  # boto3 -> nearstore (client credentials)
    moto: Any  # boto3 -> moto
    seaweed: Any  # boto3 -> SeaweedFS
    proxy: FaultProxy
    real: dict[str, str]  # gateway bucket -> upstream bucket
    seaweed_server: S3Server


@pytest.fixture(scope="module")
def mapped(servers: ServerPool) -> Iterator[Mapped]:
    moto, seaweed = servers.get("moto"), servers.get("seaweed")
    uid = uuid.uuid4().hex[:10]
    real = {
        "datasets": f"real-datasets-{uid}",
        "renamed": f"other-name-{uid}",
        "sw-data": f"sw-real-{uid}",
        "ghost": f"missing-{uid}",
        "proxied": f"proxied-{uid}",
    }
    moto_c, sw_c = servers.client("moto"), servers.client("seaweed")
    for name in ("datasets", "renamed", "proxied"):
        moto_c.create_bucket(Bucket=real[name])
    sw_c.create_bucket(Bucket=real["sw-data"])
    proxy = FaultProxy(moto.host, moto.port).start()
    fast = {"connect_timeout": 1.0, "read_timeout": 10.0, "deadline": 5.0}
    buckets = [
        upstream_mapping(moto, "datasets", bucket=real["datasets"], prefix=PREFIX, **fast),
        upstream_mapping(moto, "renamed", bucket=real["renamed"], **fast),
        upstream_mapping(seaweed, "sw-data", bucket=real["sw-data"], **fast),
        upstream_mapping(moto, "ghost", bucket=real["ghost"], **fast),
        upstream_mapping(seaweed, "sw-badkey", bucket=real["sw-data"],
                         secret_key="not-the-secret", **fast),
        upstream_mapping(seaweed, "sw-readonly", bucket=real["sw-data"],
                         access_key=SEAWEED_READONLY_ACCESS_KEY,
                         secret_key=SEAWEED_READONLY_SECRET_KEY, **fast),
        upstream_mapping(moto, "proxied", bucket=real["proxied"], endpoint=proxy.url, **fast),
    ]
    try:
        ns = servers.private(f"nearstore-mapped-{uid}", "nearstore", buckets=buckets,
                             label="nearstore-mapped")
        yield Mapped(ns, ns.client(), moto_c, sw_c, proxy, real, seaweed)
    finally:
        proxy.stop()


def moto_keys(m: Mapped, name: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in m.moto.get_paginator("list_objects_v2").paginate(Bucket=m.real[name],
                                                                Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


# -- prefix and bucket-name mapping ---------------------------------------------------

LIST_KEYS = ["a.txt", "b/1", "b/2", "b/c/3", "c/x", "c/y/z", "d", "e/"]


@pytest.fixture(scope="module")
def listed_prefix(mapped: Mapped) -> Mapped:
    for k in LIST_KEYS:
        mapped.s3.put_object(Bucket="datasets", Key=f"list/{k}", Body=k.encode())
    # Neighbours in the backing bucket that the mapping must not show.
    for k in ("outside/x", "pfxlist/a", "list/zz-no-prefix"):
        mapped.moto.put_object(Bucket=mapped.real["datasets"], Key=k, Body=b"hidden")
    return mapped


@pytest.mark.timeout(60)
def test_prefix_keys_are_stored_under_the_prefix(listed_prefix: Mapped) -> None:
    m = listed_prefix
    assert moto_keys(m, "datasets", PREFIX + "list/") == [PREFIX + "list/" + k for k in LIST_KEYS]
    got = m.s3.get_object(Bucket="datasets", Key="list/b/1")
    assert got["Body"].read() == b"b/1"
    assert m.moto.get_object(Bucket=m.real["datasets"], Key=PREFIX + "list/b/1")[
        "Body"].read() == b"b/1"
    # What lies outside the prefix is invisible through the mapping.
    assert error_of(m.s3.get_object, Bucket="datasets", Key="../outside/x")[0] == 404
    assert error_of(m.s3.head_object, Bucket="datasets", Key="list/zz-no-prefix") == (404, "404")


@pytest.mark.timeout(60)
def test_prefix_listing_strips_prefix_with_delimiters(listed_prefix: Mapped) -> None:
    s3 = listed_prefix.s3
    r = s3.list_objects_v2(Bucket="datasets", Prefix="list/")
    assert [o["Key"] for o in r["Contents"]] == ["list/" + k for k in LIST_KEYS]
    assert r["Prefix"] == "list/"
    r = s3.list_objects_v2(Bucket="datasets", Prefix="list/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["list/a.txt", "list/d"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["list/b/", "list/c/", "list/e/"]
    assert r["KeyCount"] == 5
    r = s3.list_objects_v2(Bucket="datasets", Prefix="list/b/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["list/b/1", "list/b/2"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["list/b/c/"]
    # Top level: only what is under the mapping's prefix.
    r = s3.list_objects_v2(Bucket="datasets", Delimiter="/")
    prefixes = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
    assert "list/" in prefixes
    assert not any(p.startswith(("pfx", "outside")) for p in prefixes), prefixes
    for o in r.get("Contents", []):
        assert not o["Key"].startswith(PREFIX)


@pytest.mark.timeout(60)
def test_prefix_listing_pagination(listed_prefix: Mapped) -> None:
    s3 = listed_prefix.s3
    seen: list[str] = []
    token = None
    for _ in range(20):
        kw: dict[str, Any] = {"Bucket": "datasets", "Prefix": "list/", "MaxKeys": 3}
        if token:
            kw["ContinuationToken"] = token
        r = s3.list_objects_v2(**kw)
        assert len(r.get("Contents", [])) <= 3
        seen += [o["Key"] for o in r.get("Contents", [])]
        if not r["IsTruncated"]:
            break
        token = r["NextContinuationToken"]
    assert seen == ["list/" + k for k in LIST_KEYS]
    r = s3.list_objects_v2(Bucket="datasets", Prefix="list/", StartAfter="list/b/2")
    assert [o["Key"] for o in r["Contents"]] == ["list/" + k for k in LIST_KEYS[3:]]
    r = s3.list_objects_v2(Bucket="datasets", Prefix="list/", Delimiter="/", MaxKeys=2)
    assert r["IsTruncated"] is True and r["KeyCount"] == 2
    # v1: markers are client keys too.
    r = s3.list_objects(Bucket="datasets", Prefix="list/", MaxKeys=2)
    assert [o["Key"] for o in r["Contents"]] == ["list/a.txt", "list/b/1"]
    assert r["IsTruncated"] is True
    r = s3.list_objects(Bucket="datasets", Prefix="list/", Marker="list/b/1")
    assert [o["Key"] for o in r["Contents"]] == ["list/" + k for k in LIST_KEYS[2:]]
    r = s3.list_objects(Bucket="datasets", Prefix="list/", Delimiter="/", MaxKeys=2)
    assert r["NextMarker"] == "list/b/"
    r = s3.list_objects(Bucket="datasets", Prefix="list/", Delimiter="/", Marker=r["NextMarker"])
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["list/c/", "list/e/"]
    assert [o["Key"] for o in r["Contents"]] == ["list/d"]
    pages = list(s3.get_paginator("list_objects_v2").paginate(
        Bucket="datasets", Prefix="list/", PaginationConfig={"PageSize": 2}))
    assert [o["Key"] for p in pages for o in p["Contents"]] == ["list/" + k for k in LIST_KEYS]


@pytest.mark.timeout(60)
def test_prefix_copy_delete_multipart_tagging(mapped: Mapped) -> None:
    s3, real = mapped.s3, mapped.real["datasets"]
    s3.put_object(Bucket="datasets", Key="ops/src", Body=b"source", Tagging="t=1")
    s3.copy_object(Bucket="datasets", Key="ops/dst", CopySource={"Bucket": "datasets",
                                                                  "Key": "ops/src"})
    assert mapped.moto.get_object(Bucket=real, Key=PREFIX + "ops/dst")["Body"].read() == b"source"
    assert s3.get_object_tagging(Bucket="datasets", Key="ops/src")["TagSet"] == [
        {"Key": "t", "Value": "1"}]
    s3.delete_object(Bucket="datasets", Key="ops/src")
    assert moto_keys(mapped, "datasets", PREFIX + "ops/") == [PREFIX + "ops/dst"]
    s3.delete_objects(Bucket="datasets", Delete={"Objects": [{"Key": "ops/dst"}]})
    assert moto_keys(mapped, "datasets", PREFIX + "ops/") == []

    parts = [pattern(5 * MiB, seed=60), b"tail"]
    uid = s3.create_multipart_upload(Bucket="datasets", Key="ops/mp")["UploadId"]
    uploads = s3.list_multipart_uploads(Bucket="datasets", Prefix="ops/")["Uploads"]
    assert [u["Key"] for u in uploads] == ["ops/mp"]
    etags = [s3.upload_part(Bucket="datasets", Key="ops/mp", UploadId=uid, PartNumber=n,
                            Body=p)["ETag"] for n, p in enumerate(parts, 1)]
    assert s3.list_parts(Bucket="datasets", Key="ops/mp", UploadId=uid)["Key"] == "ops/mp"
    done = s3.complete_multipart_upload(
        Bucket="datasets", Key="ops/mp", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e}
                                   for n, e in enumerate(etags, 1)]})
    assert done["Key"] == "ops/mp"
    assert done["ETag"] == multipart_etag(parts)
    assert mapped.moto.head_object(Bucket=real, Key=PREFIX + "ops/mp")["ContentLength"] == (
        5 * MiB + 4)


@pytest.mark.timeout(60)
def test_different_upstream_bucket_name(mapped: Mapped) -> None:
    mapped.s3.put_object(Bucket="renamed", Key="k", Body=b"renamed body")
    assert mapped.moto.get_object(Bucket=mapped.real["renamed"], Key="k")[
        "Body"].read() == b"renamed body"
    assert error_of(mapped.moto.head_bucket, Bucket="renamed") == (404, "404")
    assert mapped.s3.head_bucket(Bucket="renamed")["ResponseMetadata"]["HTTPStatusCode"] == 200
    names = [b["Name"] for b in mapped.s3.list_buckets()["Buckets"]]
    for name in ("datasets", "renamed", "sw-data"):
        assert name in names
    for upstream_name in mapped.real.values():
        assert upstream_name not in names


@pytest.mark.timeout(60)
def test_two_upstreams_side_by_side(mapped: Mapped) -> None:
    s3 = mapped.s3
    s3.put_object(Bucket="datasets", Key="two/m", Body=b"on moto")
    s3.put_object(Bucket="sw-data", Key="two/s", Body=b"on seaweed")
    assert mapped.seaweed.get_object(Bucket=mapped.real["sw-data"], Key="two/s")[
        "Body"].read() == b"on seaweed"
    assert error_of(mapped.seaweed.head_object, Bucket=mapped.real["sw-data"],
                    Key="two/m") == (404, "404")
    assert moto_keys(mapped, "datasets", PREFIX + "two/") == [PREFIX + "two/m"]
    # A copy between the two streams through the node.
    body = pattern(3 * MiB, seed=61)
    s3.put_object(Bucket="datasets", Key="two/big", Body=body)
    s3.copy_object(Bucket="sw-data", Key="two/from-moto",
                   CopySource={"Bucket": "datasets", "Key": "two/big"})
    got = mapped.seaweed.get_object(Bucket=mapped.real["sw-data"], Key="two/from-moto")
    assert md5_hex(got["Body"].read()) == md5_hex(body)
    assert s3.get_object(Bucket="sw-data", Key="two/from-moto")["Body"].read() == body


@pytest.mark.timeout(60)
def test_unmapped_buckets_stay_local(mapped: Mapped) -> None:
    name = f"local-{uuid.uuid4().hex[:10]}"
    mapped.s3.create_bucket(Bucket=name)
    mapped.s3.put_object(Bucket=name, Key="k", Body=b"local body")
    assert mapped.s3.get_object(Bucket=name, Key="k")["Body"].read() == b"local body"
    assert error_of(mapped.moto.head_bucket, Bucket=name) == (404, "404")
    assert error_of(mapped.seaweed.head_bucket, Bucket=name) == (404, "404")
    assert name in [b["Name"] for b in mapped.s3.list_buckets()["Buckets"]]
    # A copy from a local bucket into a mapped one, and back.
    mapped.s3.copy_object(Bucket="renamed", Key="from-local", CopySource=f"{name}/k")
    assert mapped.moto.get_object(Bucket=mapped.real["renamed"], Key="from-local")[
        "Body"].read() == b"local body"
    mapped.s3.copy_object(Bucket=name, Key="back", CopySource="renamed/from-local")
    assert mapped.s3.get_object(Bucket=name, Key="back")["Body"].read() == b"local body"
    # Pinned to the version the client named, across stores too.
    assert error_of(mapped.s3.copy_object, Bucket="renamed", Key="pinned", CopySource=f"{name}/k",
                    CopySourceIfMatch='"0123456789abcdef0123456789abcdef"') == (412, "PreconditionFailed")
    # A part copied from a local object into an upload on the backing store.
    uid = mapped.s3.create_multipart_upload(Bucket="renamed", Key="parts")["UploadId"]
    part = mapped.s3.upload_part_copy(Bucket="renamed", Key="parts", UploadId=uid, PartNumber=1,
                                      CopySource=f"{name}/k", CopySourceRange="bytes=6-9")
    assert error_of(mapped.s3.upload_part_copy, Bucket="renamed", Key="parts", UploadId=uid, PartNumber=2,
                    CopySource=f"{name}/k", CopySourceRange="bytes=6-99")[0] == 416
    mapped.s3.complete_multipart_upload(
        Bucket="renamed", Key="parts", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["CopyPartResult"]["ETag"]}]})
    assert mapped.s3.get_object(Bucket="renamed", Key="parts")["Body"].read() == b"body"


# -- credentials ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_client_credentials_never_reach_the_upstream(mapped: Mapped) -> None:
    s3, proxy = mapped.s3, mapped.proxy
    proxy.clear_log()
    s3.put_object(Bucket="proxied", Key="k", Body=b"x" * 1000)
    s3.get_object(Bucket="proxied", Key="k")["Body"].read()
    s3.head_object(Bucket="proxied", Key="k")
    s3.list_objects_v2(Bucket="proxied")
    uid = s3.create_multipart_upload(Bucket="proxied", Key="mp")["UploadId"]
    e = s3.upload_part(Bucket="proxied", Key="mp", UploadId=uid, PartNumber=1, Body=b"p")["ETag"]
    s3.complete_multipart_upload(Bucket="proxied", Key="mp", UploadId=uid,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e}]})
    s3.copy_object(Bucket="proxied", Key="c", CopySource={"Bucket": "proxied", "Key": "k"})
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "proxied", "Key": "k"})
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.read() == b"x" * 1000
    events = proxy.events()
    assert len(events) >= 9
    assert {ev.access_key for ev in events} == {MOTO_ACCESS_KEY}
    for ev in events:
        assert ACCESS_KEY not in ev.path + ev.query + str(ev.headers)


@pytest.mark.timeout(60)
def test_seaweed_accepts_the_configured_upstream_keys(mapped: Mapped) -> None:
    # SeaweedFS checks signatures: this only works with the mapping's own
    # keys, correctly signed (the client signs with keys SeaweedFS rejects).
    assert mapped.ns.access_key != SEAWEED_ACCESS_KEY
    mapped.s3.put_object(Bucket="sw-data", Key="signed", Body=b"signed")
    assert mapped.s3.get_object(Bucket="sw-data", Key="signed")["Body"].read() == b"signed"
    # The client's keys straight at SeaweedFS: refused.
    direct = mapped.seaweed_server.client(access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    status, code = error_of(direct.get_object, Bucket=mapped.real["sw-data"], Key="signed")
    assert (status, code) == (403, "InvalidAccessKeyId")


# -- upstream errors pass through ---------------------------------------------------


@pytest.mark.timeout(60)
def test_upstream_errors_pass_through(mapped: Mapped) -> None:
    s3 = mapped.s3
    s3.put_object(Bucket="datasets", Key="err/obj", Body=bytes(100))
    etag = s3.head_object(Bucket="datasets", Key="err/obj")["ETag"]
    assert error_of(s3.get_object, Bucket="datasets", Key="err/missing") == (404, "NoSuchKey")
    assert error_of(s3.head_object, Bucket="datasets", Key="err/missing") == (404, "404")
    assert error_of(s3.get_object_tagging, Bucket="datasets", Key="err/missing") == (
        404, "NoSuchKey")
    assert error_of(s3.get_object, Bucket="datasets", Key="err/obj",
                    IfMatch='"0000"') == (412, "PreconditionFailed")
    assert error_of(s3.get_object, Bucket="datasets", Key="err/obj",
                    Range="bytes=100-") == (416, "InvalidRange")
    assert error_of(s3.copy_object, Bucket="datasets", Key="err/c",
                    CopySource={"Bucket": "datasets", "Key": "err/obj"},
                    CopySourceIfMatch='"0000"') == (412, "PreconditionFailed")
    assert s3.get_object(Bucket="datasets", Key="err/obj", IfMatch=etag)["Body"].read() == bytes(
        100)
    # The same from SeaweedFS.
    assert error_of(s3.get_object, Bucket="sw-data", Key="err/missing") == (404, "NoSuchKey")
    s3.put_object(Bucket="sw-data", Key="err/obj", Body=bytes(100))
    assert error_of(s3.get_object, Bucket="sw-data", Key="err/obj",
                    IfMatch='"0000"') == (412, "PreconditionFailed")
    assert error_of(s3.get_object, Bucket="sw-data", Key="err/obj",
                    Range="bytes=200-") == (416, "InvalidRange")
    # (moto accepts parts for unknown upload ids; SeaweedFS does not)
    assert error_of(s3.upload_part, Bucket="sw-data", Key="err/obj", UploadId="nope",
                    PartNumber=1, Body=b"x") == (404, "NoSuchUpload")


@pytest.mark.timeout(60)
def test_missing_upstream_bucket_is_no_such_bucket(mapped: Mapped) -> None:
    s3 = mapped.s3
    assert error_of(s3.get_object, Bucket="ghost", Key="k") == (404, "NoSuchBucket")
    assert error_of(s3.put_object, Bucket="ghost", Key="k", Body=b"x") == (404, "NoSuchBucket")
    assert error_of(s3.list_objects_v2, Bucket="ghost") == (404, "NoSuchBucket")
    assert error_of(s3.head_bucket, Bucket="ghost") == (404, "404")
    assert error_of(s3.create_multipart_upload, Bucket="ghost", Key="k") == (
        404, "NoSuchBucket")


@pytest.mark.timeout(60)
def test_seaweed_access_denied_passes_through(mapped: Mapped) -> None:
    s3 = mapped.s3
    s3.put_object(Bucket="sw-data", Key="ro/obj", Body=b"readable")
    # An identity that may read but not write: SeaweedFS's AccessDenied as is.
    assert s3.get_object(Bucket="sw-readonly", Key="ro/obj")["Body"].read() == b"readable"
    assert error_of(s3.put_object, Bucket="sw-readonly", Key="ro/new", Body=b"x") == (
        403, "AccessDenied")
    assert error_of(s3.delete_object, Bucket="sw-readonly", Key="ro/obj") == (403, "AccessDenied")
    assert s3.get_object(Bucket="sw-data", Key="ro/obj")["Body"].read() == b"readable"


@pytest.mark.timeout(60)
def test_wrong_upstream_credentials_are_403(mapped: Mapped) -> None:
    # SeaweedFS answers SignatureDoesNotMatch to the gateway's wrong secret.
    # Passed through as is, or as AccessDenied (the client's own signature
    # was fine): both are 403, neither retried, nothing is written.
    s3 = mapped.s3
    for call, kw in ((s3.get_object, {"Key": "ro/obj"}),
                     (s3.put_object, {"Key": "bad/new", "Body": b"x"}),
                     (s3.list_objects_v2, {})):
        status, code = error_of(call, Bucket="sw-badkey", **kw)
        assert status == 403, (call, code)
        assert code in ("AccessDenied", "SignatureDoesNotMatch"), code
    assert error_of(mapped.seaweed.head_object, Bucket=mapped.real["sw-data"],
                    Key="bad/new") == (404, "404")


# -- the AWS CLI -------------------------------------------------------------------------


def aws(server: S3Server, *args: str, timeout: float = 60) -> str:
    proc = subprocess.run([AWS, "--endpoint-url", server.url, *args], env=server.cli_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"aws {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(120)
def test_aws_cli_cp_ls_sync_through_mapped_bucket(mapped: Mapped, tmp_path: Path) -> None:
    ns = mapped.ns
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    big = pattern(10 * MiB + 7, seed=62)  # multipart in the CLI
    (src / "small.txt").write_bytes(b"small\n")
    (src / "sub" / "big.bin").write_bytes(big)
    aws(ns, "s3", "cp", str(src / "small.txt"), "s3://datasets/cli/small.txt")
    aws(ns, "s3", "cp", str(src / "sub" / "big.bin"), "s3://datasets/cli/big.bin")
    head = mapped.moto.head_object(Bucket=mapped.real["datasets"], Key=PREFIX + "cli/big.bin")
    assert head["ContentLength"] == len(big)
    out = aws(ns, "s3", "ls", "s3://datasets/cli/")
    assert "small.txt" in out and "big.bin" in out and str(len(big)) in out
    assert PREFIX not in out
    aws(ns, "s3", "cp", "s3://datasets/cli/big.bin", str(tmp_path / "big.copy"))
    assert (tmp_path / "big.copy").read_bytes() == big
    aws(ns, "s3", "sync", str(src), "s3://sw-data/synced/")
    assert mapped.seaweed.get_object(Bucket=mapped.real["sw-data"], Key="synced/sub/big.bin")[
        "ContentLength"] == len(big)
    assert "upload:" not in aws(ns, "s3", "sync", str(src), "s3://sw-data/synced/")
    dst = tmp_path / "dst"
    aws(ns, "s3", "sync", "s3://sw-data/synced/", str(dst))
    assert (dst / "sub" / "big.bin").read_bytes() == big
    assert (dst / "small.txt").read_bytes() == b"small\n"


# -- `nearstore serve --config upstream.toml` -----------------------------------------------


def _serve_with_config(workdir: Path, moto: S3Server, tls: bool) -> S3Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = {"host": "127.0.0.1", "port": port, "data_dir": str(workdir / "data")}
    text = "[server]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in server.items())
    tls_files = None
    if tls:
        tls_files = make_tls_files(workdir / "tls")
        text += (f"\n[tls]\ncert = {toml_value(str(tls_files.cert_file))}\n"
                 f"key = {toml_value(str(tls_files.key_file))}\n")
    text += "\n" + toml_tables("buckets", [upstream_mapping(moto, "*")])
    config = workdir / "upstream.toml"
    config.write_text(text)
    exe = Path(sys.executable).parent / "nearstore"
    env = dict(os.environ, NEARSTORE_ACCESS_KEY=ACCESS_KEY,
               NEARSTORE_SECRET_KEY=SECRET_KEY, PYTHONUNBUFFERED="1")
    env.pop("PYTHONWARNINGS", None)
    srv = S3Server(kind="nearstore-config", host="127.0.0.1", port=port,
                   argv=[str(exe), "serve", "--config", str(config)], env=env,
                   log_path=workdir / "server.log", health_path="/_nearstore/health",
                   tls=tls_files)
    srv.start()
    return srv


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_serve_config_file_in_front_of_moto(servers: ServerPool, tmp_path: Path,
                                            tls: bool) -> None:
    moto = servers.get("moto")
    backing = servers.client("moto")
    srv = _serve_with_config(tmp_path / "ns", moto, tls)
    try:
        s3 = srv.client()  # boto3 defaults: over HTTPS, aws-chunked with a trailing CRC32
        bucket = f"cfg-{'tls' if tls else 'plain'}-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        backing.head_bucket(Bucket=bucket)  # created upstream
        body = pattern(MiB + 3, seed=63)
        put = s3.put_object(Bucket=bucket, Key="stream", Body=io.BytesIO(body))
        assert put["ETag"] == f'"{md5_hex(body)}"'
        stored = backing.get_object(Bucket=bucket, Key="stream")["Body"].read()
        assert md5_hex(stored) == md5_hex(body), "chunk framing or trailer reached the upstream"
        got = s3.get_object(Bucket=bucket, Key="stream", ChecksumMode="ENABLED")
        assert got["Body"].read() == body
        if got.get("ChecksumCRC32"):
            assert got["ChecksumCRC32"] == checksum_b64("CRC32", body)
        # The transfer manager: multipart, each part with a trailer over HTTPS.
        src = tmp_path / "tm.bin"
        src.write_bytes(pattern(9 * MiB, seed=64))
        s3.upload_file(str(src), bucket, "tm.bin")
        assert backing.head_object(Bucket=bucket, Key="tm.bin")["ETag"].endswith('-2"')
        s3.download_file(bucket, "tm.bin", str(tmp_path / "tm.out"))
        assert (tmp_path / "tm.out").read_bytes() == src.read_bytes()
        listed = s3.list_objects_v2(Bucket=bucket)
        assert [o["Key"] for o in listed["Contents"]] == ["stream", "tm.bin"]
        with pytest.raises(ClientError):
            srv.client(secret_key="wrong").list_objects_v2(Bucket=bucket)
    finally:
        srv.stop()

"""The AWS CLI (the venv's ``aws``) against the server, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.s3util import pattern
from tests.helpers.servers import S3Server

AWS = str(Path(sys.executable).parent / "aws")
MiB = 1024 * 1024


def aws(server: S3Server, *args: str, timeout: float = 60) -> str:
    proc = subprocess.run([AWS, "--endpoint-url", server.url, *args], env=server.cli_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"aws {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(120)
def test_aws_cli_cp_ls_sync_range(server: S3Server, s3: Any, bucket: str,
                                  tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub dir").mkdir(parents=True)
    small = b"small file\n"
    big = pattern(10 * MiB + 5, seed=30)  # above the CLI's 8 MiB multipart threshold
    (src / "small.txt").write_bytes(small)
    (src / "sub dir" / "big.bin").write_bytes(big)
    (src / "sub dir" / "ünï+code.txt").write_bytes(b"unicode")

    aws(server, "s3", "cp", str(src / "small.txt"), f"s3://{bucket}/one/small.txt")
    aws(server, "s3", "cp", str(src / "sub dir" / "big.bin"), f"s3://{bucket}/one/big.bin")
    assert s3.head_object(Bucket=bucket, Key="one/big.bin")["ETag"].endswith('-2"')
    out = aws(server, "s3", "ls", f"s3://{bucket}/one/")
    assert "small.txt" in out and "big.bin" in out and str(len(big)) in out
    assert bucket in aws(server, "s3", "ls")

    aws(server, "s3", "cp", f"s3://{bucket}/one/big.bin", str(tmp_path / "big.copy"))
    assert (tmp_path / "big.copy").read_bytes() == big

    aws(server, "s3", "sync", str(src), f"s3://{bucket}/synced/")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="synced/")[
        "Contents"])
    assert keys == ["synced/small.txt", "synced/sub dir/big.bin", "synced/sub dir/ünï+code.txt"]
    # A second sync uploads nothing.
    assert "upload:" not in aws(server, "s3", "sync", str(src), f"s3://{bucket}/synced/")
    dst = tmp_path / "dst"
    aws(server, "s3", "sync", f"s3://{bucket}/synced/", str(dst))
    assert (dst / "sub dir" / "big.bin").read_bytes() == big
    assert (dst / "sub dir" / "ünï+code.txt").read_bytes() == b"unicode"

    out_file = tmp_path / "range.bin"
    out = aws(server, "s3api", "get-object", "--bucket", bucket, "--key", "one/big.bin",
              "--range", "bytes=100-199", str(out_file))
    assert out_file.read_bytes() == big[100:200]
    assert "bytes 100-199/" in out

    aws(server, "s3", "rm", f"s3://{bucket}/synced/", "--recursive")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="synced/")


def test_aws_cli_access_control(server: S3Server, s3: Any, bucket: str, tmp_path: Path) -> None:
    """ACLs, a bucket policy and the Public Access Block set with the CLI,
    then read by an anonymous client (no signature, as curl)."""
    (tmp_path / "f.txt").write_bytes(b"public file\n")
    aws(server, "s3", "cp", str(tmp_path / "f.txt"), f"s3://{bucket}/pub.txt", "--acl", "public-read")
    aws(server, "s3", "cp", str(tmp_path / "f.txt"), f"s3://{bucket}/priv.txt")
    assert rawhttp.send(server, "GET", key_path(bucket, "pub.txt"), {}).body == b"public file\n"
    assert rawhttp.send(server, "GET", key_path(bucket, "priv.txt"), {}).status == 403
    grants = json.loads(aws(server, "s3api", "get-object-acl", "--bucket", bucket, "--key", "pub.txt"))["Grants"]
    assert {"Type": "Group", "URI": "http://acs.amazonaws.com/groups/global/AllUsers"} in [g["Grantee"] for g in grants]

    policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/priv.txt"}]})
    aws(server, "s3api", "put-bucket-policy", "--bucket", bucket, "--policy", policy)
    assert json.loads(aws(server, "s3api", "get-bucket-policy", "--bucket", bucket))["Policy"] == policy
    status = json.loads(aws(server, "s3api", "get-bucket-policy-status", "--bucket", bucket))
    assert status["PolicyStatus"]["IsPublic"] is True
    assert rawhttp.send(server, "GET", key_path(bucket, "priv.txt"), {}).status == 200

    aws(server, "s3api", "put-public-access-block", "--bucket", bucket, "--public-access-block-configuration",
        "BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true")
    assert rawhttp.send(server, "GET", key_path(bucket, "pub.txt"), {}).status == 403
    assert rawhttp.send(server, "GET", key_path(bucket, "priv.txt"), {}).status == 403
    aws(server, "s3api", "delete-public-access-block", "--bucket", bucket)
    aws(server, "s3api", "delete-bucket-policy", "--bucket", bucket)
    aws(server, "s3api", "put-object-acl", "--bucket", bucket, "--key", "pub.txt", "--acl", "private")
    assert rawhttp.send(server, "GET", key_path(bucket, "pub.txt"), {}).status == 403
    assert s3.get_object(Bucket=bucket, Key="pub.txt")["Body"].read() == b"public file\n"

"""Third-party S3 clients against a real node, each with the settings that
docs/CLIENTS.md tells users to set and nothing else: s3fs/fsspec, pyarrow's
S3FileSystem (Parquet written and read back), and AWS's PyTorch connector
(s3torchconnector: map and iterable datasets, S3Checkpoint). The AWS CLI is
in test_awscli.py, boto3 everywhere else."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from s3torchconnector import (
    S3Checkpoint,
    S3ClientConfig,
    S3IterableDataset,
    S3MapDataset,
    S3Reader,
    S3ReaderConstructor,
)

from tests.helpers.s3util import pattern
from tests.helpers.servers import S3Server

MiB = 1024 * 1024
AWS = str(Path(sys.executable).parent / "aws")


@pytest.fixture
def node(nearstore_server: S3Server, servers: Any) -> tuple[S3Server, Any, str]:
    """The session's plain-HTTP node, a boto3 client for it and a new bucket."""
    s3 = servers.client(nearstore_server.kind)
    bucket = f"compat-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return nearstore_server, s3, bucket


# -- s3fs / fsspec -------------------------------------------------------------

def s3fs_for(srv: S3Server, **client_kwargs: Any) -> s3fs.S3FileSystem:
    # No region: the node accepts any; skip_instance_cache only so that tests
    # share no listing cache.
    return s3fs.S3FileSystem(key=srv.access_key, secret=srv.secret_key, endpoint_url=srv.url,
                             client_kwargs=client_kwargs, skip_instance_cache=True)


def test_s3fs_ls_put_get_and_seek(node: Any, tmp_path: Any) -> None:
    srv, s3, bucket = node
    fs = s3fs_for(srv)
    data = pattern(3 * MiB + 11, seed=61)
    local = tmp_path / "in.bin"
    local.write_bytes(data)
    fs.put(str(local), f"{bucket}/dir/a.bin")
    fs.pipe(f"{bucket}/dir/sub/b.txt", b"bee")
    assert s3.get_object(Bucket=bucket, Key="dir/a.bin")["Body"].read() == data

    assert sorted(fs.ls(f"{bucket}/dir", detail=False)) == [
        f"{bucket}/dir/a.bin", f"{bucket}/dir/sub"]
    assert fs.find(f"{bucket}/dir") == [f"{bucket}/dir/a.bin", f"{bucket}/dir/sub/b.txt"]
    info = fs.info(f"{bucket}/dir/a.bin")
    assert info["size"] == len(data) and info["type"] == "file"
    assert fs.isdir(f"{bucket}/dir/sub") and not fs.exists(f"{bucket}/nope")

    fs.get(f"{bucket}/dir/a.bin", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == data
    assert fs.cat(f"{bucket}/dir/sub/b.txt") == b"bee"
    with fsspec.open(f"s3://{bucket}/dir/sub/b.txt", key=srv.access_key,
                     secret=srv.secret_key, endpoint_url=srv.url) as f:
        assert f.read() == b"bee"
    assert fs.cat_file(f"{bucket}/dir/a.bin", start=100, end=200) == data[100:200]

    # Small block size: every seek + read is a ranged GET of its own.
    with fs.open(f"{bucket}/dir/a.bin", "rb", block_size=256 * 1024) as f:
        f.seek(2 * MiB + 5)
        assert f.read(1000) == data[2 * MiB + 5: 2 * MiB + 1005]
        f.seek(-10, io.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(7)
        assert f.read(3) == data[7:10]

    fs.rm(f"{bucket}/dir", recursive=True)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="dir/")

    made = f"compat-mk-{uuid.uuid4().hex[:12]}"
    fs.mkdir(made)
    # As on AWS: s3fs names its region_name as the LocationConstraint, and
    # us-east-1 may not be named.
    with pytest.raises(OSError, match="location-constraint"):
        s3fs_for(srv, region_name="us-east-1").mkdir(made + "-x")
    assert made in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert {bucket, made} <= set(fs.ls("", detail=False))


def test_s3fs_multipart_write(node: Any) -> None:
    srv, s3, bucket = node
    fs = s3fs_for(srv)
    data = pattern(12 * MiB + 3, seed=62)
    # block_size 5 MiB (the S3 minimum part size): three parts.
    with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * MiB) as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])
    head = s3.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-3"')
    with fs.open(f"{bucket}/big.bin", "rb") as f:
        assert f.read() == data


# -- pyarrow -------------------------------------------------------------------

def arrow_fs(srv: S3Server, host: str | None = None) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=srv.access_key, secret_key=srv.secret_key, region=srv.region,
        endpoint_override=f"{host or srv.host}:{srv.port}", scheme="http")


def table(n: int, seed: int) -> pa.Table:
    return pa.table({
        "id": pa.array(range(seed * n, seed * n + n), pa.int64()),
        "name": pa.array([f"row-{seed}-{i}" for i in range(n)]),
        "value": pa.array([i * 0.5 + seed for i in range(n)], pa.float64()),
    })


def test_pyarrow_parquet_write_read(node: Any) -> None:
    srv, s3, bucket = node
    fs = arrow_fs(srv, "localhost")
    t = table(20_000, seed=1)
    pq.write_table(t, f"{bucket}/one.parquet", filesystem=fs)
    body = s3.get_object(Bucket=bucket, Key="one.parquet")["Body"].read()
    assert body[:4] == b"PAR1" and body[-4:] == b"PAR1"
    assert pq.read_table(f"{bucket}/one.parquet", filesystem=fs).equals(t)
    # Column projection: ranged reads of the column chunks and the footer.
    got = pq.read_table(f"{bucket}/one.parquet", filesystem=fs, columns=["name"])
    assert got.column("name").equals(t.column("name"))
    info = fs.get_file_info(f"{bucket}/one.parquet")
    assert info.type == pafs.FileType.File and info.size == len(body)


def test_pyarrow_large_stream_and_dataset(node: Any) -> None:
    srv, s3, bucket = node
    fs = arrow_fs(srv)
    # Bigger than pyarrow's upload part size (10 MiB): a multipart upload.
    data = pattern(11 * MiB + 7, seed=63)
    with fs.open_output_stream(f"{bucket}/raw/big.bin") as out:
        for i in range(0, len(data), 3 * MiB):
            out.write(data[i:i + 3 * MiB])
    head = s3.head_object(Bucket=bucket, Key="raw/big.bin")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-2"')
    with fs.open_input_file(f"{bucket}/raw/big.bin") as f:
        assert f.read_at(100, 5 * MiB) == data[5 * MiB: 5 * MiB + 100]
        assert f.readall() == data

    parts = [table(500, seed=i) for i in range(4)]
    for i, t in enumerate(parts):
        pq.write_table(t, f"{bucket}/ds/part-{i}.parquet", filesystem=fs)
    ds = pads.dataset(f"{bucket}/ds/", filesystem=fs, format="parquet")
    assert sorted(ds.files) == [f"{bucket}/ds/part-{i}.parquet" for i in range(4)]
    got = ds.to_table().sort_by("id")
    assert got.equals(pa.concat_tables(parts))
    assert ds.to_table(filter=pads.field("id") < 3).column("id").to_pylist() == [0, 1, 2]
    selector = pafs.FileSelector(f"{bucket}/ds", recursive=True)
    assert len(fs.get_file_info(selector)) == 4


# -- s3torchconnector -----------------------------------------------------------

@pytest.fixture
def torch_env(node: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """s3torchconnector takes credentials from the standard AWS variables."""
    srv, _, _ = node
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv.secret_key)
    return node


def connector_kwargs(srv: S3Server, endpoint: str | None = None) -> dict[str, Any]:
    # force_path_style: without it the CRT client puts the bucket in the host
    # name (bucket.localhost), which does not resolve.
    return {"region": srv.region, "endpoint": endpoint or srv.url,
            "s3client_config": S3ClientConfig(force_path_style=True)}


def read_sample(reader: S3Reader) -> tuple[str, bytes]:
    return reader.key, reader.read()


def test_s3torchconnector_datasets(torch_env: Any) -> None:
    srv, s3, bucket = torch_env
    samples = {f"train/shard-{i:03d}.bin": pattern(1000 + 997 * i, seed=70 + i)
               for i in range(12)}
    samples["train/big.bin"] = pattern(9 * MiB + 1, seed=90)  # above the 8 MiB part size
    for key, body in samples.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    s3.put_object(Bucket=bucket, Key="other/x", Body=b"not in the prefix")

    # localhost, as a job on the node's machine names it.
    kw = connector_kwargs(srv, f"http://localhost:{srv.port}")
    mapped = S3MapDataset.from_prefix(f"s3://{bucket}/train/", transform=read_sample, **kw)
    assert len(mapped) == len(samples)
    assert dict(mapped[i] for i in range(len(mapped))) == samples

    iterable = S3IterableDataset.from_prefix(f"s3://{bucket}/train/", transform=read_sample,
                                             **kw)
    assert dict(iterable) == samples

    # Range-based readers: seek and partial reads.
    ranged = S3MapDataset.from_prefix(
        f"s3://{bucket}/train/big", reader_constructor=S3ReaderConstructor.range_based(), **kw)
    reader = ranged[0]
    reader.seek(5 * MiB)
    assert reader.read(1000) == samples["train/big.bin"][5 * MiB: 5 * MiB + 1000]

    # Two worker processes, as a training job runs it: each makes its own client.
    loader = torch.utils.data.DataLoader(mapped, batch_size=4, collate_fn=list, num_workers=2)
    got = [item for batch in loader for item in batch]
    assert dict(got) == samples


def test_s3torchconnector_checkpoint(torch_env: Any) -> None:
    srv, s3, bucket = torch_env
    gen = torch.Generator().manual_seed(5)
    state = {
        "weight": torch.randn(1024, 3 * 1024, generator=gen),  # 12 MiB: a multipart upload
        "bias": torch.arange(17, dtype=torch.int64),
        "step": 1234,
    }
    checkpoint = S3Checkpoint(**connector_kwargs(srv))
    uri = f"s3://{bucket}/ckpt/epoch-1.pt"
    with checkpoint.writer(uri) as writer:
        torch.save(state, writer)
    head = s3.head_object(Bucket=bucket, Key="ckpt/epoch-1.pt")
    assert head["ContentLength"] > 12 * MiB and head["ETag"].endswith('-2"')  # 8 MiB parts
    with checkpoint.reader(uri) as reader:
        loaded = torch.load(reader, weights_only=True)
    assert loaded.keys() == state.keys() and loaded["step"] == 1234
    assert torch.equal(loaded["weight"], state["weight"])
    assert torch.equal(loaded["bias"], state["bias"])


# -- HTTPS with a private CA, and configuration from the environment only -------

def test_https_with_a_private_ca(nearstore_tls_server: S3Server, servers: Any,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    srv = nearstore_tls_server
    ca = str(srv.ca_file)
    s3 = servers.client(srv.kind)
    bucket = f"compat-tls-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    t = table(300, seed=7)

    fs = s3fs_for(srv, verify=ca)
    fs.pipe(f"{bucket}/fsspec.bin", b"over tls")
    assert fs.cat(f"{bucket}/fsspec.bin") == b"over tls"

    afs = pafs.S3FileSystem(access_key=srv.access_key, secret_key=srv.secret_key,
                            region=srv.region, endpoint_override=srv.url, tls_ca_file_path=ca)
    pq.write_table(t, f"{bucket}/t.parquet", filesystem=afs)
    assert pq.read_table(f"{bucket}/t.parquet", filesystem=afs).equals(t)

    # The connector's TLS (s2n) takes extra trust anchors from SSL_CERT_FILE.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv.secret_key)
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    kw = connector_kwargs(srv)
    assert [r.read() for r in S3MapDataset.from_prefix(f"s3://{bucket}/fsspec", **kw)] == [
        b"over tls"]
    with S3Checkpoint(**kw).writer(f"s3://{bucket}/w.pt") as writer:
        torch.save({"x": torch.arange(5)}, writer)
    with S3Checkpoint(**kw).reader(f"s3://{bucket}/w.pt") as reader:
        assert torch.equal(torch.load(reader, weights_only=True)["x"], torch.arange(5))


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_endpoint_from_the_environment(node: Any, monkeypatch: pytest.MonkeyPatch,
                                       variable: str) -> None:
    """The endpoint, keys and region in the environment, nothing in code:
    enough for boto3, s3fs/fsspec, the AWS CLI and pyarrow's s3:// URIs."""
    srv, s3, bucket = node
    monkeypatch.setenv(variable, srv.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv.secret_key)
    monkeypatch.setenv("AWS_REGION", srv.region)
    # fsspec reuses a filesystem made with the same arguments (here: none),
    # which would hide whether this test's variable is read.
    s3fs.S3FileSystem.clear_instance_cache()

    boto3.client("s3").put_object(Bucket=bucket, Key="env/boto3", Body=b"from boto3")
    assert s3.get_object(Bucket=bucket, Key="env/boto3")["Body"].read() == b"from boto3"

    with fsspec.open(f"s3://{bucket}/env/fsspec", "wb") as f:
        f.write(b"from fsspec")
    assert s3fs.S3FileSystem(skip_instance_cache=True).cat(f"{bucket}/env/fsspec") == (
        b"from fsspec")

    t = table(100, seed=3)
    pq.write_table(t, f"s3://{bucket}/env/t.parquet")
    assert pq.read_table(f"s3://{bucket}/env/t.parquet").equals(t)
    fs, path = pafs.FileSystem.from_uri(f"s3://{bucket}/env/t.parquet")
    assert fs.get_file_info(path).size == s3.head_object(
        Bucket=bucket, Key="env/t.parquet")["ContentLength"]

    env = dict(os.environ, AWS_PAGER="")
    out = subprocess.run([AWS, "s3", "ls", f"s3://{bucket}/env/"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert sorted(line.split()[-1] for line in out.splitlines()) == [
        "boto3", "fsspec", "t.parquet"]

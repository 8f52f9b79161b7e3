"""clients.datasets against a real node: WebDataset shards and objects read
through nearstore, plain iteration and torch's DataLoader with worker
processes, sharding by rank and worker."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from nearstore.clients.connect import connect
from nearstore.clients.datasets import ObjectDataset, ObjectStream, S3Source, TarDataset
from tests.helpers.servers import S3Server
from tests.unit.clients.test_datasets import make_tar

SHARDS = 5
PER_SHARD = 40


@pytest.fixture(scope="module")
def dataset(nearstore_server: S3Server) -> Any:
    env = {"NEARSTORE_ENDPOINT": nearstore_server.url,
           "NEARSTORE_ACCESS_KEY": nearstore_server.access_key,
           "NEARSTORE_SECRET_KEY": nearstore_server.secret_key}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # module-wide, and inherited by DataLoader workers
    s3 = connect()
    bucket = f"datasets-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    expected: dict[str, tuple[bytes, int]] = {}
    for s in range(SHARDS):
        members = []
        for i in range(PER_SHARD):
            key = f"{s:02d}/{i:04d}"
            data = os.urandom(1000 + i)
            members += [(f"{key}.bin", data), (f"{key}.cls", str(i % 10).encode())]
            expected[key] = (data, i % 10)
        s3.put_object(Bucket=bucket, Key=f"shards/train-{s:04d}.tar", Body=make_tar(members))
    for i in range(12):
        s3.put_object(Bucket=bucket, Key=f"objects/{i:03d}", Body=bytes([i]) * 100)
    yield bucket, expected
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def decode(sample: dict[str, Any]) -> tuple[str, torch.Tensor, int]:
    return sample["__key__"], torch.frombuffer(bytearray(sample["bin"]), dtype=torch.uint8), int(sample["cls"])


def test_tar_shards_as_a_plain_iterator(dataset: Any) -> None:
    bucket, expected = dataset
    ds = TarDataset(f"s3://{bucket}/shards/", decode=lambda s: (s["__key__"], s["bin"], s["__url__"]))
    got = list(ds)
    assert [k for k, _, _ in got] == sorted(expected)
    assert all(data == expected[k][0] for k, data, _ in got)
    assert got[0][2] == f"s3://{bucket}/shards/train-0000.tar"


def test_tar_shards_through_a_dataloader_with_workers(dataset: Any) -> None:
    bucket, expected = dataset
    seen: list[str] = []
    for rank in range(2):  # two ranks, each with 2 loader processes
        ds = TarDataset(f"s3://{bucket}/shards/", decode=decode, rank=rank, world_size=2,
                        shuffle=True, seed=3)
        ds.set_epoch(1)
        loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=list)
        for batch in loader:
            for key, tensor, cls in batch:
                assert bytes(tensor.numpy()) == expected[key][0] and cls == expected[key][1]
                seen.append(key)
    assert sorted(seen) == sorted(expected)  # every sample exactly once across ranks x workers


def test_object_datasets_with_torch(dataset: Any) -> None:
    bucket, _ = dataset
    ds = ObjectDataset(f"s3://{bucket}/objects/", decode=lambda kv: torch.tensor(kv[1][0]))
    assert len(ds) == 12
    sampler = DistributedSampler(ds, num_replicas=3, rank=2, shuffle=False)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2)
    assert torch.cat(list(loader)).tolist() == [2, 5, 8, 11]
    stream = ObjectStream(S3Source(bucket), "objects/", decode=lambda kv: kv[1][0], shuffle=True,
                          seed=1, prefetch=3)
    got = [int(x) for x in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(got) == list(range(12))


def test_a_missing_bucket_is_an_error_not_an_empty_dataset(dataset: Any) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="NoSuchBucket"):
        TarDataset(f"s3://no-such-{uuid.uuid4().hex[:8]}/shards/")

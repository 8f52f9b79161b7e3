"""clients/checkpoint.py against a real node: parallel multipart save,
ranged load, and no object (nor a lingering upload) after any failure."""

from __future__ import annotations

import io
import os
import pickle
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nearstore.clients import checkpoint
from nearstore.clients.connect import connect
from tests.conftest import ServerPool
from tests.helpers.servers import S3Server

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part: several parts from small sources


@pytest.fixture
def node(nearstore_server: S3Server) -> tuple[Any, str]:
    s3 = connect(nearstore_server.url, access_key=nearstore_server.access_key,
                 secret_key=nearstore_server.secret_key)  # fmt: skip
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def _data(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _get(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _no_uploads(s3: Any, bucket: str) -> None:
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_file_round_trip(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    data = _data(3 * PART + 17)
    src = tmp_path / "ckpt.bin"
    src.write_bytes(data)
    etag = checkpoint.save(s3, bucket, "run/step-1.bin", src, part_size=PART, streams=3)
    assert etag.strip('"').endswith("-4")  # a multipart object of four parts
    assert _get(s3, bucket, "run/step-1.bin") == data
    # str paths, file objects (read from their current offset) too
    checkpoint.save(s3, bucket, "str", str(src), part_size=PART)
    with open(src, "rb") as f:
        f.seek(100)
        checkpoint.save(s3, bucket, "from-100", f, part_size=PART)
        assert f.tell() == len(data)
    assert _get(s3, bucket, "str") == data and _get(s3, bucket, "from-100") == data[100:]
    out = tmp_path / "restored.bin"
    assert checkpoint.load(s3, bucket, "run/step-1.bin", out, streams=4, chunk=MiB) == len(data)
    assert out.read_bytes() == data
    assert bytes(checkpoint.load(s3, bucket, "run/step-1.bin", chunk=MiB)) == data
    buf = bytearray(len(data) + 5)
    view = checkpoint.load(s3, bucket, "run/step-1.bin", buf, streams=2, chunk=2 * MiB)
    assert len(view) == len(data) and bytes(view) == data
    _no_uploads(s3, bucket)


def test_buffers_and_streams(node: tuple[Any, str]) -> None:
    s3, bucket = node
    data = _data(2 * PART + 3, seed=1)
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    sources: dict[str, Any] = {
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(arr.data),
        "numpy-f32-view": memoryview(arr[: 2 * PART].view(np.float32).data),
        "bytesio": io.BytesIO(data),  # no descriptor: read in order
    }
    for name, src in sources.items():
        checkpoint.save(s3, bucket, name, src, part_size=PART, streams=2)
    for name in sources:
        want = data[: 2 * PART] if name == "numpy-f32-view" else data
        assert _get(s3, bucket, name) == want, name


class _Pipe(io.RawIOBase):
    """A stream with no descriptor and short reads; fails after ``fail_at``."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self.data, self.pos, self.fail_at = data, 0, fail_at

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise OSError("the source broke")
        n = min(len(b), 777_777, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_stream_memory_is_bounded(node: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s3, bucket = node
    data = _data(8 * PART + 1, seed=2)
    peak = 0
    real = checkpoint._Upload.buffer

    def counting(self: checkpoint._Upload) -> bytearray:
        nonlocal peak
        buf = real(self)
        peak = max(peak, self.allocated)
        return buf

    monkeypatch.setattr(checkpoint._Upload, "buffer", counting)
    checkpoint.save(s3, bucket, "stream", _Pipe(data), part_size=PART, streams=2)
    assert _get(s3, bucket, "stream") == data
    assert 1 <= peak <= 2  # never more part buffers than streams
    checkpoint.save(s3, bucket, "buffer", data, part_size=PART, streams=3)
    assert peak <= 3


def test_small_and_empty_sources_are_one_put(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    sources: dict[str, checkpoint.Source] = {
        "small": b"x" * 1000, "empty": b"", "empty-stream": _Pipe(b"")}
    for name, src in sources.items():
        etag = checkpoint.save(s3, bucket, name, src, part_size=PART)
        assert "-" not in etag.strip('"')
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    checkpoint.save(s3, bucket, "empty-file", empty)
    assert _get(s3, bucket, "small") == b"x" * 1000
    assert _get(s3, bucket, "empty") == b"" == _get(s3, bucket, "empty-file")


def _assert_untouched(s3: Any, bucket: str, key: str, old: bytes) -> None:
    assert _get(s3, bucket, key) == old  # the previous version, whole
    _no_uploads(s3, bucket)


def test_source_error_mid_way_leaves_nothing(node: tuple[Any, str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    s3, bucket = node
    data = _data(6 * PART, seed=3)
    # A stream that breaks in its fourth part: no object at all.
    with pytest.raises(OSError, match="the source broke"):
        checkpoint.save(s3, bucket, "new", _Pipe(data, fail_at=3 * PART + 10), part_size=PART,
                        streams=2)  # fmt: skip
    with pytest.raises(s3.exceptions.ClientError, match=r"404|Not Found"):
        s3.head_object(Bucket=bucket, Key="new")
    _no_uploads(s3, bucket)
    # A file whose read fails part-way: the old version stays.
    s3.put_object(Bucket=bucket, Key="ckpt", Body=b"old version")
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    real = os.preadv
    calls = 0

    def failing(fd: int, buffers: list[Any], offset: int) -> int:
        nonlocal calls
        calls += 1
        if offset >= 4 * PART:
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(checkpoint.os, "preadv", failing)
    with pytest.raises(OSError, match="Input/output error"):
        checkpoint.save(s3, bucket, "ckpt", src, part_size=PART, streams=2)
    monkeypatch.setattr(checkpoint.os, "preadv", real)
    assert calls >= 1
    _assert_untouched(s3, bucket, "ckpt", b"old version")
    # A file that is shorter than it said (truncated while being read).
    monkeypatch.setattr(checkpoint.os, "preadv",
                        lambda fd, bufs, off: 0 if off >= 5 * PART else real(fd, bufs, off))
    with pytest.raises(OSError, match="ended at"):
        checkpoint.save(s3, bucket, "ckpt", src, part_size=PART, streams=2)
    _assert_untouched(s3, bucket, "ckpt", b"old version")


def test_store_error_aborts(node: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s3, bucket = node
    s3.put_object(Bucket=bucket, Key="ckpt", Body=b"old")
    real = s3.upload_part

    def third_fails(**kw: Any) -> Any:
        if kw["PartNumber"] == 3:
            raise ConnectionResetError("the store went away")
        return real(**kw)

    monkeypatch.setattr(s3, "upload_part", third_fails)
    with pytest.raises(ConnectionResetError):
        checkpoint.save(s3, bucket, "ckpt", _data(5 * PART), part_size=PART, streams=2)
    _assert_untouched(s3, bucket, "ckpt", b"old")
    real_complete = s3.complete_multipart_upload
    monkeypatch.setattr(s3, "upload_part", real)

    def complete_fails(**kw: Any) -> Any:
        raise RuntimeError("complete failed")

    monkeypatch.setattr(s3, "complete_multipart_upload", complete_fails)
    with pytest.raises(RuntimeError):
        checkpoint.save(s3, bucket, "ckpt", _data(2 * PART), part_size=PART)
    monkeypatch.setattr(s3, "complete_multipart_upload", real_complete)
    _assert_untouched(s3, bucket, "ckpt", b"old")


def test_part_size_rules() -> None:
    with pytest.raises(ValueError, match="at least"):
        checkpoint._part_size(100, MiB)
    # 10,000 parts at most: a 1 TiB object gets parts of 105 MiB (whole MiB).
    assert checkpoint._part_size(1 << 40, PART) == 105 * MiB
    assert checkpoint._part_size(1 << 30, PART) == PART


def test_state_dict_round_trip(node: tuple[Any, str]) -> None:
    s3, bucket = node
    torch.manual_seed(0)
    sd: dict[str, Any] = {
        "embed.weight": torch.randn(1024, 1536, dtype=torch.bfloat16),  # 3 MiB
        "head.weight": torch.randn(1024, 1024),  # 4 MiB
        "step": torch.tensor(1000),
        "nested": {"ids": torch.arange(10)},
    }
    checkpoint.save_state_dict(s3, bucket, "model.pt", sd, part_size=PART, streams=2)
    got = checkpoint.load_state_dict(s3, bucket, "model.pt")
    assert got.keys() == sd.keys()
    for k in ("embed.weight", "head.weight", "step"):
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k])
    assert torch.equal(got["nested"]["ids"], sd["nested"]["ids"])


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getpid, ())


def test_load_state_dict_refuses_arbitrary_objects(node: tuple[Any, str]) -> None:
    s3, bucket = node
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "evil": Evil()}, buf)
    s3.put_object(Bucket=bucket, Key="evil.pt", Body=buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load_state_dict(s3, bucket, "evil.pt")


def test_torch_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        checkpoint.save_state_dict(None, "b", "k", {})
    with pytest.raises(ImportError, match="pip install torch"):
        checkpoint.load_state_dict(None, "b", "k")


def test_through_the_cache_in_front_of_seaweedfs(servers: ServerPool, tmp_path: Path) -> None:
    """Multipart passes through to the backing store; loads read via the cache."""
    srv = servers.get("nearstore-seaweed")
    s3 = connect(srv.url, access_key=srv.access_key, secret_key=srv.secret_key)
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    data = _data(3 * PART + 1, seed=4)
    checkpoint.save(s3, bucket, "ckpt", data, part_size=PART, streams=4)
    for _ in range(2):  # cold, then warm
        assert bytes(checkpoint.load(s3, bucket, "ckpt", streams=4, chunk=4 * MiB)) == data
    _no_uploads(s3, bucket)

"""clients/safetensors.py against a real node, cross-checked with the
maintained ``safetensors`` package: files it writes load identically;
hostile headers are refused with a clear error."""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy as st_np
import safetensors.torch as st_pt
import torch
from safetensors import safe_open

from nearstore.clients import direct, rangeget
from nearstore.clients import safetensors as nst
from nearstore.clients.connect import connect
from nearstore.clients.ranged import ObjectChanged, read_into
from tests.conftest import ServerPool
from tests.helpers.servers import S3Server

MiB = 1024 * 1024


def _client(srv: S3Server) -> Any:
    return connect(srv.url, access_key=srv.access_key, secret_key=srv.secret_key)


@pytest.fixture
def node(nearstore_server: S3Server) -> tuple[Any, str]:
    s3 = _client(nearstore_server)
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def _numpy_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {
        "scalar": np.array(3.25, dtype=np.float64),
        "empty": np.zeros((0, 7), dtype=np.float16),
        "mask": rng.integers(0, 2, (5, 3)).astype(bool),
        "ids": rng.integers(-(2**62), 2**62, (33,), dtype=np.int64),
        "u64": rng.integers(0, 2**63, (9,), dtype=np.uint64),
        "c64": (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64),
    }
    for dt in ("u1", "i1", "i2", "u2", "f2", "i4", "u4", "f4"):
        out[f"t_{dt}"] = rng.integers(0, 100, (17, 5)).astype(dt)
    for i in range(4):
        out[f"layers.{i}.weight"] = rng.standard_normal((256, 300 + i)).astype(np.float32)
    return out


def _put_file(s3: Any, bucket: str, key: str, path: Path) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def _same_np(got: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert np.array_equal(got[k], v), k


def test_numpy_files_load_identically(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    tensors = _numpy_tensors()
    path = tmp_path / "model.safetensors"
    st_np.save_file(tensors, str(path), metadata={"format": "np", "note": "é"})
    _put_file(s3, bucket, "m/model.safetensors", path)
    reference = st_np.load_file(str(path))
    _same_np(nst.load(s3, bucket, "m/model.safetensors"), reference)
    _same_np(nst.load(s3, bucket, "m/model.safetensors", transport="boto"), reference)
    # Small ranges: every chunk boundary and piece split is crossed.
    _same_np(nst.load(s3, bucket, "m/model.safetensors", chunk=64 * 1024, streams=5), reference)
    header = nst.read_header(s3, bucket, "m/model.safetensors")
    with safe_open(str(path), framework="np") as f:
        assert header.metadata == f.metadata()
        assert list(header.tensors) == sorted(f.keys(), key=lambda k: header.tensors[k].begin)
    assert header.size == path.stat().st_size
    # Tensors are views of one buffer per file: no copy each.
    got = nst.load(s3, bucket, "m/model.safetensors")
    assert not any(a.flags.owndata for a in got.values())
    assert np.shares_memory(got["layers.0.weight"].base, got["layers.3.weight"].base)


def test_subset_by_name(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    tensors = _numpy_tensors(1)
    path = tmp_path / "m.safetensors"
    st_np.save_file(tensors, str(path))
    _put_file(s3, bucket, "m.safetensors", path)
    names = ["layers.3.weight", "scalar", "empty", "layers.0.weight"]
    got = nst.load(s3, bucket, "m.safetensors", names=names, chunk=64 * 1024)
    _same_np(got, {n: tensors[n] for n in names})
    with pytest.raises(nst.SafetensorsError, match="no tensor 'nope'"):
        nst.load(s3, bucket, "m.safetensors", names=["scalar", "nope"])


def _torch_tensors(seed: int = 0, n: int = 6, width: int = 512) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "bf16": torch.randn(64, width, generator=g).to(torch.bfloat16),
        "f16": torch.randn(width, generator=g).to(torch.float16),
        "f8e4": torch.randn(100, generator=g).to(torch.float8_e4m3fn),
        "f8e5": torch.randn(100, generator=g).to(torch.float8_e5m2),
        "i32": torch.arange(-50, 50, dtype=torch.int32),
        "u16": torch.arange(0, 300, dtype=torch.int32).to(torch.uint16),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(7.5),
    }
    for i in range(n):
        out[f"model.layers.{i}.mlp.weight"] = torch.randn(width, 256, generator=g)
    return out


def _same_pt(got: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        # bitwise: NaNs of float8 compare unequal as values
        assert torch.equal(got[k].reshape(-1).view(torch.uint8),
                           v.reshape(-1).view(torch.uint8)), k


def test_torch_files_load_identically(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    tensors = _torch_tensors()
    path = tmp_path / "adapter.safetensors"
    st_pt.save_file(tensors, str(path), metadata={"format": "pt"})
    _put_file(s3, bucket, "adapter.safetensors", path)
    reference = st_pt.load_file(str(path))
    _same_pt(nst.load_torch(s3, bucket, "adapter.safetensors"), reference)
    _same_pt(nst.load(s3, bucket, "adapter.safetensors", framework="pt", chunk=128 * 1024),
             reference)  # fmt: skip
    _same_pt(nst.load_torch(s3, bucket, "adapter.safetensors", device="cpu"), reference)
    loaded = nst.load_torch(s3, bucket, "adapter.safetensors")
    loaded["f16"][0] = 1  # writable, and each tensor its own bytes
    assert torch.equal(loaded["bf16"], reference["bf16"])
    # numpy: bf16 and float8 are raw views of the same bytes
    raw = nst.load(s3, bucket, "adapter.safetensors")
    assert raw["bf16"].dtype == np.uint16 and raw["f8e4"].dtype == np.uint8
    assert np.array_equal(nst.bf16_to_float32(raw["bf16"]), reference["bf16"].float().numpy())
    assert np.array_equal(raw["f8e5"], reference["f8e5"].view(torch.uint8).numpy())


def test_whole_files_are_mapped_from_the_node(node: tuple[Any, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The node is on this machine: whole files are mapped from its files
    (copy-on-write), not read; the tensors are those of the package's own
    loader, writable, and keep the mapping alive."""
    import gc
    import mmap

    from nearstore.clients.local import LocalNode

    s3, bucket = node
    tensors = _torch_tensors(seed=3, n=8, width=1024)
    path = tmp_path / "model.safetensors"
    st_pt.save_file(tensors, str(path), metadata={"format": "pt"})
    _put_file(s3, bucket, "model.safetensors", path)
    calls: list[str] = []
    real_map = LocalNode.map

    def spy(self: LocalNode, b: str, k: str, **kw: Any) -> Any:
        m = real_map(self, b, k, **kw)
        calls.append(f"{k}:{m.mapped}:{m.copied}")
        return m

    monkeypatch.setattr(LocalNode, "map", spy)
    reference = st_pt.load_file(str(path))
    got = nst.load_torch(s3, bucket, "model.safetensors")
    size = path.stat().st_size
    assert calls == [f"model.safetensors:{size}:0"]
    _same_pt(got, reference)
    got["f16"][0] = 1  # writable, copy-on-write: the next load sees the file
    _same_pt(nst.load_torch(s3, bucket, "model.safetensors", chunk=256 * 1024), reference)
    arrays = nst.load(s3, bucket, "model.safetensors")
    base = arrays["bf16"].base
    assert isinstance(base.base, memoryview) and isinstance(base.base.obj, mmap.mmap)
    assert np.array_equal(arrays["i32"], reference["i32"].numpy())
    one = arrays["model.layers.7.mlp.weight"]
    del arrays, got
    gc.collect()
    assert np.array_equal(one, reference["model.layers.7.mlp.weight"].numpy())
    # a reader given: read, not mapped
    calls.clear()
    _same_pt(nst.load_torch(s3, bucket, "model.safetensors", reader=read_into), reference)
    assert calls == []


def test_load_into_existing_tensors(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    tensors = _torch_tensors(seed=7, n=8, width=1024)
    path = tmp_path / "adapter.safetensors"
    st_pt.save_file(tensors, str(path))
    _put_file(s3, bucket, "adapter.safetensors", path)
    reference = st_pt.load_file(str(path))
    # torch: every tensor, in place (small chunks: tensors cut across GETs)
    dest = {k: torch.empty_like(v) for k, v in reference.items()}
    ptrs = {k: v.data_ptr() for k, v in dest.items()}
    for chunk in (nst.CHUNK, 64 * 1024, 5000):
        for t in dest.values():
            t.reshape(-1).view(torch.uint8).fill_(0xAB)
        assert nst.load_into(s3, bucket, "adapter.safetensors", dest, chunk=chunk) is dest
        _same_pt(dest, reference)
        assert {k: v.data_ptr() for k, v in dest.items()} == ptrs  # nothing reallocated
    # over HTTP too (no short-circuit socket)
    os.environ["NEARSTORE_LOCAL_READS"] = "0"
    try:
        assert rangeget.RangeGetter(s3).local is None
        for t in dest.values():
            t.reshape(-1).view(torch.uint8).fill_(0xAB)
        _same_pt(nst.load_into(s3, bucket, "adapter.safetensors", dest, chunk=64 * 1024),
                 reference)  # fmt: skip
    finally:
        del os.environ["NEARSTORE_LOCAL_READS"]
    # numpy, a subset with gaps between the wanted tensors; parameters too
    names = ["model.layers.1.mlp.weight", "model.layers.5.mlp.weight", "i32", "scalar"]
    arrays = {k: np.empty(tuple(reference[k].shape), dtype=reference[k].numpy().dtype)
              for k in names}  # fmt: skip
    nst.load_into(s3, bucket, "adapter.safetensors", arrays, chunk=256 * 1024)
    for k in names:
        assert np.array_equal(arrays[k], reference[k].numpy()), k
    raw = {"bf16": np.zeros(tuple(reference["bf16"].shape), np.uint16)}
    nst.load_into(s3, bucket, "adapter.safetensors", raw)
    assert np.array_equal(raw["bf16"], reference["bf16"].view(torch.uint16).numpy())
    param = torch.nn.Parameter(torch.zeros(tuple(reference["f16"].shape), dtype=torch.float16))
    nst.load_into(s3, bucket, "adapter.safetensors", {"f16": param})
    assert torch.equal(param.detach(), reference["f16"])
    bad: list[tuple[dict[str, Any], str]] = [
        ({"i32": torch.empty(100, dtype=torch.int64)}, "the file has I32"),
        ({"i32": torch.empty(99, dtype=torch.int32)}, r"the file has I32 \[100\]"),
        ({"i32": torch.empty(200, dtype=torch.int32)[::2]}, "contiguous"),
        ({"i32": np.empty(100, np.int32)[::-1]}, "C-contiguous"),
        ({"i32": [0] * 100}, "a numpy array or a torch tensor"),
    ]
    for out, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            nst.load_into(s3, bucket, "adapter.safetensors", out)
    with pytest.raises(nst.SafetensorsError, match="no tensor 'nope'"):
        nst.load_into(s3, bucket, "adapter.safetensors", {"nope": np.empty(1)})


def _sharded(tmp_path: Path, s3: Any, bucket: str, prefix: str) -> dict[str, torch.Tensor]:
    """Three files and an index, as transformers' save_pretrained writes them."""
    tensors = _torch_tensors(seed=3, n=9, width=1024)
    names = sorted(tensors)
    shards = [names[i::3] for i in range(3)]
    wmap = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        path = tmp_path / fname
        st_pt.save_file({n: tensors[n] for n in shard}, str(path), metadata={"format": "pt"})
        _put_file(s3, bucket, prefix + fname, path)
        wmap.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": wmap}  # fmt: skip
    s3.put_object(Bucket=bucket, Key=prefix + "model.safetensors.index.json",
                  Body=json.dumps(index).encode())  # fmt: skip
    return tensors


def test_sharded_checkpoint_with_index(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    tensors = _sharded(tmp_path, s3, bucket, "llm/")
    _same_pt(nst.load_torch(s3, bucket, "llm/model.safetensors.index.json", chunk=MiB), tensors)
    _same_pt(nst.load_torch(s3, bucket, "llm/"), tensors)  # the prefix finds the index
    keys = [f"llm/model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    _same_pt(nst.load_torch(s3, bucket, keys), tensors)
    want = ["model.layers.4.mlp.weight", "bf16"]
    _same_pt(nst.load_torch(s3, bucket, "llm/model.safetensors.index.json", names=want),
             {n: tensors[n] for n in want})  # fmt: skip
    dest = {k: torch.empty_like(v) for k, v in tensors.items()}
    _same_pt(nst.load_into(s3, bucket, "llm/model.safetensors.index.json", dest), tensors)
    # numpy too; a prefix without an index: every .safetensors under it
    s3.delete_object(Bucket=bucket, Key="llm/model.safetensors.index.json")
    got = nst.load(s3, bucket, "llm/")
    assert set(got) == set(tensors)
    assert np.array_equal(got["i32"], tensors["i32"].numpy())


def test_broken_indexes(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    tensors = _sharded(tmp_path, s3, bucket, "a/")

    def index(body: Any) -> str:
        key = f"a/{uuid.uuid4().hex[:6]}.safetensors.index.json"
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        return key

    first = "model-00001-of-00003.safetensors"
    cases: list[tuple[Any, str]] = [
        (b"{not json", "index is not JSON"),
        ({"metadata": {}}, "no weight_map"),
        ({"weight_map": {"x": 1}}, "no weight_map"),
        ({"weight_map": {"bf16": "../other/" + first}}, "names the file"),
        ({"weight_map": {"missing.weight": first}}, "no tensor 'missing.weight'"),
    ]
    for body, msg in cases:
        with pytest.raises(nst.SafetensorsError, match=msg):
            nst.load(s3, bucket, index(body))
    # The same tensor in two files
    path = tmp_path / "dup.safetensors"
    st_pt.save_file({"bf16": tensors["bf16"]}, str(path))
    _put_file(s3, bucket, "a/dup.safetensors", path)
    with pytest.raises(nst.SafetensorsError, match="'bf16' is in both"):
        nst.load(s3, bucket, [f"a/{first}", "a/model-00002-of-00003.safetensors",
                              "a/model-00003-of-00003.safetensors", "a/dup.safetensors"])
    with pytest.raises(nst.SafetensorsError, match=r"no \.safetensors file"):
        nst.load(s3, bucket, "nothing-here/")


def _file(header: Any, data: bytes = b"", *, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _t(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "too short"),
    "seven bytes": (b"\x01" * 7, "too short"),
    "N past the end": (_file({}, n=1000), "header of 1000 bytes in a file of"),
    "N of 2**64-1": (_file({}, n=2**64 - 1), "over the 104857600 limit"),
    "N just over the cap": (_file({}, n=100 * MiB + 1), "over the 104857600 limit"),
    "not JSON": (_file(b"{nope", b""), "not JSON"),
    "not UTF-8": (_file(b'{"\xff": 1}'), "not JSON"),
    "a JSON array": (_file(b"[1, 2]"), "start with '{'"),
    "nested 100k deep": (_file(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "not JSON|an entry"),
    "duplicate names": (_file(b'{"a": 1, "a": 2}'), "duplicate key 'a'"),
    "entry not an object": (_file({"a": [1, 2]}, bytes(8)), "needs dtype"),
    "missing field": (_file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "needs dtype"),
    "unknown dtype": (_file({"a": _t("F128")}, bytes(8)), "unsupported dtype 'F128'"),
    "sub-byte dtype": (_file({"a": _t("F4")}, bytes(8)), "unsupported dtype 'F4'"),
    "negative dim": (_file({"a": _t(shape=(-2,))}, bytes(8)), "shape must be"),
    "float dim": (_file({"a": _t(shape=(2.0,))}, bytes(8)), "shape must be"),
    "bool dim": (_file({"a": _t(shape=(True, 2))}, bytes(8)), "shape must be"),
    "three offsets": (_file({"a": _t(offsets=(0, 4, 8))}, bytes(8)), "two non-negative"),
    "negative offset": (_file({"a": _t(offsets=(-8, 0))}, bytes(8)), "two non-negative"),
    "begin after end": (_file({"a": _t(offsets=(8, 0))}, bytes(8)), "outside the"),
    "past the data": (_file({"a": _t(offsets=(8, 16))}, bytes(8)), "outside the 8 bytes"),
    "huge offsets": (_file({"a": _t(offsets=(0, 2**70))}, bytes(8)), "outside the"),
    "size mismatch": (_file({"a": _t(shape=(3,))}, bytes(8)), "is 12 bytes, data_offsets hold 8"),
    "huge shape": (_file({"a": _t(shape=(2**40, 2**40))}, bytes(8)), "data_offsets hold 8"),
    "overlap": (_file({"a": _t(offsets=(0, 8)), "b": _t(offsets=(4, 12))}, bytes(12)), "overlap"),
    "metadata not strings": (_file({"__metadata__": {"a": 1}}), "map strings to strings"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_are_refused(node: tuple[Any, str], case: str) -> None:
    s3, bucket = node
    blob, message = HOSTILE[case]
    s3.put_object(Bucket=bucket, Key="evil.safetensors", Body=blob)
    with pytest.raises(nst.SafetensorsError, match=message) as err:
        nst.load(s3, bucket, "evil.safetensors")
    assert "evil.safetensors" in str(err.value)
    # The maintained package refuses them too (it is stricter: gaps as well).
    with pytest.raises(Exception):  # noqa: B017 -- its own error types vary
        st_np.load(blob)


def test_odd_but_valid_files(node: tuple[Any, str], tmp_path: Path) -> None:
    s3, bucket = node
    # A header over the first read (256 KiB): one more GET for the rest.
    many = {f"a.very.long.parameter.name.to.grow.the.header.{i:06d}": np.full(3, i, np.int32)
            for i in range(6000)}  # fmt: skip
    path = tmp_path / "many.safetensors"
    st_np.save_file(many, str(path))
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] > nst.FIRST_READ
    _put_file(s3, bucket, "many.safetensors", path)
    _same_np(nst.load(s3, bucket, "many.safetensors"), many)
    # No tensors at all, and only empty ones.
    st_np.save_file({}, str(tmp_path / "none.safetensors"))
    _put_file(s3, bucket, "none.safetensors", tmp_path / "none.safetensors")
    assert nst.load(s3, bucket, "none.safetensors") == {}
    assert nst.load_torch(s3, bucket, "none.safetensors") == {}
    st_np.save_file({"e": np.zeros((0,), np.float32)}, str(tmp_path / "e.safetensors"))
    _put_file(s3, bucket, "e.safetensors", tmp_path / "e.safetensors")
    assert nst.load_torch(s3, bucket, "e.safetensors")["e"].shape == (0,)
    # A misaligned tensor (hand-written offsets): torch gets a copy of its own.
    hdr = {"a": _t("U8", (1,), (0, 1)), "b": _t("F32", (2,), (1, 9))}
    blob = _file(hdr, b"\x07" + np.array([1.5, -2], np.float32).tobytes())
    s3.put_object(Bucket=bucket, Key="odd.safetensors", Body=blob)
    got = nst.load_torch(s3, bucket, "odd.safetensors")
    assert got["b"].tolist() == [1.5, -2.0] and got["a"].tolist() == [7]
    assert nst.load(s3, bucket, "odd.safetensors")["b"].tolist() == [1.5, -2.0]
    # Fields beyond dtype, shape and data_offsets are ignored, as the package does.
    blob = _file({"a": {**_t(), "quant": "none"}}, np.array([1, 2], np.float32).tobytes())
    assert st_np.load(blob)["a"].tolist() == [1.0, 2.0]
    s3.put_object(Bucket=bucket, Key="extra.safetensors", Body=blob)
    assert nst.load(s3, bucket, "extra.safetensors")["a"].tolist() == [1.0, 2.0]


def test_a_changed_file_is_never_mixed(node: tuple[Any, str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    s3, bucket = node
    path = tmp_path / "m.safetensors"
    st_np.save_file(_numpy_tensors(), str(path))
    _put_file(s3, bucket, "m.safetensors", path)
    real_open = rangeget.RangeGetter.open
    seeds = iter(range(1, 100))

    def open_then_overwrite(self: rangeget.RangeGetter, *a: Any, **kw: Any) -> Any:
        result = real_open(self, *a, **kw)
        st_np.save_file(_numpy_tensors(seed=next(seeds)), str(path))
        _put_file(s3, bucket, "m.safetensors", path)
        return result

    monkeypatch.setattr(rangeget.RangeGetter, "open", open_then_overwrite)
    for transport in ("http", "boto"):
        with pytest.raises(ObjectChanged):
            nst.load(s3, bucket, "m.safetensors", transport=transport)
    # in place, from the node's chunk files (its short-circuit socket)
    assert rangeget.RangeGetter(s3).local is not None
    dest = {k: np.empty_like(v) for k, v in _numpy_tensors().items()}
    with pytest.raises(ObjectChanged):
        nst.load_into(s3, bucket, "m.safetensors", dest)


def test_whole_files_are_one_version(node: tuple[Any, str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Whole files go through the reader given (clients.ranged by default),
    which pins the version it finds: if that is not the one whose header was
    read, the load is refused, or (same header) all of the new version."""
    s3, bucket = node
    path = tmp_path / "m.safetensors"
    old, new = _numpy_tensors(seed=1), _numpy_tensors(seed=2)
    st_np.save_file(old, str(path))
    _put_file(s3, bucket, "m.safetensors", path)
    calls: list[str] = []

    def reader(*a: Any, **kw: Any) -> Any:
        calls.append(a[2])
        return read_into(*a, **kw)

    _same_np(nst.load(s3, bucket, "m.safetensors", reader=reader), old)
    assert calls == ["m.safetensors"]
    real_open = rangeget.RangeGetter.open
    replacement: dict[str, np.ndarray] = {}

    def open_then_overwrite(self: rangeget.RangeGetter, *a: Any, **kw: Any) -> Any:
        result = real_open(self, *a, **kw)
        st_np.save_file(replacement, str(path))
        _put_file(s3, bucket, "m.safetensors", path)
        return result

    monkeypatch.setattr(rangeget.RangeGetter, "open", open_then_overwrite)
    replacement.update(new)  # same names, dtypes and shapes: the same header
    _same_np(nst.load(s3, bucket, "m.safetensors"), new)
    replacement.clear()
    replacement.update({"other": np.zeros(10)})
    with pytest.raises(ObjectChanged):
        nst.load(s3, bucket, "m.safetensors")
    replacement.update({k: np.concatenate([v.reshape(-1)] * 3) for k, v in new.items()})
    with pytest.raises(ObjectChanged):  # a larger file
        nst.load(s3, bucket, "m.safetensors")


def test_missing_object_is_a_client_error(node: tuple[Any, str]) -> None:
    s3, bucket = node
    for transport in ("auto", "http", "boto"):
        with pytest.raises(s3.exceptions.ClientError, match="NoSuchKey"):
            nst.load(s3, bucket, "absent.safetensors", transport=transport)


def test_over_https_and_through_the_cache(servers: ServerPool, tmp_path: Path) -> None:
    """HTTPS goes through boto3 (its TLS settings); a node with a cache in
    front of SeaweedFS serves the same bytes cold and warm."""
    tensors = _torch_tensors(seed=5, n=12, width=2048)  # ~25 MiB: two cache chunks
    path = tmp_path / "lora.safetensors"
    st_pt.save_file(tensors, str(path))
    tls = servers.get("nearstore-tls")
    s3 = tls.client()
    s3.create_bucket(Bucket="tls-models")
    _put_file(s3, "tls-models", "lora.safetensors", path)
    _same_pt(nst.load_torch(s3, "tls-models", "lora.safetensors"), tensors)
    cached = servers.get("nearstore-seaweed")
    s3 = _client(cached)
    bucket = f"cached-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    _put_file(s3, bucket, "lora.safetensors", path)
    for _ in range(2):
        _same_pt(nst.load_torch(s3, bucket, "lora.safetensors"), tensors)
    # The cluster-aware reader (each chunk from its owner; one node: the node)
    _same_pt(nst.load_torch(s3, bucket, "lora.safetensors", reader=direct.read_into), tensors)

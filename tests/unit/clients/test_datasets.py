"""clients.tar and clients.datasets over local directories: the tar parser
against archives written by the standard library, sharding, shuffling,
read-ahead bounds and the WebDataset grouping."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path

import pytest

from nearstore.clients.datasets import (
    Entry,
    LocalSource,
    ObjectDataset,
    ObjectStream,
    TarDataset,
    epoch_order,
    prefetched,
    split,
)
from nearstore.clients.tar import (
    TarError,
    buffer_reader,
    group_samples,
    iter_members,
    split_name,
    stream_reader,
)


def make_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
    return out.getvalue()


LONG = "d/" + "x" * 150 + "/sample.0001.json"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["buffer", "stream"])
def test_parser_matches_tarfile(fmt: int, mode: str) -> None:
    members = [("a/0001.jpg", b"\xff" * 1000), ("a/0001.cls", b"7"), ("a/empty.txt", b""),
               ("a/0002.jpg", bytes(range(256)) * 3)]
    if fmt != tarfile.USTAR_FORMAT:
        members.append((LONG, b"{}"))
        members.append(("uni/caf\u00e9.txt", b"utf8 name"))
    archive = make_tar(members, fmt)
    read = buffer_reader(archive) if mode == "buffer" else stream_reader(io.BytesIO(archive))
    got = [(name, bytes(data)) for name, data in iter_members(read)]
    assert got == members  # the directory is skipped


def test_parser_rejects_corruption() -> None:
    archive = bytearray(make_tar([("a.txt", b"hello" * 100)]))
    with pytest.raises(TarError, match="truncated"):
        list(iter_members(buffer_reader(archive[:700])))
    archive[10] ^= 0xFF  # inside the first header's name
    with pytest.raises(TarError, match="checksum"):
        list(iter_members(buffer_reader(archive)))


def test_parser_accepts_a_missing_end_marker() -> None:
    archive = make_tar([("a.txt", b"x" * 600)], tarfile.USTAR_FORMAT)
    # header + 2 data blocks; drop the directory entry and end-of-archive blocks
    assert [n for n, _ in iter_members(buffer_reader(archive[: 512 * 3]))] == ["a.txt"]


def test_webdataset_names_and_grouping() -> None:
    assert split_name("train/0001.jpg") == ("train/0001", "jpg")
    assert split_name("train/0001.seg.png") == ("train/0001", "seg.png")
    assert split_name("dir.v2/0001.cls") == ("dir.v2/0001", "cls")
    assert split_name("README") is None and split_name("x/.hidden") is None
    members = [("s/1.jpg", b"J1"), ("s/1.cls", b"1"), ("s/2.jpg", b"J2"), ("notes", b"-")]
    samples = list(group_samples(members, "u"))
    assert samples == [{"__key__": "s/1", "__url__": "u", "jpg": b"J1", "cls": b"1"},
                       {"__key__": "s/2", "__url__": "u", "jpg": b"J2"}]
    with pytest.raises(TarError, match="twice"):
        list(group_samples([("s/1.jpg", b""), ("s/1.jpg", b"")], "u"))


def test_split_partitions_every_item_once() -> None:
    items = list(range(103))
    shares = [split(items, rank=r, world_size=4, worker=w, workers=3)
              for r in range(4) for w in range(3)]
    assert sorted(x for s in shares for x in s) == items
    even = [split(items, rank=r, world_size=4, even=True) for r in range(4)]
    assert {len(s) for s in even} == {25}
    with pytest.raises(ValueError):
        split(items, rank=4, world_size=4)


def test_epoch_order_is_deterministic_per_epoch() -> None:
    a = epoch_order(50, shuffle=True, seed=1, epoch=0)
    assert a == epoch_order(50, shuffle=True, seed=1, epoch=0)
    assert a != epoch_order(50, shuffle=True, seed=1, epoch=1)
    assert a != epoch_order(50, shuffle=True, seed=2, epoch=0)
    assert sorted(a) == list(range(50))
    assert epoch_order(5, shuffle=False, seed=1, epoch=3) == [0, 1, 2, 3, 4]


def test_prefetch_is_bounded_ordered_and_cancellable() -> None:
    running = 0
    peak = 0
    started: list[int] = []
    lock = threading.Lock()

    def slow(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            started.append(i)
        time.sleep(0.01)
        with lock:
            running -= 1
        return i * i

    assert list(prefetched(slow, range(40), depth=4, threads=4)) == [i * i for i in range(40)]
    assert peak <= 4
    started.clear()
    gen = prefetched(slow, range(1000), depth=3, threads=3)
    assert [next(gen) for _ in range(5)] == [0, 1, 4, 9, 16]
    gen.close()
    assert len(started) <= 5 + 3  # nothing more was read once the consumer stopped


def write_shards(root: Path, shards: int, per_shard: int) -> dict[str, bytes]:
    expected: dict[str, bytes] = {}
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"sample{s:02d}{i:04d}"
            data = f"{key}:".encode() * 10
            members += [(f"{key}.bin", data), (f"{key}.cls", str(i % 7).encode())]
            expected[key] = data
        (root / "shards").mkdir(exist_ok=True)
        (root / "shards" / f"train-{s:04d}.tar").write_bytes(make_tar(members))
    (root / "shards" / "README.txt").write_text("not a shard")
    return expected


def test_tar_dataset_over_local_disk(tmp_path: Path) -> None:
    expected = write_shards(tmp_path, shards=6, per_shard=25)
    ds = TarDataset(str(tmp_path), "shards/", decode=lambda s: (s["__key__"], s["bin"], int(s["cls"])))
    assert ds.shards == [f"shards/train-{s:04d}.tar" for s in range(6)]
    got = list(ds)
    assert [k for k, _, _ in got] == sorted(expected)  # shard and archive order
    assert all(expected[k] == data for k, data, _ in got)

    # two ranks x (one worker): a partition; shuffled differently per epoch
    def keys(rank: int, epoch: int, **kw: object) -> list[str]:
        d = TarDataset(str(tmp_path), "shards/", rank=rank, world_size=2, shuffle=True, seed=7, **kw)  # type: ignore[arg-type]
        d.set_epoch(epoch)
        return [s["__key__"] for s in d]  # type: ignore[misc]

    e0 = keys(0, 0) + keys(1, 0)
    assert sorted(e0) == sorted(expected)
    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 0) != keys(0, 1) or keys(1, 0) != keys(1, 1)
    buffered = keys(0, 0, shuffle_buffer=20)
    assert sorted(buffered) == sorted(keys(0, 0)) and buffered != keys(0, 0)


def test_large_shards_are_streamed(tmp_path: Path) -> None:
    expected = write_shards(tmp_path, shards=2, per_shard=10)
    reads: list[str] = []

    class Counting(LocalSource):
        def read(self, entry: Entry) -> bytes:
            reads.append(entry.name)
            return super().read(entry)

    ds = TarDataset(Counting(tmp_path), "shards/", max_buffer=100)
    assert sorted(s["__key__"] for s in ds) == sorted(expected)  # type: ignore[misc]
    assert reads == []  # every shard was over max_buffer: streamed, never read whole


def test_object_datasets(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / "objs").mkdir(exist_ok=True)
        (tmp_path / "objs" / f"{i:03d}.bin").write_bytes(bytes([i]) * (i + 1))
    ds = ObjectDataset(f"file://{tmp_path}", "objs/", decode=lambda kv: len(kv[1]))
    assert len(ds) == 30 and ds[4] == 5 and ds.keys[0] == "objs/000.bin"
    stream = ObjectStream(str(tmp_path), "objs/", rank=1, world_size=3, prefetch=4)
    got = list(stream)
    assert [k for k, _ in got] == [f"objs/{i:03d}.bin" for i in range(1, 30, 3)]
    assert all(data == bytes([int(k[5:8])]) * (int(k[5:8]) + 1) for k, data in got)


def test_an_empty_prefix_is_said(tmp_path: Path) -> None:
    """A dataset over nothing (a wrong bucket or prefix) would train on
    nothing in silence."""
    from nearstore.clients.datasets import EmptyDataset, ObjectDataset

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.bin").write_bytes(b"x")
    with pytest.warns(EmptyDataset, match=r"no objects under .* \(prefix 'valid/'\)"):
        assert len(ObjectDataset(str(tmp_path), prefix="valid/")) == 0
    with pytest.warns(EmptyDataset, match="ending in .tar"):
        TarDataset(str(tmp_path), prefix="train/")
    assert len(ObjectDataset(str(tmp_path), prefix="train/")) == 1  # and no warning (warnings are errors)

"""The embedded local store, driven directly (no HTTP)."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nearstore.gateway import errors
from nearstore.gateway.backends.local import MIN_PART_SIZE, LocalStore, _key_upper_bound
from nearstore.metadata.backing import CompletedPart, ObjectMeta, WriteConditions


class Body:
    """An UploadBody over bytes; optionally fails after streaming."""

    def __init__(self, data: bytes, *, fail: bool = False, piece: int = 65536) -> None:
        self.data, self.fail, self.piece = data, fail, piece

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        for i in range(0, len(self.data), self.piece):
            yield self.data[i : i + self.piece]
        if self.fail:
            raise errors.BadDigest()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def md5_hex(self) -> str:
        return hashlib.md5(self.data).hexdigest()

    @property
    def checksum(self) -> tuple[str, str] | None:
        return None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalStore]:
    s = LocalStore(tmp_path / "data", fsync=False)
    await s.start()
    await s.create_bucket("bkt")
    yield s
    await s.close()


async def read_all(store: LocalStore, key: str) -> bytes:
    h = await store.open_object("bkt", key)
    try:
        return b"".join([c async for c in h.read_range(0, h.info.size)])
    finally:
        await h.close()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_key_upper_bound() -> None:
    assert _key_upper_bound(b"") is None
    assert _key_upper_bound(b"ab") == b"ac"
    assert _key_upper_bound(b"a\xff\xff") == b"b"
    assert _key_upper_bound(b"\xff") is None


async def test_put_get_overwrite_delete(store: LocalStore, tmp_path: Path) -> None:
    info = await store.put_object("bkt", "k", Body(b"one"), ObjectMeta(content_type="text/plain"))
    assert info.etag == f'"{hashlib.md5(b"one").hexdigest()}"'
    assert await read_all(store, "k") == b"one"
    await store.put_object("bkt", "k", Body(b"two!"), ObjectMeta())
    assert await read_all(store, "k") == b"two!"
    # The replaced version's file is gone: one object file remains.
    assert len([f for f in files_under(tmp_path / "data" / "objects")]) == 1
    await store.delete_object("bkt", "k")
    with pytest.raises(errors.NoSuchKey):
        await store.head_object("bkt", "k")
    assert files_under(tmp_path / "data" / "objects") == []


async def test_reader_keeps_its_version_across_overwrite(store: LocalStore) -> None:
    await store.put_object("bkt", "k", Body(b"A" * 100000), ObjectMeta())
    h = await store.open_object("bkt", "k")
    await store.put_object("bkt", "k", Body(b"B" * 5), ObjectMeta())
    await store.delete_object("bkt", "k")
    data = b"".join([c async for c in h.read_range(0, h.info.size)])
    await h.close()
    assert data == b"A" * 100000


async def test_failed_body_leaves_nothing(store: LocalStore, tmp_path: Path) -> None:
    await store.put_object("bkt", "k", Body(b"old"), ObjectMeta())
    with pytest.raises(errors.BadDigest):
        await store.put_object("bkt", "k", Body(os.urandom(300000), fail=True), ObjectMeta())
    assert await read_all(store, "k") == b"old"
    assert files_under(tmp_path / "data" / "tmp") == []


@pytest.mark.parametrize("key", ["../../etc/passwd", "..", "/abs/path", "a/../../b", "nul\x01", "\u20ac/\u00e9"])
async def test_keys_never_become_paths(store: LocalStore, tmp_path: Path, key: str) -> None:
    await store.put_object("bkt", key, Body(b"x"), ObjectMeta())
    assert await read_all(store, key) == b"x"
    for f in files_under(tmp_path):
        assert ".." not in f and "passwd" not in f and "abs" not in f


async def test_file_and_directory_style_keys_coexist(store: LocalStore) -> None:
    await store.put_object("bkt", "a", Body(b"1"), ObjectMeta())
    await store.put_object("bkt", "a/b", Body(b"2"), ObjectMeta())
    assert await read_all(store, "a") == b"1"
    assert await read_all(store, "a/b") == b"2"


async def test_listing_matches_a_reference_model(store: LocalStore) -> None:
    rng = random.Random(7)
    alphabet = ["a", "b", "/", "-", "\u00e9", "z", "\U0001f600"]
    keys = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(150)})
    for k in keys:
        await store.put_object("bkt", k, Body(b""), ObjectMeta())
    ordered = sorted(keys, key=lambda k: k.encode())

    def model(prefix: str, delimiter: str, after: str) -> list[str]:
        out: list[str] = []
        for k in ordered:
            if not k.startswith(prefix) or k.encode() <= after.encode():
                continue
            if delimiter and delimiter in k[len(prefix) :]:
                cp = k[: k.index(delimiter, len(prefix)) + len(delimiter)]
                if cp.encode() <= after.encode():
                    continue
                if not out or out[-1] != cp:
                    out.append(cp)
            else:
                out.append(k)
        return out

    for prefix in ["", "a", "a/", "\u00e9", "zz"]:
        for delimiter in ["", "/", "b"]:
            for page_size in [1, 3, 1000]:
                got: list[str] = []
                after = ""
                for _ in range(1000):
                    page = await store.list_objects(
                        "bkt", prefix=prefix, delimiter=delimiter, start_after=after, max_keys=page_size
                    )
                    entries = sorted([o.key for o in page.objects] + list(page.common_prefixes), key=str.encode)
                    got += entries
                    if not page.is_truncated:
                        break
                    assert page.next_marker is not None
                    after = page.next_marker
                assert got == model(prefix, delimiter, ""), (prefix, delimiter, page_size)


async def test_bucket_lifecycle(store: LocalStore) -> None:
    with pytest.raises(errors.BucketAlreadyOwnedByYou):
        await store.create_bucket("bkt")
    await store.put_object("bkt", "k", Body(b"x"), ObjectMeta())
    with pytest.raises(errors.BucketNotEmpty):
        await store.delete_bucket("bkt")
    await store.delete_object("bkt", "k")
    await store.delete_bucket("bkt")
    with pytest.raises(errors.NoSuchBucket):
        await store.put_object("bkt", "k", Body(b"x"), ObjectMeta())


async def test_conditional_writes(store: LocalStore) -> None:
    await store.put_object("bkt", "k", Body(b"1"), ObjectMeta(), WriteConditions(if_none_match="*"))
    with pytest.raises(errors.PreconditionFailed):
        await store.put_object("bkt", "k", Body(b"2"), ObjectMeta(), WriteConditions(if_none_match="*"))
    with pytest.raises(errors.PreconditionFailed):
        await store.put_object("bkt", "k", Body(b"2"), ObjectMeta(), WriteConditions(if_match='"nope"'))
    with pytest.raises(errors.NoSuchKey):
        await store.put_object("bkt", "other", Body(b"2"), ObjectMeta(), WriteConditions(if_match="*"))
    assert await read_all(store, "k") == b"1"


async def test_multipart(store: LocalStore, tmp_path: Path) -> None:
    uid = await store.create_upload("bkt", "mp", ObjectMeta(content_type="x/y"))
    p1, p2 = os.urandom(MIN_PART_SIZE), os.urandom(1000)
    i1 = await store.upload_part("bkt", "mp", uid, 1, Body(p1, piece=1 << 20))
    i2 = await store.upload_part("bkt", "mp", uid, 2, Body(p2))
    with pytest.raises(errors.InvalidPart):
        await store.complete_upload("bkt", "mp", uid, [CompletedPart(1, i1.etag), CompletedPart(2, '"bad"')])
    with pytest.raises(errors.InvalidPartOrder):
        await store.complete_upload("bkt", "mp", uid, [CompletedPart(2, i2.etag), CompletedPart(1, i1.etag)])
    with pytest.raises(errors.EntityTooSmall):
        await store.complete_upload("bkt", "mp", uid, [CompletedPart(2, i2.etag), CompletedPart(3, i2.etag)])
    info = await store.complete_upload("bkt", "mp", uid, [CompletedPart(1, i1.etag), CompletedPart(2, i2.etag)])
    md5s = hashlib.md5(p1).digest() + hashlib.md5(p2).digest()
    assert info.etag == f'"{hashlib.md5(md5s).hexdigest()}-2"'
    assert info.parts == (len(p1), len(p2))
    assert await read_all(store, "mp") == p1 + p2
    assert (await store.head_object("bkt", "mp")).content_type == "x/y"
    with pytest.raises(errors.NoSuchUpload):
        await store.complete_upload("bkt", "mp", uid, [CompletedPart(1, i1.etag)])
    assert files_under(tmp_path / "data" / "uploads") == []


async def test_abort_and_list_uploads(store: LocalStore) -> None:
    a = await store.create_upload("bkt", "x/1", ObjectMeta())
    b = await store.create_upload("bkt", "x/2", ObjectMeta())
    ups, truncated = await store.list_uploads("bkt", prefix="x/")
    assert [u.upload_id for u in ups] == [a, b] and not truncated
    ups, truncated = await store.list_uploads("bkt", max_uploads=1)
    assert len(ups) == 1 and truncated
    await store.abort_upload("bkt", "x/1", a)
    with pytest.raises(errors.NoSuchUpload):
        await store.upload_part("bkt", "x/1", a, 1, Body(b"x"))


async def test_restart_sweeps_debris(tmp_path: Path) -> None:
    root = tmp_path / "data"
    s = LocalStore(root, fsync=False)
    await s.start()
    await s.create_bucket("bkt")
    await s.put_object("bkt", "keep", Body(b"keep"), ObjectMeta())
    await s.close()
    (root / "tmp" / "half-written").write_bytes(b"partial")
    (root / "objects" / "zz" / "zz").mkdir(parents=True)
    (root / "objects" / "zz" / "zz" / "orphan").write_bytes(b"orphan")
    s = LocalStore(root, fsync=False)
    await s.start()
    assert await read_all(s, "keep") == b"keep"
    assert files_under(root / "tmp") == []
    assert not (root / "objects" / "zz" / "zz" / "orphan").exists()
    await s.close()


async def test_remembered_rows_follow_every_writer(store: LocalStore, tmp_path: Path) -> None:
    """Reads reuse the rows they read lately; a write by this store or by
    another process's store on the same directory (a worker) is seen at
    once, and a delete too."""
    other = LocalStore(store.root, fsync=False, sweep=False)  # another worker process's view
    await other.start()
    try:
        await store.put_object("bkt", "k", Body(b"one"), ObjectMeta())
        assert await read_all(store, "k") == b"one" and await read_all(other, "k") == b"one"
        await other.put_object("bkt", "k", Body(b"two"), ObjectMeta())  # the other process writes
        assert await read_all(store, "k") == b"two"
        assert (await store.head_object("bkt", "k")).etag == hashlib.md5(b"two").hexdigest().join('""')
        await store.put_object("bkt", "k", Body(b"three"), ObjectMeta())  # this process writes
        assert await read_all(other, "k") == b"three" and await read_all(store, "k") == b"three"
        # A write that changes only the index (tags) is seen too.
        assert (await store.head_object("bkt", "k")).tag_count == 0
        await other.put_tags("bkt", "k", {"a": "1"})
        assert (await store.head_object("bkt", "k")).tag_count == 1
        await other.delete_object("bkt", "k")
        with pytest.raises(errors.NoSuchKey):
            await store.head_object("bkt", "k")
    finally:
        await other.close()



async def test_buckets_keep_their_owner_and_an_old_index_is_the_first_users(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "data"
    root.mkdir()
    # An index written before buckets had owners.
    old = sqlite3.connect(root / "meta.sqlite3")
    old.execute("CREATE TABLE buckets (name TEXT PRIMARY KEY, created REAL NOT NULL, region TEXT NOT NULL DEFAULT '')")
    old.execute("INSERT INTO buckets VALUES ('legacy', 1.0, '')")
    old.commit()
    old.close()
    s = LocalStore(root, fsync=False)
    await s.start()
    try:
        assert s.bucket_owner("legacy") == ""
        with pytest.raises(errors.NoSuchTagSet):
            await s.get_bucket_tags("legacy")
        await s.put_bucket_tags("legacy", {"a": "1"})
        assert await s.get_bucket_tags("legacy") == {"a": "1"}
        await s.create_bucket("theirs", owner="a" * 64)
        assert s.bucket_owner("theirs") == "a" * 64
        assert {(b.name, b.owner) for b in await s.list_buckets()} == {("legacy", ""), ("theirs", "a" * 64)}
        with pytest.raises(errors.BucketAlreadyExists):
            await s.create_bucket("theirs")
        with pytest.raises(errors.BucketAlreadyOwnedByYou):
            await s.create_bucket("theirs", owner="a" * 64)
        with pytest.raises(errors.NoSuchBucket):
            s.bucket_owner("nobody")
        # The memo follows a delete and a new owner of the same name.
        await s.delete_bucket("theirs")
        with pytest.raises(errors.NoSuchBucket):
            s.bucket_owner("theirs")
        await s.create_bucket("theirs", owner="b" * 64)
        assert s.bucket_owner("theirs") == "b" * 64
    finally:
        await s.close()


async def test_versions_page_by_key_and_version_as_one_whole_listing(store: LocalStore, tmp_path: Path) -> None:
    """ListObjectVersions in pages of any size, with and without a
    delimiter, is the whole listing cut into pieces; and the files of
    versions removed for good are gone."""
    await store.put_bucket_versioning("bkt", "Enabled")
    rng = random.Random(5)
    keys = ["a/x", "a/y", "b", "c/d/e", "c/f", "d"]
    for _ in range(25):
        key = rng.choice(keys)
        if rng.random() < 0.25:
            await store.delete_object("bkt", key)
        else:
            await store.put_object("bkt", key, Body(os.urandom(8)), ObjectMeta())
    for prefix, delimiter in (("", ""), ("", "/"), ("c/", "/"), ("a", "")):
        whole = await store.list_versions("bkt", prefix=prefix, delimiter=delimiter)
        assert not whole.is_truncated
        for size in (1, 2, 3, 7):
            entries, prefixes, key_marker, version_marker = [], [], "", ""
            for _ in range(200):
                page = await store.list_versions("bkt", prefix=prefix, delimiter=delimiter, key_marker=key_marker,
                                                 version_id_marker=version_marker, max_keys=size)
                assert len(page.entries) + len(page.common_prefixes) <= size
                entries += page.entries
                prefixes += page.common_prefixes
                if not page.is_truncated:
                    break
                key_marker, version_marker = page.next_key_marker or "", page.next_version_id_marker or ""
            assert [(e.info.key, e.info.version_id, e.is_latest) for e in entries] == [
                (e.info.key, e.info.version_id, e.is_latest) for e in whole.entries], (prefix, delimiter, size)
            assert prefixes == list(whole.common_prefixes)
    # Each key's versions newest first, exactly one latest per key.
    whole = await store.list_versions("bkt")
    for key in keys:
        mine = [e for e in whole.entries if e.info.key == key]
        assert sum(e.is_latest for e in mine) == (1 if mine else 0) and (not mine or mine[0].is_latest)
    # Every version removed for good: no file is left behind.
    for e in whole.entries:
        await store.delete_object("bkt", e.info.key, version_id=e.info.version_id)
    assert (await store.list_versions("bkt")).entries == []
    assert files_under(tmp_path / "data" / "objects") == []
    await store.delete_bucket("bkt")


@pytest.mark.parametrize("where", ["body", "fsync"])
async def test_a_full_disk_refuses_the_upload_whole(store: LocalStore, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """ENOSPC while receiving a body or syncing it: the client is told 507
    InsufficientStorage (not a 500, not a traceback), the previous version
    stays, and the partial file is gone (it would hold the space)."""
    import errno as errno_mod

    from nearstore.gateway.backends import local

    await store.put_object("bkt", "k", Body(b"old"), ObjectMeta())
    store.fsync = where == "fsync"

    def full(*args: object) -> None:
        raise OSError(errno_mod.ENOSPC, "No space left on device")

    if where == "body":
        monkeypatch.setattr(local, "_write_all", full)
    else:
        monkeypatch.setattr(local.os, "fsync", full)
    with pytest.raises(OSError) as caught:
        await store.put_object("bkt", "k", Body(os.urandom(300000)), ObjectMeta())
    monkeypatch.undo()
    err = errors.to_s3(caught.value)
    assert isinstance(err, errors.InsufficientStorage) and err.status == 507
    assert await read_all(store, "k") == b"old"
    assert files_under(tmp_path / "data" / "tmp") == []


def test_sqlite_full_is_insufficient_storage_too() -> None:
    import sqlite3

    assert isinstance(errors.to_s3(sqlite3.OperationalError("database or disk is full")), errors.InsufficientStorage)
    assert errors.to_s3(sqlite3.OperationalError("no such table: x")) is None  # a bug stays a bug (500, logged)

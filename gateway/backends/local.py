"""The embedded local store: objects as immutable files, metadata in SQLite.

Layout under the data directory::

    meta.sqlite3            buckets, objects, uploads, parts (WAL mode)
    objects/ab/cd/<id>      one immutable file per object version
    uploads/<upload>/<id>   one file per uploaded part
    tmp/<id>                bodies being received; emptied at start-up

Why files named by a random id rather than by key: S3 keys are not paths.
"a" and "a/b" can both exist, keys may contain "..", "//", NUL-free
arbitrary UTF-8 up to 1 KiB, and case matters on every filesystem we may run
on. Naming files by id makes path traversal impossible by construction (no
byte of a key ever reaches a path) and makes an overwrite an index update.

Write order, and why:

1. the body streams into ``tmp/<id>`` (nothing visible yet);
2. fsync the file, then rename it to ``objects/..../<id>`` and fsync that
   directory: the bytes are durable before anything points at them;
3. one SQLite transaction makes the new version current;
4. only then is the replaced version's file unlinked.

A crash between 2 and 3 leaves an unreferenced file, removed by the
start-up sweep; a crash before 2 leaves a temporary file, also swept. A
reader holds an open descriptor, so a version unlinked in step 4 stays
readable to those already reading it: a reader sees one version whole.

All SQLite access runs on one dedicated thread (one connection, no locks to
get wrong); bulk file I/O runs on the default executor so that a slow disk
write never delays a metadata lookup.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import mmap
import os
import re
import secrets
import sqlite3
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from nearstore.gateway import errors
from nearstore.gateway.checksums import combine_crc, new_checksum
from nearstore.gateway.conditions import http_date
from nearstore.metadata.backing import (
    ACCESS_DOCUMENTS,
    VERSIONING_STATES,
    BucketAccess,
    BucketInfo,
    CompletedPart,
    Deleted,
    FileSegment,
    ListPage,
    ObjectInfo,
    ObjectMeta,
    PartInfo,
    ReadOptions,
    Served,
    UploadBody,
    UploadInfo,
    VersionEntry,
    VersionPage,
    WriteConditions,
    read_segments,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10000
READ_CHUNK = 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    name    TEXT PRIMARY KEY,
    created REAL NOT NULL,
    region  TEXT NOT NULL DEFAULT '',
    owner   TEXT NOT NULL DEFAULT '',  -- canonical user id; '' the node's first user
    tags    TEXT,                      -- JSON object; NULL: no tag set
    cors    TEXT,                      -- CORSConfiguration document; NULL: none
    versioning TEXT                    -- 'Enabled' | 'Suspended'; NULL: never enabled
);
-- Keys are stored as UTF-8 BLOBs: SQLite compares BLOBs with memcmp, which is
-- exactly S3's listing order (UTF-8 binary), and makes prefix ranges exact.
CREATE TABLE IF NOT EXISTS objects (
    bucket  TEXT NOT NULL,
    key     BLOB NOT NULL,
    file    TEXT NOT NULL,
    size    INTEGER NOT NULL,
    etag    TEXT NOT NULL,
    mtime   REAL NOT NULL,
    info    TEXT NOT NULL,   -- JSON: content type, headers, meta, checksum, parts
    tags    TEXT NOT NULL DEFAULT '{}',
    version TEXT NOT NULL DEFAULT 'null',  -- the current version's id
    PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
-- A versioned bucket's other versions and its delete markers (file NULL);
-- the current version stays in objects, so reads and listings of current
-- objects never look here. seq orders a key's versions, newest highest.
CREATE TABLE IF NOT EXISTS versions (
    bucket  TEXT NOT NULL,
    key     BLOB NOT NULL,
    version TEXT NOT NULL,
    file    TEXT,
    size    INTEGER NOT NULL,
    etag    TEXT NOT NULL,
    mtime   REAL NOT NULL,
    info    TEXT NOT NULL,
    tags    TEXT NOT NULL DEFAULT '{}',
    seq     INTEGER NOT NULL,
    PRIMARY KEY (bucket, key, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS versions_by_age ON versions (bucket, key, seq);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    bucket    TEXT NOT NULL,
    key       BLOB NOT NULL,
    initiated REAL NOT NULL,
    meta      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_by_key ON uploads (bucket, key, initiated);
CREATE TABLE IF NOT EXISTS parts (
    upload_id   TEXT NOT NULL,
    part_number INTEGER NOT NULL,
    file        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    etag        TEXT NOT NULL,
    md5         BLOB NOT NULL,
    mtime       REAL NOT NULL,
    checksum    TEXT,
    PRIMARY KEY (upload_id, part_number)
) WITHOUT ROWID;
-- Uploads completed lately (a day), so that a repeated
-- CompleteMultipartUpload (a client that lost the first answer) is answered
-- as the first one was, as S3 does.
CREATE TABLE IF NOT EXISTS completed (
    upload_id TEXT PRIMARY KEY,
    bucket    TEXT NOT NULL,
    key       BLOB NOT NULL,
    parts     TEXT NOT NULL,  -- JSON [[part number, ETag], ...] as completed
    etag      TEXT NOT NULL,
    at        REAL NOT NULL
);
-- Access documents of a bucket (gateway.access), of this store's buckets
-- and of the buckets this node fronts (which have no row above).
CREATE TABLE IF NOT EXISTS access (
    bucket              TEXT PRIMARY KEY,
    acl                 TEXT,  -- JSON, as gateway.acl records it; NULL: private
    policy              TEXT,  -- the bucket policy as sent; NULL: none
    public_access_block TEXT   -- JSON of the four flags; NULL: none
);
"""
COMPLETED_KEPT_S = 86400.0


def _key_upper_bound(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with
    ``prefix``, or None when there is none (prefix empty or all 0xFF)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)


def _meta_to_json(meta: ObjectMeta) -> str:
    return json.dumps(
        {
            "content_type": meta.content_type,
            "headers": dict(meta.headers),
            "user_meta": dict(meta.user_meta),
            "tags": dict(meta.tags),
            "checksum_algorithm": meta.checksum_algorithm,
            "acl": meta.acl,
        }
    )


def _meta_from_json(text: str) -> ObjectMeta:
    d = json.loads(text)
    return ObjectMeta(
        content_type=d.get("content_type"),
        headers=d.get("headers") or {},
        user_meta=d.get("user_meta") or {},
        tags=d.get("tags") or {},
        checksum_algorithm=d.get("checksum_algorithm"),
        acl=d.get("acl"),
    )


def _info_json(
    meta: ObjectMeta,
    checksum: tuple[str, str, str] | None,
    parts: Sequence[int] = (),
    part_checksums: Sequence[str] = (),
) -> str:
    return json.dumps(
        {
            "content_type": meta.content_type or "binary/octet-stream",
            "headers": dict(meta.headers),
            "user_meta": dict(meta.user_meta),
            "checksum": list(checksum) if checksum else None,
            "parts": list(parts),
            "part_checksums": list(part_checksums),
            "acl": meta.acl,
        }
    )


def _row_to_info(key: bytes, size: int, etag: str, mtime: float, info: str, tags: str) -> ObjectInfo:
    d = json.loads(info)
    checksum = d.get("checksum")
    return ObjectInfo(
        key=key.decode(),
        size=size,
        etag=etag,
        last_modified=mtime,
        content_type=d["content_type"],
        headers=d["headers"],
        user_meta=d["user_meta"],
        checksum=(checksum[0], checksum[1], checksum[2]) if checksum else None,
        parts=tuple(d.get("parts") or ()),
        part_checksums=tuple(d.get("part_checksums") or ()),
        tag_count=len(json.loads(tags)),
        acl=d.get("acl"),
    )


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass
class LocalHandle:
    """An open object version (see ``ObjectHandle``)."""

    info: ObjectInfo
    fd: int
    _closed: bool = False
    served: Served | None = None

    async def segments(self, start: int, length: int) -> AsyncIterator[FileSegment | bytes]:
        yield FileSegment(self.fd, start, length)

    def read_range(self, start: int, length: int) -> AsyncIterator[bytes]:
        return read_segments(self.segments(start, length))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.fd >= 0:
                os.close(self.fd)


class LocalStore:
    """A bucket store on a local directory (see the module docstring)."""

    name = "local"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True, sweep: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        # Only one process of a node sweeps: a worker must not delete the
        # temporary files of another process's uploads in flight.
        self.sweep = sweep
        self._db_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nearstore-db")
        self._conn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._hot: dict[tuple[str, str], tuple[ObjectInfo, str]] = {}
        self._hot_access: dict[str, BucketAccess] = {}
        self._generation: mmap.mmap | None = None
        self._hot_generation = b""

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        # Private to the node's user: the files are every tenant's objects
        # and the index lists every key. Also tightens a data directory an
        # older version left readable (0755 directories, 0644 files below
        # them become unreachable).
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Group search stays if the local socket's server gave it (the
        # socket lives here; cache/localsock.py).
        os.chmod(self.root, 0o700 | (stat.S_IMODE(os.stat(self.root).st_mode) & stat.S_IXGRP))
        for sub in ("objects", "uploads", "tmp"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root / sub, 0o700)
        await self._db(self._open_db)
        self._generation = self._open_generation()
        # A process that died between a commit and its bump (below) is
        # replaced by one that starts here: no memo outlives that commit.
        self._bump_generation()
        if self.sweep:
            await asyncio.get_running_loop().run_in_executor(None, self._sweep)

    async def close(self) -> None:
        if self._generation is not None:
            self._generation.close()
            self._generation = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._db_thread, conn.close)
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None
        self._db_thread.shutdown(wait=True)

    def _open_db(self) -> None:
        db = self.root / "meta.sqlite3"
        # SQLite creates the file (and its -wal and -shm, with the same
        # mode) 0644 less the umask: create it 0600 first.
        os.close(os.open(db, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        os.chmod(db, 0o600)
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; the object
        # bytes themselves are fsynced before the commit that publishes them.
        conn.execute("PRAGMA synchronous=NORMAL" if not self.fsync else "PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        # Columns added since the first index: an older one gets them (its
        # buckets are the first user's, "", and have no tags).
        have = {(t, r[1]) for t in ("buckets", "objects") for r in conn.execute(f"PRAGMA table_info({t})")}
        for table, column, kind in (("buckets", "owner", "TEXT NOT NULL DEFAULT ''"), ("buckets", "tags", "TEXT"),
                                    ("buckets", "cors", "TEXT"), ("buckets", "versioning", "TEXT"),
                                    ("objects", "version", "TEXT NOT NULL DEFAULT 'null'")):
            if (table, column) in have:
                continue
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as e:  # another process of the node added it first
                if "duplicate column" not in str(e):
                    raise
        self._conn = conn
        # The event loop's own connection, for point reads (see open_object).
        rconn = sqlite3.connect(self.root / "meta.sqlite3", isolation_level=None, check_same_thread=False)
        rconn.execute("PRAGMA query_only=1")
        self._rconn = rconn

    def _sweep(self) -> None:
        """Remove what a crash left behind: temporary bodies, and object or
        part files that no index row references."""
        tmp = self.root / "tmp"
        for entry in os.scandir(tmp):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        conn = self._conn
        assert conn is not None
        # The sweep runs before the server accepts requests, so reading the
        # connection from this thread cannot race with the db thread.
        referenced = {r[0] for r in conn.execute("SELECT file FROM objects")}
        referenced.update(r[0] for r in conn.execute("SELECT file FROM parts"))
        removed = 0
        for base in (self.root / "objects", self.root / "uploads"):
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                    if rel not in referenced:
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(dirpath, name))
                            removed += 1
        if removed:
            log.warning("start-up sweep removed %d unreferenced files", removed)

    async def _db(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, self._changing, fn, *args)

    def _changing(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` on the db thread; if it changed any row (committed or
        not), bump the generation after it, so every process's memo of hot
        rows is dropped (see _hot_row)."""
        conn = self._conn
        before = conn.total_changes if conn is not None else 0
        try:
            return fn(*args)
        finally:
            if conn is not None and self._conn is conn and conn.total_changes != before:
                self._bump_generation()

    # The generation: 8 bytes in a file every process of the node maps,
    # rewritten with a value never used before after each write to the
    # index. A reader that memoized rows under one value drops them as soon
    # as it sees another. Never a counter: two writers incrementing at once
    # could write the same value and one bump would be lost; a torn read
    # only costs a spurious refresh.
    def _open_generation(self) -> mmap.mmap:
        fd = os.open(self.root / "meta.generation", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            return mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def _bump_generation(self) -> None:
        if self._generation is not None:
            self._generation[:8] = secrets.token_bytes(8)

    @property
    def rconn(self) -> sqlite3.Connection:
        assert self._rconn is not None, "LocalStore.start() not called"
        return self._rconn

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "LocalStore.start() not called"
        return self._conn

    # --- buckets ------------------------------------------------------------

    async def list_buckets(self) -> list[BucketInfo]:
        def q() -> list[BucketInfo]:
            rows = self.conn.execute("SELECT name, created, region, owner FROM buckets ORDER BY name")
            return [BucketInfo(*r) for r in rows]

        return await self._db(q)

    async def create_bucket(self, bucket: str, region: str = "", owner: str = "") -> None:
        def q() -> None:
            try:
                self.conn.execute(
                    "INSERT INTO buckets (name, created, region, owner) VALUES (?, ?, ?, ?)",
                    (bucket, time.time(), region, owner),
                )
            except sqlite3.IntegrityError:
                if self._bucket_row(bucket).owner != owner:
                    raise errors.BucketAlreadyExists(BucketName=bucket) from None
                raise errors.BucketAlreadyOwnedByYou(BucketName=bucket) from None

        await self._db(q)

    def _bucket_row(self, bucket: str, conn: sqlite3.Connection | None = None) -> BucketInfo:
        row = (conn or self.conn).execute(
            "SELECT name, created, region, owner FROM buckets WHERE name = ?", (bucket,)
        ).fetchone()
        if row is None:
            raise errors.NoSuchBucket(BucketName=bucket)
        return BucketInfo(*row)

    async def head_bucket(self, bucket: str) -> BucketInfo:
        return await self._db(self._bucket_row, bucket)

    # A bucket's own documents, one column each of its row (NULL: none).
    _BUCKET_DOCUMENTS = {"tags": errors.NoSuchTagSet, "cors": errors.NoSuchCORSConfiguration}

    def _bucket_document(self, bucket: str, column: str) -> str:
        row = self.conn.execute(f"SELECT {column} FROM buckets WHERE name = ?", (bucket,)).fetchone()
        if row is None:
            raise errors.NoSuchBucket(BucketName=bucket)
        if row[0] is None:
            raise self._BUCKET_DOCUMENTS[column](BucketName=bucket)
        return str(row[0])

    def _set_bucket_document(self, bucket: str, column: str, value: str | None) -> None:
        assert column in self._BUCKET_DOCUMENTS
        if self.conn.execute(f"UPDATE buckets SET {column} = ? WHERE name = ?", (value, bucket)).rowcount == 0:
            raise errors.NoSuchBucket(BucketName=bucket)

    async def get_bucket_tags(self, bucket: str) -> dict[str, str]:
        tags: dict[str, str] = json.loads(await self._db(self._bucket_document, bucket, "tags"))
        return tags

    async def put_bucket_tags(self, bucket: str, tags: Mapping[str, str]) -> None:
        await self._db(self._set_bucket_document, bucket, "tags", json.dumps(dict(tags)) if tags else None)

    async def get_bucket_cors(self, bucket: str) -> bytes:
        return (await self._db(self._bucket_document, bucket, "cors")).encode()

    async def put_bucket_cors(self, bucket: str, document: bytes | None) -> None:
        await self._db(self._set_bucket_document, bucket, "cors", document.decode() if document is not None else None)

    async def delete_bucket(self, bucket: str) -> None:
        def q() -> list[str]:
            c = self.conn
            self._bucket_row(bucket)
            if c.execute("SELECT 1 FROM objects WHERE bucket = ? LIMIT 1", (bucket,)).fetchone() or c.execute(
                    "SELECT 1 FROM versions WHERE bucket = ? LIMIT 1", (bucket,)).fetchone():
                raise errors.BucketNotEmpty(BucketName=bucket)
            c.execute("BEGIN IMMEDIATE")
            try:
                files = [
                    r[0]
                    for r in c.execute(
                        "SELECT p.file FROM parts p JOIN uploads u USING (upload_id) WHERE u.bucket = ?",
                        (bucket,),
                    )
                ]
                c.execute(
                    "DELETE FROM parts WHERE upload_id IN (SELECT upload_id FROM uploads WHERE bucket = ?)",
                    (bucket,),
                )
                c.execute("DELETE FROM uploads WHERE bucket = ?", (bucket,))
                c.execute("DELETE FROM buckets WHERE name = ?", (bucket,))
                c.execute("DELETE FROM access WHERE bucket = ?", (bucket,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            return files

        for f in await self._db(q):
            self._unlink(f)

    # --- objects: reads -----------------------------------------------------

    def _object_row(
        self, bucket: str, key: str, conn: sqlite3.Connection | None = None
    ) -> tuple[ObjectInfo, str]:
        row = (conn or self.conn).execute(
            "SELECT o.key, o.size, o.etag, o.mtime, o.info, o.tags, o.file, o.version, b.versioning"
            " FROM objects o JOIN buckets b ON b.name = o.bucket WHERE o.bucket = ? AND o.key = ?",
            (bucket, key.encode()),
        ).fetchone()
        if row is None:
            self._bucket_row(bucket, conn)
            raise self._missing(bucket, key, conn or self.conn)
        info = _row_to_info(*row[:6])
        if row[8] is not None:
            info = dataclasses.replace(info, version_id=row[7])
        return info, row[6]

    def _missing(self, bucket: str, key: str, conn: sqlite3.Connection) -> errors.S3Error:
        """NoSuchKey for a key with no current version; where its latest is
        a delete marker, S3 says so in headers."""
        row = conn.execute(
            "SELECT version, file FROM versions WHERE bucket = ? AND key = ? ORDER BY seq DESC LIMIT 1",
            (bucket, key.encode()),
        ).fetchone()
        if row is not None and row[1] is None:
            return errors.NoSuchKey(Key=key, headers={"x-amz-delete-marker": "true", "x-amz-version-id": row[0]})
        return errors.NoSuchKey(Key=key)

    def _version_row(self, bucket: str, key: str, version: str, conn: sqlite3.Connection) -> tuple[ObjectInfo, str]:
        """One version of a key by id, current or not: NoSuchVersion where
        there is none, MethodNotAllowed for a delete marker (S3's answers)."""
        _check_version_id(version)
        try:
            info, rel = self._object_row(bucket, key, conn)
        except errors.NoSuchKey:
            pass
        else:
            if (info.version_id or "null") == version:
                return info, rel
        row = conn.execute(
            "SELECT key, size, etag, mtime, info, tags, file FROM versions WHERE bucket = ? AND key = ? AND version = ?",
            (bucket, key.encode(), version),
        ).fetchone()
        if row is None:
            raise errors.NoSuchVersion(Key=key, VersionId=version)
        if row[6] is None:
            raise errors.MethodNotAllowed(
                "The specified method is not allowed against this resource.", Method="GET", ResourceType="DeleteMarker",
                headers={"x-amz-delete-marker": "true", "x-amz-version-id": version,
                         "Last-Modified": http_date(row[3]), "Allow": "DELETE"})
        return dataclasses.replace(_row_to_info(*row[:6]), version_id=version), row[6]

    # Rows read lately, with the object file's full path: a hot key's GET
    # skips the query, the JSON of its metadata and the path join (py-spy:
    # 16 % of a 64 KiB GET). Valid while the generation (above) is
    # unchanged, which it is until any process of the node writes the index.
    # Reading it is a slice of a shared mapping; SQLite's PRAGMA
    # data_version did the same job at 16 % of a small GET's CPU.
    HOT_ROWS = 4096

    def _check_memo(self) -> None:
        generation = self._generation[:8] if self._generation is not None else b""
        if generation != self._hot_generation or not generation:
            self._hot.clear()
            self._hot_access.clear()
            self._hot_generation = generation

    def bucket_owner(self, bucket: str) -> str:
        return self.bucket_access(bucket).owner

    def bucket_access(self, bucket: str) -> BucketAccess:
        self._check_memo()
        got = self._hot_access.get(bucket)
        if got is None:
            owner = self._bucket_row(bucket, self.rconn).owner
            got = self._remember_access(bucket, BucketAccess(owner, *self._access_row(bucket)))
        return got

    def fronted_access(self, bucket: str, owner: str) -> BucketAccess:
        """The access of a bucket this node fronts (no row of ours but its
        documents), owned by ``owner``."""
        self._check_memo()
        got = self._hot_access.get(bucket)
        if got is None or got.owner != owner:
            got = self._remember_access(bucket, BucketAccess(owner, *self._access_row(bucket)))
        return got

    def _remember_access(self, bucket: str, access: BucketAccess) -> BucketAccess:
        if len(self._hot_access) >= self.HOT_ROWS:
            self._hot_access.clear()
        self._hot_access[bucket] = access
        return access

    def _access_row(self, bucket: str) -> tuple[str | None, str | None, str | None]:
        row = self.rconn.execute(
            "SELECT acl, policy, public_access_block FROM access WHERE bucket = ?", (bucket,)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else (None, None, None)

    async def put_bucket_access(self, bucket: str, name: str, document: str | None, *, fronted: bool = False) -> None:
        """``fronted``: a bucket of another store, which has no row here."""
        assert name in ACCESS_DOCUMENTS

        def q() -> None:
            if not fronted:
                self._bucket_row(bucket)
            self.conn.execute("INSERT OR IGNORE INTO access (bucket) VALUES (?)", (bucket,))
            self.conn.execute(f"UPDATE access SET {name} = ? WHERE bucket = ?", (document, bucket))

        await self._db(q)

    async def forget_access(self, bucket: str) -> None:
        """Drop a fronted bucket's access documents (it was deleted)."""
        await self._db(lambda: self.conn.execute("DELETE FROM access WHERE bucket = ?", (bucket,)))

    async def put_object_acl(self, bucket: str, key: str, acl: str | None, version_id: str | None = None) -> None:
        await self._db(self._update_object, bucket, key, version_id, "info = json_set(info, '$.acl', ?)", (acl,))

    def _hot_row(self, bucket: str, key: str) -> tuple[ObjectInfo, str]:
        self._check_memo()
        got = self._hot.get((bucket, key))
        if got is None:
            info, rel = self._object_row(bucket, key, self.rconn)
            if len(self._hot) >= self.HOT_ROWS:
                self._hot.clear()
            got = self._hot[(bucket, key)] = (info, str(self.root / rel))
        return got

    async def head_object(self, bucket: str, key: str) -> ObjectInfo:
        return self._hot_row(bucket, key)[0]

    async def open_object(
        self, bucket: str, key: str, opts: ReadOptions | None = None, *, head: bool = False
    ) -> LocalHandle:
        """Lookup and open run inline on the event loop, on a read-only
        connection: a WAL reader never waits for a writer, a point lookup
        costs ~20 us, and a thread hop costs several times that (py-spy:
        executor hand-offs were 40% of a 4 KiB GET). If an overwrite
        unlinks the file between lookup and open, look again."""
        version = opts.version_id if opts is not None else None
        for _ in range(5):
            if version is not None:
                info, rel = self._version_row(bucket, key, version, self.rconn)
                path = str(self.root / rel)
            else:
                info, path = self._hot_row(bucket, key)
            if head:
                return LocalHandle(info, -1)
            try:
                fd = os.open(path, os.O_RDONLY | _CLOEXEC)
            except FileNotFoundError:
                self._hot.pop((bucket, key), None)  # replaced meanwhile: look again
                continue
            return LocalHandle(info, fd)
        raise errors.SlowDown("The object is being overwritten too fast to read")

    # --- objects: writes ----------------------------------------------------

    @contextlib.contextmanager
    def _temp_file(self) -> Iterator[tuple[int, str]]:
        """A new temporary file (descriptor, path relative to root): closed
        when the block ends, and removed if the block fails. The caller
        fsyncs, where it may block."""
        rel = f"tmp/{uuid.uuid4().hex}"
        path = self.root / rel
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            yield fd, rel
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)

    async def _publish_async(self, tmp_rel: str, dest_dir: str) -> str:
        """_publish on the executor; the temp file is removed if it fails."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._publish, tmp_rel, dest_dir)
        except BaseException:
            self._unlink(tmp_rel)
            raise

    async def _receive(self, body: UploadBody, dest_dir: str | None = None) -> tuple[str, int]:
        """Stream ``body`` into a new temporary file and fsync it; with
        ``dest_dir``, also move it there (`_publish`). Returns its path
        (relative to root) and the size. Removes the file if the body fails
        any check or the client goes away.

        Each piece is written once the next has arrived, so the last one,
        the fsync and the move are one job on the executor: a small PUT
        costs one thread hop here, not three (a hop is ~0.1 ms of CPU on
        this machine, bench/RESULTS.md)."""
        loop = asyncio.get_running_loop()
        size = 0
        held: bytes | memoryview | None = None
        with self._temp_file() as (fd, rel):
            async for chunk in body.chunks():
                if held is not None:
                    await loop.run_in_executor(None, _write_all, fd, held)
                held = chunk
                size += len(chunk)
            # Past the loop, the body passed every check chunks() makes.
            rel = await loop.run_in_executor(None, self._settle, fd, held, rel, dest_dir)
        return rel, size

    def _settle(self, fd: int, last: bytes | memoryview | None, tmp_rel: str, dest_dir: str | None) -> str:
        if last:
            _write_all(fd, last)
        if self.fsync:
            os.fsync(fd)
        if dest_dir is None:
            return tmp_rel
        try:
            return self._publish(tmp_rel, dest_dir)
        except BaseException:
            self._unlink(tmp_rel)
            raise

    def _publish(self, tmp_rel: str, dest_dir: str) -> str:
        """Move a received temporary file to its final place (fsynced
        directory), returning the new relative path."""
        name = os.path.basename(tmp_rel)
        if dest_dir == "objects":
            dest_dir = f"objects/{name[:2]}/{name[2:4]}"
        d = self.root / dest_dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        rel = f"{dest_dir}/{name}"
        os.rename(self.root / tmp_rel, self.root / rel)
        if self.fsync:
            _fsync_dir(d)
        return rel

    def _unlink(self, rel: str) -> None:
        try:
            os.unlink(self.root / rel)
        except FileNotFoundError:
            pass
        except OSError as e:  # the sweep at next start removes it
            log.warning("could not remove %s: %s", rel, e)

    def _commit_object(
        self,
        bucket: str,
        key: str,
        rel: str,
        size: int,
        etag: str,
        info_json: str,
        tags: Mapping[str, str],
        conditions: WriteConditions,
        before_commit: Callable[[sqlite3.Connection], None] | None = None,
    ) -> ObjectInfo:
        """Make ``rel`` the current version of (bucket, key). Runs on the db
        thread. In a versioned bucket the replaced version is kept (moved to
        the versions table), except a null version replaced by another
        (versioning suspended); files no version keeps are unlinked after
        the commit."""
        c = self.conn
        mtime = time.time()
        dead: list[str] = []
        version = "null"
        c.execute("BEGIN IMMEDIATE")
        try:
            state = self._versioning(bucket)
            row = c.execute(
                "SELECT file, etag FROM objects WHERE bucket = ? AND key = ?", (bucket, key.encode())
            ).fetchone()
            _check_write_conditions(conditions, row[1] if row else None, key)
            if state is None:
                if row:
                    dead.append(row[0])
            else:
                version = _new_version_id() if state == "Enabled" else "null"
                dead += self._retire_current(bucket, key, state)
            if before_commit is not None:
                before_commit(c)
            c.execute(
                "INSERT OR REPLACE INTO objects (bucket, key, file, size, etag, mtime, info, tags, version)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (bucket, key.encode(), rel, size, etag, mtime, info_json, json.dumps(dict(tags)), version),
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            self._unlink(rel)
            raise
        for old in dead:
            if old != rel:
                self._unlink(old)
        info = _row_to_info(key.encode(), size, etag, mtime, info_json, json.dumps(dict(tags)))
        return dataclasses.replace(info, version_id=version) if state is not None else info

    # --- versions (db thread, inside the caller's transaction) -------------

    def _versioning(self, bucket: str) -> str | None:
        row = self.conn.execute("SELECT versioning FROM buckets WHERE name = ?", (bucket,)).fetchone()
        if row is None:
            raise errors.NoSuchBucket(BucketName=bucket)
        return None if row[0] is None else str(row[0])

    def _next_seq(self, bucket: str, key: str) -> int:
        row = self.conn.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM versions WHERE bucket = ? AND key = ?", (bucket, key.encode())
        ).fetchone()
        return int(row[0])

    def _retire_current(self, bucket: str, key: str, state: str) -> list[str]:
        """Before a new current version (or a delete marker) of a versioned
        bucket's key: keep the current one among the versions, or, where
        versioning is suspended, drop the key's null version (current or
        not) that the new one replaces. Returns the files to unlink."""
        c, k, dead = self.conn, key.encode(), []
        if state == "Suspended":
            for (f,) in c.execute("DELETE FROM versions WHERE bucket = ? AND key = ? AND version = 'null' RETURNING file",
                                  (bucket, k)).fetchall():
                if f is not None:
                    dead.append(f)
        row = c.execute("DELETE FROM objects WHERE bucket = ? AND key = ? RETURNING file, size, etag, mtime, info, "
                        "tags, version", (bucket, k)).fetchone()
        if row is None:
            return dead
        if state == "Suspended" and row[6] == "null":
            return [*dead, row[0]]
        c.execute("INSERT INTO versions (bucket, key, version, file, size, etag, mtime, info, tags, seq)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (bucket, k, row[6], *row[:6], self._next_seq(bucket, key)))
        return dead

    def _promote(self, bucket: str, key: str) -> None:
        """After the current version or the latest marker is deleted for
        good: the newest remaining version becomes current, unless it is a
        delete marker (then the key stays deleted)."""
        c, k = self.conn, key.encode()
        row = c.execute("SELECT version, file FROM versions WHERE bucket = ? AND key = ? ORDER BY seq DESC LIMIT 1",
                        (bucket, k)).fetchone()
        if row is None or row[1] is None:
            return
        c.execute("INSERT INTO objects (bucket, key, file, size, etag, mtime, info, tags, version)"
                  " SELECT bucket, key, file, size, etag, mtime, info, tags, version FROM versions"
                  " WHERE bucket = ? AND key = ? AND version = ?", (bucket, k, row[0]))
        c.execute("DELETE FROM versions WHERE bucket = ? AND key = ? AND version = ?", (bucket, k, row[0]))

    def _delete_version(self, bucket: str, key: str, version: str) -> tuple[Deleted, list[str]]:
        _check_version_id(version)
        c, k = self.conn, key.encode()
        row = c.execute("DELETE FROM objects WHERE bucket = ? AND key = ? AND version = ? RETURNING file",
                        (bucket, k, version)).fetchone()
        if row is not None:
            self._promote(bucket, key)
            return Deleted(version), [row[0]]
        row = c.execute("DELETE FROM versions WHERE bucket = ? AND key = ? AND version = ? RETURNING file",
                        (bucket, k, version)).fetchone()
        if row is None:
            return Deleted(version), []  # nothing by that id: deleting it again is not an error, as S3
        if c.execute("SELECT 1 FROM objects WHERE bucket = ? AND key = ?", (bucket, k)).fetchone() is None:
            self._promote(bucket, key)
        return Deleted(version, delete_marker=row[0] is None), [row[0]] if row[0] is not None else []

    async def put_object(
        self,
        bucket: str,
        key: str,
        body: UploadBody,
        meta: ObjectMeta,
        conditions: WriteConditions | None = None,
    ) -> ObjectInfo:
        conditions = conditions or WriteConditions()
        await self.head_bucket(bucket)  # fail fast, before reading the body
        rel, size = await self._receive(body, "objects")
        checksum = body.checksum
        info_json = _info_json(meta, (checksum[0], checksum[1], "FULL_OBJECT") if checksum else None)
        etag = f'"{body.md5_hex}"'
        return await self._db(
            self._commit_object, bucket, key, rel, size, etag, info_json, meta.tags, conditions
        )

    async def copy_object(
        self,
        src_bucket: str,
        src_key: str,
        dst_bucket: str,
        dst_key: str,
        meta: ObjectMeta | None,
        expected_etag: str | None = None,
        src_version: str | None = None,
    ) -> ObjectInfo:
        src = await self.open_object(src_bucket, src_key, ReadOptions(version_id=src_version))
        try:
            if expected_etag is not None and src.info.etag != expected_etag:
                raise errors.PreconditionFailed(Condition="x-amz-copy-source-if-match")
            await self.head_bucket(dst_bucket)
            loop = asyncio.get_running_loop()
            tmp_rel, md5 = await loop.run_in_executor(None, self._copy_range_to, src.fd, 0, src.info.size)
        finally:
            await src.close()
        rel = await self._publish_async(tmp_rel, "objects")
        info = src.info
        if meta is None:
            meta = ObjectMeta(
                content_type=info.content_type, headers=info.headers, user_meta=info.user_meta
            )
            tags = await self.get_tags(src_bucket, src_key, src_version)
        else:
            tags = dict(meta.tags)
        # A copy is a new single-part object: S3 recomputes the ETag as the
        # MD5 of the bytes (a multipart source's "-N" ETag does not carry over).
        etag = f'"{md5.hex()}"'
        checksum = info.checksum if info.checksum and info.checksum[2] == "FULL_OBJECT" else None
        info_json = _info_json(meta, checksum)
        return await self._db(
            self._commit_object, dst_bucket, dst_key, rel, info.size, etag, info_json, tags, WriteConditions()
        )

    def _copy_range_to(self, src_fd: int, start: int, length: int) -> tuple[str, bytes]:
        """Copy a byte range of an open file into a new temporary file,
        fsync it, and return its path and the MD5 of the bytes (needed for
        the ETag, so we read them anyway rather than use copy_file_range)."""
        md5 = hashlib.md5()
        with self._temp_file() as (fd, rel):
            pos, end = start, start + length
            while pos < end:
                data = os.pread(src_fd, min(READ_CHUNK * 4, end - pos), pos)
                if not data:
                    raise OSError(errno.EIO, "source object file shorter than recorded size")
                md5.update(data)
                _write_all(fd, data)
                pos += len(data)
            if self.fsync:
                os.fsync(fd)
        return rel, md5.digest()

    async def delete_object(
        self, bucket: str, key: str, if_match: str | None = None, version_id: str | None = None
    ) -> Deleted:
        def q() -> tuple[Deleted, list[str]]:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                state = self._versioning(bucket)
                if if_match is not None:
                    current = c.execute(
                        "SELECT etag FROM objects WHERE bucket = ? AND key = ?", (bucket, key.encode())
                    ).fetchone()
                    _check_write_conditions(WriteConditions(if_match=if_match), current[0] if current else None, key)
                if version_id is not None:
                    done = self._delete_version(bucket, key, version_id)
                elif state is None:
                    row = c.execute(
                        "DELETE FROM objects WHERE bucket = ? AND key = ? RETURNING file", (bucket, key.encode())
                    ).fetchone()
                    done = Deleted(), [row[0]] if row else []
                else:
                    dead = self._retire_current(bucket, key, state)
                    marker = _new_version_id() if state == "Enabled" else "null"
                    c.execute("INSERT INTO versions (bucket, key, version, file, size, etag, mtime, info, tags, seq)"
                              " VALUES (?, ?, ?, NULL, 0, '', ?, ?, '{}', ?)",
                              (bucket, key.encode(), marker, time.time(), _info_json(ObjectMeta(), None),
                               self._next_seq(bucket, key)))
                    done = Deleted(marker, delete_marker=True), dead
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            return done

        deleted, dead = await self._db(q)
        for rel in dead:
            self._unlink(rel)
        return deleted

    async def get_bucket_versioning(self, bucket: str) -> str | None:
        return await self._db(self._versioning, bucket)

    async def put_bucket_versioning(self, bucket: str, status: str) -> None:
        assert status in VERSIONING_STATES

        def q() -> None:
            if self.conn.execute("UPDATE buckets SET versioning = ? WHERE name = ?", (status, bucket)).rowcount == 0:
                raise errors.NoSuchBucket(BucketName=bucket)

        await self._db(q)

    # --- listing ------------------------------------------------------------

    async def list_objects(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        start_after: str = "",
        max_keys: int = 1000,
    ) -> ListPage:
        return await self._db(self._list, bucket, prefix, delimiter, start_after, max_keys)

    def _list(
        self, bucket: str, prefix: str, delimiter: str, start_after: str, max_keys: int
    ) -> ListPage:
        self._bucket_row(bucket)
        c = self.conn
        bprefix = prefix.encode()
        upper = _key_upper_bound(bprefix)
        after = start_after.encode()
        lower = max(bprefix, after)
        inclusive = lower == bprefix and lower != after
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        last: str | None = None
        batch = max(min(max_keys + 1, 1000), 2)
        while True:
            sql = (
                "SELECT key, size, etag, mtime, info, tags FROM objects WHERE bucket = ? AND key "
                + (">=" if inclusive else ">")
                + " ?"
            )
            args: list[object] = [bucket, lower]
            if upper is not None:
                sql += " AND key < ?"
                args.append(upper)
            sql += " ORDER BY key LIMIT ?"
            args.append(batch)
            rows = c.execute(sql, args).fetchall()
            if not rows:
                return ListPage(objects, prefixes, False, last)
            jumped = False
            for row in rows:
                key = row[0].decode()
                if delimiter:
                    idx = key.find(delimiter, len(prefix))
                    if idx >= 0:
                        cp = key[: idx + len(delimiter)]
                        # A common prefix at or before the marker was returned
                        # on an earlier page (S3 paginates by it, too).
                        if cp.encode() > after:
                            if len(objects) + len(prefixes) >= max_keys:
                                return ListPage(objects, prefixes, True, last)
                            prefixes.append(cp)
                            last = cp
                        # Skip every other key under this common prefix in one
                        # index seek instead of reading them all.
                        nxt = _key_upper_bound(cp.encode())
                        if nxt is None:
                            return ListPage(objects, prefixes, False, last)
                        lower, inclusive, jumped = nxt, True, True
                        break
                if len(objects) + len(prefixes) >= max_keys:
                    return ListPage(objects, prefixes, True, last)
                objects.append(_row_to_info(*row))
                last = key
            if not jumped:
                if len(rows) < batch:
                    return ListPage(objects, prefixes, False, last)
                lower, inclusive = rows[-1][0], False

    async def list_versions(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        key_marker: str = "",
        version_id_marker: str = "",
        max_keys: int = 1000,
    ) -> VersionPage:
        return await self._db(self._list_versions, bucket, prefix, delimiter, key_marker, version_id_marker,
                              max_keys)

    def _key_versions(self, bucket: str, key: bytes) -> list[VersionEntry]:
        """A key's versions, newest first: the current one, then the rest."""
        c = self.conn
        out: list[VersionEntry] = []
        for current, row in [(True, r) for r in c.execute(
                "SELECT key, size, etag, mtime, info, tags, version, 0 FROM objects WHERE bucket = ? AND key = ?",
                (bucket, key))] + [(False, r) for r in c.execute(
                "SELECT key, size, etag, mtime, info, tags, version, file IS NULL FROM versions"
                " WHERE bucket = ? AND key = ? ORDER BY seq DESC", (bucket, key))]:
            info = dataclasses.replace(_row_to_info(*row[:6]), version_id=row[6], delete_marker=bool(row[7]))
            out.append(VersionEntry(info, is_latest=current or not out))
        return out

    def _list_versions(self, bucket: str, prefix: str, delimiter: str, key_marker: str, version_id_marker: str,
                       max_keys: int) -> VersionPage:
        """Keys in order (from either table), each key's versions newest
        first; the page ends after ``max_keys`` entries and common
        prefixes, and starts after (key_marker, version_id_marker)."""
        c = self.conn
        self._bucket_row(bucket)
        entries: list[VersionEntry] = []
        prefixes: list[str] = []
        upper = _key_upper_bound(prefix.encode())
        lower = max(prefix.encode(), key_marker.encode())
        bound = " AND key < ?" if upper is not None else ""
        args: tuple[object, ...] = (bucket, lower) + ((upper,) if upper is not None else ())

        last: tuple[str, str | None] = ("", None)  # the last key (or common prefix) and version listed
        while True:
            keys = [r[0] for r in c.execute(
                f"SELECT key FROM objects WHERE bucket = ? AND key >= ?{bound}"
                f" UNION SELECT key FROM versions WHERE bucket = ? AND key >= ?{bound} ORDER BY key LIMIT 1000",
                args * 2)]
            if not keys:
                return VersionPage(entries, prefixes, False)
            for raw in keys:
                key = raw.decode()
                if key == key_marker and not version_id_marker:
                    continue  # the marker's key was listed whole
                if delimiter:
                    idx = key.find(delimiter, len(prefix))
                    if idx >= 0:
                        cp = key[: idx + len(delimiter)]
                        # A common prefix at or before the marker was listed
                        # on an earlier page.
                        if cp > key_marker:
                            if len(entries) + len(prefixes) >= max_keys:
                                return VersionPage(entries, prefixes, True, *last)
                            prefixes.append(cp)
                            last = (cp, None)
                        nxt = _key_upper_bound(cp.encode())
                        if nxt is None:
                            return VersionPage(entries, prefixes, False)
                        lower = nxt
                        break
                versions = self._key_versions(bucket, raw)
                if key == key_marker:
                    ids = [v.info.version_id for v in versions]
                    versions = versions[ids.index(version_id_marker) + 1:] if version_id_marker in ids else []
                for v in versions:
                    if len(entries) + len(prefixes) >= max_keys:
                        return VersionPage(entries, prefixes, True, *last)
                    entries.append(v)
                    last = (key, v.info.version_id)
            else:
                lower = keys[-1] + b"\x00"
            args = (bucket, lower) + ((upper,) if upper is not None else ())

    # --- tagging ------------------------------------------------------------

    async def get_tags(self, bucket: str, key: str, version_id: str | None = None) -> dict[str, str]:
        def q() -> dict[str, str]:
            if version_id is not None:
                self._version_row(bucket, key, version_id, self.conn)  # NoSuchVersion, MethodNotAllowed
            row = self.conn.execute(
                "SELECT tags FROM objects WHERE bucket = ? AND key = ?", (bucket, key.encode())
            ).fetchone() if version_id is None else self.conn.execute(
                "SELECT tags FROM objects WHERE bucket = ? AND key = ? AND version = ?"
                " UNION ALL SELECT tags FROM versions WHERE bucket = ? AND key = ? AND version = ?",
                (bucket, key.encode(), version_id) * 2,
            ).fetchone()
            if row is None:
                self._bucket_row(bucket)
                raise errors.NoSuchKey(Key=key)
            return dict(json.loads(row[0]))

        return await self._db(q)

    async def put_tags(
        self, bucket: str, key: str, tags: Mapping[str, str], version_id: str | None = None
    ) -> None:
        await self._db(self._update_object, bucket, key, version_id, "tags = ?", (json.dumps(dict(tags)),))

    def _update_object(self, bucket: str, key: str, version: str | None, assignment: str,
                       values: tuple[object, ...]) -> None:
        """Change a column of the current version, or of the one named (a
        delete marker has nothing to change: MethodNotAllowed, as S3)."""
        c, k = self.conn, key.encode()
        if version is None:
            if c.execute(f"UPDATE objects SET {assignment} WHERE bucket = ? AND key = ?", (*values, bucket, k)
                         ).rowcount == 0:
                self._object_row(bucket, key)  # NoSuchBucket or NoSuchKey
            return
        self._version_row(bucket, key, version, c)  # NoSuchVersion, MethodNotAllowed
        for table in ("objects", "versions"):
            c.execute(f"UPDATE {table} SET {assignment} WHERE bucket = ? AND key = ? AND version = ?",
                      (*values, bucket, k, version))

    # --- multipart ----------------------------------------------------------

    def _upload_row(self, bucket: str, key: str, upload_id: str) -> UploadInfo:
        row = self.conn.execute(
            "SELECT upload_id, key, initiated, meta FROM uploads WHERE upload_id = ? AND bucket = ? AND key = ?",
            (upload_id, bucket, key.encode()),
        ).fetchone()
        if row is None:
            self._bucket_row(bucket)
            raise errors.NoSuchUpload(UploadId=upload_id)
        return UploadInfo(row[0], row[1].decode(), row[2], _meta_from_json(row[3]))

    async def create_upload(self, bucket: str, key: str, meta: ObjectMeta) -> str:
        upload_id = base64.urlsafe_b64encode(uuid.uuid4().bytes + os.urandom(8)).decode().rstrip("=")

        def q() -> None:
            self._bucket_row(bucket)
            self.conn.execute(
                "INSERT INTO uploads (upload_id, bucket, key, initiated, meta) VALUES (?, ?, ?, ?, ?)",
                (upload_id, bucket, key.encode(), time.time(), _meta_to_json(meta)),
            )

        await self._db(q)
        return upload_id

    def _commit_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, rel: str, size: int,
        md5: bytes, checksum: str | None,
    ) -> PartInfo:
        c = self.conn
        mtime = time.time()
        old = None
        c.execute("BEGIN IMMEDIATE")
        try:
            self._upload_row(bucket, key, upload_id)
            row = c.execute(
                "SELECT file FROM parts WHERE upload_id = ? AND part_number = ?", (upload_id, part_number)
            ).fetchone()
            old = row[0] if row else None
            c.execute(
                "INSERT OR REPLACE INTO parts (upload_id, part_number, file, size, etag, md5, mtime, checksum)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (upload_id, part_number, rel, size, f'"{md5.hex()}"', md5, mtime, checksum),
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            self._unlink(rel)
            raise
        if old:
            self._unlink(old)
        return PartInfo(part_number, size, f'"{md5.hex()}"', mtime, checksum)

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: UploadBody
    ) -> PartInfo:
        upload = await self._db(self._upload_row, bucket, key, upload_id)
        alg = upload.meta.checksum_algorithm
        if alg and body.checksum is not None and body.checksum[0] != alg:
            raise errors.InvalidRequest(
                f"Checksum Type mismatch occurred, expected checksum Type: {alg.lower()}, "
                f"actual checksum Type: {body.checksum[0].lower()}"
            )
        rel, size = await self._receive(body, f"uploads/{upload_id}")
        md5 = bytes.fromhex(body.md5_hex)
        checksum = body.checksum[1] if body.checksum else None
        return await self._db(self._commit_part, bucket, key, upload_id, part_number, rel, size, md5, checksum)

    async def upload_part_copy(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        src_bucket: str,
        src_key: str,
        src_range: tuple[int, int] | None,
        expected_etag: str | None = None,
        src_version: str | None = None,
    ) -> PartInfo:
        upload = await self._db(self._upload_row, bucket, key, upload_id)
        src = await self.open_object(src_bucket, src_key, ReadOptions(version_id=src_version))
        loop = asyncio.get_running_loop()
        try:
            if expected_etag is not None and src.info.etag != expected_etag:
                raise errors.PreconditionFailed(Condition="x-amz-copy-source-if-match")
            start, end = src_range if src_range else (0, src.info.size - 1)
            if src_range and (end >= src.info.size or start > end):
                raise errors.InvalidRange(
                    "The specified copy range is invalid for the source object size",
                    ActualObjectSize=str(src.info.size),
                )
            tmp_rel, md5 = await loop.run_in_executor(
                None, self._copy_range_to, src.fd, start, end - start + 1
            )
        finally:
            await src.close()
        checksum = None
        alg = upload.meta.checksum_algorithm
        if alg:
            checksum = await loop.run_in_executor(None, self._file_checksum, tmp_rel, alg)
        rel = await self._publish_async(tmp_rel, f"uploads/{upload_id}")
        return await self._db(
            self._commit_part, bucket, key, upload_id, part_number, rel, end - start + 1, md5, checksum
        )

    def _file_checksum(self, rel: str, alg: str) -> str:
        ck = new_checksum(alg)
        with open(self.root / rel, "rb") as f:
            while data := f.read(READ_CHUNK * 4):
                ck.update(data)
        return ck.b64()

    async def complete_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[CompletedPart],
        conditions: WriteConditions | None = None,
    ) -> ObjectInfo:
        def check() -> tuple[UploadInfo, list[tuple[str, int, bytes, str | None]]]:
            upload = self._upload_row(bucket, key, upload_id)
            stored = {
                r[0]: (r[1], r[2], r[3], r[4], r[5])
                for r in self.conn.execute(
                    "SELECT part_number, file, size, etag, md5, checksum FROM parts WHERE upload_id = ?",
                    (upload_id,),
                )
            }
            chosen: list[tuple[str, int, bytes, str | None]] = []
            alg = upload.meta.checksum_algorithm
            for i, p in enumerate(parts):
                s = stored.get(p.part_number)
                if s is None or _unquote(s[2]) != _unquote(p.etag):
                    raise errors.InvalidPart(
                        ETag=p.etag, PartNumber=str(p.part_number), UploadId=upload_id
                    )
                if alg and p.checksum is not None and s[4] is not None and p.checksum != s[4]:
                    raise errors.InvalidPart(
                        ETag=p.etag, PartNumber=str(p.part_number), UploadId=upload_id
                    )
                if i < len(parts) - 1 and s[1] < MIN_PART_SIZE:
                    raise errors.EntityTooSmall(
                        ProposedSize=str(s[1]), MinSizeAllowed=str(MIN_PART_SIZE),
                        PartNumber=str(p.part_number), ETag=p.etag,
                    )
                chosen.append((s[0], s[1], s[3], s[4]))
            return upload, chosen

        if not parts:
            raise errors.MalformedXML()
        numbers = [p.part_number for p in parts]
        if any(b <= a for a, b in itertools.pairwise(numbers)):
            raise errors.InvalidPartOrder()
        listed = json.dumps([[p.part_number, _unquote(p.etag)] for p in parts])
        try:
            upload, chosen = await self._db(check)
        except errors.NoSuchUpload:
            done = await self._db(self._completed, bucket, key, upload_id, listed)
            if done is None:
                raise
            return done
        # The object's checksum comes from the parts' alone (no byte of the
        # object is read), so it is settled, and checked against what the
        # client expects, before the parts are copied into one file.
        mode = upload.meta.headers.get("x-amz-checksum-type", "COMPOSITE").upper()
        if conditions is not None and conditions.checksum_type is not None and conditions.checksum_type.upper() != mode:
            raise errors.InvalidRequest(f"The upload was created using the {mode} checksum mode. "
                                        "The complete request must use the same checksum mode.")
        checksum: tuple[str, str, str] | None = None
        part_checksums: list[str] = []
        alg = upload.meta.checksum_algorithm
        if alg and all(c[3] for c in chosen):
            part_checksums = [c[3] or "" for c in chosen]
            if mode == "FULL_OBJECT":
                # CRC combination, as S3 computes it.
                value = base64.b64encode(combine_crc(alg, [(base64.b64decode(c[3] or ""), c[1]) for c in chosen]))
                checksum = (alg, value.decode(), "FULL_OBJECT")
            else:
                ck = new_checksum(alg)
                for v in part_checksums:
                    ck.update(base64.b64decode(v))
                checksum = (alg, f"{ck.b64()}-{len(chosen)}", "COMPOSITE")
        if conditions is not None and conditions.checksum is not None:
            _check_expected_checksum(conditions.checksum, checksum)
        loop = asyncio.get_running_loop()
        tmp_rel = await loop.run_in_executor(None, self._concat, [c[0] for c in chosen])
        rel = await self._publish_async(tmp_rel, "objects")
        etag = '"' + hashlib.md5(b"".join(c[2] for c in chosen)).hexdigest() + f'-{len(chosen)}"'
        size = sum(c[1] for c in chosen)
        meta = upload.meta
        stored_headers = {k: v for k, v in meta.headers.items() if k != "x-amz-checksum-type"}
        info_json = _info_json(
            ObjectMeta(content_type=meta.content_type, headers=stored_headers, user_meta=meta.user_meta,
                       acl=meta.acl),
            checksum,
            [c[1] for c in chosen],
            part_checksums,
        )

        def finish(c: sqlite3.Connection) -> None:
            # Completing consumes the upload: in the same transaction as the
            # object becomes visible, so a retry sees NoSuchUpload, never a
            # half-completed state.
            if c.execute("SELECT 1 FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone() is None:
                raise errors.NoSuchUpload(UploadId=upload_id)
            c.execute("DELETE FROM parts WHERE upload_id = ?", (upload_id,))
            c.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
            now = time.time()
            c.execute("DELETE FROM completed WHERE at < ?", (now - COMPLETED_KEPT_S,))
            c.execute("INSERT OR REPLACE INTO completed VALUES (?, ?, ?, ?, ?, ?)",
                      (upload_id, bucket, key.encode(), listed, etag, now))

        info = await self._db(
            self._commit_object, bucket, key, rel, size, etag, info_json, meta.tags,
            conditions or WriteConditions(), finish,
        )
        await loop.run_in_executor(None, self._remove_upload_dir, upload_id)
        return info

    def _completed(self, bucket: str, key: str, upload_id: str, listed: str) -> ObjectInfo | None:
        """The answer to a CompleteMultipartUpload of an upload completed
        lately with the same parts: the object as it became (or, if it was
        replaced since, its ETag then); None otherwise."""
        row = self.conn.execute(
            "SELECT etag, at FROM completed WHERE upload_id = ? AND bucket = ? AND key = ? AND parts = ? AND at >= ?",
            (upload_id, bucket, key.encode(), listed, time.time() - COMPLETED_KEPT_S),
        ).fetchone()
        if row is None:
            return None
        try:
            info, _ = self._object_row(bucket, key)
        except errors.NoSuchKey:
            info = None
        if info is not None and info.etag == row[0]:
            return info
        return ObjectInfo(key=key, size=0, etag=row[0], last_modified=row[1])

    def _concat(self, rels: Sequence[str]) -> str:
        """Concatenate part files into a new temporary file with
        copy_file_range (in-kernel, no copy through user space)."""
        with self._temp_file() as (out, tmp_rel):
            for rel in rels:
                src = os.open(self.root / rel, os.O_RDONLY)
                try:
                    remaining = os.fstat(src).st_size
                    while remaining > 0:
                        try:
                            n = os.copy_file_range(src, out, remaining)
                        except OSError as e:
                            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                                raise
                            n = _copy_fallback(src, out, remaining)
                        if n == 0:
                            raise OSError(errno.EIO, "part file shorter than recorded")
                        remaining -= n
                finally:
                    os.close(src)
            if self.fsync:
                os.fsync(out)
        return tmp_rel

    def _remove_upload_dir(self, upload_id: str) -> None:
        d = self.root / "uploads" / upload_id
        if d.is_dir():
            for entry in os.scandir(d):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            with contextlib.suppress(OSError):
                d.rmdir()

    async def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        def q() -> None:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                self._upload_row(bucket, key, upload_id)
                c.execute("DELETE FROM parts WHERE upload_id = ?", (upload_id,))
                c.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        await self._db(q)
        await asyncio.get_running_loop().run_in_executor(None, self._remove_upload_dir, upload_id)

    async def list_parts(
        self, bucket: str, key: str, upload_id: str, *, marker: int = 0, max_parts: int = 1000
    ) -> tuple[UploadInfo, list[PartInfo], bool]:
        def q() -> tuple[UploadInfo, list[PartInfo], bool]:
            upload = self._upload_row(bucket, key, upload_id)
            rows = self.conn.execute(
                "SELECT part_number, size, etag, mtime, checksum FROM parts"
                " WHERE upload_id = ? AND part_number > ? ORDER BY part_number LIMIT ?",
                (upload_id, marker, max_parts + 1),
            ).fetchall()
            parts = [PartInfo(*r) for r in rows[:max_parts]]
            return upload, parts, len(rows) > max_parts

        return await self._db(q)

    async def list_uploads(
        self,
        bucket: str,
        *,
        prefix: str = "",
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> tuple[list[UploadInfo], bool]:
        def q() -> tuple[list[UploadInfo], bool]:
            self._bucket_row(bucket)
            bprefix = prefix.encode()
            upper = _key_upper_bound(bprefix)
            sql = "SELECT upload_id, key, initiated, meta FROM uploads WHERE bucket = ? AND key >= ?"
            args: list[object] = [bucket, bprefix]
            if upper is not None:
                sql += " AND key < ?"
                args.append(upper)
            if key_marker:
                # S3: with an upload-id-marker, uploads of key-marker itself
                # that sort after it are included; without, key-marker is
                # excluded entirely.
                if upload_id_marker:
                    sql += " AND (key > ? OR (key = ? AND upload_id > ?))"
                    args += [key_marker.encode(), key_marker.encode(), upload_id_marker]
                else:
                    sql += " AND key > ?"
                    args.append(key_marker.encode())
            sql += " ORDER BY key, initiated, upload_id LIMIT ?"
            args.append(max_uploads + 1)
            rows = self.conn.execute(sql, args).fetchall()
            ups = [UploadInfo(r[0], r[1].decode(), r[2], _meta_from_json(r[3])) for r in rows[:max_uploads]]
            return ups, len(rows) > max_uploads

        return await self._db(q)


def _new_version_id() -> str:
    """A version id: 32 URL-safe characters, unique (S3's are opaque too)."""
    return secrets.token_urlsafe(24)


_VERSION_ID = re.compile(r"[A-Za-z0-9_-]{32}")


def _check_version_id(version: str) -> None:
    """One this store could have made, or "null": S3 answers InvalidArgument
    for any other (an unknown well-formed one is NoSuchVersion)."""
    if version != "null" and not _VERSION_ID.fullmatch(version):
        raise errors.InvalidArgument("Invalid version id specified", ArgumentName="versionId", ArgumentValue=version)


def _check_write_conditions(cond: WriteConditions, current_etag: str | None, key: str) -> None:
    """Conditional writes (S3, 2024): If-None-Match: * fails with 412 when
    the key exists; If-Match fails with 412 on another ETag and 404 when the
    key does not exist."""
    if cond.if_none_match is not None and current_etag is not None:
        raise errors.PreconditionFailed(Condition="If-None-Match")
    if cond.if_match is not None:
        if current_etag is None:
            raise errors.NoSuchKey(Key=key)
        if cond.if_match.strip() != "*" and _unquote(cond.if_match) != _unquote(current_etag):
            raise errors.PreconditionFailed(Condition="If-Match")


def _check_expected_checksum(expected: tuple[str, str], computed: tuple[str, str, str] | None) -> None:
    """CompleteMultipartUpload's x-amz-checksum-*: the algorithm must be the
    upload's (InvalidRequest), the value the object's (BadDigest); a
    composite value may come with or without its -N."""
    alg, value = expected
    if computed is None or computed[0].upper() != alg.upper():
        raise errors.InvalidRequest(
            f"Checksum Type mismatch occurred, expected checksum Type: "
            f"{computed[0].lower() if computed else 'null'}, actual checksum Type: {alg.lower()}")
    if value != computed[1] and value != computed[1].rsplit("-", 1)[0]:
        raise errors.BadDigest(f"The {alg.upper()} you specified did not match the calculated checksum.")


def _unquote(etag: str) -> str:
    etag = etag.strip()
    if len(etag) >= 2 and etag[0] == etag[-1] == '"':
        return etag[1:-1]
    return etag


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_fallback(src: int, out: int, remaining: int) -> int:
    data = os.read(src, min(remaining, READ_CHUNK * 4))
    _write_all(out, data)
    return len(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def decode_md5_b64(value: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidDigest() from None
    if len(raw) != 16:
        raise errors.InvalidDigest()
    return raw

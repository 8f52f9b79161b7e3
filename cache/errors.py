"""The cache's failures: what can go wrong between a read and its bytes.

None of these speak S3; the gateway turns each into its S3 error in one
table (``gateway.errors.to_s3``). Inside the cache most are recovered from
(a peer that fails, a chunk that fails verification: the read serves the
bytes another way); these types name what escapes.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base of the cache's failures."""


class ChunkCorrupt(CacheError):
    """A chunk file whose bytes are not the ones recorded: never served."""


class ChunkMissing(CacheError):
    """A chunk in the index whose file is gone."""


class ObjectChanged(CacheError):
    """The backing store's object is no longer the version being read (a
    fill's If-Match failed, or it answered for another size or version)."""


class StaleVersion(CacheError):
    """A peer asked for a version of an object that is not the current one
    here, even after a fresh look at the backing store."""


class PeerFailed(CacheError):
    """A peer could not serve a chunk; the caller serves it itself."""


class PeerTampered(CacheError):
    """A peer's answer did not hash to the sum its owner signed, found at
    its end, after its bytes went on: the response they went into must
    fail (never complete), not be finished from elsewhere."""


class PeerDenied(CacheError):
    """A peer request without a valid cluster-secret signature."""


class NotOwner(CacheError):
    """Asked for a chunk this node does not own (the asker's ring is not
    ours): the asker serves it itself."""


class NotCached(CacheError):
    """A bucket that is not read through the cache."""

    def __init__(self, bucket: str) -> None:
        super().__init__(f"Bucket {bucket!r} is not served through the cache")


class BadRequest(CacheError):
    """A malformed request to one of the cache's own APIs (the peer API,
    the local socket)."""


class NotFileBacked(CacheError):
    """Short-circuit reads need bytes in local files: a pass-through
    upstream has none."""

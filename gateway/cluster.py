"""Cache peers: the chunk API between the nodes of a cluster.

Each chunk has an owner on the ring (``metadata.ring``). A node reading a
chunk it does not own asks the owner for it; the owner serves it from its
cache (filling it from the backing store on a miss, once for the whole
cluster) with zero copies. If the owner is down or fails, the reader
serves the chunk itself (its own cache or the backing store): a client
sees correct bytes or a clean error, never a failed read because a peer
died.

Peers trust each other through the shared cluster secret: every peer
request carries ``x-nearstore-peer: <unix time>.<HMAC-SHA256(secret, time
\\n method \\n path?query)>``, valid for five minutes. Without it nothing is
readable (403). Writes through any node invalidate the object's metadata
on every peer before the client is answered.

Routes (served by ``gateway.app``):

- ``GET  /_nearstore/peer/chunk?bucket&key&etag&index&start&end``: the
  owner takes the object's size from its own metadata (never from the
  asker: a wrong size would cut a chunk to the wrong length for everyone)
  and answers 412 if its version is not ``etag``.
- ``POST /_nearstore/peer/invalidate?bucket&key``
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from nearstore.gateway.backends.base import FileSegment, ObjectInfo, Served, read_segments
from nearstore.metadata.membership import Membership
from nearstore.metadata.ring import Node, NoLiveNodes

log = logging.getLogger(__name__)

AUTH_HEADER = "x-nearstore-peer"
MAX_SKEW = 300.0
INVALIDATE_TIMEOUT_S = 5.0


class PeerFailed(Exception):
    """A peer could not serve a chunk; the caller serves it itself."""


def sign(secret: str, method: str, path_query: str, now: float | None = None) -> str:
    ts = str(int(time.time() if now is None else now))
    mac = hmac.new(secret.encode(), f"{ts}\n{method}\n{path_query}".encode(), hashlib.sha256).hexdigest()
    return f"{ts}.{mac}"


def verify(secret: str, method: str, path_query: str, header: str | None, now: float | None = None) -> bool:
    if not secret or not header or "." not in header:
        return False
    ts, _, mac = header.partition(".")
    try:
        when = int(ts)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - when) > MAX_SKEW:
        return False
    expected = sign(secret, method, path_query, when).partition(".")[2]
    return hmac.compare_digest(expected, mac)


@dataclass
class Cluster:
    membership: Membership
    secret: str
    session: aiohttp.ClientSession | None = None
    # A peer that stalls mid-chunk is abandoned after this long without bytes.
    read_timeout: float = 5.0

    @property
    def self_id(self) -> str:
        return self.membership.self_id

    def owner(self, chunk_id: str) -> Node | None:
        """The chunk's owner if it is another live node, else None."""
        ring = self.membership.current
        if ring is None or not self.membership.peers:
            return None
        try:
            node = ring.owner(chunk_id)
        except NoLiveNodes:
            return None
        return None if node.id == self.self_id else node

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=1.0, sock_read=self.read_timeout),
            read_bufsize=4 * 1024 * 1024,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(
        self, node: Node, bucket: str, key: str, etag: str, index: int, start: int, end: int
    ) -> AsyncIterator[bytes]:
        """Bytes start..end (exclusive) of a chunk from its owner. Raises
        PeerFailed before the first byte if the owner cannot serve it."""
        assert self.session is not None
        query = urlencode({"bucket": bucket, "key": key, "etag": etag, "index": index, "start": start, "end": end})
        path = f"/_nearstore/peer/chunk?{query}"
        try:
            # encoded=True: the request line carries exactly the signed text
            # (yarl would otherwise turn %2F in a key back into "/").
            resp = await self.session.get(URL(node.address.rstrip("/") + path, encoded=True),
                                          headers={AUTH_HEADER: sign(self.secret, "GET", path)})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # noqa: UP041
            self.membership.mark(node.id, ok=False, error=str(e))
            raise PeerFailed(f"{node.id}: {e}") from e
        try:
            if resp.status != 200:
                raise PeerFailed(f"{node.id}: HTTP {resp.status}")
            async for piece in resp.content.iter_any():
                yield piece
        finally:
            resp.close()

    async def broadcast_invalidate(self, bucket: str, key: str) -> None:
        """Tell every peer to drop its metadata of bucket/key; returns when
        each has answered or timed out (then it is logged: that peer may
        serve the old version until its metadata TTL runs out). Peers the
        health checks call down are told too, with a short timeout: "down"
        is this node's view, and a peer that only missed probes under load
        still serves clients."""
        if self.session is None or not self.membership.peers:
            return
        query = urlencode({"bucket": bucket, "key": key})
        path = f"/_nearstore/peer/invalidate?{query}"

        async def one(node: Node, up: bool) -> None:
            assert self.session is not None
            try:
                async with self.session.post(
                    URL(node.address.rstrip("/") + path, encoded=True),
                    headers={AUTH_HEADER: sign(self.secret, "POST", path)},
                    # Read-after-write on other nodes waits on this; a busy
                    # peer may take a while.
                    timeout=aiohttp.ClientTimeout(total=INVALIDATE_TIMEOUT_S if up else 1.0),
                ) as r:
                    await r.read()
                    if r.status != 200:
                        log.warning("invalidate %s/%s on %s: HTTP %d", bucket, key, node.id, r.status)
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                log.warning("invalidate %s/%s on %s failed: %r", bucket, key, node.id, e)

        await asyncio.gather(*(one(p.node, p.up) for p in self.membership.peers.values()))


class ChunkFileHandle:
    """A chunk file as a FileBacked handle, for the peer API's zero-copy send."""

    served: Served | None = None

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd, self.start, self.end = fd, start, end
        self.info = ObjectInfo(key="", size=end - start, etag="", last_modified=0.0)

    async def segments(self, start: int, length: int) -> AsyncIterator[FileSegment | bytes]:
        yield FileSegment(self.fd, start, length)

    def read_range(self, start: int, length: int) -> AsyncIterator[bytes]:
        return read_segments(self.segments(start, length))

    async def close(self) -> None:
        os.close(self.fd)

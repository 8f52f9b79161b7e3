"""Cache peers: the chunk API between the nodes of a cluster.

Each chunk has an owner on the ring (``metadata.ring``). A node reading a
chunk it does not own asks the owner for it; the owner serves it from its
cache (filling it from the backing store on a miss, once for the whole
cluster) with zero copies. If the owner is down or fails, the reader
serves the chunk itself (its own cache or the backing store): a client
sees correct bytes or a clean error, never a failed read because a peer
died.

Peers trust each other through the shared cluster secret: every peer
request carries ``x-nearstore-peer: <unix time>.<nonce>.<HMAC-SHA256(secret,
time \\n nonce \\n target node id \\n method \\n path?query)>``, valid for
a minute, on the node it names, once: a captured request replays neither
against another node nor against the same one (``Nonces``). Without it
nothing is readable (403). Peers' clocks must agree within that minute.
The secret itself never travels.

Answers are authenticated too. Over TLS (``PeerLink``: the peer's
certificate checked against the cluster's CA, and with mutual TLS the
asker's as well) the channel does it. Over plain HTTP, a chunk's answer
carries ``x-nearstore-peer-sum: <XXH3-64 of the bytes sent>.<HMAC(secret,
the request's nonce, the owner's id, start, end, that hash)>``, a sum only
the owner could have signed for this very request. The asker hashes the
bytes as they stream through and checks the sum at the end: a byte changed
on the wire, or an answer replayed from another request, raises
``PeerTampered`` there, and the client's response fails rather than
completes (chunks read ahead, held whole anyway, are checked before a byte
goes on, and served from the backing store instead). Rejected: holding
every chunk until it is checked; measured on the cluster bench, remote
reads fell from 0.78 to 0.60 GB/s and their first byte came 20 ms late
instead of 3 ms (a 16 MiB chunk received before a byte is sent). The
owner's hash is free for a whole chunk (its file name's checksum, just
verified) and one pass over the pages for part of one. Writes through any node invalidate the object's metadata
on every peer before the client is answered.

The server side is here too (``check``, ``serve_chunk``,
``serve_invalidate``); the gateway's admin routes give it HTTP and send the
chunk file with sendfile. Routes:

- ``GET  /_nearstore/peer/chunk?bucket&key&etag&index&start&end``: the
  owner takes the object's size from its own metadata (never from the
  asker: a wrong size would cut a chunk to the wrong length for everyone)
  and answers 412 if its version is not ``etag``.
- ``POST /_nearstore/peer/invalidate?bucket&key``
- ``POST /_nearstore/peer/hint?bucket`` with JSON ``{"key", "etag", "size",
  "indices"}``: fill those chunks of that version ahead of a reader
  (cache.prefetch); the owner checks the version and size as any fill does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import aiohttp
import xxhash
from yarl import URL

from nearstore.cache.errors import (
    BadRequest,
    ChunkCorrupt,
    ChunkMissing,
    NotCached,
    NotOwner,
    ObjectChanged,
    PeerDenied,
    PeerFailed,
    PeerTampered,
    StaleVersion,
)
from nearstore.cache.store import open_verified, range_digest
from nearstore.metadata.backing import (
    FileSegment,
    ObjectInfo,
    RangeNotSatisfiable,
    Served,
    read_segments,
)
from nearstore.metadata.membership import Membership
from nearstore.metadata.ring import Node

if TYPE_CHECKING:
    from nearstore.cache.readpath import CachedBackend

log = logging.getLogger(__name__)

AUTH_HEADER = "x-nearstore-peer"
SUM_HEADER = "x-nearstore-peer-sum"
MAX_SKEW = 60.0
INVALIDATE_TIMEOUT_S = 5.0


def _mac(secret: str, ts: str, nonce: str, target: str, method: str, path_query: str) -> str:
    text = f"{ts}\n{nonce}\n{target}\n{method}\n{path_query}"
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path_query: str, target: str, now: float | None = None) -> str:
    """The header for a request to the node ``target`` (its id)."""
    ts, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(12)
    return f"{ts}.{nonce}.{_mac(secret, ts, nonce, target, method, path_query)}"


def nonce_of(header: str) -> str:
    """The nonce of a request's ``AUTH_HEADER``."""
    return header.split(".")[1] if header.count(".") == 2 else ""


def answer_sum(secret: str, nonce: str, owner: str, start: int, end: int, digest: str) -> str:
    """The ``SUM_HEADER`` of a chunk answer: the bytes' hash, signed for
    the request (its nonce) the owner answers."""
    text = f"answer\n{nonce}\n{owner}\n{start}\n{end}\n{digest}"
    return f"{digest}.{hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()}"


def check_answer(secret: str, nonce: str, owner: str, start: int, end: int, header: str | None,
                 digest: str) -> bool:
    """Whether the bytes of a chunk answer, hashed to ``digest``, are those
    its owner signed for."""
    if not header:
        return False
    return hmac.compare_digest(answer_sum(secret, nonce, owner, start, end, digest), header)


class Nonces:
    """The nonces of peer requests accepted within the last MAX_SKEW
    seconds (a request older than that is refused anyway), in 10-second
    bins: a second use of one is a replay."""

    BIN_S = 10

    def __init__(self) -> None:
        self._bins: dict[int, set[str]] = {}

    def fresh(self, nonce: str, now: float) -> bool:
        current = int(now) // self.BIN_S
        for b in [b for b in self._bins if b < current - int(MAX_SKEW) // self.BIN_S - 2]:
            del self._bins[b]
        if any(nonce in seen for seen in self._bins.values()):
            return False
        self._bins.setdefault(current, set()).add(nonce)
        return True


def verify(secret: str, method: str, path_query: str, header: str | None, me: str, nonces: Nonces,
           now: float | None = None) -> bool:
    """Whether a peer request addressed to node ``me`` is authentic and
    fresh (and, if so, its nonce is spent)."""
    if not secret or not header:
        return False
    ts, _, rest = header.partition(".")
    nonce, _, mac = rest.partition(".")
    try:
        when = int(ts)
    except ValueError:
        return False
    now = time.time() if now is None else now
    if abs(now - when) > MAX_SKEW or not 16 <= len(nonce) <= 64:
        return False
    if not hmac.compare_digest(_mac(secret, ts, nonce, me, method, path_query), mac):
        return False
    return nonces.fresh(nonce, now)


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

    async def start(self) -> None:
        self.session = self.membership.link.session(
            timeout=aiohttp.ClientTimeout(total=None, connect=1.0, sock_read=self.read_timeout),
            read_bufsize=4 * 1024 * 1024,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(
        self, node: Node, bucket: str, key: str, etag: str, index: int, start: int, end: int
    ) -> AsyncIterator[bytes]:
        """Exactly bytes start..end (exclusive) of a chunk from its owner, or
        PeerFailed (before the first byte or mid-stream: the caller serves
        the rest itself). Over plain HTTP, PeerTampered after the last byte
        if the bytes were not those the owner signed for."""
        assert self.session is not None
        query = urlencode({"bucket": bucket, "key": key, "etag": etag, "index": index, "start": start, "end": end})
        path = f"/_nearstore/peer/chunk?{query}"
        auth = sign(self.secret, "GET", path, node.id)
        hasher = None if self.membership.link.ssl is not None else xxhash.xxh3_64()
        try:
            # encoded=True: the request line carries exactly the signed text
            # (yarl would otherwise turn %2F in a key back into "/").
            resp = await self.session.get(URL(node.address.rstrip("/") + path, encoded=True),
                                          headers={AUTH_HEADER: auth}, server_hostname=self.membership.link.hostname)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # noqa: UP041
            self.membership.mark(node.id, ok=False, error=str(e),
                                 slow=isinstance(e, TimeoutError))
            raise PeerFailed(f"{node.id}: {e}") from e
        want, got = end - start, 0
        try:
            if resp.status != 200:
                raise PeerFailed(f"{node.id}: HTTP {resp.status}")
            if hasher is not None and not resp.headers.get(SUM_HEADER):
                raise PeerFailed(f"{node.id}: chunk {index}: an answer without the owner's signed sum")
            async for piece in resp.content.iter_any():
                piece = piece[: want - got]
                got += len(piece)
                if hasher is not None:
                    hasher.update(piece)
                yield piece
            if got < want:
                raise PeerFailed(f"{node.id}: chunk {index} ended short ({got} of {want} bytes)")
            if hasher is not None and not check_answer(self.secret, nonce_of(auth), node.id, start, end,
                                                       resp.headers.get(SUM_HEADER), hasher.hexdigest()):
                log.error("peer %s: chunk %d of %s: the bytes are not what the owner signed (changed on the "
                          "way?); failing the read", node.id, index, key)
                raise PeerTampered(f"{node.id}: chunk {index}: the answer's bytes are not what the owner signed")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # noqa: UP041
            raise PeerFailed(f"{node.id}: chunk {index}: {e}") from e
        finally:
            resp.close()

    async def hint(self, node: Node, bucket: str, info: ObjectInfo, indices: list[int]) -> None:
        """Ask a chunk's owner to prefetch it (cache.prefetch); advice, so
        a failure is only logged."""
        if self.session is None:
            return
        path = f"/_nearstore/peer/hint?{urlencode({'bucket': bucket})}"
        body = json.dumps({"key": info.key, "etag": info.etag, "size": info.size, "indices": indices}).encode()
        try:
            async with self.session.post(
                URL(node.address.rstrip("/") + path, encoded=True), data=body,
                headers={AUTH_HEADER: sign(self.secret, "POST", path, node.id), "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=INVALIDATE_TIMEOUT_S), server_hostname=self.membership.link.hostname,
            ) as r:
                await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            log.debug("hint to %s failed: %r", node.id, e)

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
                    headers={AUTH_HEADER: sign(self.secret, "POST", path, node.id)}, server_hostname=self.membership.link.hostname,
                    # Read-after-write on other nodes waits on this; a busy
                    # peer may take a while.
                    timeout=aiohttp.ClientTimeout(total=INVALIDATE_TIMEOUT_S if up else 1.0),
                ) as r:
                    await r.read()
                    if r.status not in (200, 204):
                        log.warning("invalidate %s/%s on %s: HTTP %d", bucket, key, node.id, r.status)
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                log.warning("invalidate %s/%s on %s failed: %r", bucket, key, node.id, e)

        await asyncio.gather(*(one(p.node, p.up) for p in self.membership.peers.values()))


class ChunkFileHandle:
    """A chunk file as a FileBacked handle, for the peer API's zero-copy send."""

    served: Served | None = None

    def __init__(self, fd: int, start: int, end: int, checksum: str = "", size: int = -1) -> None:
        self.fd, self.start, self.end = fd, start, end
        self.checksum, self.size = checksum, size  # the whole chunk's
        self.info = ObjectInfo(key="", size=end - start, etag="", last_modified=0.0)

    async def digest(self) -> str:
        """XXH3-64 of the bytes served: the chunk's own (verified) checksum
        for all of it, else hashed from the pages."""
        if self.start == 0 and self.end == self.size and self.checksum:
            return self.checksum
        return await asyncio.get_running_loop().run_in_executor(None, range_digest, self.fd, self.start,
                                                                self.end)

    async def segments(self, start: int, length: int) -> AsyncIterator[FileSegment | bytes]:
        yield FileSegment(self.fd, start, length)

    def read_range(self, start: int, length: int) -> AsyncIterator[bytes]:
        return read_segments(self.segments(start, length))

    async def close(self) -> None:
        os.close(self.fd)


# --- the server side ----------------------------------------------------------


def check(secret: str, method: str, path_query: str, header: str | None, me: str, nonces: Nonces) -> None:
    """A peer request's signature, or PeerDenied."""
    if not verify(secret, method, path_query, header, me, nonces):
        raise PeerDenied("Peer authentication failed")


async def serve_invalidate(cache: CachedBackend | None, bucket: str, key: str) -> None:
    """A write through another node: drop this node's metadata of the object
    (in every worker process)."""
    if cache is None:
        return
    cache.meta.invalidate(bucket, key)
    if cache.control is not None:
        await cache.control.broadcast_invalidate(bucket, key)


async def serve_chunk(cache: CachedBackend | None, bucket: str, query: Mapping[str, str]) -> ChunkFileHandle:
    """Bytes start..end of chunk ``index`` of bucket/key at version
    ``etag``, as an open, verified chunk file: filled here on a miss."""
    if cache is None:
        raise NotCached(bucket)
    key = query.get("key", "")
    try:
        index, start, end = (int(query[n]) for n in ("index", "start", "end"))
    except (KeyError, ValueError):
        raise BadRequest("index, start and end are integers") from None
    # The object's size and version come from this node's own metadata,
    # never from the asker (a size it sent would decide the chunk's length).
    etag = query.get("etag", "")
    info = await cache.head_object(bucket, key)
    if info.etag != etag:
        cache.meta.invalidate(bucket, key)  # perhaps ours is the stale one
        info = await cache.head_object(bucket, key)
        if info.etag != etag:
            raise StaleVersion(f"{bucket}/{key} is at {info.etag}, not {etag}")
    if not 0 <= index * cache.chunk_size < info.size:
        raise RangeNotSatisfiable(info.size)
    if cache.owner(bucket, info, index) is not None:
        # The asker's ring is not ours (a peer coming back, seen here
        # first): caching the chunk here would leave a copy beside its
        # owner's. The asker serves it itself.
        raise NotOwner(f"{bucket}/{key} chunk {index}")
    try:
        chunk = await cache.fetch_chunk(bucket, info, index)
    except ObjectChanged:
        raise StaleVersion(f"{bucket}/{key} changed") from None
    if not 0 <= start <= end <= chunk.size:
        raise RangeNotSatisfiable(chunk.size)
    loop = asyncio.get_running_loop()
    try:
        fd = await loop.run_in_executor(None, open_verified, cache.store.path(chunk), chunk.checksum, chunk.size,
                                        cache.reverify_s)
    except (ChunkCorrupt, ChunkMissing):
        cache.store.discard(chunk)  # the asker tries again: refilled then
        raise
    return ChunkFileHandle(fd, start, end, chunk.checksum, chunk.size)

"""The node's routes under ``/_nearstore/``: health, metrics, the ring,
warming, and the HTTP side of the cache peers' API.

The cache does the work (``cache.peers`` serves chunks, ``cache.warm``
warms); these routes give it HTTP: authentication of the S3 kind where a
user calls them, query parsing, and sending a chunk file with sendfile.
Which buckets are cached comes from the node (``CACHE_FOR_KEY``): nothing
here looks at backend types.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict

from nearstore.cache import peers
from nearstore.cache.errors import NotCached, PeerDenied
from nearstore.cache.localsock import OpenRead
from nearstore.cache.metrics import exposition as metrics_exposition
from nearstore.cache.prefetch import Item
from nearstore.cache.warm import WarmProgress, warm
from nearstore.gateway import errors
from nearstore.gateway.access import Op, authorize_owner, decide, requester
from nearstore.gateway.auth import SignedRequest, authenticate
from nearstore.gateway.conditions import check_read_conditions
from nearstore.gateway.config import Config, User, is_loopback
from nearstore.gateway.request import check_key, parse_query, split_target, validate_bucket_name
from nearstore.gateway.routes import S3_SUBRESOURCES
from nearstore.gateway.sendfile import send_body
from nearstore.gateway.state import (
    BACKEND_KEY,
    CACHE_FOR_KEY,
    CONFIG_KEY,
    HEALTH_KEY,
    LOCALSOCK_KEY,
    MEMBERSHIP_KEY,
    PEER_NONCES_KEY,
)
from nearstore.metadata.backing import Backend, ObjectHandle, ObjectInfo, ReadOptions

if TYPE_CHECKING:
    from nearstore.cache.readpath import CachedBackend


async def admin(request: web.Request, path: str) -> web.StreamResponse:
    if path == "/_nearstore/health" and request.method in ("GET", "HEAD"):
        return web.json_response({**request.app[HEALTH_KEY].describe(), "pid": os.getpid(),
                                  "local_socket": request.app.get(LOCALSOCK_KEY)})
    if path == "/_nearstore/metrics" and request.method in ("GET", "HEAD"):
        control_plane(request, operator=True)
        body, content_type = metrics_exposition()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp
    if path.startswith("/_nearstore/peer/"):
        return await peer_route(request, path)
    if path == "/_nearstore/ring" and request.method in ("GET", "HEAD"):
        control_plane(request, operator=False)
        return ring_route(request)
    if path == "/_nearstore/warm" and request.method == "POST":
        return await warm_route(request)
    if path == "/_nearstore/hint" and request.method == "POST":
        return await hint_route(request)
    raise errors.NoSuchKey("No such administrative route", Key=path)
def control_plane(request: web.Request, *, operator: bool) -> None:
    """The control plane apart from the data plane: a control route answers
    a request from this machine (``[server] control_from_loopback``), or one
    signed like any S3 request, by an operator where ``operator``, by any
    user otherwise. AccessDenied for the rest, anonymous included. Health
    stays open: probes are unsigned."""
    cfg = request.app[CONFIG_KEY]
    if cfg.control_from_loopback and is_loopback(request.remote or ""):
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        # What a metrics scraper can send: the operator's token, metrics only.
        if operator and cfg.metrics_token and hmac.compare_digest(token.strip().encode(), cfg.metrics_token.encode()):
            return
        raise errors.AccessDenied()
    raw_path, _, raw_query = request.raw_path.partition("?")
    auth = authenticate(SignedRequest(request.method, raw_path, raw_query, request.headers), cfg.credentials)
    user = requester(cfg, auth.access_key, auth.scheme == "anonymous")
    if user is None or (operator and not cfg.is_operator(user)):
        raise errors.AccessDenied()


def ring_route(request: web.Request) -> web.Response:
    """GET /_nearstore/ring[?bucket=B]: the ring and each peer's health;
    with ``bucket=B`` also how B's objects are cut into chunks::

        "bucket": {"name": B, "cached": true, "store": "s3:http://...", "chunk_size": 16777216}

    (``cached`` false and nothing more when B is not read through the
    cache). With the ring, that is all a client needs to compute each
    chunk's id (metadata.identity.chunk_id) and owner, and to ask the owner for
    it itself, saving the hop through a peer (clients/direct.py).

    For this machine or a signed user (``control_plane``): it tells the
    topology and the cache's configuration (which buckets are cached, the
    backing store's name, which is its endpoint URL, and the chunk size),
    never credentials or data; it does no I/O. Every object byte still needs
    a signed S3 request."""
    doc = request.app[MEMBERSHIP_KEY].describe()
    query = parse_query(request.raw_path.partition("?")[2])
    if "bucket" in query:
        bucket = query["bucket"]
        cache = request.app[CACHE_FOR_KEY](bucket)
        layout: dict[str, object] = {"name": bucket, "cached": cache is not None}
        if cache is not None:
            layout.update(store=cache.inner.name, chunk_size=cache.chunk_size)
        doc["bucket"] = layout
    return web.json_response(doc)


async def warm_route(request: web.Request) -> web.StreamResponse:
    """POST /_nearstore/warm?bucket=B&prefix=P[&pin=true]: fill the cache
    with every chunk of the objects under a prefix; answers JSON lines of
    progress, the last one the summary. Signed like any S3 request."""
    raw_path, _, raw_query = request.raw_path.partition("?")
    cfg = request.app[CONFIG_KEY]
    auth = authenticate(SignedRequest(request.method, raw_path, raw_query, request.headers), cfg.credentials)
    q = parse_query(raw_query)
    bucket = q.get("bucket", "")
    validate_bucket_name(bucket)
    authorize_owner(cfg, request.app[BACKEND_KEY], auth, bucket)  # a user warms its own buckets
    prefix = q.get("prefix", "")
    pin = q.get("pin", "").lower() in ("1", "true", "yes")
    target = request.app[CACHE_FOR_KEY](bucket)
    if target is None:
        raise NotCached(bucket)
    objects: list[tuple[str, int]] = []
    after = ""
    while True:
        page = await target.list_objects(bucket, prefix=prefix, start_after=after, max_keys=1000)
        objects += [(o.key, o.size) for o in page.objects]
        if not page.is_truncated or not page.next_marker:
            break
        after = page.next_marker
    infos: dict[str, ObjectInfo] = {}
    not_pinned = 0

    async def fill(key: str, index: int) -> int:
        nonlocal not_pinned
        info = infos.get(key)
        if info is None:
            info = infos[key] = await target.head_object(bucket, key)
        chunk = await target.fetch_chunk(bucket, info, index)
        if pin and not target.store.pin(chunk.id):
            not_pinned += 1
        return chunk.size

    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    latest: list[WarmProgress] = []
    task = asyncio.ensure_future(
        warm(objects, target.chunk_size, fill, report=lambda p: latest.append(p), report_every=0.5)
    )
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if latest and not task.done():
            await resp.write((json.dumps(latest[-1].as_dict()) + "\n").encode())
            latest.clear()
    summary = task.result().as_dict()
    summary["pinned"] = pin
    summary["not_pinned_chunks"] = not_pinned
    await resp.write((json.dumps(summary) + "\n").encode())
    await resp.write_eof()
    return resp


async def peer_route(request: web.Request, path: str) -> web.StreamResponse:
    """The cache peers' API (``cache.peers``); 403 without the secret."""
    raw, cfg = request.raw_path, request.app[CONFIG_KEY]
    if cfg.cluster_mtls and not (request.transport and request.transport.get_extra_info("peercert")):
        raise PeerDenied("The peer API needs a client certificate ([cluster] mtls)")
    peers.check(cfg.cluster_secret, request.method, raw, request.headers.get(peers.AUTH_HEADER),
                request.app[MEMBERSHIP_KEY].self_id, request.app[PEER_NONCES_KEY])
    q = parse_query(raw.partition("?")[2])
    bucket = q.get("bucket", "")
    cache = request.app[CACHE_FOR_KEY](bucket)
    if path == "/_nearstore/peer/invalidate" and request.method == "POST":
        await peers.serve_invalidate(cache, bucket, q.get("key", ""))
        return web.Response(status=204)
    if path == "/_nearstore/peer/hint" and request.method == "POST":
        doc: dict[str, Any] = _json_body(await _small_body(request))
        item = _peer_item(doc)  # 400 before anything is handed on
        if cache is not None and cache.prefetcher is not None:
            if await _at_owner(cache, {**doc, "peer": True, "bucket": bucket}) is None:
                cache.prefetcher.add(f"peers:{bucket}", bucket, item)
        return web.Response(status=204)
    if path != "/_nearstore/peer/chunk" or request.method != "GET":
        raise errors.NoSuchKey("No such peer route", Key=path)
    handle = await peers.serve_chunk(cache, bucket, q)
    try:
        resp = web.StreamResponse(status=200)
        resp.content_length = handle.end - handle.start
        resp.headers[peers.SUM_HEADER] = peers.answer_sum(
            cfg.cluster_secret, peers.nonce_of(request.headers.get(peers.AUTH_HEADER, "")),
            request.app[MEMBERSHIP_KEY].self_id, handle.start, handle.end, await handle.digest())
        await send_body(request, resp, handle, handle.start, handle.end - handle.start, cfg.send_timeout)
        return resp
    finally:
        await handle.close()


# --- hints: what loaders will read next (cache.prefetch) -----------------------

MAX_HINT_BODY = 256 * 1024
MAX_HINT_KEYS = 1000


async def _small_body(request: web.Request) -> bytes:
    """The whole body, at most MAX_HINT_BODY bytes (else 400)."""
    data = bytearray()
    while piece := await request.content.read(64 * 1024):
        data += piece
        if len(data) > MAX_HINT_BODY:
            raise errors.InvalidRequest(f"At most {MAX_HINT_BODY} bytes of hints at a time")
    return bytes(data)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidRequest("The body is not JSON") from None
    if not isinstance(doc, dict):
        raise errors.InvalidRequest("The body is a JSON object")
    return doc


async def hint_route(request: web.Request) -> web.Response:
    """POST /_nearstore/hint?bucket=B with ``{"stream": id, "keys": [...]}``:
    the next objects (at most 1000, in read order) a loader's stream will
    read; it replaces the stream's earlier hint (docs/CLIENTS.md). Signed
    like any S3 request, never anonymous (the body's SHA-256 checked when
    signed with one); each key
    is decided as a GetObject by the signer, and keys it may not read are
    left out. Answers ``{"accepted", "queued", "denied"}``; NotImplemented
    for a bucket not read through the cache (nothing to prefetch into)."""
    cfg = request.app[CONFIG_KEY]
    raw_path, _, raw_query = request.raw_path.partition("?")
    auth = authenticate(SignedRequest(request.method, raw_path, raw_query, request.headers), cfg.credentials)
    user = requester(cfg, auth.access_key, auth.scheme == "anonymous")
    if user is None:
        raise errors.AccessDenied()  # work on the node's account: signed users only
    bucket = parse_query(raw_query).get("bucket", "")
    validate_bucket_name(bucket)
    body = await _small_body(request)
    claimed = request.headers.get("x-amz-content-sha256", "")
    if len(claimed) == 64 and not hmac.compare_digest(hashlib.sha256(body).hexdigest(), claimed.lower()):
        raise errors.XAmzContentSHA256Mismatch()
    doc = _json_body(body)
    stream, keys = doc.get("stream"), doc.get("keys")
    if not isinstance(stream, str) or not 0 < len(stream) <= 200 or not isinstance(keys, list) \
            or len(keys) > MAX_HINT_KEYS or not all(isinstance(k, str) and 0 < len(k) <= 1024 for k in keys):
        raise errors.InvalidRequest(f"Hints are {{\"stream\": up to 200 characters, \"keys\": up to "
                                   f"{MAX_HINT_KEYS} keys}}")
    cache = request.app[CACHE_FOR_KEY](bucket)
    await request.app[BACKEND_KEY].head_bucket(bucket)  # NoSuchBucket first, as S3 would (one request per window)
    if cache is None or cache.prefetcher is None:
        raise errors.NotImplemented("Hints need a bucket read through the cache")
    answer = await _at_owner(cache, {"access_key": auth.access_key, "bucket": bucket, "stream": stream, "keys": keys})
    if answer is None:
        answer = apply_hint(cfg, request.app[BACKEND_KEY], cache, user, bucket, stream, keys)
    return web.json_response(answer)


def _peer_item(doc: dict[str, Any]) -> Item:
    """A peer's hint ``{key, etag, size, indices}``: those chunks of that
    version (the owner checks version and size as any fill does)."""
    try:
        info = ObjectInfo(key=str(doc["key"]), size=int(doc["size"]), etag=str(doc["etag"]), last_modified=0.0)
        return Item(info.key, info, [int(i) for i in doc["indices"]][:MAX_HINT_KEYS])
    except (KeyError, TypeError, ValueError):
        raise errors.InvalidRequest("A peer hint is {key, etag, size, indices}") from None


async def _at_owner(cache: CachedBackend, doc: dict[str, Any]) -> dict[str, Any] | None:
    """In one process of several, a hint (a loader's or a peer's) goes to
    the owner, which fills for all (a follower's own prefetcher could start
    no fill): the owner's answer. None in the owner or a node alone: act
    on it here."""
    if not cache.follower or cache.control is None:
        return None
    try:
        return await cache.control.hint(doc)
    except OSError as e:
        raise errors.ServiceUnavailable(f"The node's owner process did not take the hint: {e}") from None


def apply_hint(cfg: Config, backend: Backend, cache: CachedBackend, user: User, bucket: str, stream: str,
               keys: list[str]) -> dict[str, int]:
    """Hand a stream's window to the prefetcher: each key decided as the
    user's GetObject (those refused counted in ``denied``)."""
    assert cache.prefetcher is not None
    items, denied = [], 0
    for key in keys:
        try:
            access = decide(cfg, backend, user, bucket, key, READ)
        except errors.AccessDenied:
            denied += 1
            continue
        items.append(Item(key, check=access.check))
    # Streams are the signer's own: one user cannot replace another's.
    accepted = cache.prefetcher.hint(f"{user.id}:{stream}", bucket, items)
    return {"accepted": accepted, "queued": cache.prefetcher.queued(), "denied": denied}


def hint_from_worker(app: web.Application) -> Callable[[dict[str, Any]], dict[str, int]]:
    """The owner's end of a follower's hint (cache.control ``/hint``): the
    follower authenticated the request. A loader's keys are decided here,
    each as the signer's GetObject, from its access key; a peer's chunks
    are queued as the peer route would."""

    def take(doc: dict[str, Any]) -> dict[str, int]:
        cfg = app[CONFIG_KEY]
        bucket = str(doc["bucket"])
        cache = app[CACHE_FOR_KEY](bucket)
        if doc.get("peer"):  # a peer's, authenticated by the cluster secret there
            if cache is not None and cache.prefetcher is not None:
                cache.prefetcher.add(f"peers:{bucket}", bucket, _peer_item(doc))
            return {}
        user = requester(cfg, str(doc["access_key"]), False)
        keys = [str(k) for k in doc["keys"]][:MAX_HINT_KEYS]
        if user is None or cache is None or cache.prefetcher is None:
            return {"accepted": 0, "queued": 0, "denied": len(keys)}
        return apply_hint(cfg, app[BACKEND_KEY], cache, user, bucket, str(doc["stream"]), keys)

    return take


# --- the short-circuit socket's requests (cache.localsock) ---------------------


READ = Op("s3:GetObject", on_object=True, permission="READ")


def local_reads(backend: Backend, cfg: Config) -> OpenRead:
    """The local socket's ``open_read``: a presigned GET URL checked and
    opened exactly as the HTTP path would (signature, access, bucket and
    key rules, conditions)."""

    async def open_read(url: str, rng: tuple[int, int] | None, if_match: str | None) -> ObjectHandle:
        parts = urlsplit(url)
        auth = authenticate(SignedRequest(method="GET", raw_path=parts.path, raw_query=parts.query,
                                          headers=CIMultiDict({"Host": parts.netloc})), cfg.credentials)
        bucket, key, _ = split_target(parts.path, parts.netloc, cfg.domain)
        if not bucket or not key:
            raise errors.InvalidRequest("A local read names one object")
        query = parse_query(parts.query)
        # A GetObject URL and nothing else: a presigned GetObjectTagging (or
        # any sub-resource) is signed GET too, but is not a read of the
        # bytes; a part is read over HTTP.
        other = sorted(n for n in query if n in S3_SUBRESOURCES and n != "versionId")
        if other:
            raise errors.InvalidRequest(f"A local read is a GetObject; this URL asks for {', '.join(other)}")
        version = query.get("versionId")
        validate_bucket_name(bucket)
        check_key(key)
        user = requester(cfg, auth.access_key, auth.scheme == "anonymous")
        access = decide(cfg, backend, user, bucket, key, READ)
        conditions = {"If-Match": if_match} if if_match else {}
        range_header = f"bytes={rng[0]}-{rng[1]}" if rng is not None else None
        try:
            handle = await backend.open_object(bucket, key, ReadOptions(range_header=range_header,
                                                                        conditions=conditions, version_id=version),
                                               head=False)
        except errors.NoSuchKey as e:
            raise access.missing(e) from None
        try:
            access.check(handle.info)
            check_read_conditions(conditions, handle.info.etag, handle.info.last_modified)
        except BaseException:
            await handle.close()
            raise
        return handle

    return open_read


def describe(exc: BaseException) -> tuple[int, str, str] | None:
    """The local socket's answer for a failure: its S3 status, code and text."""
    err = errors.to_s3(exc)
    return None if err is None else (err.status, err.code, err.text)

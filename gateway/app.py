"""The aiohttp application: one front handler, lifetimes, serving.

Every request goes through ``front``: request id, admin routes under
``/_nearstore/``, parsing into an ``S3Request``, authentication, the one
dispatch in ``routes``, and rendering of every S3 error as XML. Anything
unexpected becomes InternalError, logged with its request id. An error
after the response has started cannot be rendered: the connection is closed
so the client sees a short body, never a wrong one.

aiohttp's own low-level errors (a header line too long, a malformed request
line) would be plain text; ``_xml_handle_error`` renders those as S3 XML too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import HttpVersion11, http_exceptions, web, web_protocol

from nearstore.cache.metrics import exposition as metrics_exposition
from nearstore.cache.store import ChunkCorrupt, ChunkMissing, ChunkStore, open_verified
from nearstore.cache.warm import WarmProgress, warm
from nearstore.gateway import errors
from nearstore.gateway.auth import AuthContext, SignedRequest, authenticate
from nearstore.gateway.backends.base import Backend, ObjectInfo
from nearstore.gateway.backends.cached import CachedBackend, ObjectChanged
from nearstore.gateway.backends.local import LocalStore
from nearstore.gateway.backends.router import Router
from nearstore.gateway.backends.s3 import S3Upstream
from nearstore.gateway.cluster import AUTH_HEADER as PEER_AUTH_HEADER
from nearstore.gateway.cluster import ChunkFileHandle, Cluster
from nearstore.gateway.cluster import verify as verify_peer
from nearstore.gateway.config import Config, ConfigError
from nearstore.gateway.conn import BodyStalled, GuardedHandler, listen
from nearstore.gateway.control import Control
from nearstore.gateway.handlers.common import Ctx
from nearstore.gateway.localsock import LocalSocketServer
from nearstore.gateway.request import S3Request, parse_query, split_target
from nearstore.gateway.routes import Handler, resolve
from nearstore.gateway.sendfile import ResponseAborted, send_body
from nearstore.gateway.xml import XML_DECL, escape
from nearstore.metadata.membership import Membership, start_health_checks, stop_health_checks
from nearstore.metadata.ring import Node, Ring

log = logging.getLogger("nearstore")

CONFIG_KEY = web.AppKey("config", Config)
MEMBERSHIP_KEY = web.AppKey("membership", Membership)
BACKEND_KEY = web.AppKey("backend", Backend)

# S3 caps the request header section at 8 KiB (user metadata at 2 KiB).
# The parser's own bounds (gateway.conn.ConnLimits) sit above this, so that
# a somewhat oversized request gets this S3 error rather than a dropped
# connection, and below what would let idle heads hold real memory.
MAX_HEADER_BYTES = 8 * 1024

_POST_OBJECT_HINT = "multipart/form-data"


_ID_PREFIX = secrets.token_hex(4).upper()
_ids = itertools.count(1)


def new_request_id() -> str:
    # A per-process random prefix and a counter: unique, and no urandom
    # syscall per request (that was 6% of a small GET's CPU).
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFFFFFF:08X}"


def error_body(err: errors.S3Error, request_id: str, resource: str | None) -> bytes:
    parts = [XML_DECL, "<Error>", f"<Code>{err.code}</Code>", f"<Message>{escape(err.text)}</Message>"]
    for name, value in err.fields.items():
        parts.append(f"<{name}>{escape(str(value))}</{name}>")
    if resource is not None and "Resource" not in err.fields:
        parts.append(f"<Resource>{escape(resource)}</Resource>")
    parts.append(f"<RequestId>{request_id}</RequestId><HostId>{request_id}</HostId></Error>")
    return "".join(parts).encode()


def error_response(err: errors.S3Error, request_id: str, resource: str | None, head: bool) -> web.Response:
    headers = {"x-amz-request-id": request_id, "x-amz-id-2": request_id, **err.headers}
    if err.status == 304:
        return web.Response(status=304, headers=headers)
    if err.status == 503 and "Retry-After" not in headers:
        headers["Retry-After"] = "1"
    body = None if head else error_body(err, request_id, resource)
    resp = web.Response(status=err.status, body=body, headers=headers, content_type="application/xml")
    if head:
        # HEAD carries no body; S3 still says which error in a header.
        resp.headers["x-amz-error-code"] = err.code
    return resp


def _header_bytes(request: web.Request) -> int:
    return sum(len(k) + len(v) + 4 for k, v in request.raw_headers)


def _is_post_object(request: web.Request, bucket: str | None, key: str | None) -> bool:
    return (
        request.method == "POST"
        and bucket is not None
        and key is None
        and "Authorization" not in request.headers
        and request.headers.get("Content-Type", "").lower().startswith(_POST_OBJECT_HINT)
    )


@dataclass(frozen=True)
class Prepared:
    """A parsed, authenticated, routed request, ready to run."""

    req: S3Request
    ctx: Ctx
    handler: Handler


PREPARED_KEY = "nearstore.prepared"


def prepare(request: web.Request, request_id: str) -> Prepared:
    """Everything that can be decided from the request head alone: parse,
    authenticate, route. Raises S3 errors."""
    raw_path, _, raw_query = request.raw_path.partition("?")
    cfg = request.app[CONFIG_KEY]
    if _header_bytes(request) > MAX_HEADER_BYTES:
        raise errors.RequestHeaderSectionTooLarge(MaxSizeAllowed=str(MAX_HEADER_BYTES))
    bucket, key, vhost = split_target(raw_path, request.headers.get("Host"), cfg.domain)
    req = S3Request(
        http=request,
        method=request.method,
        bucket=bucket,
        key=key,
        query=parse_query(raw_query),
        raw_path=raw_path,
        raw_query=raw_query,
        request_id=request_id,
        vhost=vhost,
    )
    if _is_post_object(request, bucket, key) and not raw_query:
        # Browser POST: the signature is in the form, checked by the handler.
        auth = AuthContext(
            access_key="", scheme="post-v4", content_sha256=None, signing_key=None,
            seed_signature=None, amz_date=None, scope=None,
        )
    else:
        auth = authenticate(
            SignedRequest(
                method=request.method,
                raw_path=raw_path,
                raw_query=raw_query,
                headers=request.headers,
                vhost_bucket=bucket if vhost else None,
            ),
            cfg.credentials,
        )
    handler = resolve(req)
    return Prepared(req, Ctx(request.app[BACKEND_KEY], cfg, auth), handler)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: authenticate and route from the head alone
    and answer an error before the client sends its body (RFC 9110
    §10.1.1), as S3 does; otherwise invite the body."""
    if request.headers.get("Expect", "").lower() != "100-continue" or request.version != HttpVersion11:
        return None
    request_id = new_request_id()
    raw_path = request.raw_path.partition("?")[0]
    if not raw_path.startswith("/_nearstore/"):
        try:
            request[PREPARED_KEY] = prepare(request, request_id)
        except errors.S3Error as e:
            resp = error_response(e, request_id, raw_path, request.method == "HEAD")
            # The body never comes: the connection cannot be reused.
            resp.force_close()
            return resp
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0
    return None


class InFlight:
    """Requests being handled, so that shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()


INFLIGHT_KEY = web.AppKey("inflight", InFlight)
# The short-circuit socket's path, when this node serves one (the owner
# process listens; workers report the owner's).
LOCALSOCK_KEY = web.AppKey("local_socket", str)


async def front(request: web.Request) -> web.StreamResponse:
    inflight = request.app[INFLIGHT_KEY]
    inflight.enter()
    try:
        return await _front(request)
    finally:
        inflight.leave()


async def _front(request: web.Request) -> web.StreamResponse:
    guard = request.protocol
    if isinstance(guard, GuardedHandler) and request.body_exists:
        guard.reading(request.content)
    prepared: Prepared | None = request.get(PREPARED_KEY)
    request_id = prepared.req.request_id if prepared else new_request_id()
    raw_path = request.raw_path.partition("?")[0]
    head = request.method == "HEAD"
    try:
        if raw_path.startswith("/_nearstore/"):
            return await admin(request, raw_path)
        if prepared is None:
            prepared = prepare(request, request_id)
        resp = await prepared.handler(prepared.ctx, prepared.req)
    except ResponseAborted as e:
        log.warning("request %s aborted mid-response: %s", request_id, e.__cause__ or e)
        return e.response
    except errors.S3Error as e:
        if e.status >= 500:
            log.warning("request %s %s %s: %s %s", request_id, request.method, raw_path, e.code, e.text)
        return error_response(e, request_id, raw_path, head)
    except BodyStalled:
        # The client stopped sending its body (gateway.conn): S3's answer,
        # and the connection closes after it.
        resp = error_response(errors.RequestTimeout(), request_id, raw_path, head)
        resp.force_close()
        return resp
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("request %s %s %s failed", request_id, request.method, raw_path)
        return error_response(errors.InternalError(), request_id, raw_path, head)
    resp.headers["x-amz-request-id"] = request_id
    resp.headers["x-amz-id-2"] = request_id
    return resp


async def admin(request: web.Request, path: str) -> web.StreamResponse:
    if path == "/_nearstore/health" and request.method in ("GET", "HEAD"):
        return web.json_response({"status": "ok", "pid": os.getpid(),
                                  "local_socket": request.app.get(LOCALSOCK_KEY)})
    if path == "/_nearstore/metrics" and request.method in ("GET", "HEAD"):
        body, content_type = metrics_exposition()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp
    if path.startswith("/_nearstore/peer/"):
        return await peer_route(request, path)
    if path == "/_nearstore/ring" and request.method in ("GET", "HEAD"):
        return ring_route(request)
    if path == "/_nearstore/warm" and request.method == "POST":
        return await warm_route(request)
    raise errors.NoSuchKey("No such administrative route", Key=path)


def ring_route(request: web.Request) -> web.Response:
    """GET /_nearstore/ring[?bucket=B]: the ring and each peer's health;
    with ``bucket=B`` also how B's objects are cut into chunks::

        "bucket": {"name": B, "cached": true, "store": "s3:http://...", "chunk_size": 16777216}

    (``cached`` false and nothing more when B is not read through the
    cache). With the ring, that is all a client needs to compute each
    chunk's id (metadata.identity.chunk_id) and owner, and to ask the owner for
    it itself, saving the hop through a peer (clients/direct.py).

    Unauthenticated, like health and metrics: it tells the topology and the
    cache's configuration (which buckets are cached, the backing store's
    name, which is its endpoint URL, and the chunk size), never credentials
    or data; it does no I/O, so answering it for any name costs nothing.
    Every object byte still needs a signed S3 request."""
    doc = request.app[MEMBERSHIP_KEY].describe()
    query = parse_query(request.raw_path.partition("?")[2])
    if "bucket" in query:
        bucket = query["bucket"]
        backend = request.app[BACKEND_KEY]
        target = backend.pick(bucket) if isinstance(backend, Router) else backend
        layout: dict[str, object] = {"name": bucket, "cached": isinstance(target, CachedBackend)}
        if isinstance(target, CachedBackend):
            layout.update(store=target.inner.name, chunk_size=target.chunk_size)
        doc["bucket"] = layout
    return web.json_response(doc)


async def warm_route(request: web.Request) -> web.StreamResponse:
    """POST /_nearstore/warm?bucket=B&prefix=P[&pin=true]: fill the cache
    with every chunk of the objects under a prefix; answers JSON lines of
    progress, the last one the summary. Signed like any S3 request."""
    raw_path, _, raw_query = request.raw_path.partition("?")
    cfg = request.app[CONFIG_KEY]
    authenticate(SignedRequest(request.method, raw_path, raw_query, request.headers), cfg.credentials)
    q = parse_query(raw_query)
    bucket = q.get("bucket", "")
    prefix = q.get("prefix", "")
    pin = q.get("pin", "").lower() in ("1", "true", "yes")
    backend = request.app[BACKEND_KEY]
    target = backend.pick(bucket) if isinstance(backend, Router) else backend
    if not isinstance(target, CachedBackend):
        raise errors.InvalidRequest(f"Bucket {bucket!r} is not served through the cache")
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
        chunk = await target.chunk(bucket, info, index)
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


async def _control_ctx(app: web.Application) -> AsyncIterator[None]:
    """Multi-process nodes: the control plane (gateway.control)."""
    cfg = app[CONFIG_KEY]
    if cfg.workers <= 1:
        yield
        return
    control = Control(cfg.data_dir, owner=not cfg.worker)
    for b in _cached_backends(app):
        b.attach(control)
    await control.start()
    yield
    await control.close()


def make_membership(cfg: Config) -> Membership:
    """The cluster as configured, or a ring of this node alone."""
    if cfg.cluster_dns:
        # Members come from DNS once running (_membership_ctx); start alone.
        return Membership.static(cfg.node_id, [Node(cfg.node_id, f"http://{cfg.node_id}")])
    if not cfg.cluster_peers:
        me = f"{cfg.host}:{cfg.port}"
        return Membership.static(me, [Node(me, f"http://{me}")])
    nodes = [Node(urlsplit(url).netloc, url) for url in cfg.cluster_peers]
    if cfg.node_id not in {n.id for n in nodes}:
        raise ConfigError(f"[cluster] node_id {cfg.node_id!r} is not among the peers {[n.id for n in nodes]}")
    return Membership.static(cfg.node_id, nodes)


def _cached_backends(app: web.Application) -> list[CachedBackend]:
    backend = app[BACKEND_KEY]
    found = [*backend.mapped.values(), backend.wildcard] if isinstance(backend, Router) else [backend]
    return [b for b in found if isinstance(b, CachedBackend)]


async def _membership_ctx(app: web.Application) -> AsyncIterator[None]:
    m = app[MEMBERSHIP_KEY]
    cfg = app[CONFIG_KEY]
    if not m.peers and not cfg.cluster_dns:
        yield
        return
    dns_task = asyncio.ensure_future(m.run_dns(cfg.cluster_dns, cfg.port)) if cfg.cluster_dns else None
    cluster = Cluster(m, app[CONFIG_KEY].cluster_secret)
    await cluster.start()
    for b in _cached_backends(app):
        b.cluster = cluster
    backend = app[BACKEND_KEY]
    store = backend.store if isinstance(backend, Router) else None
    if store is not None:
        # A chunk this node cached while its owner was down (or before it
        # was heard from) would otherwise stay here for ever beside the
        # owner's copy: dropped (unless pinned) at every new ring.
        def keep_own(ring: Ring) -> None:
            dropped = store.drop_unless(lambda cid: ring.owner(cid).id == m.self_id)
            if dropped:
                log.warning("ring changed: dropped %d cached chunks other nodes own", dropped)

        m.on_change.append(keep_own)
    task, session = await start_health_checks(m)
    yield
    if dns_task is not None:
        dns_task.cancel()
    await stop_health_checks(task, session)
    await cluster.close()


async def peer_route(request: web.Request, path: str) -> web.StreamResponse:
    """The cache peers' API (gateway.cluster); 403 without the secret."""
    cfg = request.app[CONFIG_KEY]
    raw = request.raw_path
    if not verify_peer(cfg.cluster_secret, request.method, raw, request.headers.get(PEER_AUTH_HEADER)):
        raise errors.AccessDenied("Peer authentication failed")
    q = parse_query(raw.partition("?")[2])
    bucket, key = q.get("bucket", ""), q.get("key", "")
    backend = request.app[BACKEND_KEY]
    target = backend.pick(bucket) if isinstance(backend, Router) else backend
    if path == "/_nearstore/peer/invalidate" and request.method == "POST":
        if isinstance(target, CachedBackend):
            target.meta.invalidate(bucket, key)
            if target.control is not None:
                await target.control.broadcast_invalidate(bucket, key)
        return web.Response(status=204)
    if path != "/_nearstore/peer/chunk" or request.method != "GET":
        raise errors.NoSuchKey("No such peer route", Key=path)
    if not isinstance(target, CachedBackend):
        raise errors.InvalidRequest(f"Bucket {bucket!r} is not served through the cache")
    try:
        index, start, end = (int(q[n]) for n in ("index", "start", "end"))
    except (KeyError, ValueError):
        raise errors.InvalidArgument("index, start and end are integers") from None
    # The object's size and version come from this node's own metadata,
    # never from the asker (a size it sent would decide the chunk's length).
    etag = q.get("etag", "")
    info = await target.head_object(bucket, key)
    if info.etag != etag:
        target.meta.invalidate(bucket, key)  # perhaps ours is the stale one
        info = await target.head_object(bucket, key)
        if info.etag != etag:
            raise errors.PreconditionFailed(Condition="If-Match")
    if not 0 <= index * target.chunk_size < info.size:
        raise errors.InvalidRange(ActualObjectSize=str(info.size))
    if target.owner(bucket, info, index) is not None:
        # The asker's ring is not ours (a peer coming back, seen here
        # first): caching the chunk here would leave a copy beside its
        # owner's. The asker serves it itself.
        raise errors.ServiceUnavailable("Not this chunk's owner", headers={"Retry-After": "0"})
    try:
        chunk = await target.chunk(bucket, info, index)
    except ObjectChanged:
        raise errors.PreconditionFailed(Condition="If-Match") from None
    if not 0 <= start <= end <= chunk.size:
        raise errors.InvalidRange(ActualObjectSize=str(chunk.size))
    loop = asyncio.get_running_loop()
    try:
        fd = await loop.run_in_executor(None, open_verified, target.store.path(chunk), chunk.checksum, chunk.size,
                                        target.reverify_s)
    except (ChunkCorrupt, ChunkMissing):
        target.store.discard(chunk)
        raise errors.ServiceUnavailable("Chunk failed verification; ask again", headers={"Retry-After": "0"}) from None
    handle = ChunkFileHandle(fd, start, end)
    try:
        resp = web.StreamResponse(status=200)
        resp.content_length = end - start
        await send_body(request, resp, handle, start, end - start)
        return resp
    finally:
        await handle.close()


async def _backend_ctx(app: web.Application) -> AsyncIterator[None]:
    backend = app[BACKEND_KEY]
    await backend.start()
    yield
    await backend.close()


async def _localsock_ctx(app: web.Application) -> AsyncIterator[None]:
    """Short-circuit reads over a Unix socket (owner process only)."""
    cfg = app[CONFIG_KEY]
    server = None
    if not cfg.worker and cfg.local_socket != "off":
        server = LocalSocketServer(cfg.local_socket, app[BACKEND_KEY], cfg.credentials, cfg.domain)
        if not await server.start():
            server = None
    if server is not None:
        app[LOCALSOCK_KEY] = server.path
    elif cfg.worker and cfg.local_socket != "off":
        app[LOCALSOCK_KEY] = cfg.local_socket
    yield
    if server is not None:
        await server.close()


def make_backend(cfg: Config) -> Backend:
    local = LocalStore(cfg.data_dir, fsync=cfg.fsync, sweep=not cfg.worker)
    if not cfg.upstreams:
        return local
    store = ChunkStore(cfg.cache.dir, cfg.cache.size, cfg.cache.policy) if cfg.cache.enabled else None

    def wrap(up: S3Upstream) -> Backend:
        if store is None:
            return up
        return CachedBackend(up, store, chunk_size=cfg.cache.chunk_size, meta_ttl=cfg.cache.meta_ttl,
                             prefetch=cfg.cache.prefetch, verify=cfg.cache.verify,
                             reverify_s=cfg.cache.reverify_s)

    mapped: dict[str, Backend] = {}
    wildcard: Backend | None = None
    for up in cfg.upstreams:
        if up.name == "*":
            wildcard = wrap(S3Upstream(up))
        else:
            mapped[up.name] = wrap(S3Upstream(up))
    # Workers hold no chunk index: the owner loads it.
    return Router(local, mapped, wildcard, None if cfg.worker else store)


def build_app(cfg: Config, backend: Backend | None = None) -> web.Application:
    app = web.Application(handler_args=cfg.limits.handler_args())
    app[CONFIG_KEY] = cfg
    app[INFLIGHT_KEY] = InFlight()
    app[MEMBERSHIP_KEY] = make_membership(cfg)
    app[BACKEND_KEY] = backend or make_backend(cfg)
    app.cleanup_ctx.append(_backend_ctx)
    app.cleanup_ctx.append(_control_ctx)
    app.cleanup_ctx.append(_membership_ctx)
    app.cleanup_ctx.append(_localsock_ctx)
    # [\s\S]: keys may contain newlines, which '.' would not match.
    app.router.add_route("*", r"/{tail:[\s\S]*}", front, expect_handler=expect_continue)
    return app


def _xml_handle_error(
    self: web_protocol.RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    resp = _orig_handle_error(self, request, status, exc, message)
    err: errors.S3Error
    if isinstance(exc, http_exceptions.LineTooLong):
        err = errors.RequestHeaderSectionTooLarge(MaxSizeAllowed=str(MAX_HEADER_BYTES))
    elif 400 <= status < 500:
        err = errors.BadRequest(message or "Bad Request")
        err.status = status
    else:
        err = errors.InternalError()
    if isinstance(resp, web.Response):
        resp.set_status(err.status)
        resp.body = error_body(err, new_request_id(), None)
        resp.content_type = "application/xml"
    return resp


_orig_handle_error = web_protocol.RequestHandler.handle_error


def ssl_context(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.tls_cert or not cfg.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return ctx


def serve(cfg: Config) -> None:
    """Run a node until SIGINT/SIGTERM; in-flight requests finish first
    (up to ``cfg.shutdown_timeout`` seconds)."""
    web_protocol.RequestHandler.handle_error = _xml_handle_error  # type: ignore[method-assign]
    # Everything the node creates is its user's alone (objects, chunks, the
    # index); the places that create files also say so explicitly.
    os.umask(0o077)
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Large reads run os.sendfile/pread in threads; enough of them that 64
    # concurrent streams are not serialised behind each other.
    from concurrent.futures import ThreadPoolExecutor

    loop.set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="nearstore-io"))
    try:
        loop.run_until_complete(_run(cfg))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def _run(cfg: Config) -> None:
    # Not web.run_app: it stops by cancelling its main task, and a cancelled
    # task cuts aiohttp's graceful wait for in-flight handlers short (an
    # upload in progress at SIGTERM would be dropped). Here the stop is an
    # event, and cleanup runs uncancelled.
    if cfg.worker:
        _die_with_parent()
    app = build_app(cfg)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.shutdown_timeout)
    workers: list[subprocess.Popen[bytes]] = []
    supervisor: asyncio.Future[None] | None = None
    await runner.setup()
    try:
        listener = await listen(runner, cfg.host, cfg.port, limits=cfg.limits, ssl_context=ssl_context(cfg),
                                reuse_port=cfg.workers > 1)
        if not cfg.worker:
            _announce(cfg)
            workers = _start_workers(cfg)
        stop = asyncio.Event()
        if workers:
            supervisor = asyncio.ensure_future(_supervise(cfg, workers, stop))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if not cfg.worker:
            print("nearstore: shutting down; finishing in-flight requests", file=sys.stderr, flush=True)
            if supervisor is not None:
                supervisor.cancel()
            await _stop_workers(workers, cfg.shutdown_timeout)
        # Stop accepting, then let in-flight requests finish *before*
        # aiohttp's cleanup: its shutdown marks every connection closing and
        # from then on drops incoming bytes, which would starve an upload
        # whose body is still arriving.
        listener.close()
        try:
            await asyncio.wait_for(app[INFLIGHT_KEY].idle.wait(), cfg.shutdown_timeout)
        except TimeoutError:
            log.warning("%d requests still running after %.0f s; closing them",
                        app[INFLIGHT_KEY].count, cfg.shutdown_timeout)
    finally:
        await runner.cleanup()


def _worker_argv(cfg: Config) -> list[str]:
    argv = [sys.executable, "-m", "nearstore.gateway.cli", *sys.argv[1:], "--worker"]
    if "--workers" not in sys.argv:
        argv += ["--workers", str(cfg.workers)]
    return argv


async def _supervise(cfg: Config, procs: list[subprocess.Popen[bytes]], stop: asyncio.Event) -> None:
    """Restart a worker that died (crash, OOM kill) while the node runs;
    at most one restart a second per worker, so a worker that cannot start
    does not spin."""
    while not stop.is_set():
        await asyncio.sleep(1.0)
        for i, p in enumerate(procs):
            if p.poll() is not None and not stop.is_set():
                log.error("worker %d exited with %s; starting another", p.pid, p.returncode)
                procs[i] = subprocess.Popen(_worker_argv(cfg))


def _start_workers(cfg: Config) -> list[subprocess.Popen[bytes]]:
    """The owner starts workers-1 more processes serving the same port."""
    if cfg.workers <= 1:
        return []
    procs = [subprocess.Popen(_worker_argv(cfg)) for _ in range(cfg.workers - 1)]
    print(f"nearstore: {cfg.workers} processes serve the port (pids {os.getpid()} owner, "
          f"{', '.join(str(p.pid) for p in procs)})", file=sys.stderr, flush=True)
    return procs


async def _stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for p in procs:
        while p.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if p.poll() is None:
            p.kill()


def _die_with_parent() -> None:
    """A worker must not outlive its owner (Linux: PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _announce(cfg: Config) -> None:
    scheme = "https" if cfg.tls_cert else "http"
    print(
        f"nearstore: serving S3 on {scheme}://{cfg.host}:{cfg.port} (data in {os.path.abspath(cfg.data_dir)})",
        file=sys.stderr, flush=True,
    )
    if cfg.using_dev_keys:
        ak, sk = next(iter(cfg.credentials.items()))
        print(
            "nearstore: WARNING: no credentials configured (NEARSTORE_ACCESS_KEY / NEARSTORE_SECRET_KEY);"
            f" using development keys: access key {ak!r}, secret key {sk!r}",
            file=sys.stderr, flush=True,
        )

"""The aiohttp application: one front handler.

Every request goes through ``front``: request id, admin routes under
``/_nearstore/`` (``gateway.admin``), parsing into an ``S3Request``,
authentication, the one dispatch in ``routes``, and rendering of every
failure as S3 XML (``errors.to_s3``). Anything the table does not know
becomes InternalError, logged with its request id. The node
(``nearstore.node``) builds the application and runs it. An error
after the response has started cannot be rendered: the connection is closed
so the client sees a short body, never a wrong one.

aiohttp's own low-level errors (a header line too long, a malformed request
line) would be plain text; ``_xml_handle_error`` renders those as S3 XML too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import HttpVersion11, http_exceptions, web, web_protocol

from nearstore.cache.peers import Nonces
from nearstore.gateway import cors, errors
from nearstore.gateway.access import decide_request
from nearstore.gateway.admin import admin
from nearstore.gateway.auth import AuthContext, SignedRequest, authenticate
from nearstore.gateway.config import Config
from nearstore.gateway.conn import BodyStalled, GuardedHandler
from nearstore.gateway.cors import Rules
from nearstore.gateway.handlers.common import Ctx
from nearstore.gateway.request import S3Request, parse_query, split_target
from nearstore.gateway.routes import SELF_AUTHORIZED, Handler, operation, resolve
from nearstore.gateway.sendfile import ResponseAborted
from nearstore.gateway.state import (
    BACKEND_KEY,
    CACHE_FOR_KEY,
    CONFIG_KEY,
    CORS_KEY,
    HEALTH_KEY,
    INFLIGHT_KEY,
    MEMBERSHIP_KEY,
    PEER_NONCES_KEY,
    UPLOADS_KEY,
    CacheFor,
    Health,
    InFlight,
    Uploads,
)
from nearstore.gateway.xml import XML_DECL, escape_echo
from nearstore.metadata.backing import Backend
from nearstore.metadata.membership import Membership

log = logging.getLogger("nearstore")


# S3 caps the request header section at 8 KiB (user metadata at 2 KiB).
# The parser's own bounds (gateway.conn.ConnLimits) sit above this, so that
# a somewhat oversized request gets this S3 error rather than a dropped
# connection, and below what would let idle heads hold real memory.
MAX_HEADER_BYTES = 8 * 1024

_POST_OBJECT_HINT = "multipart/form-data"
SERVER = "nearstore"


_ID_PREFIX = secrets.token_hex(4).upper()
_ids = itertools.count(1)


def new_request_id() -> str:
    # A per-process random prefix and a counter: unique, and no urandom
    # syscall per request (that was 6% of a small GET's CPU).
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFFFFFF:08X}"


def error_body(err: errors.S3Error, request_id: str, resource: str | None) -> bytes:
    # Messages and fields echo the request (keys, headers): escape_echo.
    parts = [XML_DECL, "<Error>", f"<Code>{err.code}</Code>", f"<Message>{escape_echo(err.text)}</Message>"]
    for name, value in err.fields.items():
        parts.append(f"<{name}>{escape_echo(str(value))}</{name}>")
    if resource is not None and "Resource" not in err.fields:
        parts.append(f"<Resource>{escape_echo(resource)}</Resource>")
    parts.append(f"<RequestId>{request_id}</RequestId><HostId>{request_id}</HostId></Error>")
    return "".join(parts).encode()


def error_parts(
    err: errors.S3Error, request_id: str, resource: str | None, head: bool
) -> tuple[int, dict[str, str], bytes | None]:
    """An S3 error as status, headers and body (None: no body), for either
    server (this module's aiohttp front, ``gateway.hotpath``)."""
    headers = {"x-amz-request-id": request_id, "x-amz-id-2": request_id, "Server": SERVER, **err.headers}
    if err.status == 304:
        return 304, headers, None
    if err.status == 503 and "Retry-After" not in headers:
        headers["Retry-After"] = "1"
    headers["Content-Type"] = "application/xml"
    if head:
        # HEAD carries no body; S3 still says which error in a header.
        headers["x-amz-error-code"] = err.code
        return err.status, headers, None
    return err.status, headers, error_body(err, request_id, resource)


def error_response(err: errors.S3Error, request_id: str, resource: str | None, head: bool) -> web.Response:
    status, headers, body = error_parts(err, request_id, resource, head)
    return web.Response(status=status, body=body, headers=headers)


def as_s3_error(e: Exception, request_id: str, method: str, raw_path: str) -> errors.S3Error:
    """What the client is told of a failure: S3 errors as they are, known
    failures translated (``errors.to_s3``, the one table), anything else
    InternalError, logged with its traceback and request id."""
    err = errors.to_s3(e)
    if err is None:
        log.error("request %s %s %s failed", request_id, method, raw_path, exc_info=e)
        return errors.InternalError()
    if err.status >= 500:
        log.warning("request %s %s %s: %s %s (%r)", request_id, method, raw_path, err.code, err.text, e)
    return err


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


# Typed keys: aiohttp 3.14 warns of every string key on a request
# (NotAppKeyWarning), once per request under the tests' warnings-as-errors.
PREPARED_KEY = web.RequestKey("nearstore.prepared", Prepared)
REQUEST_ID_KEY = web.RequestKey("nearstore.request_id", str)
BUCKET_KEY: web.RequestKey[str | None] = web.RequestKey("nearstore.bucket")  # the request's bucket, for CORS


async def _stamp(request: web.BaseRequest, resp: web.StreamResponse) -> None:
    """Every response names its request and this server, set as its headers
    go out (a streamed body's head leaves before the handler returns)."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is not None:
        resp.headers.setdefault("x-amz-request-id", rid)
        resp.headers.setdefault("x-amz-id-2", rid)
    resp.headers["Server"] = SERVER
    origin, bucket = request.headers.get("Origin"), request.get(BUCKET_KEY)
    if origin and bucket and request.method != "OPTIONS" and isinstance(request, web.Request):
        rules = await request.app[CORS_KEY].of(bucket)
        resp.headers.update(cors.actual(rules, origin, request.method))


def parse_request(
    cfg: Config,
    method: str,
    target: str,
    headers: Mapping[str, str],
    header_bytes: int,
    request_id: str,
    http: web.Request | None = None,
) -> S3Request:
    """The request head as an ``S3Request``: size, bucket and key, query.
    Raises S3 errors."""
    if header_bytes > MAX_HEADER_BYTES:
        raise errors.RequestHeaderSectionTooLarge(MaxSizeAllowed=str(MAX_HEADER_BYTES))
    raw_path, _, raw_query = target.partition("?")
    bucket, key, vhost = split_target(raw_path, headers.get("Host"), cfg.domain)
    return S3Request(
        http=http,
        headers=headers,
        method=method,
        bucket=bucket,
        key=key,
        query=parse_query(raw_query),
        raw_path=raw_path,
        raw_query=raw_query,
        request_id=request_id,
        vhost=vhost,
    )


def check_signature(cfg: Config, req: S3Request) -> AuthContext:
    return authenticate(
        SignedRequest(
            method=req.method,
            raw_path=req.raw_path,
            raw_query=req.raw_query,
            headers=req.headers,
            vhost_bucket=req.bucket if req.vhost else None,
        ),
        cfg.credentials,
    )


def prepare(request: web.Request, request_id: str) -> Prepared:
    """Everything that can be decided from the request head alone: parse,
    authenticate, route. Raises S3 errors."""
    cfg = request.app[CONFIG_KEY]
    req = parse_request(cfg, request.method, request.raw_path, request.headers, _header_bytes(request), request_id,
                        request)
    if _is_post_object(request, req.bucket, req.key) and not req.raw_query:
        # Browser POST: the signature is in the form, checked by the handler.
        auth = AuthContext(
            access_key="", scheme="post-v4", content_sha256=None, signing_key=None,
            seed_signature=None, amz_date=None, scope=None,
        )
    else:
        auth = check_signature(cfg, req)
    handler = resolve(req)
    backend = request.app[BACKEND_KEY]
    access = None
    if req.bucket is not None and handler not in SELF_AUTHORIZED:
        access = decide_request(cfg, backend, req, auth, operation(handler))
    return Prepared(req, Ctx(backend, cfg, auth, request.app[CORS_KEY], access), handler)


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
    try:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    except ConnectionError:  # the client went away after its head: end quietly (see _front)
        gone = web.Response(status=400)
        gone.force_close()
        return gone
    request.writer.output_size = 0
    return None


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
    request[REQUEST_ID_KEY] = request_id
    raw_path = request.raw_path.partition("?")[0]
    head = request.method == "HEAD"
    try:
        if raw_path.startswith("/_nearstore/"):
            return await admin(request, raw_path)
        if request.method == "OPTIONS":
            return await _preflight(request)
        if prepared is None:
            prepared = prepare(request, request_id)
        request[BUCKET_KEY] = prepared.req.bucket
        if request.body_exists and request.method in ("PUT", "POST"):
            uploads = request.app[UPLOADS_KEY]
            if not uploads.try_enter():
                refused = error_response(errors.SlowDown(), request_id, raw_path, head)
                refused.force_close()  # its body is never read
                return refused
            try:
                resp = await prepared.handler(prepared.ctx, prepared.req)
            finally:
                uploads.leave()
        else:
            resp = await prepared.handler(prepared.ctx, prepared.req)
    except ResponseAborted as e:
        log.warning("request %s aborted mid-response: %s", request_id, e.__cause__ or e)
        return e.response
    except BodyStalled:
        # The client stopped sending its body (gateway.conn): S3's answer,
        # and the connection closes after it.
        resp = error_response(errors.RequestTimeout(), request_id, raw_path, head)
        resp.force_close()
        return resp
    except asyncio.CancelledError:
        raise
    except ConnectionError as e:
        if not _client_gone(request):
            return error_response(as_s3_error(e, request_id, request.method, raw_path), request_id, raw_path, head)
        # The client went away (reset, or closed its side and we closed
        # ours): nobody to answer. aiohttp logs an exception escaping a
        # handler at ERROR with a traceback; a response whose write fails
        # on the closed connection ends the request quietly instead.
        log.info("request %s %s %s: the client went away (%s)", request_id, request.method, raw_path, e)
        gone = web.Response(status=400)
        gone.force_close()
        return gone
    except Exception as e:
        return error_response(as_s3_error(e, request_id, request.method, raw_path), request_id, raw_path, head)
    return resp


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _preflight(request: web.Request) -> web.StreamResponse:
    """A browser's CORS preflight: unsigned (browsers never sign one),
    answered from the bucket's rules."""
    cfg = request.app[CONFIG_KEY]
    bucket, _, _ = split_target(request.raw_path.partition("?")[0], request.headers.get("Host"), cfg.domain)
    if not bucket:
        raise errors.BadRequest("Insufficient information. Origin request header needed.")
    request[BUCKET_KEY] = bucket
    rules = await request.app[CORS_KEY].of(bucket)
    headers = cors.preflight(rules, request.headers.get("Origin"),
                             request.headers.get("Access-Control-Request-Method"),
                             cors.requested_headers(request.headers.get("Access-Control-Request-Headers")))
    return web.Response(status=200, headers=headers)


def build_app(cfg: Config, backend: Backend, membership: Membership, cache_for: CacheFor) -> web.Application:
    """The S3 front over ``backend``; the node (``nearstore.node``) adds
    the lifetimes of what it built (stores, cache, peers, local socket)."""
    web_protocol.RequestHandler.handle_error = _xml_handle_error  # type: ignore[method-assign]
    app = web.Application(handler_args=cfg.limits.handler_args())
    app[CONFIG_KEY] = cfg
    app[INFLIGHT_KEY] = InFlight()
    app[UPLOADS_KEY] = Uploads(cfg.max_uploads)
    app[MEMBERSHIP_KEY] = membership
    app[PEER_NONCES_KEY] = Nonces()
    app[BACKEND_KEY] = backend
    app[CORS_KEY] = Rules(backend)
    app[CACHE_FOR_KEY] = cache_for
    app[HEALTH_KEY] = Health()
    app.on_response_prepare.append(_stamp)
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
    if 400 <= status < 500 and isinstance(exc, http_exceptions.HttpProcessingError):
        # A garbled request is the client's problem, not the server's: one
        # line (the parser's first line of complaint, never the request's
        # headers, which may hold credentials), not a traceback.
        reason = str(getattr(exc, "message", "") or exc).strip().splitlines()
        log.info("bad request from %s: %s %s", request.remote, status, reason[0][:200] if reason else type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        resp: web.StreamResponse = web.Response(status=status, text=message or "", content_type="text/plain")
        resp.force_close()
    else:
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



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
import logging
import os
import secrets
import ssl
import sys
from collections.abc import AsyncIterator

from aiohttp import http_exceptions, web, web_protocol

from gateway import errors
from gateway.auth import AuthContext, SignedRequest, authenticate
from gateway.backends.base import Backend
from gateway.backends.local import LocalStore
from gateway.config import Config
from gateway.handlers.common import Ctx
from gateway.request import S3Request, parse_query, split_target
from gateway.routes import resolve
from gateway.sendfile import ResponseAborted
from gateway.xml import XML_DECL, escape

log = logging.getLogger("nearstore")

CONFIG_KEY = web.AppKey("config", Config)
BACKEND_KEY = web.AppKey("backend", Backend)

# S3 caps the request header section at 8 KiB (user metadata at 2 KiB);
# aiohttp's parser is given generous limits so that we can answer an
# oversized request with an S3 error rather than a dropped connection.
MAX_HEADER_BYTES = 8 * 1024
PARSER_LIMITS = {"max_line_size": 64 * 1024, "max_field_size": 64 * 1024, "max_headers": 256}

_POST_OBJECT_HINT = "multipart/form-data"


def new_request_id() -> str:
    return secrets.token_hex(8).upper()


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


async def front(request: web.Request) -> web.StreamResponse:
    request_id = new_request_id()
    raw_path, _, raw_query = request.raw_path.partition("?")
    head = request.method == "HEAD"
    try:
        if raw_path.startswith("/_nearstore/"):
            return await admin(request, raw_path)
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
        resp = await handler(Ctx(request.app[BACKEND_KEY], cfg, auth), req)
    except ResponseAborted as e:
        log.warning("request %s aborted mid-response: %s", request_id, e.__cause__ or e)
        return e.response
    except errors.S3Error as e:
        if e.status >= 500:
            log.warning("request %s %s %s: %s %s", request_id, request.method, raw_path, e.code, e.text)
        return error_response(e, request_id, raw_path, head)
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
        return web.json_response({"status": "ok", "pid": os.getpid()})
    raise errors.NoSuchKey("No such administrative route", Key=path)


async def _backend_ctx(app: web.Application) -> AsyncIterator[None]:
    backend = app[BACKEND_KEY]
    await backend.start()
    yield
    await backend.close()


def build_app(cfg: Config, backend: Backend | None = None) -> web.Application:
    app = web.Application(handler_args=PARSER_LIMITS)
    app[CONFIG_KEY] = cfg
    app[BACKEND_KEY] = backend or LocalStore(os.path.join(cfg.data_dir), fsync=cfg.fsync)
    app.cleanup_ctx.append(_backend_ctx)
    app.router.add_route("*", "/{tail:.*}", front)
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
    app = build_app(cfg)
    scheme = "https" if cfg.tls_cert else "http"

    def announce(_: str) -> None:
        print(f"nearstore: serving S3 on {scheme}://{cfg.host}:{cfg.port} (data in {os.path.abspath(cfg.data_dir)})",
              file=sys.stderr, flush=True)
        if cfg.using_dev_keys:
            ak, sk = next(iter(cfg.credentials.items()))
            print(
                "nearstore: WARNING: no credentials configured (NEARSTORE_ACCESS_KEY / NEARSTORE_SECRET_KEY);"
                f" using development keys: access key {ak!r}, secret key {sk!r}",
                file=sys.stderr, flush=True,
            )

    web.run_app(
        app,
        host=cfg.host,
        port=cfg.port,
        ssl_context=ssl_context(cfg),
        shutdown_timeout=cfg.shutdown_timeout,
        access_log=None,
        print=announce,
        loop=loop,
        reuse_port=None,
    )


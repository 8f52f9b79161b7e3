"""The S3 upstream's salvage of a broken response's buffered bytes."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from nearstore.gateway.backends.s3 import _buffered


async def test_bytes_that_arrived_before_a_break_are_salvaged() -> None:
    """aiohttp raises a broken body's error ahead of the bytes it still
    holds (the race behind a resume that restarted from byte 0): the
    upstream takes them before it resumes."""
    loop = asyncio.get_running_loop()
    protocol: Any = type("P", (), {"_reading_paused": False, "pause_reading": lambda s: None,
                                   "resume_reading": lambda s: None})()
    reader = aiohttp.StreamReader(protocol, limit=2**16, loop=loop)
    reader.feed_data(b"first bytes")
    reader.set_exception(aiohttp.ClientPayloadError("Not enough data to satisfy content length header"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await reader.readany()  # what the stream's reader sees
    resp: Any = type("R", (), {"content": reader})()
    assert _buffered(resp) == b"first bytes"
    assert _buffered(resp) == b""  # taken once


async def _fake_store(handler: Any) -> Any:
    """A backing store answering every request with ``handler``: (server,
    an S3Upstream fronting bucket "b" on it)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from nearstore.gateway.backends.s3 import S3Upstream
    from nearstore.gateway.config import UpstreamConfig

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    up = S3Upstream(UpstreamConfig(name="b", endpoint=f"http://127.0.0.1:{server.port}", bucket="b",
                                   access_key="NODEKEY", secret_key="node-secret", max_attempts=1))
    await up.start()
    return server, up


async def test_a_backing_stores_error_passes_only_what_s3_documents() -> None:
    """Its StringToSign, CanonicalRequest, the node's key id and host ids are
    the node's business (security review): a client sees code, message and
    the documented fields."""
    from aiohttp import web

    from nearstore.gateway import errors

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=400, content_type="application/xml", body=(
            b"<Error><Code>InvalidArgument</Code><Message>bad</Message><ArgumentName>x</ArgumentName>"
            b"<AWSAccessKeyId>NODEKEY</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256 secret-ish</StringToSign>"
            b"<CanonicalRequest>GET /b/k</CanonicalRequest><HostId>store-host-7</HostId></Error>"))

    server, up = await _fake_store(refuse)
    try:
        with pytest.raises(errors.InvalidArgument) as e:
            await up.get_tags("b", "k")
        assert e.value.fields == {"ArgumentName": "x"} and e.value.text == "bad"
    finally:
        await up.close()
        await server.close()


async def test_a_listing_page_over_a_mebibyte_is_read() -> None:
    """1,000 keys of 1 KiB: ~1.1 MB of XML, above the limit for client
    bodies, well within a backing store's answer."""
    from aiohttp import web

    keys = [f"{i:04d}" + "k" * 1020 for i in range(1000)]
    page = ("<ListBucketResult><IsTruncated>false</IsTruncated>" + "".join(
        f"<Contents><Key>{k}</Key><Size>1</Size><ETag>\"e\"</ETag><LastModified>2026-01-01T00:00:00.000Z"
        "</LastModified></Contents>" for k in keys) + "</ListBucketResult>").encode()
    assert len(page) > 1024 * 1024

    async def listing(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="application/xml")

    server, up = await _fake_store(listing)
    try:
        got = await up.list_objects("b")
        assert [o.key for o in got.objects] == keys
    finally:
        await up.close()
        await server.close()

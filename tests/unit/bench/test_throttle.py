"""The throttling proxy of the `remote` scenario, over real loopback sockets.

Each test runs on asyncio's loop and on uvloop's (the proxy runs on uvloop
in the bench; they differ in when a pause made in connection_made holds).
Speed is only ever bounded from below: a slow machine may make a transfer
slower, never faster than the rate allows.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from nearstore.bench.throttle import ProxyConfig, ThrottleProxy, TokenBucket

LOOPS = ["asyncio", "uvloop"]
FAST = 1e9  # a rate that never holds a small transfer back
TIMEOUT_S = 5.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(loop: str, coro: Coroutine[Any, Any, object]) -> None:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(coro)
    else:
        asyncio.run(coro)


async def through_proxy(
    handler: Handler, body: Callable[[int], Awaitable[None]], **config: Any
) -> ThrottleProxy:
    """Start an upstream running `handler` per connection and a proxy to it,
    run body(proxy port), then close both."""
    upstream = await asyncio.start_server(handler, "127.0.0.1", 0)
    proxy = ThrottleProxy(ProxyConfig("127.0.0.1", upstream.sockets[0].getsockname()[1], **config))
    try:
        port = await proxy.start("127.0.0.1", 0)
        await asyncio.wait_for(body(port), TIMEOUT_S)
    finally:
        await proxy.close()
        upstream.close()
        await upstream.wait_closed()
    return proxy


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


def test_token_bucket_holds_reads_beyond_the_burst() -> None:
    b = TokenBucket(rate=1000.0, burst=100.0, now=0.0)
    assert b.take(100, 0.0) == 0.0  # the burst goes at once
    assert b.take(50, 0.0) == pytest.approx(0.05)  # then 50 bytes at 1000/s
    assert b.take(10, 0.05) == pytest.approx(0.01)  # the debt was paid at 0.05
    assert b.take(0, 100.0) == 0.0  # idle: refilled, but only up to the burst
    assert b.take(150, 100.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0, burst=1.0, now=0.0)


def test_token_bucket_credits_a_late_release_beyond_the_burst() -> None:
    """A held read that leaves late was the proxy's delay, not the link's:
    the time counts in full; idle time still refills only to the burst."""
    b = TokenBucket(rate=1000.0, burst=100.0, now=0.0)
    b.take(100, 0.0)
    assert b.take(50, 0.0) == pytest.approx(0.05)  # due at 0.05 ...
    b.release(0.25)  # ... left at 0.25: 200 bytes of the link's time unused
    assert b.take(200, 0.25) == 0.0
    assert b.take(0, 100.0) == 0.0
    assert b.take(150, 100.0) == pytest.approx(0.05)  # idle: the burst only


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("both", [False, True])
def test_forwards_bytes_exactly_both_ways(loop: str, both: bool) -> None:
    request, response = os.urandom(700_000), os.urandom(900_000)
    received: list[bytes] = []

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.append(await r.readexactly(len(request)))
        w.write(response)
        await w.drain()
        await closed(w)

    async def client(port: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request)
        await w.drain()
        got = await r.read()  # to EOF: the upstream closes after its answer
        await closed(w)
        assert got == response

    async def main() -> None:
        proxy = await through_proxy(upstream, client, rate=FAST, both=both)
        assert received == [request]
        assert (proxy.stats.to_server, proxy.stats.to_client) == (len(request), len(response))

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_one_connection_is_held_to_the_rate(loop: str) -> None:
    rate, burst, size = 2e6, 64 * 1024, 1_000_000
    payload = os.urandom(size)

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(payload)  # as fast as loopback goes: the proxy must hold it
        await w.drain()
        await closed(w)

    async def client(port: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.perf_counter()
        got = await r.read()
        elapsed = time.perf_counter() - t0
        await closed(w)
        assert got == payload
        expected = (size - burst) / rate  # ~0.47 s
        assert elapsed >= 0.7 * expected, f"{size} bytes in {elapsed:.3f} s at {rate:g} B/s"

    run(loop, through_proxy(upstream, client, rate=rate, burst=burst))


@pytest.mark.parametrize("loop", LOOPS)
def test_client_close_closes_the_upstream(loop: str) -> None:
    async def main() -> None:
        eof = asyncio.Event()

        async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            assert await r.readexactly(5) == b"hello"
            assert await r.read() == b""  # the client's close, passed on
            eof.set()
            await closed(w)

        async def client(port: int) -> None:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"hello")
            await w.drain()
            await closed(w)
            await eof.wait()

        await through_proxy(upstream, client)

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_upstream_close_closes_the_client(loop: str) -> None:
    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"bye")
        await w.drain()
        await closed(w)

    async def client(port: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await r.read() == b"bye"  # then EOF: the upstream's close
        await closed(w)

    run(loop, through_proxy(upstream, client))


@pytest.mark.parametrize("loop", LOOPS)
def test_refused_upstream_closes_the_client(loop: str) -> None:
    async def main() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead_port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()  # nothing listens there now
        proxy = ThrottleProxy(ProxyConfig("127.0.0.1", dead_port))
        try:
            port = await proxy.start("127.0.0.1", 0)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(r.read(), TIMEOUT_S) == b""
            await closed(w)
        finally:
            await proxy.close()
        assert proxy.stats.failed == 1

    run(loop, main())

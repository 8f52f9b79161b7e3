"""A throttling TCP proxy: a remote backing store, made out of a local one.

A cloud S3 serves one connection at 100-200 MB/s at best, however fast the
store behind it is; a SeaweedFS on loopback serves one at over 1 GB/s. The
`remote` scenario puts this proxy between the backing store and its readers
(nearstore's fills, and the direct reads it is compared with) so that each
connection gets what a remote store would give it, and a reader that opens
several connections at once (nearstore filling the next chunks in parallel)
gets several times that, as it would from a real one.

Invariants:

- Every accepted connection gets its own connection to the upstream and its
  own token bucket: the rate is per connection, never shared, like a remote
  store's. By default only server -> client is limited (reads); ``both``
  limits client -> server too.
- Bytes are forwarded unchanged and in order; when either side ends (EOF,
  error, close) both are closed, after what was already read is written.
- Bounded buffering, per direction: one read waiting out its delay (reading
  is paused meanwhile) plus the other side's write buffer up to
  `WRITE_HIGH`; past that the source is paused until the buffer drains
  (transport flow control, ``pause_writing``).
- Low CPU, so that on two shared cores it takes little from what is
  measured: protocols rather than streams (no second copy into a
  StreamReader's buffer), reads as large as the loop makes them (250-256 KiB
  for uvloop and asyncio), and per read one bucket update and at most one timer.
  It runs in its own process, whose CPU the bench keeps apart from the
  server's.

Rejected: a half-close that forwards each direction's EOF on its own. HTTP
clients never half-close, and a full close on the first EOF leaves nothing
waiting for a peer that never closes its side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from typing import cast

log = logging.getLogger("nearstore.bench.throttle")

DEFAULT_RATE = 100e6  # bytes/s per connection, server -> client
# Bytes a fresh connection may send at once; beyond it the rate holds. One
# read of the event loop: small against a second's worth at any useful rate.
DEFAULT_BURST = 256 * 1024
# Write buffer above which the side feeding it is paused.
WRITE_HIGH = 1024 * 1024


@dataclass(frozen=True)
class ProxyConfig:
    upstream_host: str
    upstream_port: int
    rate: float = DEFAULT_RATE
    burst: float = DEFAULT_BURST
    both: bool = False  # also limit client -> server


class TokenBucket:
    """``rate`` bytes per second, up to ``burst`` at once.

    Pure arithmetic over the times given to it (no clock inside:
    testable). A read larger than the tokens left puts the bucket in debt;
    the caller holds that read back for the delay `take` returns, which is
    when the debt is paid, so no byte leaves ahead of ``burst + rate * t``.

    Idle time refills the bucket up to ``burst`` only, as a link does not
    save up what it did not carry. But the time a held read waits past its
    delay (the proxy's timer late, its process not scheduled: on two busy
    cores, several ms) is the proxy's fault, not the link's: `release`
    credits it in full. Four connections beside two busy loops got 77% of
    the rate without that credit, 86% with it (97% on an idle machine).
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be positive, not {rate} and {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def take(self, n: int, now: float) -> float:
        """Account for n bytes at `now`; the seconds to hold them back."""
        refilled = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._tokens = max(self._tokens, refilled) - n  # a lateness credit is kept
        self._at = now
        return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def release(self, now: float) -> None:
        """The held read left at `now`: everything since `take`, its lateness
        included, counts, beyond the burst if it was that late."""
        self._tokens += (now - self._at) * self.rate
        self._at = now


@dataclass
class Stats:
    """What the proxy forwarded, for its log at exit."""

    connections: int = 0
    failed: int = 0
    to_client: int = 0
    to_server: int = 0


class _Side(asyncio.Protocol):
    """One socket of a proxied connection.

    What arrives on it goes to the other side's transport; with a bucket,
    only after the bucket's delay, with reading paused meanwhile. Reading is
    paused while any reason in `_holds` stands: "throttle" (a delay running),
    "full" (the other side's write buffer is over `WRITE_HIGH`), "connecting"
    (the client side, until the upstream connection is up).
    """

    def __init__(self, conn: _Connection, bucket: TokenBucket | None) -> None:
        self.conn = conn
        self.bucket = bucket
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.other: _Side | None = None
        self.forwarded = 0
        self._holds: set[str] = set()
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports do not subclass asyncio.Transport but
        # have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self.bucket is None:
            self._forward(data)
            return
        assert self._loop is not None  # set by connection_made
        delay = self.bucket.take(len(data), self._loop.time())
        if delay <= 0:
            self._forward(data)
            return
        self.hold("throttle")
        self._loop.call_later(delay, self._forward_held, data)

    def _forward_held(self, data: bytes) -> None:
        assert self.bucket is not None and self._loop is not None
        self.bucket.release(self._loop.time())
        self._forward(data)
        self.release("throttle")

    def _forward(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            # Not connected yet: uvloop may deliver a read before a pause
            # from connection_made holds. Kept (one read: this pause holds)
            # and written once the upstream is up.
            self._early.append(data)
            self.hold("connecting")
            return
        if other.transport.is_closing():
            return  # the other side is gone: nothing to deliver to
        other.transport.write(data)
        self.forwarded += len(data)

    def flush_early(self) -> None:
        """Forward what arrived before the other side was connected."""
        early, self._early = self._early, []
        for data in early:
            self._forward(data)

    def eof_received(self) -> bool:
        return False  # close this side; connection_lost closes the other

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close()

    # Flow control: this side's write buffer fills from the other side.
    def pause_writing(self) -> None:
        if self.other is not None:
            self.other.hold("full")

    def resume_writing(self) -> None:
        if self.other is not None:
            self.other.release("full")

    def hold(self, why: str) -> None:
        # Paused every time, not only on the first reason: a pause made in
        # connection_made may not hold under uvloop (see _forward).
        self._holds.add(why)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def release(self, why: str) -> None:
        self._holds.discard(why)
        if not self._holds and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        # Flushes what is buffered, then closes.
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _ClientSide(_Side):
    """The accepted socket's protocol: it starts its connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.conn.client_made()


class _Connection:
    """A client connection and its own upstream connection, closed together."""

    def __init__(self, proxy: ThrottleProxy) -> None:
        self.proxy = proxy
        cfg = proxy.config
        now = asyncio.get_running_loop().time()
        down = TokenBucket(cfg.rate, cfg.burst, now)
        up = TokenBucket(cfg.rate, cfg.burst, now) if cfg.both else None
        self.client = _ClientSide(self, up)  # reads the client, writes upstream
        self.server = _Side(self, down)  # reads upstream, writes the client
        self.client.other, self.server.other = self.server, self.client
        self.closed = False

    def client_made(self) -> None:
        """The client is connected: hold its bytes until the upstream is."""
        self.proxy.live.add(self)
        self.proxy.stats.connections += 1
        self.client.hold("connecting")
        task = asyncio.get_running_loop().create_task(self._connect_upstream())
        self.proxy.tasks.add(task)
        task.add_done_callback(self.proxy.tasks.discard)

    async def _connect_upstream(self) -> None:
        cfg = self.proxy.config
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.server, cfg.upstream_host, cfg.upstream_port)
        except OSError as exc:
            log.warning("upstream %s:%d refused: %s", cfg.upstream_host, cfg.upstream_port, exc)
            self.proxy.stats.failed += 1
            self.close()
            return
        if self.closed:  # the client left while we connected
            self.server.close()
            return
        self.client.flush_early()
        self.client.release("connecting")

    def close(self) -> None:
        self.client.close()
        self.server.close()
        if self.closed:
            return
        self.closed = True
        self.proxy.live.discard(self)
        self.proxy.stats.to_client += self.server.forwarded
        self.proxy.stats.to_server += self.client.forwarded


class ThrottleProxy:
    """Listens on host:port and forwards each connection to the upstream,
    each at `config.rate` bytes/s (see the module's invariants)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.live: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    def _accept(self) -> _Side:
        return _Connection(self).client

    async def start(self, host: str, port: int) -> int:
        """Listen; the port listened on (the one given, or a free one for 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, close every connection, wait for pending connects."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in list(self.live):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the transports' connection_lost run


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    config = ProxyConfig(host or "127.0.0.1", int(port), args.rate, args.burst, args.both)
    proxy = ThrottleProxy(config)
    listening = await proxy.start(args.host, args.port)
    log.info("listening on %s:%d -> %s at %.0f bytes/s per connection%s", args.host,
             listening, args.upstream, args.rate, " both ways" if args.both else "")  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()
    s = proxy.stats
    log.info("stopped: %d connections (%d upstream refused), %d bytes to clients, %d to the "
             "upstream", s.connections, s.failed, s.to_client, s.to_server)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nearstore.bench.throttle",
        description="TCP proxy limiting each connection to a rate (a remote-like backing store).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: any)")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="where to forward")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="bytes/s per connection")
    p.add_argument("--burst", type=float, default=DEFAULT_BURST, help="bytes sent at once")
    p.add_argument("--both", action="store_true", help="limit client -> server as well")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

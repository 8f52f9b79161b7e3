"""A node, put together: the composition root.

The one module that knows every package. From the configuration it builds
the backing stores (``gateway.backends``), the cache in front of those that
have one (``cache``), the membership and ring (``metadata``), and the S3
front (``gateway.app``), wires them to each other, and runs their
lifetimes; it supervises the worker processes of a multi-process node.
Nothing else decides which kind of store serves a bucket.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from nearstore.cache import metrics
from nearstore.cache.control import Control
from nearstore.cache.localsock import LocalSocketServer
from nearstore.cache.peers import Cluster
from nearstore.cache.prefetch import Prefetcher
from nearstore.cache.readpath import CachedBackend
from nearstore.cache.store import ChunkStore
from nearstore.gateway.access import recorded
from nearstore.gateway.admin import describe, hint_from_worker, local_reads
from nearstore.gateway.app import build_app
from nearstore.gateway.backends.local import LocalStore
from nearstore.gateway.backends.router import Router
from nearstore.gateway.backends.s3 import S3Upstream
from nearstore.gateway.config import Config, ConfigError
from nearstore.gateway.hotpath import listen
from nearstore.gateway.state import HEALTH_KEY, INFLIGHT_KEY, LOCALSOCK_KEY, Health
from nearstore.metadata.backing import Backend
from nearstore.metadata.membership import (
    Membership,
    PeerLink,
    start_health_checks,
    stop_health_checks,
)
from nearstore.metadata.ring import Node, Ring

log = logging.getLogger("nearstore")


class Stores:
    """The backing stores as configured: the local store alone, or a router
    over it and the upstream buckets, each read through the cache when one
    is configured."""

    def __init__(self, cfg: Config) -> None:
        self.local = LocalStore(cfg.data_dir, fsync=cfg.fsync, sweep=not cfg.worker)
        self.chunks: ChunkStore | None = None
        self.caches: list[CachedBackend] = []
        self.upstreams: list[S3Upstream] = []
        self.front: Backend = self.local
        self._router: Router | None = None
        if not cfg.upstreams:
            return
        if cfg.cache.enabled:
            self.chunks = ChunkStore(cfg.cache.dir, cfg.cache.size, cfg.cache.policy)

        def wrap(up: S3Upstream) -> Backend:
            self.upstreams.append(up)
            if self.chunks is None:
                return up
            cache = CachedBackend(up, self.chunks, chunk_size=cfg.cache.chunk_size, meta_ttl=cfg.cache.meta_ttl,
                                  prefetch=cfg.cache.prefetch, verify=cfg.cache.verify,
                                  reverify_s=cfg.cache.reverify_s, max_fills=cfg.cache.max_fills,
                                  prefetch_direct=cfg.cache.hint_direct)
            if cfg.cache.hints:
                cache.prefetcher = Prefetcher(cache, lanes=cfg.cache.hint_lanes,
                                              max_lanes=cfg.cache.hint_lanes_max, share=cfg.cache.hint_share)
            self.caches.append(cache)
            return cache

        mapped: dict[str, Backend] = {}
        wildcard: Backend | None = None
        for up in cfg.upstreams:
            if up.name == "*":
                wildcard = wrap(S3Upstream(up))
            else:
                mapped[up.name] = wrap(S3Upstream(up))
        owners = {up.name: recorded(cfg, cfg.user_named(up.owner)) for up in cfg.upstreams}
        self.front = self._router = Router(self.local, mapped, wildcard, owners)

    def cache_for(self, bucket: str) -> CachedBackend | None:
        """The cache that reads ``bucket``, None where it is not cached."""
        target = self._router.pick(bucket) if self._router is not None else self.front
        return target if isinstance(target, CachedBackend) else None


def peer_link(cfg: Config) -> PeerLink:
    """How this node reaches its peers: TLS when they serve HTTPS (https
    peer URLs, or DNS discovery on a node that serves HTTPS itself)."""
    if not (cfg.tls_cert or any(u.startswith("https://") for u in cfg.cluster_peers)):
        return PeerLink()
    ctx = ssl.create_default_context(cafile=cfg.cluster_ca or None)
    if cfg.cluster_cert:
        ctx.load_cert_chain(cfg.cluster_cert, cfg.cluster_key)
    # Members found by DNS are IP addresses; their certificates name the
    # Service (the DNS name), as a pod's certificate usually does.
    return PeerLink(ctx, cfg.cluster_tls_name or cfg.cluster_dns or None)


def make_membership(cfg: Config) -> Membership:
    """The cluster as configured, or a ring of this node alone."""
    link = peer_link(cfg)
    if cfg.cluster_dns:
        # Members come from DNS once running (_membership_ctx); start alone.
        return Membership.static(cfg.node_id, [Node(cfg.node_id, f"{link.scheme}://{cfg.node_id}")], link)
    if not cfg.cluster_peers:
        me = f"{cfg.host}:{cfg.port}"
        return Membership.static(me, [Node(me, f"{link.scheme}://{me}")], link)
    nodes = [Node(urlsplit(url).netloc, url) for url in cfg.cluster_peers]
    if cfg.node_id not in {n.id for n in nodes}:
        raise ConfigError(f"[cluster] node_id {cfg.node_id!r} is not among the peers {[n.id for n in nodes]}")
    return Membership.static(cfg.node_id, nodes, link)


def build_node(cfg: Config, stores: Stores | None = None) -> web.Application:
    """The node's application: the S3 front over its stores, with the
    lifetimes of the stores, the chunk cache, the control plane between
    worker processes, the cluster and the local socket."""
    stores = stores or Stores(cfg)
    membership = make_membership(cfg)
    app = build_app(cfg, stores.front, membership, stores.cache_for)

    health = app[HEALTH_KEY]

    async def stores_ctx(app: web.Application) -> AsyncIterator[None]:
        if stores.chunks is not None and not cfg.worker:  # workers hold no index: the owner loads it
            problem = await _load_chunks(stores.chunks)
            if problem:
                health.problems["cache"] = problem
        await stores.front.start()
        # Each backing store's credentials, checked while the node already
        # serves: one that fails is named (log and health), the others work.
        checks = asyncio.ensure_future(_check_upstreams(stores.upstreams, health))
        yield
        checks.cancel()
        await stores.front.close()

    async def control_ctx(app: web.Application) -> AsyncIterator[None]:
        """Multi-process nodes: the control plane (cache.control)."""
        if cfg.workers <= 1:
            yield
            return
        control = Control(cfg.data_dir, owner=not cfg.worker)
        for cache in stores.caches:
            cache.attach(control)
        if control.owner:
            control.on_hint = hint_from_worker(app)
        await control.start()
        yield
        await control.close()

    async def membership_ctx(app: web.Application) -> AsyncIterator[None]:
        m = membership
        if not m.peers and not cfg.cluster_dns:
            yield
            return
        dns_task = asyncio.ensure_future(m.run_dns(cfg.cluster_dns, cfg.port)) if cfg.cluster_dns else None
        cluster = Cluster(m, cfg.cluster_secret)
        await cluster.start()
        for cache in stores.caches:
            cache.cluster = cluster
        chunks = stores.chunks
        if chunks is not None and not cfg.worker:
            # A chunk this node cached while its owner was down (or before it
            # was heard from) would otherwise stay here for ever beside the
            # owner's copy: dropped (unless pinned) at every new ring.
            def keep_own(ring: Ring) -> None:
                dropped = chunks.drop_unless(lambda cid: ring.owner(cid).id == m.self_id)
                if dropped:
                    log.warning("ring changed: dropped %d cached chunks other nodes own", dropped)

            m.on_change.append(keep_own)
        task, session = await start_health_checks(m)
        yield
        if dns_task is not None:
            dns_task.cancel()
        await stop_health_checks(task, session)
        await cluster.close()

    async def localsock_ctx(app: web.Application) -> AsyncIterator[None]:
        """Short-circuit reads over a Unix socket (owner process only)."""
        server = None
        if not cfg.worker and cfg.local_socket != "off":
            server = LocalSocketServer(cfg.local_socket, local_reads(stores.front, cfg),
                                       describe, idle_s=cfg.idle_timeout, stall_s=cfg.send_timeout)
            if not await server.start():
                server = None
        if server is not None:
            app[LOCALSOCK_KEY] = server.path
        elif cfg.worker and cfg.local_socket != "off":
            app[LOCALSOCK_KEY] = cfg.local_socket
        yield
        if server is not None:
            await server.close()

    app.cleanup_ctx.extend([stores_ctx, control_ctx, membership_ctx, localsock_ctx])
    return app


async def _load_chunks(chunks: ChunkStore) -> str | None:
    """Load the chunk index; what is wrong with the cache, if anything."""
    problem = None
    try:
        found = await asyncio.get_running_loop().run_in_executor(None, chunks.load)
    except OSError as e:
        # A cache that cannot even be opened is a cache fault like any
        # other: serve everything from the backing store, loudly.
        problem = f"chunk cache at {chunks.root} unusable ({e}); serving from the backing store"
        log.error("%s", problem)
        found = 0
    metrics.CACHE_BYTES.set(chunks.used)
    metrics.CACHE_CAPACITY.set(chunks.capacity)
    log.info("chunk cache: %d chunks, %d bytes of %d, in %s", found, chunks.used, chunks.capacity, chunks.root)
    return problem


async def _check_upstreams(upstreams: list[S3Upstream], health: Health) -> None:
    async def one(up: S3Upstream) -> None:
        part = f"upstream {up.cfg.name}"
        health.checking.add(part)
        try:
            problem = await up.check()
        finally:
            health.checking.discard(part)
        if problem:
            health.problems[part] = problem
            log.error("backing store check failed: %s; its buckets answer with errors until it is fixed", problem)
        else:
            log.info("backing store %s ([[buckets]] %r): credentials work", up.cfg.endpoint, up.cfg.name)

    await asyncio.gather(*(one(up) for up in upstreams))


# --- serving ----------------------------------------------------------------


def ssl_context(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.tls_cert or not cfg.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.cluster_mtls:
        # Asked, not demanded: S3 clients present none; peers must (the
        # peer API refuses a request without one), and a certificate that
        # does not chain to the cluster's CA fails the handshake.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cfg.cluster_ca)
    return ctx


def serve(cfg: Config) -> None:
    """Run a node until SIGINT/SIGTERM; in-flight requests finish first
    (up to ``cfg.shutdown_timeout`` seconds)."""
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
        claim = None
    else:
        claim = claim_port(cfg.host, cfg.port, cfg.data_dir)
    try:
        await _serve_claimed(cfg)
    finally:
        if claim is not None:
            os.close(claim)


async def _serve_claimed(cfg: Config) -> None:
    app = build_node(cfg)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.shutdown_timeout)
    workers: list[subprocess.Popen[bytes]] = []
    supervisor: asyncio.Future[None] | None = None
    await runner.setup()
    try:
        listener, hot = await listen(runner, cfg.host, cfg.port, limits=cfg.limits, ssl_context=ssl_context(cfg),
                                     reuse_port=cfg.workers > 1, hot_path=cfg.hot_path)
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
        if hot is not None:
            hot.shutdown()
        try:
            await asyncio.wait_for(app[INFLIGHT_KEY].idle.wait(), cfg.shutdown_timeout)
        except TimeoutError:
            log.warning("%d requests still running after %.0f s; closing them",
                        app[INFLIGHT_KEY].count, cfg.shutdown_timeout)
    finally:
        await runner.cleanup()


def _port_lock(host: str, port: int) -> Path:
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"nearstore-port-{safe}-{port}.lock"


def claim_port(host: str, port: int, data_dir: str) -> int | None:
    """The owner's claim on its address, held (an open, locked file) for the
    node's life. A node's processes share its port with SO_REUSEPORT, and
    the kernel would just as readily let a second node join and split the
    requests between two stores; so before binding, the owner takes a lock
    named after host:port (another nearstore node holding it is named in
    the error) and checks with a bind without SO_REUSEPORT that nothing at
    all listens there yet."""
    fd: int | None = None
    holder = ""
    try:
        fd = os.open(_port_lock(host, port), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError:
        pass  # a lock another user made: the probe below still refuses a shared port
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {other.get('pid')}, data dir {other.get('data_dir')})"
            except ValueError:
                pass
            os.close(fd)
            raise OSError(errno.EADDRINUSE, f"address already in use by another nearstore node{holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "data_dir": os.path.abspath(data_dir)}).encode(), 0)
    try:
        for family, kind, proto, _, addr in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                               flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(addr)
    except OSError:
        if fd is not None:
            os.close(fd)
        raise
    return fd


def _worker_argv(cfg: Config) -> list[str]:
    argv = [sys.executable, "-m", "nearstore.cli", *sys.argv[1:], "--worker"]
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

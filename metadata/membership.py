"""Membership: which nodes form the cluster and which of them are up.

A static list of peers from the configuration (every node lists every
node, itself included). Health checks probe each peer's
``/_nearstore/health`` once a second; a peer that refuses two probes in a
row (a dead process: connection refused or reset) is marked down, within
three seconds of dying, and comes back at its first good probe. A peer that
is only slow (probes time out after a second) is marked down once it has
been silent for ``SILENT_TO_DOWN`` seconds: a node busy serving, or a
prober whose own cores are saturated, answers late, and routing a loaded
node's chunks away (to be filled twice) only adds load. Measured: on the
2-core box with both cores saturated, a one-second probe of a healthy
peer timed out twice in a row in 1 of 5 cluster runs. Every change builds a
new immutable ring (``Ring.without(down)``: only the down peers' keys move)
and swaps it in atomically; readers take ``current`` and never see a ring
half-built.

A peer never heard from is not a down peer: nodes of a cluster start one
after another, and a node that took its not-yet-started peers for dead
would route their chunks to itself and cache them twice. Such a peer stays
in the ring (a read that fails there is served by the reader) until it has
failed probes for ``NEVER_HEARD_GRACE`` seconds; then a machine that never
came up is routed around too. Listeners (``on_change``) hear of every new
ring, so that a node can drop the chunks a returning peer owns again.

Or, for clusters, the members are the addresses a DNS name resolves to (a
Kubernetes headless Service), re-resolved every few seconds: a new pod
joins the ring, a deleted one leaves it (only its keys move).

How a node reaches its peers is a ``PeerLink``: plain HTTP, or TLS with the
CA the peers' certificates are checked against, the name they must carry
(members found by DNS are addresses, and a certificate names the Service,
not a pod's IP), and optionally this node's client certificate. Members
found by DNS are reached over https when the link is TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from nearstore.metadata.ring import Node, NoLiveNodes, Ring

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 1.0
FAILURES_TO_DOWN = 2
SILENT_TO_DOWN = 5.0  # seconds of timed-out probes before a slow peer is down
NEVER_HEARD_GRACE = 30.0


@dataclass(frozen=True)
class PeerLink:
    """TLS to the peers, or None of it (plain HTTP)."""

    ssl: ssl.SSLContext | None = None
    server_name: str | None = None  # the name peers' certificates carry; None: each URL's host

    @property
    def scheme(self) -> str:
        return "https" if self.ssl is not None else "http"

    def session(self, **kw: object) -> aiohttp.ClientSession:
        """A client session for peer requests (``kw``: its other settings)."""
        connector = aiohttp.TCPConnector(ssl=self.ssl if self.ssl is not None else True)
        return aiohttp.ClientSession(connector=connector, **kw)  # type: ignore[arg-type]

    @property
    def hostname(self) -> str | None:
        """A request's ``server_hostname``: the certificate name to check
        (None: the URL's host)."""
        return self.server_name if self.ssl is not None else None


@dataclass
class PeerState:
    node: Node
    up: bool = True
    failures: int = 0
    last_ok: float = 0.0
    last_error: str = ""
    heard: bool = False  # answered a probe or a request at least once
    failing_since: float = 0.0  # when the current run of failures began


@dataclass
class Membership:
    self_id: str
    base: Ring
    peers: dict[str, PeerState] = field(default_factory=dict)
    current: Ring | None = None
    version: int = 0
    # Called after every new ring (with it): e.g. the cache dropping chunks
    # that are no longer this node's.
    on_change: list[Callable[[Ring], None]] = field(default_factory=list)
    link: PeerLink = field(default_factory=PeerLink)

    @classmethod
    def static(cls, self_id: str, nodes: Sequence[Node], link: PeerLink | None = None) -> Membership:
        ring = Ring.build(nodes)
        m = cls(self_id=self_id, base=ring, link=link or PeerLink())
        m.peers = {n.id: PeerState(n) for n in ring.nodes if n.id != self_id}
        m.current = ring
        return m

    def set_nodes(self, nodes: Sequence[Node]) -> bool:
        """Replace the member list (DNS discovery): peers that stay keep
        their health state; returns whether anything changed."""
        ids = sorted(n.id for n in nodes)
        if ids == sorted(n.id for n in self.base.nodes):
            return False
        self.base = Ring.build(nodes, version=self.base.version + 1)
        old = self.peers
        self.peers = {n.id: old.get(n.id, PeerState(n)) for n in self.base.nodes if n.id != self.self_id}
        self._rebuild()
        return True

    async def run_dns(self, name: str, port: int, interval: float = 5.0) -> None:
        """Keep the members equal to the A/AAAA records of ``name`` (a
        Kubernetes headless Service), re-resolved every ``interval`` s.
        A failed lookup keeps the last known members."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # socket.getaddrinfo in a thread, as asyncio's loop does (and
                # uvloop's does not: it would bypass a resolver the tests fake).
                infos = await loop.run_in_executor(None, functools.partial(
                    socket.getaddrinfo, name, port, type=socket.SOCK_STREAM))
                addrs = sorted({str(i[4][0]) for i in infos})
                nodes = [Node(_host_port(a, port), f"{self.link.scheme}://{_host_port(a, port)}") for a in addrs]
                if nodes and self.set_nodes(nodes):
                    log.warning("members from DNS %s: %s", name, [n.id for n in nodes])
            except OSError as e:
                log.warning("DNS lookup of %s failed (%s); keeping %d members", name, e, len(self.base.nodes))
            await asyncio.sleep(interval)

    def owner_of(self, chunk_id: str) -> Node | None:
        """Who serves a chunk: its owner on the current ring when that is
        another live node, None when this node serves it itself (it owns
        it, it is alone, or no node is live)."""
        ring = self.current
        if ring is None or not self.peers:
            return None
        try:
            node = ring.owner(chunk_id)
        except NoLiveNodes:
            return None
        return None if node.id == self.self_id else node

    @property
    def down(self) -> list[str]:
        return sorted(p.node.id for p in self.peers.values() if not p.up)

    def _rebuild(self) -> None:
        self.version += 1
        self.current = ring = self.base.without(self.down)
        log.warning("ring v%d: down %s", self.version, self.down or "none")
        for listener in self.on_change:
            try:
                listener(ring)
            except Exception:  # a listener's failure must not stop routing
                log.exception("ring change listener failed")

    def mark(self, node_id: str, ok: bool, error: str = "", *, slow: bool = False) -> None:
        """One probe's (or request's) outcome; ``slow``: it timed out rather
        than being refused."""
        p = self.peers.get(node_id)
        if p is None:
            return
        now = time.time()
        if ok:
            p.failures, p.last_ok, p.heard = 0, now, True
            if not p.up:
                p.up = True
                self._rebuild()
            return
        if p.failures == 0:
            p.failing_since = now
        p.failures += 1
        p.last_error = error
        if not p.heard and now - p.failing_since < NEVER_HEARD_GRACE:
            return  # not started yet, as far as anyone knows
        if slow and now - p.failing_since < SILENT_TO_DOWN:
            return  # late, not dead (yet)
        if p.up and p.failures >= FAILURES_TO_DOWN:
            p.up = False
            self._rebuild()

    async def run_health_checks(self, session: aiohttp.ClientSession) -> None:
        """Probe every peer once a second until cancelled."""
        while True:
            await asyncio.gather(*(self._probe(session, p) for p in list(self.peers.values())))
            await asyncio.sleep(PROBE_INTERVAL)

    async def _probe(self, session: aiohttp.ClientSession, p: PeerState) -> None:
        try:
            async with session.get(
                p.node.address.rstrip("/") + "/_nearstore/health",
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT), server_hostname=self.link.hostname,
            ) as r:
                await r.read()
                ok = r.status == 200
                error = "" if ok else f"HTTP {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # noqa: UP041
            ok, error = False, f"{type(e).__name__}: {e}"
            self.mark(p.node.id, ok, error, slow=isinstance(e, TimeoutError))
            return
        self.mark(p.node.id, ok, error)

    def describe(self) -> dict[str, object]:
        ring = self.current or self.base
        d = dict(ring.describe())
        d["self"] = self.self_id
        d["membership_version"] = self.version
        d["peers"] = [
            {"id": p.node.id, "address": p.node.address, "up": p.up, "heard": p.heard,
             "failures": p.failures, "last_ok": p.last_ok, "last_error": p.last_error}
            for p in self.peers.values()
        ]
        return d


def _host_port(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


async def start_health_checks(m: Membership) -> tuple[asyncio.Task[None], aiohttp.ClientSession]:
    session = m.link.session()
    return asyncio.ensure_future(m.run_health_checks(session)), session


async def stop_health_checks(task: asyncio.Task[None], session: aiohttp.ClientSession) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await session.close()

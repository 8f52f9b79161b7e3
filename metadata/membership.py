"""Membership: which nodes form the cluster and which of them are up.

A static list of peers from the configuration (every node lists every
node, itself included). Health checks probe each peer's
``/_nearstore/health`` once a second; a peer that fails two probes in a row
(or does not answer within a second) is marked down, within three seconds
of dying, and comes back at its first good probe. Every change builds a
new immutable ring (``Ring.without(down)``: only the down peers' keys move)
and swaps it in atomically; readers take ``current`` and never see a ring
half-built.

DNS discovery (a Kubernetes headless service) and the peer chunk API that
routes reads to owners build on this; see issue 6.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from metadata.ring import Node, Ring

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 1.0
FAILURES_TO_DOWN = 2


@dataclass
class PeerState:
    node: Node
    up: bool = True
    failures: int = 0
    last_ok: float = 0.0
    last_error: str = ""


@dataclass
class Membership:
    self_id: str
    base: Ring
    peers: dict[str, PeerState] = field(default_factory=dict)
    current: Ring | None = None
    version: int = 0

    @classmethod
    def static(cls, self_id: str, nodes: Sequence[Node]) -> Membership:
        ring = Ring.build(nodes)
        m = cls(self_id=self_id, base=ring)
        m.peers = {n.id: PeerState(n) for n in ring.nodes if n.id != self_id}
        m.current = ring
        return m

    @property
    def down(self) -> list[str]:
        return sorted(p.node.id for p in self.peers.values() if not p.up)

    def _rebuild(self) -> None:
        self.version += 1
        self.current = self.base.without(self.down)
        log.warning("ring v%d: down %s", self.version, self.down or "none")

    def mark(self, node_id: str, ok: bool, error: str = "") -> None:
        p = self.peers.get(node_id)
        if p is None:
            return
        if ok:
            p.failures, p.last_ok = 0, time.time()
            if not p.up:
                p.up = True
                self._rebuild()
            return
        p.failures += 1
        p.last_error = error
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
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            ) as r:
                await r.read()
                ok = r.status == 200
                error = "" if ok else f"HTTP {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # noqa: UP041
            ok, error = False, f"{type(e).__name__}: {e}"
        self.mark(p.node.id, ok, error)

    def describe(self) -> dict[str, object]:
        ring = self.current or self.base
        d = dict(ring.describe())
        d["self"] = self.self_id
        d["membership_version"] = self.version
        d["peers"] = [
            {"id": p.node.id, "address": p.node.address, "up": p.up, "failures": p.failures,
             "last_ok": p.last_ok, "last_error": p.last_error}
            for p in self.peers.values()
        ]
        return d


async def start_health_checks(m: Membership) -> tuple[asyncio.Task[None], aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    return asyncio.ensure_future(m.run_health_checks(session)), session


async def stop_health_checks(task: asyncio.Task[None], session: aiohttp.ClientSession) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await session.close()

"""What the gateway's application holds, by key. The node that builds the
application (``nearstore.node``) sets them; handlers and admin routes read
them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from nearstore.cache.peers import Nonces
from nearstore.cache.readpath import CachedBackend
from nearstore.gateway.config import Config
from nearstore.gateway.cors import Rules
from nearstore.metadata.backing import Backend
from nearstore.metadata.membership import Membership

# The cache that reads a bucket, None where it is not read through one.
CacheFor = Callable[[str], "CachedBackend | None"]


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


class Uploads:
    """Requests with a body being received: at most ``limit`` at once (each
    holds buffers and a temporary file); beyond it a request is answered
    SlowDown before its body is read."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    def try_enter(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


class Health:
    """What is wrong with the node, by part (the chunk cache, each backing
    store); ``/_nearstore/health`` says "degraded", with the reasons, while
    anything is. The node keeps serving what works."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}
        # Start-up checks still waiting for their answer (a backing store
        # that retries until its deadline), by the part they check.
        self.checking: set[str] = set()

    def describe(self) -> dict[str, object]:
        return {"status": "degraded" if self.problems else "ok", "problems": sorted(self.problems.values()),
                "checking": sorted(self.checking)}


CONFIG_KEY = web.AppKey("config", Config)
MEMBERSHIP_KEY = web.AppKey("membership", Membership)
UPLOADS_KEY = web.AppKey("uploads", Uploads)
# Peer requests' nonces seen lately (cache.peers): each is accepted once.
PEER_NONCES_KEY = web.AppKey("peer_nonces", Nonces)
BACKEND_KEY = web.AppKey("backend", Backend)
CORS_KEY = web.AppKey("cors", Rules)
CACHE_FOR_KEY: web.AppKey[CacheFor] = web.AppKey("cache_for")
INFLIGHT_KEY = web.AppKey("inflight", InFlight)
HEALTH_KEY = web.AppKey("health", Health)
# The short-circuit socket's path, when this node serves one (the owner
# process listens; workers report the owner's).
LOCALSOCK_KEY = web.AppKey("local_socket", str)

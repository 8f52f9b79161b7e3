"""What the gateway's application holds, by key. The node that builds the
application (``nearstore.node``) sets them; handlers and admin routes read
them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from nearstore.cache.readpath import CachedBackend
from nearstore.gateway.config import Config
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


CONFIG_KEY = web.AppKey("config", Config)
MEMBERSHIP_KEY = web.AppKey("membership", Membership)
BACKEND_KEY = web.AppKey("backend", Backend)
CACHE_FOR_KEY: web.AppKey[CacheFor] = web.AppKey("cache_for")
INFLIGHT_KEY = web.AppKey("inflight", InFlight)
# The short-circuit socket's path, when this node serves one (the owner
# process listens; workers report the owner's).
LOCALSOCK_KEY = web.AppKey("local_socket", str)

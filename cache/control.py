"""The node's control plane between its worker processes.

With ``--workers N`` a node is N processes serving the same port
(SO_REUSEPORT). The first is the owner: it alone fills chunks and evicts
(one writer per chunk store, one eviction policy that sees every read);
the others serve hits straight from the chunk files and ask the owner for
fills. Every process listens on a Unix socket in a private directory (``run_dir``):

- ``POST /fill``        owner: fill one chunk (single flight), answer when done
- ``POST /touch``       owner: chunk ids a worker served (for the policy)
- ``POST /hint``        owner: a loader's hint a worker received (the owner
  prefetches for all; gateway.admin checks it again there)
- ``POST /invalidate``  everyone: drop an object's cached metadata

Writes through any process invalidate every process's metadata before the
client gets its answer, so read-after-write holds across workers.
Sockets are files only root (or the node's user) can open; nothing here is
reachable from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

OWNER_SOCKET = "owner.sock"


def run_dir(data_dir: str) -> Path:
    """A short private directory for the node's sockets (a Unix socket path
    may not exceed 107 bytes, so not under an arbitrarily deep data dir),
    made if need be. In a shared /tmp another user could make it first and
    then move the owner's sockets away: it must be a real directory (not a
    link), this user's, and writable by no one else, or the node refuses to
    start (PermissionError, saying which path); one that others could only
    read is closed to them."""
    digest = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"nearstore-{digest}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022 and st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours, and nobody else could write into it: close it (an older node's 0755)
    elif not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"{path}: the node's socket directory must be a directory of this user's alone (mode 0700), and it is "
            "not (another user may have made it): remove it, or set XDG_RUNTIME_DIR to a private directory")
    return path


class Control:
    """One process's end of the control plane."""

    def __init__(self, data_dir: str, *, owner: bool) -> None:
        self.dir = run_dir(data_dir)
        self.owner = owner
        self.name = OWNER_SOCKET if owner else f"worker-{os.getpid()}.sock"
        self.on_fill: Callable[[dict[str, object]], Awaitable[int]] | None = None
        self.on_touch: Callable[[list[str]], None] | None = None
        self.on_invalidate: Callable[[str, str], None] | None = None
        self.on_hint: Callable[[dict[str, Any]], dict[str, int]] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._connectors: dict[str, aiohttp.UnixConnector] = {}

    async def start(self) -> None:
        path = self.dir / self.name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        app = web.Application()
        app.router.add_post("/fill", self._fill)
        app.router.add_post("/touch", self._touch)
        app.router.add_post("/invalidate", self._invalidate)
        app.router.add_post("/hint", self._hint)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(path)).start()
        os.chmod(path, 0o600)

    async def close(self) -> None:
        for c in self._connectors.values():
            await c.close()
        self._connectors.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            (self.dir / self.name).unlink()

    # --- server side ----------------------------------------------------------

    async def _fill(self, request: web.Request) -> web.Response:
        if self.on_fill is None:
            return web.Response(status=404)
        try:
            size = await self.on_fill(await request.json())
        except Exception as e:  # the worker falls back to the backing store
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=503)
        return web.json_response({"size": size})

    async def _touch(self, request: web.Request) -> web.Response:
        if self.on_touch is not None:
            self.on_touch(list(await request.json()))
        return web.Response(status=204)

    async def _hint(self, request: web.Request) -> web.Response:
        if self.on_hint is None:
            return web.Response(status=404)
        return web.json_response(self.on_hint(await request.json()))

    async def _invalidate(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.on_invalidate is not None:
            self.on_invalidate(str(body["bucket"]), str(body["key"]))
        return web.Response(status=204)

    # --- client side ----------------------------------------------------------

    async def _post(self, sock: str, route: str, payload: object, timeout: float) -> aiohttp.ClientResponse:
        connector = self._connectors.get(sock)
        if connector is None:
            connector = self._connectors[sock] = aiohttp.UnixConnector(path=str(self.dir / sock))
        async with aiohttp.ClientSession(connector=connector, connector_owner=False) as s:
            resp = await s.post(f"http://nearstore{route}", data=json.dumps(payload),
                                timeout=aiohttp.ClientTimeout(total=timeout))
            await resp.read()
            return resp

    async def fill(self, request: dict[str, object], timeout: float = 120.0) -> int:
        resp = await self._post(OWNER_SOCKET, "/fill", request, timeout)
        if resp.status != 200:
            raise OSError(f"owner could not fill: {resp.status}")
        return int((await resp.json())["size"])

    async def hint(self, doc: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Hand a hint to the owner; its answer (OSError when it has none)."""
        try:
            resp = await self._post(OWNER_SOCKET, "/hint", doc, timeout)
            if resp.status != 200:
                raise OSError(f"owner answered {resp.status}")
            answer = await resp.json()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise OSError(f"owner unreachable: {e}") from e
        return dict(answer)

    async def touch(self, ids: list[str]) -> None:
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            await self._post(OWNER_SOCKET, "/touch", ids, 5.0)

    async def broadcast_invalidate(self, bucket: str, key: str) -> None:
        """Tell every other process; best effort, bounded: a process that
        does not answer within a second is dead or about to be."""
        others = [p.name for p in self.dir.glob("*.sock") if p.name != self.name]
        if not others:
            return

        async def one(sock: str) -> None:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                await self._post(sock, "/invalidate", {"bucket": bucket, "key": key}, 1.0)

        await asyncio.gather(*(one(s) for s in others))

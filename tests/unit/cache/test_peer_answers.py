"""Peer answers are authenticated (security review): over plain HTTP a
chunk's bytes must hash to a sum the owner signed for that very request.
A byte changed on the wire, or an answer replayed from another request, is
found at the answer's end (PeerTampered: the response those bytes went
into fails, never completes); an answer without a sum fails before its
first byte; a chunk read ahead (held whole) is checked before a byte goes
on and is a failed peer like any other."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import xxhash
from aiohttp import web
from aiohttp.test_utils import TestServer

from nearstore.cache import peers
from nearstore.cache.errors import PeerFailed, PeerTampered
from nearstore.cache.readpath import CachedHandle
from nearstore.metadata.backing import ObjectInfo
from nearstore.metadata.membership import Membership
from nearstore.metadata.ring import Node

SECRET = "cluster-secret"
DATA = bytes(range(256)) * 4096  # 1 MiB


def owner_app(answer: Callable[[web.Request, bytes], tuple[bytes, str | None]]) -> web.Application:
    """A fake owner: answers bytes start..end of DATA with the sum
    ``answer`` makes of them (what it does to the bytes or the sum is the
    test's fault)."""

    async def chunk(request: web.Request) -> web.Response:
        start, end = int(request.query["start"]), int(request.query["end"])
        body, header = answer(request, DATA[start:end])
        headers = {peers.SUM_HEADER: header} if header is not None else {}
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/_nearstore/peer/chunk", chunk)
    return app


def honest(request: web.Request, body: bytes) -> tuple[bytes, str]:
    nonce = peers.nonce_of(request.headers[peers.AUTH_HEADER])
    start, end = int(request.query["start"]), int(request.query["end"])
    return body, peers.answer_sum(SECRET, nonce, "owner", start, end, xxhash.xxh3_64(body).hexdigest())


Answer = Callable[[web.Request, bytes], tuple[bytes, str | None]]


@contextlib.asynccontextmanager
async def owner_cluster(answer: Answer) -> AsyncIterator[tuple[peers.Cluster, Node]]:
    server = TestServer(owner_app(answer), host="127.0.0.1")
    await server.start_server()
    owner = Node("owner", str(server.make_url("")))
    cluster = peers.Cluster(Membership.static("me", [Node("me", "http://127.0.0.1:1"), owner]), SECRET)
    await cluster.start()
    try:
        yield cluster, owner
    finally:
        await cluster.close()
        await server.close()


async def fetch_all(answer: Answer, start: int = 0, end: int = len(DATA),
                    got: list[bytes] | None = None) -> list[bytes]:
    got = [] if got is None else got
    async with owner_cluster(answer) as (cluster, owner):
        async for piece in cluster.fetch(owner, "b", "k", "etag", 0, start, end):
            got.append(piece)
    return got


async def read_ahead(answer: Answer) -> bytes:
    """A chunk read ahead by a cached read (CachedHandle._fetch_remote)."""
    async with owner_cluster(answer) as (cluster, owner):
        cb = SimpleNamespace(cluster=cluster)
        handle = CachedHandle(cb, "b", "k", ObjectInfo(key="k", size=len(DATA), etag="etag",  # type: ignore[arg-type]
                                                       last_modified=0.0))
        return await handle._fetch_remote(owner, 0, 0, len(DATA))


async def test_an_honest_answer_is_passed_on() -> None:
    assert b"".join(await fetch_all(honest)) == DATA
    assert b"".join(await fetch_all(honest, 1000, 5000)) == DATA[1000:5000]
    assert await read_ahead(honest) == DATA


@pytest.mark.parametrize("fault", ["flipped byte", "sum of the flipped bytes unsigned",
                                   "other request's sum", "other owner's sum"])
async def test_a_tampered_answer_fails_at_its_end(fault: str) -> None:
    def tampered(request: web.Request, body: bytes) -> tuple[bytes, str | None]:
        good_body, good_sum = honest(request, body)
        bad = bytearray(good_body)
        bad[len(bad) // 2] ^= 1
        digest = xxhash.xxh3_64(bytes(bad)).hexdigest()
        start, end = int(request.query["start"]), int(request.query["end"])
        if fault == "flipped byte":
            return bytes(bad), good_sum
        if fault == "sum of the flipped bytes unsigned":
            return bytes(bad), f"{digest}.{good_sum.partition('.')[2]}"
        if fault == "other request's sum":  # a recorded answer to another request
            return good_body, peers.answer_sum(SECRET, "0" * 24, "owner", start, end,
                                               xxhash.xxh3_64(good_body).hexdigest())
        nonce = peers.nonce_of(request.headers[peers.AUTH_HEADER])
        return good_body, peers.answer_sum(SECRET, nonce, "another", start, end,
                                           xxhash.xxh3_64(good_body).hexdigest())

    with pytest.raises(PeerTampered, match="not what the owner signed"):
        await fetch_all(tampered)
    with pytest.raises(PeerFailed, match="not what the owner signed"):
        await read_ahead(tampered)


async def test_an_answer_without_a_sum_fails_before_its_first_byte() -> None:
    got: list[bytes] = []
    with pytest.raises(PeerFailed, match="without the owner's signed sum"):
        await fetch_all(lambda request, body: (body, None), got=got)
    assert got == []


@pytest.fixture
async def chunk_file(tmp_path: Path) -> AsyncIterator[int]:
    path = tmp_path / "chunk"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.mark.parametrize(("start", "end"), [(0, len(DATA)), (0, 1), (4095, 4097), (70000, len(DATA)),
                                            (12345, 12345), (len(DATA) - 3, len(DATA))])
async def test_the_owner_hashes_exactly_the_bytes_it_sends(chunk_file: int, start: int, end: int) -> None:
    whole = xxhash.xxh3_64(DATA).hexdigest()
    handle = peers.ChunkFileHandle(os.dup(chunk_file), start, end, whole, len(DATA))
    try:
        assert await handle.digest() == xxhash.xxh3_64(DATA[start:end]).hexdigest()
    finally:
        await handle.close()

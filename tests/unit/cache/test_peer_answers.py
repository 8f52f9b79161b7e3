"""Peer answers are authenticated (security review): over plain HTTP a
chunk's bytes reach the reader only when they hash to a sum the owner
signed for that very request. A byte changed on the wire, a missing sum,
or an answer replayed from another request is a failed peer (the reader
then serves the chunk from the backing store), never bytes passed on."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import xxhash
from aiohttp import web
from aiohttp.test_utils import TestServer

from nearstore.cache import peers
from nearstore.cache.errors import PeerFailed
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


async def fetch_all(answer: Callable[[web.Request, bytes], tuple[bytes, str | None]],
                    start: int = 0, end: int = len(DATA)) -> list[bytes]:
    server = TestServer(owner_app(answer), host="127.0.0.1")
    await server.start_server()
    owner = Node("owner", str(server.make_url("")))
    cluster = peers.Cluster(Membership.static("me", [Node("me", "http://127.0.0.1:1"), owner]), SECRET)
    await cluster.start()
    got: list[bytes] = []
    try:
        async for piece in cluster.fetch(owner, "b", "k", "etag", 0, start, end):
            got.append(piece)
        return got
    finally:
        await cluster.close()
        await server.close()


async def test_an_honest_answer_is_passed_on() -> None:
    assert b"".join(await fetch_all(honest)) == DATA
    assert b"".join(await fetch_all(honest, 1000, 5000)) == DATA[1000:5000]


@pytest.mark.parametrize("fault", ["flipped byte", "no sum", "sum of the flipped bytes unsigned",
                                   "other request's sum", "other owner's sum"])
async def test_a_tampered_answer_yields_nothing(fault: str) -> None:
    def tampered(request: web.Request, body: bytes) -> tuple[bytes, str | None]:
        good_body, good_sum = honest(request, body)
        bad = bytearray(good_body)
        bad[len(bad) // 2] ^= 1
        digest = xxhash.xxh3_64(bytes(bad)).hexdigest()
        start, end = int(request.query["start"]), int(request.query["end"])
        if fault == "flipped byte":
            return bytes(bad), good_sum
        if fault == "no sum":
            return good_body, None
        if fault == "sum of the flipped bytes unsigned":
            return bytes(bad), f"{digest}.{good_sum.partition('.')[2]}"
        if fault == "other request's sum":  # a recorded answer to another request
            return good_body, peers.answer_sum(SECRET, "0" * 24, "owner", start, end,
                                               xxhash.xxh3_64(good_body).hexdigest())
        nonce = peers.nonce_of(request.headers[peers.AUTH_HEADER])
        return good_body, peers.answer_sum(SECRET, nonce, "another", start, end,
                                           xxhash.xxh3_64(good_body).hexdigest())

    got: list[bytes] = []
    with pytest.raises(PeerFailed, match="not what the owner signed"):
        got = await fetch_all(tampered)
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

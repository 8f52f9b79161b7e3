"""clients/direct.py against a real three-node cluster in front of moto: each
chunk read from its owner (no peer hop on any node), the same bytes as a
plain read, failover when an owner dies mid-read, ObjectChanged on an
overwrite mid-read, plain reads for a bucket that is not cached; and the
ring route's ``?bucket=`` answer the reader relies on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from nearstore.clients import direct, ranged
from nearstore.clients.connect import connect
from nearstore.clients.direct import ClusterView, DirectReader
from nearstore.clients.ranged import ObjectChanged, Span
from nearstore.metadata.identity import chunk_id
from nearstore.metadata.ring import Node, Ring
from tests.helpers.procs import BIN, moto_server, wait_ready
from tests.helpers.servers import S3Server, free_port

MiB = 1024 * 1024
OTHER = ("dr-other-tenant", "dr-other-tenant-secret")  # a user who owns nothing here
CACHED = "direct-data"  # mapped to moto, read through the cache
LOCAL = "direct-local"  # each node's own local store: not cached
ENV = {"NEARSTORE_ACCESS_KEY": "dr-access", "NEARSTORE_SECRET_KEY": "dr-secret",
       "NEARSTORE_CLUSTER_SECRET": "direct-cluster-secret"}

pytestmark = pytest.mark.timeout(60)


class Nodes:
    """Three cache nodes, one ring, ``CACHED`` on a moto server."""

    def __init__(self, tmp: Path, moto: str) -> None:
        self.tmp, self.moto = tmp, moto
        self.ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def node_id(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def start(self, i: int) -> None:
        port = self.ports[i]
        conf = self.tmp / f"node{i}.toml"
        conf.write_text(
            f'[[buckets]]\nname = "{CACHED}"\nendpoint = "{self.moto}"\naccess_key = "x"\nsecret_key = "x"\n'
            '[cache]\nchunk_size = "1MiB"\nsize = "256MiB"\n'
            f'[[users]]\nname = "other"\nkeys = [{{ access_key = "{OTHER[0]}", secret_key = "{OTHER[1]}" }}]\n'
            "[cluster]\npeers = [" + ", ".join(f'"{self.url(j)}"' for j in range(3)) + "]\n")
        with open(self.tmp / f"node{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                [str(BIN / "nearstore"), "serve", "--port", str(port), "--data-dir", str(self.tmp / f"data{i}"),
                 "--config", str(conf)], env={**os.environ, **ENV}, stderr=log)
        wait_ready(f"{self.url(i)}/_nearstore/health", self.procs[i])

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(10)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def ring(self, i: int, bucket: str | None = None) -> dict[str, Any]:
        query = f"?bucket={bucket}" if bucket is not None else ""
        with urllib.request.urlopen(f"{self.url(i)}/_nearstore/ring{query}", timeout=5) as r:
            doc: dict[str, Any] = json.loads(r.read())
        return doc

    def wait_ring(self, i: int, down: set[str], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while {n["id"] for n in self.ring(i)["nodes"] if n["down"]} != down:
            assert time.monotonic() < deadline, self.ring(i)
            time.sleep(0.1)

    def peer_bytes(self) -> list[float]:
        out = []
        for i in self.procs:
            if self.procs[i].poll() is not None:
                continue
            with urllib.request.urlopen(f"{self.url(i)}/_nearstore/metrics", timeout=5) as r:
                text = r.read().decode()
            out += [float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("nearstore_bytes_from_peers_total ")]
        return out

    def client(self, i: int) -> Any:
        return connect(self.url(i), access_key=ENV["NEARSTORE_ACCESS_KEY"], secret_key=ENV["NEARSTORE_SECRET_KEY"])


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    with moto_server() as moto:
        n = Nodes(tmp_path_factory.mktemp("direct"), moto)
        try:
            for i in range(3):
                n.start(i)
            for i in range(3):
                n.wait_ring(i, set())
            # A bucket mapped by name is the upstream's own: made there.
            connect(moto, access_key="x", secret_key="x").create_bucket(Bucket=CACHED)
            n.client(0).create_bucket(Bucket=LOCAL)
            yield n
        finally:
            n.stop()


def put(nodes: Nodes, key: str, size: int, bucket: str = CACHED) -> bytes:
    data = os.urandom(size)
    nodes.client(0).put_object(Bucket=bucket, Key=key, Body=data)
    return data


def owners(nodes: Nodes, key: str, size: int, down: tuple[str, ...] = ()) -> list[str]:
    """Each chunk's owner, computed here from the configuration alone."""
    ring = Ring.build([Node(nodes.node_id(i), nodes.url(i)) for i in range(3)]).without(down)
    etag = nodes.client(0).head_object(Bucket=CACHED, Key=key)["ETag"]
    return [ring.owner(chunk_id(f"s3:{nodes.moto}", CACHED, key, etag, MiB, index)).id
            for index in range(-(-size // MiB))]


class Hooked(DirectReader):
    """Runs ``after(n)`` (off the reader's loop) once the n-th range is read."""

    def __init__(self, s3: Any, after: Callable[[int], None], **kw: Any) -> None:
        super().__init__(s3, **kw)
        self.after, self.done = after, 0

    async def _fetch(self, read: Any, span: Span) -> None:
        await super()._fetch(read, span)
        self.done += 1
        await asyncio.to_thread(self.after, self.done)


def test_ring_route_describes_a_bucket(nodes: Nodes) -> None:
    assert "bucket" not in nodes.ring(0)
    doc = nodes.ring(1, CACHED)
    assert doc["bucket"] == {"name": CACHED, "cached": True, "store": f"s3:{nodes.moto}", "chunk_size": MiB}
    assert doc["self"] == nodes.node_id(1) and len(doc["nodes"]) == 3
    assert nodes.ring(1, LOCAL)["bucket"] == {"name": LOCAL, "cached": False}
    assert nodes.ring(1, "odd%20name%2F")["bucket"]["name"] == "odd name/"


def test_each_chunk_comes_from_its_owner(nodes: Nodes, tmp_path: Path) -> None:
    size = 13 * MiB + 7
    data = put(nodes, "dir/sub dir/obj+1", size)
    chunk_owners = owners(nodes, "dir/sub dir/obj+1", size)
    expected = Counter(chunk_owners)
    assert len(expected) == 3, "the chunks of this object should land on every node"
    before = nodes.peer_bytes()
    reader = DirectReader(nodes.client(0), streams=4)
    assert bytes(reader.read_into(CACHED, "dir/sub dir/obj+1")) == data  # cold: each owner fills its own
    assert reader.read_bytes(CACHED, "dir/sub dir/obj+1") == data  # warm
    assert direct.download(nodes.client(0), CACHED, "dir/sub dir/obj+1", tmp_path / "out", streams=3) == size
    assert (tmp_path / "out").read_bytes() == data
    assert reader.sent == {nodes.url(0) if node == nodes.node_id(0) else node: 2 * n for node, n in expected.items()}
    assert reader.failovers == 0
    # No node fetched a chunk from another: every range went to its owner.
    assert nodes.peer_bytes() == before
    # A plain ranged read through node 0 does take the peer hop (the counter works).
    assert ranged.read_bytes(nodes.client(0), CACHED, "dir/sub dir/obj+1", chunk=MiB, local=False) == data
    remote = sum(min(MiB, size - i * MiB) for i, o in enumerate(chunk_owners) if o != nodes.node_id(0))
    assert sum(nodes.peer_bytes()) - sum(before) == remote


def test_another_tenant_is_denied_by_every_node_warm_chunks_included(nodes: Nodes) -> None:
    """CACHED is the first user's. Warm on every owner, a reader with
    another tenant's key is refused by each node it asks, whether the
    chunk is local to that node or a peer's: the decision is made where the
    request arrives, and peers are only asked by a node that made it."""
    data = put(nodes, "tenant", 3 * MiB + 1)
    assert DirectReader(nodes.client(0), streams=3).read_bytes(CACHED, "tenant") == data  # warm, from owners
    for i in range(3):
        other = connect(nodes.url(i), access_key=OTHER[0], secret_key=OTHER[1])
        for read in (lambda c=other: ranged.read_bytes(c, CACHED, "tenant", chunk=MiB, local=False),
                     lambda c=other: c.get_object(Bucket=CACHED, Key="tenant")["Body"].read(),
                     lambda c=other: c.list_objects_v2(Bucket=CACHED)):
            with pytest.raises(ClientError) as e:
                read()
            # (A HEAD's answer has no body: botocore names it by its status.)
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403, e.value.response
            assert e.value.response["Error"]["Code"] in ("AccessDenied", "403"), e.value.response
        assert CACHED not in {b["Name"] for b in other.list_buckets()["Buckets"]}


async def test_async_readers(nodes: Nodes, tmp_path: Path) -> None:
    data = put(nodes, "async", 5 * MiB + 3)
    s3 = nodes.client(1)
    buf = bytearray(6 * MiB)
    view = await direct.aread_into(s3, CACHED, "async", buf, streams=3)
    assert len(view) == len(data) and bytes(view) == data
    assert await ranged.aread_bytes(s3, CACHED, "async", streams=2, chunk=MiB, local=False) == data
    assert await direct.aread_bytes(s3, CACHED, "async") == data
    assert await direct.adownload(s3, CACHED, "async", tmp_path / "a") == len(data)
    assert (tmp_path / "a").read_bytes() == data
    with pytest.raises(ValueError):
        await direct.aread_into(s3, CACHED, "async", bytearray(10))


def test_a_bucket_that_is_not_cached_is_read_through_the_node(nodes: Nodes) -> None:
    data = put(nodes, "local", 3 * MiB + 1, bucket=LOCAL)  # only on node 0's own disk
    reader = DirectReader(nodes.client(0), streams=3, chunk=MiB)
    assert reader.read_bytes(LOCAL, "local") == data
    assert reader.sent == {nodes.url(0): 4}


def test_one_node_ring_and_changes_of_membership() -> None:
    view = ClusterView(connect("http://127.0.0.1:1"))
    one: dict[str, Any] = {"self": "a:1", "version": 0, "membership_version": 0, "algorithm": "multiprobe", "params": {},
           "nodes": [{"id": "a:1", "address": "http://a:1", "weight": 1.0, "down": False}],
           "bucket": {"name": "b", "cached": True, "store": "s", "chunk_size": MiB}}
    assert view._layout(one) is None
    nodes = [{"id": f"{h}:1", "address": f"http://{h}:1", "weight": 1.0, "down": h == "c"} for h in "abc"]
    three = {**one, "nodes": nodes}
    lay = view._layout(three)
    assert lay is not None and lay.ring.down == {"c:1"} and lay.chunk_size == MiB
    again = view._layout(dict(three))
    assert again is not None and again.ring is lay.ring  # same membership: not rebuilt
    changed = view._layout({**three, "membership_version": 1, "nodes": [{**n, "down": False} for n in nodes]})
    assert changed is not None and changed.ring is not lay.ring and not changed.ring.down
    assert view._layout({**three, "bucket": {"name": "b", "cached": False}}) is None
    assert view.layout("b") is None  # nothing listens there: plain reads


def test_object_changed_mid_read(nodes: Nodes) -> None:
    put(nodes, "changing", 6 * MiB)

    def overwrite(n: int) -> None:
        if n == 1:
            nodes.client(2).put_object(Bucket=CACHED, Key="changing", Body=os.urandom(6 * MiB))

    with pytest.raises(ObjectChanged):
        Hooked(nodes.client(0), overwrite, streams=1).read_bytes(CACHED, "changing")


def test_an_owner_killed_mid_read(nodes: Nodes) -> None:
    size, dead = 24 * MiB, nodes.node_id(2)
    for _ in range(5):  # until node 2 owns chunks read well after the kill (almost always at once)
        data = put(nodes, "kill", size)
        if dead in owners(nodes, "kill", size)[6:]:
            break
    s3 = nodes.client(0)

    def kill(n: int) -> None:
        if n == 3:
            nodes.kill(2)

    reader = Hooked(s3, kill, streams=2)
    try:
        assert reader.read_bytes(CACHED, "kill") == data
        assert reader.failovers >= 1 and nodes.procs[2].poll() is not None
        # Suspect now: its chunks go through node 0 without trying it again.
        again = DirectReader(s3, streams=2)
        assert again.read_bytes(CACHED, "kill") == data and again.failovers == 0
        assert dead not in again.sent
        # Once the nodes mark it down, a fresh reader routes around it as they do:
        # straight to each chunk's next owner, no peer hop anywhere.
        nodes.wait_ring(0, {dead})
        nodes.wait_ring(1, {dead})
        fresh = DirectReader(s3, streams=2, view=ClusterView(s3))
        before = nodes.peer_bytes()
        assert fresh.read_bytes(CACHED, "kill") == data
        assert fresh.failovers == 0 and dead not in fresh.sent
        expected = Counter(owners(nodes, "kill", size, down=(dead,)))
        assert fresh.sent == {nodes.url(0) if k == nodes.node_id(0) else k: v for k, v in expected.items()}
        assert nodes.peer_bytes() == before
    finally:
        if nodes.procs[2].poll() is not None:
            nodes.start(2)
            for i in range(3):
                nodes.wait_ring(i, set())


def test_ranged_reads_over_tls(nearstore_tls_server: S3Server, tmp_path: Path) -> None:
    s3 = nearstore_tls_server.client()
    s3.create_bucket(Bucket="ranged-tls")
    data = os.urandom(3 * MiB + 5)
    s3.put_object(Bucket="ranged-tls", Key="k", Body=data)
    assert ranged.read_bytes(s3, "ranged-tls", "k", streams=3, chunk=MiB, local=False) == data
    assert ranged.download(s3, "ranged-tls", "k", tmp_path / "k", chunk=MiB) == len(data)
    assert (tmp_path / "k").read_bytes() == data


def test_a_missing_object_and_a_cancelled_read(nodes: Nodes) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError):
        direct.read_bytes(nodes.client(0), CACHED, "no such key")
    data = put(nodes, "cancel", 32 * MiB)
    buf = bytearray(32 * MiB)

    class Signals(ranged.RangedReader):
        async def _fetch(self, read: Any, span: Span) -> None:
            await super()._fetch(read, span)
            started.set()

    async def cancel_soon() -> None:
        reader = Signals(nodes.client(1), streams=2, chunk=MiB, local=False)  # the HTTP path
        task = asyncio.ensure_future(reader.aread_into(CACHED, "cancel", buf))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert 0 < sum(reader.sent.values()) < 32

    started = asyncio.Event()
    asyncio.run(cancel_soon())
    snapshot = bytes(buf)
    time.sleep(0.3)
    assert bytes(buf) == snapshot  # nothing writes into the buffer after the cancellation
    assert bytes(ranged.read_into(nodes.client(1), CACHED, "cancel", buf, local=False)) == data


@pytest.mark.parametrize("fault", ["fail", "reset_response", "truncate_response", "drop"])
def test_ranged_reads_survive_a_fault(nodes: Nodes, fault: str) -> None:
    from tests.helpers.faultproxy import FaultProxy

    data = put(nodes, f"fault-{fault}", 3 * MiB + 11)
    with FaultProxy("127.0.0.1", nodes.ports[0]) as proxy:
        s3 = connect(proxy.url, access_key=ENV["NEARSTORE_ACCESS_KEY"], secret_key=ENV["NEARSTORE_SECRET_KEY"])
        kw = {"after": 300_000} if fault in ("reset_response", "truncate_response") else {}
        getattr(proxy, fault)(times=1, method="GET", **kw)
        assert ranged.read_bytes(s3, CACHED, f"fault-{fault}", streams=1, chunk=MiB, local=False) == data
        gets = proxy.events(method="GET")
        assert len(gets) == 5, [(e.action, e.status) for e in gets]  # 4 ranges and one again
        assert all(e.headers.get("if-match") for e in gets)

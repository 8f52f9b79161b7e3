"""``nearstore bench faults``: each fault under concurrent load on a 3-node
cluster in front of a real backing store, and a table of what clients saw.

A row: client threads (boto3, default settings: its retries are what a
training job has) read and write through the nodes, each thread on one
node, for ``--seconds``; the fault is injected; it holds; it is healed; the
load goes on until every node served a request after the heal, and
``--seconds`` more; then every write that was acknowledged is read back.

Columns:

- requests: client requests (a multipart upload counts once);
- errors: requests that failed visibly (after boto3's retries); expected
  ones are those the fault explains (requests to a killed node; 503s from a
  failing store, ...: `Fault.expected`), the rest are counted apart as
  unexpected and named;
- corrupt bytes: bytes a client received that were not the object's (must
  be 0): every read is compared byte for byte (harness.content);
- lost writes: acknowledged PUTs and CompleteMultipartUploads that do not
  read back exactly after the heal (must be 0);
- recover s: seconds from the heal until the last failed request ended:
  from then on requests succeed again (0: nothing failed after the heal).

Exit status 1 when any row has corrupt bytes or lost writes.

Where a fault needs a disk that fills up it mounts a small tmpfs, which
needs root; without it the row is skipped and says why.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import math
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from nearstore.bench import harness
from nearstore.bench.harness import (
    BUCKET,
    CONNECTION_KINDS,
    FAULT_TIMEOUTS,
    Cluster,
    ClusterSpec,
    KiB,
    MiB,
    Node,
    Op,
    Recorder,
    Threads,
    Tmpfs,
    Version,
    error_kind,
    get_checked,
    put_checked,
    s3_client,
    upload,
    wait_until,
)

MULTIPART_PART = 5 * MiB  # S3's smallest part but the last
_seeds = itertools.count(1 << 24)  # every write its own content


@dataclass
class Options:
    seconds: float = 2.0  # steady load before the fault and after recovery
    clients: int = 4
    backing: str = "seaweedfs"
    seed: int = 1


@dataclass
class Context:
    """What a fault works with during its row."""

    fault: str
    cluster: Cluster
    rec: Recorder
    opts: Options
    victim: int  # the node the fault aims at
    urls: list[str]  # where client i sends its requests: urls[i % len(urls)]
    warm: list[Version]
    cold: list[Version] = field(default_factory=list)
    t_fault: float = 0.0
    t_heal: float = 0.0
    notes: list[str] = field(default_factory=list)
    writes: list[tuple[Version, bool]] = field(default_factory=list)  # (version, acknowledged)
    lock: threading.Lock = field(default_factory=threading.Lock)
    load: Threads | None = None
    _cold_next: int = 0
    _local: threading.local = field(default_factory=threading.local)

    def client(self, target: int) -> Any:
        """This thread's boto3 client for target ``target``."""
        cache: dict[str, Any] | None = getattr(self._local, "clients", None)
        if cache is None:
            cache = self._local.clients = {}
        url = self.urls[target]
        if url not in cache:
            cache[url] = s3_client(url)
        return cache[url]

    def next_cold(self, rng: random.Random) -> Version:
        """The next object nobody has read yet, or any cold one once all were."""
        with self.lock:
            i = self._cold_next
            self._cold_next += 1
        return self.cold[i] if i < len(self.cold) else rng.choice(self.cold)

    def wrote(self, version: Version, acked: bool) -> None:
        with self.lock:
            self.writes.append((version, acked))

    @property
    def node(self) -> Node:
        return self.cluster.nodes[self.victim]


# -- the load ----------------------------------------------------------------------------

DEFAULT_MIX = {"get": 0.5, "range": 0.15, "put": 0.2, "own": 0.15}


def _choose(rng: random.Random, mix: dict[str, float]) -> str:
    return rng.choices(list(mix), weights=list(mix.values()))[0]


def _load(ctx: Context, mix: dict[str, float], put_sizes: tuple[int, int]) -> Threads:
    def body(i: int, stop: threading.Event) -> None:
        rng = random.Random(ctx.opts.seed * 1000 + i)
        target = i % len(ctx.urls)
        mine: list[Version] = []
        seq = 0
        while not stop.is_set():
            threads.checkpoint(i)
            kind = _choose(rng, mix)
            if kind == "own" and not mine:
                kind = "get"
            op = Op(kind, target, i, time.monotonic())
            s3 = ctx.client(target)
            if kind in ("get", "range", "cold", "own"):
                v = (ctx.next_cold(rng) if kind == "cold" and ctx.cold
                     else rng.choice(mine) if kind == "own" else rng.choice(ctx.warm))
                span = None
                if kind == "range" and v.size > 1:
                    a = rng.randrange(v.size)
                    span = (a, min(v.size - 1, a + rng.randrange(1, 2 * MiB)))
                op.detail = v.key
                get_checked(s3, v.key, [v.body()], op, span)
            elif kind in ("put", "multipart"):
                seq += 1
                key = f"{ctx.fault}/{'w' if kind == 'put' else 'mp'}/n{target}/c{i}/{seq}"
                size = (rng.randint(*put_sizes) if kind == "put"
                        else MULTIPART_PART + rng.randint(1, MiB))
                v = Version(key, next(_seeds), size)
                op.detail = key
                acked = put_checked(s3, v, op, None if kind == "put" else MULTIPART_PART)
                ctx.wrote(v, acked)
                if acked:
                    mine.append(v)
            ctx.rec.add(op)

    threads = Threads(body, ctx.opts.clients)
    return threads


# -- faults ------------------------------------------------------------------------------


class Fault:
    """One row. The runner calls prepare (no load), then under load inject,
    waits ``hold_s``, heal; then finish (no load). ``expected`` says which
    failed requests the fault explains."""

    name: ClassVar[str]
    help: ClassVar[str]
    hold_s: ClassVar[float] = 3.0
    mix: ClassVar[dict[str, float]] = DEFAULT_MIX
    put_sizes: ClassVar[tuple[int, int]] = (4 * KiB, 1536 * KiB)
    cold: ClassVar[tuple[int, int]] = (0, 0)  # (objects, bytes each) not yet read by anyone

    def unavailable(self, cluster: Cluster) -> str | None:
        return None

    def prepare(self, ctx: Context) -> None:
        """Before the load (not measured)."""

    def inject(self, ctx: Context) -> None: ...

    def heal(self, ctx: Context) -> None: ...

    def finish(self, ctx: Context) -> None:
        """After the load, before the writes are read back."""

    def extra(self, ctx: Context) -> list[Callable[[threading.Event], None]]:
        """Client loops of the fault's own, beside the load."""
        return []

    def expected(self, ctx: Context, op: Op) -> bool:
        return False


FAULTS: dict[str, type[Fault]] = {}


def fault(cls: type[Fault]) -> type[Fault]:
    FAULTS[cls.name] = cls
    return cls


class _NodeDown(Fault):
    """A fault that takes the victim node down; healed by starting it again."""

    hold_s = 1.0

    def heal(self, ctx: Context) -> None:
        if not ctx.node.alive():
            ctx.node.start()

    def expected(self, ctx: Context, op: Op) -> bool:
        """A request to the node that went down, from then until it served
        again, failing the way a dead server fails. Never a request of the
        fault's own probes (sigterm-drain's in-flight ones)."""
        return (op.node == ctx.victim and op.t1 >= ctx.t_fault and op.error in CONNECTION_KINDS
                and not op.kind.startswith("drain"))


def _killer(ctx: Context) -> tuple[threading.Event, Callable[[], None]]:
    """A kill -9 of the victim to run from a proxy's rule, noting when; only
    the first call of a rule that fires more than once kills."""
    killed = threading.Event()

    def kill() -> None:
        if killed.is_set():
            return
        ctx.t_fault = time.monotonic()
        ctx.node.signal(9)
        killed.set()

    return killed, kill


class _KillHeld(_NodeDown):
    """kill -9 of the victim while one of its requests is held at the
    backing store's proxy (so it is surely in flight)."""

    method: ClassVar[str]
    query: ClassVar[str | None] = None
    prefix: ClassVar[str]

    def inject(self, ctx: Context) -> None:
        proxy = ctx.cluster.backing_proxy
        assert proxy is not None
        killed, kill = _killer(ctx)
        path = f"/{BUCKET}/{ctx.fault}/{self.prefix}/n{ctx.victim}/"
        rule = proxy.delay(0.5, times=1, method=self.method, path=path, query=self.query,
                           on_fire=kill)
        wait_until(killed.is_set, 30, f"a {self.method} of node {ctx.victim} in flight")
        ctx.node.kill()
        ctx.notes.append(f"killed node {ctx.victim} with its {self.method} held upstream "
                         f"({rule.fired} held)")


@fault
class KillDuringPut(_KillHeld):
    name = "kill-put"
    help = "kill -9 of a node while a PUT through it is in flight"
    mix = {"get": 0.4, "put": 0.45, "own": 0.15}
    method, prefix = "PUT", "w"


@fault
class KillDuringComplete(_KillHeld):
    name = "kill-complete"
    help = "kill -9 of a node during CompleteMultipartUpload"
    mix = {"get": 0.5, "multipart": 0.35, "own": 0.15}
    method, query, prefix = "POST", "uploadId=", "mp"


def _slow_fills(ctx: Context, stall_s: float = 0.4) -> None:
    """Every fill of a cold object stalls a moment 256 KiB in: fills (and
    the peer streams that follow them) last long enough to be cut."""
    assert ctx.cluster.backing_proxy is not None
    ctx.cluster.backing_proxy.stall_response(after=256 * KiB, seconds=stall_s, method="GET",
                                             path=f"/{BUCKET}/{ctx.fault}/cold/")


def _temp_files(node: Node) -> int:
    tmp = node.cache_dir / "tmp"
    return sum(1 for _ in tmp.iterdir()) if tmp.exists() else 0


@fault
class KillDuringFills(_NodeDown):
    name = "kill-fill"
    help = "kill -9 of a node while it fills chunks from the backing store (cold reads)"
    mix = {"cold": 0.8, "get": 0.2}
    cold = (40, 3 * MiB)

    def prepare(self, ctx: Context) -> None:
        _slow_fills(ctx)

    def inject(self, ctx: Context) -> None:
        wait_until(lambda: _temp_files(ctx.node) > 0, 30, f"a fill in progress on node {ctx.victim}",
                   step=0.01)
        ctx.t_fault = time.monotonic()
        ctx.node.kill()
        ctx.notes.append(f"fills cut on node {ctx.victim}: {_temp_files(ctx.node)} temp files")

    def heal(self, ctx: Context) -> None:
        ctx.node.start()
        ctx.notes.append(f"temp files after restart: {_temp_files(ctx.node)}")


@fault
class KillPeerMidStream(_NodeDown):
    """kill -9 of the victim the moment 64 KiB of a chunk it serves to a peer
    have passed its relay, which then ends that stream there (FIN).

    Why the relay cuts it: on loopback an owner hands a whole cached chunk
    to the kernel (sendfile) long before a kill can land, and a killed
    process's socket still delivers what it had written; the asker would
    get the whole chunk and the mid-stream path would never run. Over a
    real link the owner is still writing when it dies, and the asker sees
    exactly this: part of the chunk, then the connection's end."""

    name = "kill-peer-stream"
    help = "kill -9 of a node while it streams a chunk to another node"
    mix = {"get": 0.8, "range": 0.2}

    def inject(self, ctx: Context) -> None:
        killed, kill = _killer(ctx)
        relay = ctx.cluster.relays[ctx.victim]
        relay.clear_log()
        # Every chunk answer, not just the next one: a rule is spent by the
        # request it matched, and the next may be a range shorter than 64 KiB,
        # which ends before the rule can fire.
        relay.truncate_response(after=64 * KiB, times=None, method="GET",
                                path="/_nearstore/peer/chunk", on_fire=kill)
        try:
            wait_until(killed.is_set, 30, f"node {ctx.victim} streaming a chunk to a peer")
        except TimeoutError:
            seen = Counter(f"{e.method} {e.path} -> {e.status} ({e.response_bytes} B)"
                           for e in relay.events() if "/peer/" in e.path)
            ctx.notes.append(f"peer requests to node {ctx.victim} meanwhile: "
                             f"{dict(seen.most_common(5)) or 'none'}")
            raise
        ctx.node.kill()
        cut = [e for e in relay.events() if e.action == "truncate_response" and e.error]
        ctx.notes.append(f"chunk stream to a peer cut after {cut[0].response_bytes if cut else '?'} "
                         "bytes")

    def heal(self, ctx: Context) -> None:
        ctx.cluster.relays[ctx.victim].clear()  # before the node is back
        super().heal(ctx)


@fault
class SigtermDrain(_NodeDown):
    """SIGTERM with requests in flight: a slow GET of a 16 MiB object and a
    slow PUT of 4 MiB, each well under way (and too big for the socket
    buffers to hide) when the signal comes. They must complete; requests
    that arrive after it may be refused."""

    name = "sigterm-drain"
    help = "SIGTERM of a node with requests in flight: they complete, new ones are refused"
    hold_s = 0.0
    PROBE_GET = 16 * MiB
    PROBE_PUT = 4 * MiB

    def prepare(self, ctx: Context) -> None:
        self.get_v = Version(f"{ctx.fault}/probe-get", next(_seeds), self.PROBE_GET)
        upload(ctx.cluster.backing_client(), [self.get_v])
        self.put_v = Version(f"{ctx.fault}/probe-put", next(_seeds), self.PROBE_PUT)
        self.progress = [0, 0]
        self.threads: list[threading.Thread] = []

    def inject(self, ctx: Context) -> None:
        url = ctx.node.url
        probes = [(self._slow_get, 0), (self._slow_put, 1)]
        for fn, slot in probes:
            t = threading.Thread(target=fn, args=(ctx, url, slot), daemon=True)
            self.threads.append(t)
            t.start()
        wait_until(lambda: min(self.progress) >= MiB, 30, "both probes under way")
        ctx.t_fault = time.monotonic()
        ctx.node.signal(15)
        ctx.notes.append(f"SIGTERM with the probe GET {self.progress[0] >> 10} KiB and the probe "
                         f"PUT {self.progress[1] >> 10} KiB in")
        if not ctx.node.wait_exit(60):
            ctx.notes.append("the node did not exit within 60 s of SIGTERM")
            ctx.node.kill()
        for t in self.threads:
            t.join(30)
        finished = [op for op in ctx.rec.ops() if op.kind.startswith("drain")]
        ctx.notes.append("in flight at SIGTERM: " + ", ".join(
            f"{op.kind[6:].upper()} {'completed' if op.ok else f'FAILED ({op.error})'}"
            for op in finished))

    def _slow_get(self, ctx: Context, url: str, slot: int) -> None:
        op = Op("drain-get", ctx.victim, -1, time.monotonic())
        want = self.get_v.body()
        got = bytearray()
        try:
            resp = _raw(url, "GET", self.get_v.key, rcvbuf=64 * KiB)
            if resp.status != 200:
                op.error = f"{resp.status}"
            while op.error is None:
                piece = resp.read(128 * KiB)
                if not piece:
                    break
                got += piece
                self.progress[slot] = len(got)
                time.sleep(0.02)  # a slow reader: ~6 MB/s
        except Exception as exc:
            op.error = error_kind(exc)
        op.nbytes = len(got)
        op.corrupt = harness.mismatch(bytes(got), want)
        if op.error is None and len(got) != len(want):
            op.error = "short body"
        ctx.rec.add(op)

    def _slow_put(self, ctx: Context, url: str, slot: int) -> None:
        op = Op("drain-put", ctx.victim, -1, time.monotonic())
        body = self.put_v.body()
        try:
            conn, path = _raw_conn(url, "PUT", self.put_v.key)
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            for off in range(0, len(body), 64 * KiB):
                conn.send(body[off : off + 64 * KiB])
                self.progress[slot] = off + 64 * KiB
                time.sleep(0.02)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                op.error = f"{resp.status}"
        except Exception as exc:
            op.error = error_kind(exc)
        ctx.wrote(self.put_v, op.error is None)
        ctx.rec.add(op)


def _raw_conn(url: str, method: str, key: str,
              rcvbuf: int | None = None) -> tuple[http.client.HTTPConnection, str]:
    """A connection and a presigned path: a client that sends and reads at
    its own pace."""
    s3 = s3_client(url)
    op = {"GET": "get_object", "PUT": "put_object"}[method]
    signed = s3.generate_presigned_url(op, Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600)
    parts = urlsplit(signed)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.connect()
    if rcvbuf is not None:
        import socket

        assert conn.sock is not None
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return conn, f"{parts.path}?{parts.query}"


def _raw(url: str, method: str, key: str, rcvbuf: int | None = None) -> http.client.HTTPResponse:
    conn, path = _raw_conn(url, method, key, rcvbuf)
    conn.request(method, path)
    return conn.getresponse()


class _Backing(Fault):
    """The backing store misbehaves for ``hold_s``: nearstore retries, resumes
    or gives a clean 503; it never passes a broken answer on as data."""

    mix = {"cold": 0.35, "get": 0.25, "put": 0.25, "own": 0.15}
    cold = (40, 2 * MiB)

    def proxy(self, ctx: Context) -> Any:
        assert ctx.cluster.backing_proxy is not None
        return ctx.cluster.backing_proxy

    def heal(self, ctx: Context) -> None:
        self.proxy(ctx).clear()

    def expected(self, ctx: Context, op: Op) -> bool:
        # A 503 (SlowDown, ServiceUnavailable; a HEAD's has no code) once
        # nearstore's deadline ran out; a body cut after its head was sent.
        clean = op.error is not None and (op.error.startswith("503") or op.error == "short body")
        return clean and op.t1 >= ctx.t_fault


@fault
class Backing503(_Backing):
    name = "backing-503"
    help = "every backing-store request answered 503 SlowDown"

    def inject(self, ctx: Context) -> None:
        self.proxy(ctx).fail(times=None)


@fault
class BackingReset(_Backing):
    name = "backing-reset"
    help = "backing-store connections reset (RST): before any answer, or 128 KiB into a GET's body"

    def inject(self, ctx: Context) -> None:
        self.proxy(ctx).reset_response(after=128 * KiB, times=None, method="GET")
        self.proxy(ctx).drop(times=None)


@fault
class BackingTruncate(_Backing):
    name = "backing-truncate"
    help = "backing-store GET bodies cut short (FIN) 128 KiB in"

    def inject(self, ctx: Context) -> None:
        self.proxy(ctx).truncate_response(after=128 * KiB, times=None, method="GET")


@fault
class BackingStall(_Backing):
    name = "backing-stall"
    help = "the backing store stalls (no answer, or a GET body stops 64 KiB in) longer than the read timeout"
    hold_s = 5.0  # beyond the nodes' read_timeout (3 s here)

    def inject(self, ctx: Context) -> None:
        self.proxy(ctx).stall_response(after=64 * KiB, seconds=60, method="GET")
        self.proxy(ctx).delay(60)


@fault
class CacheDiskFull(Fault):
    name = "cache-disk-full"
    help = "a node's cache disk full (ENOSPC on fills: a tmpfs filled up)"
    mix = {"cold": 0.6, "get": 0.25, "put": 0.15}
    cold = (40, 2 * MiB)

    def unavailable(self, cluster: Cluster) -> str | None:
        if cluster.cache_tmpfs is None:
            return Tmpfs.unavailable() or "no tmpfs cache on this cluster"
        return None

    def prepare(self, ctx: Context) -> None:
        ctx.victim = ctx.cluster.nodes.index(
            next(n for n in ctx.cluster.nodes if n.cache_dir == _tmpfs(ctx).path))
        self.before = ctx.node.metrics()

    def inject(self, ctx: Context) -> None:
        taken = _tmpfs(ctx).fill()
        ctx.notes.append(f"node {ctx.victim}'s cache disk filled ({taken >> 20} MiB)")

    def heal(self, ctx: Context) -> None:
        _tmpfs(ctx).free()

    def finish(self, ctx: Context) -> None:
        after = ctx.node.metrics()
        name = "nearstore_cache_fill_errors_total"
        ctx.notes.append(f"failed fills on node {ctx.victim}: "
                         f"{after.get(name, 0) - self.before.get(name, 0):.0f}")


def _tmpfs(ctx: Context) -> Tmpfs:
    assert ctx.cluster.cache_tmpfs is not None
    return ctx.cluster.cache_tmpfs


@fault
class LocalDiskFull(Fault):
    """A fourth node on the embedded local store (no backing store), its data
    directory on a small tmpfs that is then filled: writes must fail cleanly
    and nothing acknowledged may be lost; reads go on."""

    name = "local-disk-full"
    help = "the local store's disk full (a node on the embedded store, its tmpfs filled up)"
    mix = {"get": 0.35, "put": 0.45, "own": 0.2}
    # Room for what the load writes in a row (a few thousand small PUTs):
    # the disk fills when the fault fills it, not before.
    put_sizes = (4 * KiB, 96 * KiB)
    SIZE = 256 * MiB

    def unavailable(self, cluster: Cluster) -> str | None:
        return Tmpfs.unavailable()

    def prepare(self, ctx: Context) -> None:
        workdir = ctx.cluster.workdir / "local-node"
        self.fs = Tmpfs(workdir / "data", self.SIZE)
        self.fs.mount()
        ctx.cluster.tmpfs.append(self.fs)
        template = ctx.cluster.nodes[0]
        self.local = Node(99, workdir, harness.procs.free_ports(1)[0], "", template.env,
                          template.bin_dir)
        self.local.config_path.unlink()
        self.local.config_path.write_text("# the embedded local store alone\n")
        self.local.start()
        ctx.urls = [self.local.url]
        ctx.victim = 0
        s3 = ctx.client(0)
        s3.create_bucket(Bucket=BUCKET)
        # Its own readable set, a few MiB (the tmpfs is small).
        ctx.warm = [Version(f"{ctx.fault}/warm/{i}", next(_seeds), (i + 1) * 96 * KiB)
                    for i in range(8)]
        upload(s3, ctx.warm)

    def inject(self, ctx: Context) -> None:
        taken = self.fs.fill()
        ctx.notes.append(f"the local store's disk filled ({taken >> 20} MiB)")

    def heal(self, ctx: Context) -> None:
        self.fs.free()

    def after_verify(self, ctx: Context) -> None:
        self.local.stop()
        self.fs.unmount()

    def expected(self, ctx: Context, op: Op) -> bool:
        # A write refused with a 5xx that says so (not an InternalError):
        # the disk is full, the client may try later.
        return (op.kind in ("put", "multipart") and op.error is not None
                and op.error[:1] == "5" and "InternalError" not in op.error
                and op.t1 >= ctx.t_fault)


@fault
class ChunkCorrupt(Fault):
    """Chunk files of the objects being read, damaged in place on every
    node: a byte flipped in half of them, the other half cut to half their
    length. Each must be caught by its checksum, dropped and filled again,
    never served.

    The damage is done at rest: the clients pause between two requests
    while the files change. A chunk is verified when it is opened and then
    sent with sendfile, so a write landing during a send goes out as it is
    (what a checksum checked before sending cannot see); damaging files
    under readers in flight measured that window, not the checksums."""

    name = "chunk-corrupt"
    help = "cached chunk files flipped or truncated on disk under readers"
    mix = {"get": 0.75, "range": 0.25}
    PER_NODE = 8

    def prepare(self, ctx: Context) -> None:
        self.before = [n.metrics() for n in ctx.cluster.nodes]
        files = ctx.cluster.chunk_files_of(ctx.warm)
        by_node: dict[Path, list[Path]] = {}
        for path in files:
            by_node.setdefault(path.parents[2], []).append(path)
        self.targets = [p for paths in by_node.values() for p in paths[: self.PER_NODE]]

    def inject(self, ctx: Context) -> None:
        assert ctx.load is not None
        with ctx.load.paused():
            ctx.t_fault = time.monotonic()
            self._damage(ctx)

    def _damage(self, ctx: Context) -> None:
        flipped = truncated = 0
        for j, path in enumerate(self.targets):
            with contextlib.suppress(OSError), open(path, "r+b") as f:
                size = f.seek(0, 2)
                if j % 2:
                    f.truncate(size // 2)
                    truncated += 1
                else:
                    f.seek(size // 2)
                    b = f.read(1)
                    f.seek(size // 2)
                    f.write(bytes([b[0] ^ 0xFF]))
                    flipped += 1
        ctx.notes.append(f"{flipped} chunk files of the objects read with a byte flipped, "
                         f"{truncated} truncated")

    def finish(self, ctx: Context) -> None:
        name = "nearstore_cache_checksum_failures_total"
        caught = sum(n.metrics().get(name, 0) - b.get(name, 0)
                     for n, b in zip(ctx.cluster.nodes, self.before, strict=True))
        bad = sum(1 for p in self.targets if p.exists() and not harness.chunk_file_ok(p))
        ctx.notes.append(f"checksum failures counted: {caught:.0f}; still damaged on disk: {bad}")


_skew = threading.local()


def _skewable_signer() -> None:
    """botocore signs with get_current_datetime() of botocore.auth, or of
    botocore.crt.auth where awscrt is installed; shift both by this thread's
    ``_skew.seconds`` (other threads keep the true time)."""
    import importlib

    for name in ("botocore.auth", "botocore.crt.auth"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "_nearstore_skewable", False):
            continue
        true_now = module.get_current_datetime

        def now(*args: Any, _true_now: Any = true_now, **kwargs: Any) -> Any:
            return _true_now(*args, **kwargs) + timedelta(seconds=getattr(_skew, "seconds", 0.0))

        setattr(module, "get_current_datetime", now)  # noqa: B010 (a module mypy cannot see)
        setattr(module, "_nearstore_skewable", True)  # noqa: B010


@fault
class ClockSkewClient(Fault):
    """A client whose clock is 16 minutes off (ahead, then behind) beside the
    load: each of its requests must get 403 RequestTimeTooSkewed, none may
    take effect, and nobody else may notice."""

    name = "clock-skew-client"
    help = "a client signing with its clock 16 min off: RequestTimeTooSkewed, nothing else"
    hold_s = 2.0

    def prepare(self, ctx: Context) -> None:
        _skewable_signer()
        self.keys: list[str] = []

    def extra(self, ctx: Context) -> list[Callable[[threading.Event], None]]:
        def skewed(stop: threading.Event) -> None:
            s3 = s3_client(ctx.cluster.nodes[0].url)
            for n in itertools.count():
                if stop.is_set():
                    return
                _skew.seconds = 16 * 60 * (1 if n % 2 else -1)
                kind = ("get", "put", "list", "head")[n % 4]
                op = Op(f"skewed-{kind}", 0, -1, time.monotonic())
                key = f"{ctx.fault}/skewed/{n}" if kind == "put" else ctx.warm[0].key
                try:
                    if kind == "get":
                        s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                    elif kind == "put":
                        self.keys.append(key)
                        s3.put_object(Bucket=BUCKET, Key=key, Body=b"must not be stored")
                    elif kind == "list":
                        s3.list_objects_v2(Bucket=BUCKET, MaxKeys=5)
                    else:
                        s3.head_object(Bucket=BUCKET, Key=key)
                    op.error = "accepted with a skewed clock"
                except Exception as exc:
                    op.error = error_kind(exc)
                ctx.rec.add(op)
                time.sleep(0.05)

        return [skewed]

    def finish(self, ctx: Context) -> None:
        s3 = ctx.client(0)
        stored = 0
        for key in self.keys:
            with contextlib.suppress(Exception):
                s3.head_object(Bucket=BUCKET, Key=key)
                stored += 1
        ctx.notes.append(f"{len(self.keys)} skewed PUTs, {stored} of them stored")
        if stored:
            ctx.rec.add(Op("skewed-put-stored", 0, -1, time.monotonic(), error="skewed PUT stored"))

    def expected(self, ctx: Context, op: Op) -> bool:
        return op.kind.startswith("skewed-") and op.error in ("403 RequestTimeTooSkewed", "403")


@fault
class ClockSkewPeer(Fault):
    """A node whose clock runs 2 minutes ahead (past the peers' 60 s): its
    peer requests are refused and it refuses theirs; every node serves the
    chunks it cannot get from the owner itself."""

    name = "clock-skew-peer"
    help = "a node with its clock 2 min ahead: peers refuse each other, clients see nothing"
    hold_s = 2.0

    def prepare(self, ctx: Context) -> None:
        ctx.node.stop()
        ctx.node.skew_s = 120.0
        ctx.node.start()
        ctx.cluster.wait_ring()
        ctx.cluster.relays[ctx.victim].clear_log()

    def finish(self, ctx: Context) -> None:
        refused = [e for e in ctx.cluster.relays[ctx.victim].events()
                   if e.path.startswith("/_nearstore/peer/") and e.status == 403]
        ctx.notes.append(f"peer requests to the skewed node refused: {len(refused)}")
        ctx.node.stop()
        ctx.node.skew_s = 0.0
        ctx.node.start()


@fault
class Partition(Fault):
    """Every peer link dropped (the relays carry nothing either way) for
    longer than a silent peer takes to be called down; clients still reach
    every node."""

    name = "partition"
    help = "the network between the peers partitioned (every node cut off from the others)"
    hold_s = 8.0

    def inject(self, ctx: Context) -> None:
        for relay in ctx.cluster.relays:
            relay.partition()

    def heal(self, ctx: Context) -> None:
        for relay in ctx.cluster.relays:
            relay.heal()


# -- a row ---------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    help: str
    requests: int = 0
    errors: int = 0
    unexpected: int = 0
    corrupt_bytes: int = 0
    lost_writes: int = 0
    recover_s: float = 0.0
    acked_writes: int = 0
    unacked_landed: int = 0
    max_latency_s: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)
    unexpected_kinds: dict[str, int] = field(default_factory=dict)
    # A few failed requests as "kind@nodeN +t0..t1 s: error (key)", times
    # from the fault's start: what explains an error count.
    error_samples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    harness_errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.corrupt_bytes and not self.lost_writes


def summarize(ctx: Context, f: Fault, ops: list[Op]) -> Row:
    """The row of a fault from its requests (pure but for ``f.expected``)."""
    row = Row(ctx.fault, f.help, requests=len(ops), notes=list(ctx.notes))
    failed = [op for op in ops if op.error is not None]
    row.errors = len(failed)
    row.corrupt_bytes = sum(op.corrupt for op in ops)
    row.error_kinds = dict(Counter(op.error for op in failed if op.error).most_common())
    odd = [op for op in failed if not f.expected(ctx, op)]
    row.unexpected = len(odd)
    row.unexpected_kinds = dict(Counter(f"{op.kind}@node{op.node}: {op.error}" for op in odd
                                        if op.error).most_common(6))
    row.recover_s = recovery(ops, ctx.t_heal, _targets(ctx))
    row.error_samples = [f"{op.kind}@node{op.node} {op.t0 - ctx.t_fault:+.1f}..{op.t1 - ctx.t_fault:+.1f} s: "
                         f"{op.error} ({op.detail})" for op in (odd + failed)[:SAMPLES]]
    row.max_latency_s = max((op.seconds for op in ops), default=0.0)
    for op in ops:
        if op.corrupt and op.detail:
            row.notes.append(f"CORRUPT: {op.detail}")
    return row


SAMPLES = 20


def recovery(ops: list[Op], t_heal: float, targets: set[int]) -> float:
    """Seconds from the heal until requests succeed again: until the last
    failed request ended and every target answered a request successfully
    (a node restarting answers none before it is up, though boto3's
    retries may hide that from its clients). None seen: NaN."""
    if not t_heal:
        return 0.0
    last_error = max((op.t1 for op in ops if op.error is not None), default=t_heal)
    first_ok: dict[int, float] = {}
    for op in ops:
        if op.ok and op.t1 >= t_heal and op.node in targets:
            first_ok[op.node] = min(first_ok.get(op.node, op.t1), op.t1)
    if set(first_ok) < targets:
        return math.nan
    return max(0.0, last_error - t_heal, *(t - t_heal for t in first_ok.values()))


def verify(ctx: Context, row: Row) -> None:
    """Read back every write: acknowledged ones must be whole and exact (on
    any node); unacknowledged ones may be absent, and if present, exact."""
    targets = list(range(len(ctx.urls)))
    for n, (v, acked) in enumerate(ctx.writes):
        want: list[bytes | None] = [v.body()] if acked else [v.body(), None]
        outcome = None
        for attempt in range(3):
            op = Op("verify", targets[(n + attempt) % len(targets)], -1, time.monotonic())
            got = get_checked(ctx.client(op.node), v.key, want, op)
            row.corrupt_bytes += op.corrupt
            if op.corrupt and op.detail:
                row.notes.append(f"CORRUPT on read-back: {op.detail}")
            if got is not None or op.corrupt:
                outcome = got
                break
            if op.error and op.error.startswith("404"):
                break  # absent, and asking again will not change that
            time.sleep(0.5)  # a read that failed: another node, a little later
        if acked:
            row.acked_writes += 1
            if outcome != 0:
                row.lost_writes += 1
                row.notes.append(f"LOST: {v.key} ({v.size} bytes) acknowledged, read back: "
                                 f"{op.error or 'wrong bytes'}")
        elif outcome == 0:
            row.unacked_landed += 1


def run_fault(cluster: Cluster, f: Fault, opts: Options, warm: list[Version]) -> Row:
    victim = min(1, opts.clients - 1, len(cluster.nodes) - 1)
    ctx = Context(f.name, cluster, Recorder(), opts, victim,
                  [n.url for n in cluster.nodes], warm)
    why = f.unavailable(cluster)
    if why:
        return Row(f.name, f.help, skipped=why)
    count, size = f.cold
    if count:
        ctx.cold = [Version(f"{f.name}/cold/{i}", next(_seeds), size) for i in range(count)]
        upload(cluster.backing_client(), ctx.cold)
    f.prepare(ctx)
    load = ctx.load = _load(ctx, f.mix, f.put_sizes)
    extras = [_one(fn) for fn in f.extra(ctx)]
    load.start()
    for t in extras:
        t.start()
    broke: list[str] = []
    try:
        time.sleep(opts.seconds)
        ctx.t_fault = time.monotonic()  # faults that wait for their moment set it again
        try:
            f.inject(ctx)
            time.sleep(f.hold_s)
        except Exception as exc:  # the row still shows what the clients saw
            broke.append(f"inject: {exc!r}")
        ctx.t_heal = time.monotonic()
        f.heal(ctx)
        _wait_served(ctx, load)
        time.sleep(opts.seconds)
    finally:
        for t in [load, *extras]:
            t.stop()
    f.finish(ctx)
    row = summarize(ctx, f, ctx.rec.ops())
    row.harness_errors = [*broke, *load.failures, *(x for t in extras for x in t.failures)]
    verify(ctx, row)
    after = getattr(f, "after_verify", None)
    if after is not None:
        after(ctx)
    return row


def _one(fn: Callable[[threading.Event], None]) -> Threads:
    return Threads(lambda _i, stop: fn(stop), 1)


def _targets(ctx: Context) -> set[int]:
    """The targets that have a client thread."""
    return {i % len(ctx.urls) for i in range(ctx.opts.clients)}


def _wait_served(ctx: Context, load: Threads, timeout: float = 60.0) -> None:
    """Until a request to every target (that has a client) succeeded after
    the heal, or ``timeout``: the row then says it did not recover."""
    targets = _targets(ctx)

    def served() -> bool:
        done = {op.node for op in ctx.rec.ops() if op.ok and op.t0 >= ctx.t_heal}
        return targets <= done

    try:
        wait_until(served, timeout, "requests to every node succeed again", step=0.1)
    except TimeoutError as exc:
        ctx.notes.append(f"NOT RECOVERED: {exc}")


# -- the table -----------------------------------------------------------------------------

COLUMNS = ("fault", "requests", "errors", "unexpected", "corrupt bytes", "lost writes",
           "recover s", "what clients saw")


def _kinds(kinds: dict[str, int], most: int = 3) -> str:
    items = list(kinds.items())
    text = ", ".join(f"{k} x{n}" for k, n in items[:most])
    return text + (f", +{len(items) - most} more" if len(items) > most else "")


def render(rows: list[Row]) -> str:
    """The table (Markdown) and, under it, each row's notes."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.fault} | skipped: {r.skipped} |" + " |" * (len(COLUMNS) - 2))
            continue
        lines.append(f"| {r.fault} | {r.requests} | {r.errors} | {r.unexpected} | "
                     f"{r.corrupt_bytes} | {r.lost_writes} of {r.acked_writes} | "
                     f"{r.recover_s:.1f} | {_kinds(r.error_kinds) or '-'} |")
    notes = []
    for r in rows:
        extra = list(r.notes)
        if r.unexpected_kinds:
            extra.append("unexpected: " + _kinds(r.unexpected_kinds, 6))
        if 0 < r.errors <= 3:
            extra.append("failed: " + "; ".join(r.error_samples[: r.errors]))
        if r.unacked_landed:
            extra.append(f"{r.unacked_landed} unacknowledged writes landed (whole and exact)")
        if r.max_latency_s:
            extra.append(f"slowest request {r.max_latency_s:.1f} s")
        extra += [f"HARNESS: {h}" for h in r.harness_errors]
        if extra and not r.skipped:
            notes.append(f"- {r.fault}: " + "; ".join(extra))
    return "\n".join(lines + (["", *notes] if notes else []))


# -- the command ---------------------------------------------------------------------------


def _warm_set() -> list[Version]:
    """Objects every fault reads: small, a few chunks, several chunks."""
    sizes = [37 * KiB, 100 * KiB, 700 * KiB, 1536 * KiB + 3, 3 * MiB + 17, 4 * MiB + 900 * KiB]
    return [Version(f"warm/{i}", 1 + i, sizes[i % len(sizes)]) for i in range(18)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nearstore bench faults", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                   help="comma list (default: all; --list names them)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="steady load before each fault and after its recovery (2)")
    p.add_argument("--clients", type=int, default=4, help="client threads (4), thread i on node i %% 3")
    p.add_argument("--backing", choices=("seaweedfs", "moto"), default="seaweedfs",
                   help="the backing store (seaweedfs; moto where weed is missing)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the rows to FILE")
    p.add_argument("--list", action="store_true", help="list the faults, then exit")
    p.add_argument("--workdir", type=Path, help="where the cluster keeps its data (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, cls in FAULTS.items():
            print(f"{name:18s} {cls.help}")
        return 0
    names = args.faults or list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        print(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    if args.clients < 1:
        print("--clients must be at least 1", file=sys.stderr)
        return 2
    opts = Options(seconds=args.seconds, clients=args.clients, backing=args.backing)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nearstore-faults-"))
    spec = ClusterSpec(backing=args.backing, relays=True, timeouts=FAULT_TIMEOUTS,
                       tmpfs_cache_node=2)
    cluster = Cluster(workdir, spec)
    why = cluster.backing_unavailable()
    if why and args.backing == "seaweedfs":
        print(f"SeaweedFS unavailable ({why}); using moto", file=sys.stderr)
        spec.backing = opts.backing = "moto"
        why = cluster.backing_unavailable()
    if why:
        print(f"no backing store: {why}", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows: list[Row] = []
    t0 = time.monotonic()
    try:
        with cluster:
            warm = _warm_set()
            upload(cluster.backing_client(), warm)
            for v in warm:  # through a node: every chunk cached at its owner
                get_checked(cluster.client(0), v.key, [v.body()], Op("warm", 0, -1, 0.0))
            for name in names:
                print(f"[{time.monotonic() - t0:6.1f}s] {name} ...", file=sys.stderr, flush=True)
                try:
                    row = run_fault(cluster, FAULTS[name](), opts, warm)
                except Exception as exc:  # the row says so; the other faults still run
                    row = Row(name, FAULTS[name].help,
                              harness_errors=[f"the fault's run failed: {exc!r}"])
                rows.append(row)
                print(f"[{time.monotonic() - t0:6.1f}s] {name}: {row.requests} requests, "
                      f"{row.errors} errors ({row.unexpected} unexpected), {row.corrupt_bytes} "
                      f"corrupt bytes, {row.lost_writes} lost", file=sys.stderr, flush=True)
                cluster.heal_all()
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(rows))
    print(f"\n{len(rows)} faults in {time.monotonic() - t0:.0f} s, backing store {spec.backing}, "
          f"{opts.clients} clients, {platform.node()} ({started})")
    if args.json:
        doc = {"command": "nearstore bench faults " + " ".join(argv), "started": started,
               "backing": spec.backing, "clients": opts.clients, "seconds": opts.seconds,
               "rows": [asdict(r) | {"passed": r.passed} for r in rows]}
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(r.passed for r in rows) else 1

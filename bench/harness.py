"""The harness the fault table (bench/faults.py) and the soak (bench/soak.py)
share: a nearstore cluster in front of a real backing store, client threads,
and checks of every byte a client received.

The cluster: a backing store (SeaweedFS ``weed mini``, which checks
signatures like a production S3, or moto), and N nearstore cache nodes
(``[[buckets]] name = "*"`` on it, chunk cache on, one ring, one cluster
secret), each its own process group on free loopback ports. With
``relays`` (the fault table) two kinds of `FaultProxy` sit in the paths a
fault breaks:

- one between every node and the backing store (503s, resets, truncated
  bodies, stalls; a request held there while its node is killed);
- one in front of each node's peer API: the ring names each node by its
  relay's address (``[cluster] node_id``), so every peer request and health
  probe goes through it, while clients reach the node's own port directly.
  A relay can drop the link (partition) or watch a chunk stream and kill
  the node serving it.

Bytes are checked exactly: every object's content is a function of (seed,
size) (`content`), 64 KiB blocks each stamped with the seed and its offset,
so that a chunk of another object, of another version or from another
offset can never compare equal. A read is right (every byte equal), or a
visible error (an S3 error, a refused or broken connection, a body shorter
than its Content-Length: botocore raises for that); anything else is
corrupt, and `mismatch` counts the bytes.

Everything the harness starts it stops, by process group; tmpfs mounts
(disk-full faults, root only) are unmounted on the way out.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nearstore.bench import procs
from nearstore.bench.faultproxy import FaultProxy
from nearstore.bench.peers import (
    ACCESS_KEY,
    CACHE_CONFIG,
    SECRET_KEY,
    MotoPeer,
    PeerContext,
    S3Peer,
    SeaweedPeer,
    find_tool,
)

MiB = 1 << 20
KiB = 1 << 10
BUCKET = "nearstore-faults"
REGION = "us-east-1"
CLUSTER_SECRET = "nearstore-bench-faults-cluster-secret"
BLOCK = 64 * KiB  # content is stamped every BLOCK bytes
START_TIMEOUT_S = 60.0


# -- content ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _base(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def content(seed: int, size: int) -> bytes:
    """The bytes of object version ``seed``: its own random 64 KiB block,
    repeated, each copy starting with (seed, offset). Cheap to make again
    on every check (a copy and one stamp per 64 KiB)."""
    blocks = -(-size // BLOCK)
    buf = bytearray(_base(seed) * blocks)
    del buf[size:]
    for i in range(blocks):
        stamp = struct.pack(">QQ", seed, i * BLOCK)
        end = min(i * BLOCK + len(stamp), size)
        buf[i * BLOCK : end] = stamp[: end - i * BLOCK]
    return bytes(buf)


def mismatch(got: bytes, want: bytes) -> int:
    """Bytes of ``got`` that are not ``want``'s: differing bytes where both
    have one, plus every byte ``got`` has beyond ``want``. A ``got`` shorter
    than ``want`` is judged on what it has (the caller knows whether its
    shortness was visible)."""
    if got == want[: len(got)]:
        return max(0, len(got) - len(want))
    n = min(len(got), len(want))
    bad = max(0, len(got) - len(want))
    step = 4096
    for off in range(0, n, step):
        a, b = got[off : off + step], want[off : off + step]
        if a != b:
            bad += sum(x != y for x, y in zip(a, b, strict=False))
    return bad


@dataclass(frozen=True)
class Version:
    """One write of one key: what a read of it must return."""

    key: str
    seed: int
    size: int

    def body(self) -> bytes:
        return content(self.seed, self.size)


# -- outcomes --------------------------------------------------------------------------

# What a client sees when the node it talks to is gone or going.
CONNECTION_KINDS = frozenset({"refused", "connection closed", "connect timeout", "read timeout",
                              "short body", "connection reset"})


def error_kind(exc: BaseException) -> str:
    """A short, stable name of what a client saw: ``503 SlowDown`` for an S3
    error (the status alone for a HEAD, whose answer has no body), or one of
    `CONNECTION_KINDS`, or the exception's type."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode", "?")
        code = exc.response.get("Error", {}).get("Code", "")
        return f"{status} {code}".strip() if code and code != str(status) else str(status)
    if isinstance(exc, bx.EndpointConnectionError):
        return "refused"
    if isinstance(exc, bx.ConnectTimeoutError):
        return "connect timeout"
    if isinstance(exc, bx.ReadTimeoutError):
        return "read timeout"
    if isinstance(exc, bx.IncompleteReadError | bx.ResponseStreamingError):
        return "short body"
    if isinstance(exc, bx.ConnectionClosedError):
        return "connection closed"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "connection reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "read timeout"
    if isinstance(exc, ConnectionError | OSError):
        return "connection closed"
    return type(exc).__name__


@dataclass
class Op:
    """One client request (a multipart upload counts as one) and its outcome."""

    kind: str  # get, put, multipart, list, delete, head ...
    node: int
    client: int
    t0: float
    t1: float = 0.0
    error: str | None = None  # `error_kind`, None when it succeeded
    nbytes: int = 0
    corrupt: int = 0  # bytes received that were wrong
    stale: bool = False  # an older acknowledged version (soak)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.corrupt

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


class Recorder:
    """Every Op of a run, in completion order (threads append)."""

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._lock = threading.Lock()

    def add(self, op: Op) -> None:
        if not op.t1:
            op.t1 = time.monotonic()
        with self._lock:
            self._ops.append(op)

    def ops(self, since: int = 0) -> list[Op]:
        with self._lock:
            return self._ops[since:]

    def drain(self) -> list[Op]:
        """Every Op so far, forgotten here (a long run keeps no history)."""
        with self._lock:
            ops, self._ops = self._ops, []
        return ops

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)


def read_body(stream: Any, piece: int = MiB) -> tuple[bytes, BaseException | None]:
    """All of a botocore StreamingBody, or what came before it broke."""
    parts: list[bytes] = []
    try:
        while True:
            data = stream.read(piece)
            if not data:
                return b"".join(parts), None
            parts.append(data)
    except Exception as exc:
        return b"".join(parts), exc
    finally:
        with contextlib.suppress(Exception):
            stream.close()


def get_checked(s3: Any, key: str, want: Sequence[bytes | None], op: Op,
                byte_range: tuple[int, int] | None = None) -> int | None:
    """GET ``key`` (``byte_range``: first and last byte, inclusive) and judge
    it against the acceptable contents ``want`` (None: the key may be
    absent). Fills op.error / op.corrupt / op.nbytes; returns the index in
    ``want`` that matched, or None."""
    try:
        kw: dict[str, Any] = {"Bucket": BUCKET, "Key": key}
        if byte_range is not None:
            kw["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        resp = s3.get_object(**kw)
    except Exception as exc:
        op.error = error_kind(exc)
        if op.error.startswith("404") and None in want:
            op.error = None
            return want.index(None)
        return None
    data, broke = read_body(resp["Body"])
    op.nbytes = len(data)
    candidates = [(i, w if byte_range is None else w[byte_range[0] : byte_range[1] + 1])
                  for i, w in enumerate(want) if w is not None]
    if not candidates:
        op.corrupt = len(data)  # a body where there must be none
        op.detail = f"{key}: {len(data)} bytes of an object that must not exist"
        return None
    bad = {i: mismatch(data, w) for i, w in candidates}
    best = min(bad, key=lambda i: bad[i])
    if bad[best]:
        op.corrupt = bad[best]
        op.detail = f"{key} range={byte_range}: {bad[best]} of {len(data)} bytes wrong"
    if broke is not None:
        op.error = error_kind(broke)
        return None
    full = dict(candidates)[best]
    if len(data) != len(full):
        # botocore checks Content-Length; a body that ends early without
        # an exception means the server sent a wrong Content-Length.
        op.corrupt = max(op.corrupt, abs(len(full) - len(data)))
        op.detail = f"{key}: {len(data)} bytes, expected {len(full)}, without an error"
        return None
    return None if op.corrupt else best


def put_checked(s3: Any, v: Version, op: Op, part: int | None = None) -> bool:
    """Write a version: one PUT, or with ``part`` a multipart upload in parts
    of that size (create, parts, Complete). Acknowledged (True) when the
    PUT or the Complete answered 200; else op.error says what was seen."""
    body = v.body()
    try:
        if part is None:
            s3.put_object(Bucket=BUCKET, Key=v.key, Body=body)
        else:
            uid = s3.create_multipart_upload(Bucket=BUCKET, Key=v.key)["UploadId"]
            parts = []
            for n, off in enumerate(range(0, v.size, part), 1):
                etag = s3.upload_part(Bucket=BUCKET, Key=v.key, UploadId=uid, PartNumber=n,
                                      Body=body[off : off + part])["ETag"]
                parts.append({"PartNumber": n, "ETag": etag})
            s3.complete_multipart_upload(Bucket=BUCKET, Key=v.key, UploadId=uid,
                                         MultipartUpload={"Parts": parts})
    except Exception as exc:
        op.error = error_kind(exc)
        return False
    op.nbytes = v.size
    return True


# -- processes -------------------------------------------------------------------------


def rss_bytes(root: int) -> int:
    """Resident memory now (VmRSS) of a process and all its children."""
    total = 0
    for pid in procs.process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def wait_until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class Tmpfs:
    """A small tmpfs (root only): a disk that can really fill up. `fill`
    takes all its free space with a file, `free` gives it back."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.mounted = False
        self.filler = path / "filler.bin"

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0:
            return "needs root to mount a small tmpfs (a disk that can fill up)"
        if shutil.which("mount") is None:
            return "no mount command"
        return None

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs",
                        str(self.path)], check=True, capture_output=True, timeout=20)
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True,
                           timeout=20)
            self.mounted = False

    def fill(self) -> int:
        """Take every free byte; returns how many."""
        taken = 0
        try:
            f = open(self.filler, "ab", buffering=0)  # unbuffered: ENOSPC shows at write
        except OSError:
            return 0  # full already
        with f:
            block = b"\0" * MiB
            for size in (MiB, 64 * KiB, 4 * KiB, 512):
                while True:
                    try:
                        n = f.write(block[:size])
                    except OSError:
                        break
                    taken += n or 0
                    if not n:
                        break
        return taken

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def available(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


class Node:
    """One nearstore process (its own process group), on fixed ports and
    directories across restarts. ``skew_s``: started with its clock that far
    ahead (bench/skewclock.py)."""

    def __init__(self, index: int, workdir: Path, port: int, config: str,
                 env: dict[str, str], bin_dir: Path) -> None:
        self.index = index
        self.workdir = workdir
        self.port = port
        self.config_path = workdir / "nearstore.toml"
        self.data_dir = workdir / "data"
        self.cache_dir = workdir / "cache"
        self.log = workdir / "node.log"
        self.env = env
        self.bin_dir = bin_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.skew_s = 0.0
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.config_path.write_text(config)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir",
                str(self.data_dir), "--config", str(self.config_path), "--log-level", "warning"]
        if self.skew_s:
            return [sys.executable, "-m", "nearstore.bench.skewclock", repr(self.skew_s), *args]
        exe = find_tool("nearstore", self.bin_dir)
        return [exe, *args] if exe else [sys.executable, "-m", "nearstore.cli", *args]

    def spawn(self) -> None:
        self.proc = procs.spawn(self.argv(), self.log, env=self.env, cwd=self.workdir)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.index} exited with {self.proc.returncode}: "
                                   f"{procs.tail(self.log)}")
            try:
                _get_json(f"{self.url}/_nearstore/health", timeout=1.0)
                return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.index} not ready: {procs.tail(self.log)}")
            time.sleep(0.05)

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 of the whole node (its process group)."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def wait_exit(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)

    def restart(self) -> None:
        if self.alive():
            self.stop()
        self.start()

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.alive() and self.proc else 0

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /_nearstore/metrics (empty if unreachable)."""
        try:
            return procs.node_metrics(self.url)
        except OSError:
            return {}

    def chunk_files(self) -> list[Path]:
        root = self.cache_dir / "chunks"
        return sorted(p for p in root.rglob("*.*") if p.is_file()) if root.exists() else []


def chunk_file_ok(path: Path) -> bool:
    """Whether a chunk file's XXH3-64 is the checksum in its name (False if
    it is gone)."""
    import xxhash

    try:
        data = path.read_bytes()
    except OSError:
        return False
    return xxhash.xxh3_64(data).hexdigest() == path.name.partition(".")[2]


CLUSTER_TABLE = """
[cluster]
peers = [{peers}]
node_id = "{node_id}"
"""
# Upstream timeouts shorter than the defaults (connect 3 s, read 30 s,
# deadline 10 s) so that a stalled backing store is given up on within a
# fault's few seconds; the behaviour is the same, only sooner.
FAULT_TIMEOUTS = "connect_timeout = 1.0\nread_timeout = 3.0\ndeadline = 8.0\n"


@dataclass
class ClusterSpec:
    nodes: int = 3
    backing: str = "seaweedfs"  # or "moto"
    relays: bool = False  # fault proxies before the backing store and each peer API
    cache_size: int = 64 * MiB
    chunk_size: int = MiB
    timeouts: str = ""  # extra [[buckets]] lines
    tmpfs_cache_node: int | None = None  # this node's cache on a tmpfs (root only)


class Cluster:
    """The backing store, its relays and N nearstore nodes (see the module
    docstring). Use as a context manager: everything is stopped on exit."""

    def __init__(self, workdir: Path, spec: ClusterSpec, bin_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.spec = spec
        self.bin_dir = bin_dir or Path(sys.executable).parent
        self.backing: S3Peer | None = None
        self.backing_proxy: FaultProxy | None = None
        self.relays: list[FaultProxy] = []
        self.nodes: list[Node] = []
        self.tmpfs: list[Tmpfs] = []
        self.cache_tmpfs: Tmpfs | None = None
        self.notes: list[str] = []
        self._clients = threading.local()

    # -- life ------------------------------------------------------------------
    def backing_unavailable(self) -> str | None:
        return _backing_cls(self.spec.backing)(self._backing_ctx()).unavailable()

    def _backing_ctx(self) -> PeerContext:
        return PeerContext(self.workdir / "backing", self.workdir, BUCKET, self.bin_dir)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backing = _backing_cls(self.spec.backing)(self._backing_ctx())
        self.backing.start()
        s3 = self.backing.client()
        _retry(lambda: s3.create_bucket(Bucket=BUCKET), "create the bucket")
        endpoint = self.backing.endpoint()
        if self.spec.relays:
            self.backing_proxy = FaultProxy("127.0.0.1", self.backing.port).start()
            endpoint = self.backing_proxy.url
        ports = procs.free_ports(self.spec.nodes)
        if self.spec.relays:
            self.relays = [FaultProxy("127.0.0.1", p).start() for p in ports]
            ids = [f"127.0.0.1:{r.port}" for r in self.relays]
        else:
            ids = [f"127.0.0.1:{p}" for p in ports]
        peers = ", ".join(f'"http://{i}"' for i in ids)
        env = dict(os.environ)
        env.update(NEARSTORE_ACCESS_KEY=ACCESS_KEY, NEARSTORE_SECRET_KEY=SECRET_KEY,
                   NEARSTORE_CLUSTER_SECRET=CLUSTER_SECRET, PYTHONUNBUFFERED="1")
        env.pop("PYTHONWARNINGS", None)
        for i, port in enumerate(ports):
            ndir = self.workdir / f"node{i}"
            cache_dir = ndir / "cache"
            if i == self.spec.tmpfs_cache_node and Tmpfs.unavailable() is None:
                # Room for the budget and a little more: the cache itself
                # never fills it; a fault's filler file does.
                self.cache_tmpfs = Tmpfs(cache_dir, self.spec.cache_size + 16 * MiB)
                self.cache_tmpfs.mount()
                self.tmpfs.append(self.cache_tmpfs)
            config = CACHE_CONFIG.format(
                backing=self.backing.name, endpoint=endpoint, access_key=self.backing.access_key,
                secret_key=self.backing.secret_key, cache_dir=cache_dir,
                size=self.spec.cache_size, chunk_size=self.spec.chunk_size)
            # The timeouts belong to the [[buckets]] table, which ends where
            # [cache] begins.
            config = config.replace("\n[cache]\n", f"{self.spec.timeouts}\n[cache]\n", 1)
            if self.spec.nodes > 1:
                config += CLUSTER_TABLE.format(peers=peers, node_id=ids[i])
            self.nodes.append(Node(i, ndir, port, config, env, self.bin_dir))
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            node.wait_ready()
        self.wait_ring()

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        for proxy in [*self.relays, *([self.backing_proxy] if self.backing_proxy else [])]:
            with contextlib.suppress(Exception):
                proxy.stop()
        if self.backing is not None:
            with contextlib.suppress(Exception):
                self.backing.stop()
        for fs in self.tmpfs:
            fs.unmount()

    # -- state -----------------------------------------------------------------
    def ring_ok(self) -> bool:
        """Every live node's ring holds every node, none of them down."""
        for node in self.nodes:
            try:
                ring = _get_json(f"{node.url}/_nearstore/ring")
            except (OSError, ValueError):
                return False
            nodes = ring.get("nodes", [])
            if len(nodes) != len(self.nodes) or any(n.get("down") for n in nodes):
                return False
        return True

    def wait_ring(self, timeout: float = 45.0) -> None:
        if len(self.nodes) > 1:
            wait_until(self.ring_ok, timeout, "every node's ring up", step=0.2)

    def heal_all(self) -> None:
        """Back to a whole cluster: proxies pass everything, every node runs
        without skew, every ring is full."""
        for proxy in [*self.relays, *([self.backing_proxy] if self.backing_proxy else [])]:
            proxy.clear()
            proxy.heal()
        for node in self.nodes:
            if not node.alive():
                node.start()
        self.wait_ring()

    # -- clients ---------------------------------------------------------------
    def client(self, node: int) -> Any:
        """A boto3 client of this thread for a node: default settings
        (retries included), as a training job would have."""
        cache: dict[int, Any] | None = getattr(self._clients, "by_node", None)
        if cache is None:
            cache = self._clients.by_node = {}
        if node not in cache:
            cache[node] = s3_client(self.nodes[node].url)
        return cache[node]

    def backing_client(self) -> Any:
        assert self.backing is not None
        return self.backing.client()

    def rss(self) -> list[int]:
        return [n.rss() for n in self.nodes]

    def chunk_files_of(self, versions: Sequence[Version]) -> list[Path]:
        """The cached chunk files of these objects, on any node: their ids
        computed as the nodes compute them (metadata.identity.chunk_id, with
        the store's name and chunk size from /_nearstore/ring)."""
        from nearstore.metadata.identity import chunk_id

        layout = _get_json(f"{self.nodes[0].url}/_nearstore/ring?bucket={BUCKET}")["bucket"]
        store, size = layout["store"], int(layout["chunk_size"])
        s3 = self.client(0)
        ids: set[str] = set()
        for v in versions:
            etag = s3.head_object(Bucket=BUCKET, Key=v.key)["ETag"]
            for tag in {etag, etag.strip('"')}:  # whichever form the nodes use
                ids.update(chunk_id(store, BUCKET, v.key, tag, size, i)
                           for i in range(-(-v.size // size)))
        return [p for n in self.nodes for p in n.chunk_files() if p.name.partition(".")[0] in ids]


def s3_client(url: str) -> Any:
    import boto3

    session = boto3.session.Session(aws_access_key_id=ACCESS_KEY,
                                    aws_secret_access_key=SECRET_KEY, region_name=REGION)
    return session.client("s3", endpoint_url=url)


def _backing_cls(name: str) -> type[S3Peer]:
    try:
        return {"seaweedfs": SeaweedPeer, "moto": MotoPeer}[name]
    except KeyError:
        raise ValueError(f"backing store {name!r}: seaweedfs or moto") from None


def _retry(fn: Callable[[], object], what: str, attempts: int = 20) -> None:
    for i in range(attempts):
        try:
            fn()
            return
        except Exception as exc:
            if i == attempts - 1:
                raise RuntimeError(f"{what}: {exc!r}") from exc
            time.sleep(0.25)


def upload(s3: Any, versions: Sequence[Version], threads: int = 4) -> None:
    """Put objects (straight into the backing store, say), a few at a time."""
    import concurrent.futures

    def one(v: Version) -> None:
        _retry(lambda: s3.put_object(Bucket=BUCKET, Key=v.key, Body=v.body()), f"put {v.key}", 5)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, versions))


# -- load ------------------------------------------------------------------------------


@dataclass
class Threads:
    """N client threads running ``body(index, stop)`` until stopped. A body
    that calls `checkpoint` between its requests can be paused there."""

    body: Callable[[int, threading.Event], None]
    n: int
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _go: threading.Event = field(default_factory=threading.Event)
    _idle: set[int] = field(default_factory=set)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> Threads:
        self._go.set()
        for i in range(self.n):
            t = threading.Thread(target=self._run, args=(i,), name=f"client-{i}", daemon=True)
            self.threads.append(t)
            t.start()
        return self

    def _run(self, i: int) -> None:
        try:
            self.body(i, self.stop_event)
        except Exception as exc:  # a bug of the harness, reported, not hidden
            self.failures.append(f"client {i}: {exc!r}")
        finally:
            with self._cond:
                self._idle.add(i)
                self._cond.notify_all()

    def checkpoint(self, i: int) -> None:
        """Between two requests of thread i: wait here while paused."""
        if self._go.is_set():
            return
        with self._cond:
            self._idle.add(i)
            self._cond.notify_all()
        self._go.wait()
        with self._cond:
            self._idle.discard(i)

    @contextlib.contextmanager
    def paused(self, timeout: float = 120.0) -> Iterator[None]:
        """No request in flight inside the block: every thread waits at its
        next checkpoint (one that is in a request finishes it first)."""
        self._go.clear()
        try:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self._idle) >= self.n, timeout):
                    raise TimeoutError("client threads still busy")
            yield
        finally:
            self._go.set()

    def stop(self, timeout: float = 120.0) -> None:
        """Ask every thread to stop after its current request; wait for them
        (a request may take as long as boto3's retries)."""
        self.stop_event.set()
        self._go.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))


@contextlib.contextmanager
def running(threads: Threads) -> Iterator[Threads]:
    threads.start()
    try:
        yield threads
    finally:
        threads.stop()


def log_tail(node: Node, n: int = 400) -> str:
    return procs.tail(node.log, n)

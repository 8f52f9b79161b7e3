"""Configuration: a TOML file, then NEARSTORE_* environment variables, then
command-line flags, in rising precedence.

Example ``nearstore.toml``::

    [server]
    host = "0.0.0.0"
    port = 9000
    data_dir = "/var/lib/nearstore"
    domain = "s3.local"          # enables virtual-hosted-style requests
    region = "us-east-1"

    [[credentials]]              # as many pairs as needed
    access_key = "trainer"
    secret_key = "..."

    [tls]
    cert = "/etc/nearstore/cert.pem"
    key = "/etc/nearstore/key.pem"

    [[buckets]]                  # front a bucket of another S3 store
    name = "datasets"            # what clients see; "*" = every bucket there
    endpoint = "https://s3.us-east-1.amazonaws.com"
    bucket = "my-datasets"       # default: same as name
    prefix = ""                  # optional key prefix inside it
    region = "us-east-1"
    addressing = "virtual"       # or "path" (MinIO, Ceph, SeaweedFS)
    access_key = "AKIA..."       # the backing store's own credentials
    secret_key = "..."
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nearstore.gateway.conn import ConnLimits
from nearstore.metadata.defaults import DEFAULT_CHUNK_SIZE, DEV_ACCESS_KEY, DEV_SECRET_KEY


class ConfigError(ValueError):
    pass


_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object) -> int:
    """'10GiB', '512MiB', '4M', 1048576 -> bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    num = text.rstrip("KMGTIB")
    unit = text[len(num):]
    try:
        return int(float(num) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ConfigError(f"not a size: {value!r} (use e.g. 512MiB, 10GiB)") from None


@dataclass
class CacheConfig:
    """[cache]: the node-local chunk cache in front of upstream buckets."""

    enabled: bool = True
    dir: str = ""  # default: <data_dir>/cache
    size: int = 10 << 30
    # 16 MiB by measurement (512 MiB object, nearstore as the backing store,
    # curl, this 2-core machine; cold / warm GB/s): 1 MiB 0.34 / 1.65,
    # 4 MiB 0.31 / 2.15, 8 MiB 0.49 / 1.85, 16 MiB 0.78 / 2.77,
    # 32 MiB 0.76 / 2.58. Larger chunks mean fewer fills and sends per byte;
    # beyond 16 MiB nothing improves and random small ranges read more.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    policy: str = "sieve"  # by hit ratio on training-like traces: bench/eviction.py
    meta_ttl: float = 5.0
    prefetch: int = 4
    # Verify each chunk's checksum before every send. Turning it off exists
    # to measure what it costs (bench/RESULTS.md); it gives up the promise
    # that a flipped bit is never served.
    verify: bool = True
    # A chunk hashed less than this many seconds ago, whose file has not
    # changed since (inode, size, mtime, ctime), is sent without hashing it
    # again (cache/store.py open_verified); 0 hashes on every read.
    reverify_s: float = 60.0


@dataclass(frozen=True)
class UpstreamConfig:
    """One [[buckets]] entry: a gateway bucket served by an S3 store."""

    name: str  # the bucket clients see, or "*" for every bucket of the upstream
    endpoint: str
    bucket: str  # upstream bucket ("" with name "*": same as the client's)
    prefix: str = ""
    region: str = "us-east-1"
    addressing: str = "path"
    access_key: str = ""
    secret_key: str = ""
    connect_timeout: float = 3.0
    read_timeout: float = 30.0
    # Total time one request may spend on retries before the client gets 503.
    deadline: float = 10.0
    max_attempts: int = 5
    pool_size: int = 64


def _upstream(entry: Mapping[str, Any]) -> UpstreamConfig:
    try:
        name = str(entry["name"])
        endpoint = str(entry["endpoint"]).rstrip("/")
    except KeyError as e:
        raise ConfigError(f"[[buckets]] entry needs {e.args[0]!r}") from None
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"[[buckets]] {name}: endpoint must be an http(s) URL")
    addressing = str(entry.get("addressing", "path"))
    if addressing not in ("path", "virtual"):
        raise ConfigError(f"[[buckets]] {name}: addressing is 'path' or 'virtual'")
    bucket = str(entry.get("bucket", "" if name == "*" else name))
    if name == "*" and (bucket or entry.get("prefix")):
        raise ConfigError("[[buckets]] '*' maps every bucket by its own name: no bucket or prefix")
    known = set(UpstreamConfig.__dataclass_fields__)
    unknown = set(entry) - known
    if unknown:
        raise ConfigError(f"[[buckets]] {name}: unknown settings {sorted(unknown)}")
    kwargs = {k: v for k, v in entry.items() if k not in ("name", "endpoint", "bucket", "addressing")}
    try:
        return UpstreamConfig(name=name, endpoint=endpoint, bucket=bucket, addressing=addressing, **kwargs)
    except TypeError as e:
        raise ConfigError(f"[[buckets]] {name}: {e}") from None


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 9000
    data_dir: str = "./nearstore-data"
    domain: str | None = None
    region: str = "us-east-1"
    credentials: dict[str, str] = field(default_factory=dict)
    tls_cert: str | None = None
    tls_key: str | None = None
    fsync: bool = True
    # Seconds the server waits for in-flight requests on SIGTERM.
    shutdown_timeout: float = 30.0
    using_dev_keys: bool = False
    upstreams: list[UpstreamConfig] = field(default_factory=list)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Processes serving the port (SO_REUSEPORT); the first owns fills and
    # eviction. ``worker`` is set in the processes the owner starts.
    workers: int = 1
    worker: bool = False
    # [cluster]: the peers' base URLs (this node's own included) and this
    # node's id among them (default: host:port of its own URL).
    cluster_peers: list[str] = field(default_factory=list)
    node_id: str = ""
    cluster_secret: str = ""
    cluster_dns: str = ""  # members = this name's addresses (headless Service)
    # Unix socket for short-circuit reads by clients on this machine
    # (cache/localsock.py); "" means <data_dir>/nearstore.sock, "off" none.
    local_socket: str = ""
    # Connection limits before and around a request (gateway/conn.py):
    # seconds to finish a request head, to keep an idle connection, and
    # between two body bytes while the body is awaited.
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 30.0
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def limits(self) -> ConnLimits:
        return ConnLimits(head_timeout=self.head_timeout, idle_timeout=self.idle_timeout,
                          body_timeout=self.body_timeout)


_TIMEOUTS = {
    "NEARSTORE_HEAD_TIMEOUT": "head_timeout",
    "NEARSTORE_IDLE_TIMEOUT": "idle_timeout",
    "NEARSTORE_BODY_TIMEOUT": "body_timeout",
}


def _seconds(value: object, where: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: not a number of seconds: {value!r}") from None
    if not 0 < seconds <= 86400:
        raise ConfigError(f"{where}: must be between 0 and 86400 seconds, not {value!r}")
    return seconds


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name, or a wildcard written otherwise: assume reachable


def _section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    sec = doc.get(name, {})
    if not isinstance(sec, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    return sec


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    env = os.environ if env is None else env
    cfg = Config()
    doc: Mapping[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid TOML in {path}: {e}") from e
        server = _section(doc, "server")
        for name in ("host", "data_dir", "domain", "region", "local_socket"):
            if name in server:
                setattr(cfg, name, str(server[name]))
        if "port" in server:
            cfg.port = int(server["port"])
        if "workers" in server:
            cfg.workers = int(server["workers"])
        if "fsync" in server:
            cfg.fsync = bool(server["fsync"])
        for name in _TIMEOUTS.values():
            if name in server:
                setattr(cfg, name, _seconds(server[name], f"[server] {name}"))
        tls = _section(doc, "tls")
        cfg.tls_cert = tls.get("cert", cfg.tls_cert)
        cfg.tls_key = tls.get("key", cfg.tls_key)
        creds = doc.get("credentials", [])
        if not isinstance(creds, list):
            raise ConfigError("[[credentials]] must be an array of tables")
        for c in creds:
            try:
                cfg.credentials[str(c["access_key"])] = str(c["secret_key"])
            except (KeyError, TypeError):
                raise ConfigError("each [[credentials]] needs access_key and secret_key") from None
        buckets = doc.get("buckets", [])
        if not isinstance(buckets, list):
            raise ConfigError("[[buckets]] must be an array of tables")
        cfg.upstreams = [_upstream(b) for b in buckets]
        names = [u.name for u in cfg.upstreams]
        if len(names) != len(set(names)):
            raise ConfigError("[[buckets]]: a bucket name is mapped twice")
        cl = _section(doc, "cluster")
        peers = cl.get("peers", [])
        if not isinstance(peers, list) or not all(isinstance(x, str) for x in peers):
            raise ConfigError("[cluster] peers is a list of URLs")
        cfg.cluster_peers = [str(x).rstrip("/") for x in peers]
        cfg.node_id = str(cl.get("node_id", ""))
        cfg.cluster_secret = str(cl.get("secret", ""))
        cfg.cluster_dns = str(cl.get("dns", ""))
        c = _section(doc, "cache")
        for name in ("enabled",):
            if name in c:
                cfg.cache.enabled = bool(c[name])
        for name in ("size", "chunk_size"):
            if name in c:
                setattr(cfg.cache, name, parse_size(c[name]))
        if "dir" in c:
            cfg.cache.dir = str(c["dir"])
        if "policy" in c:
            cfg.cache.policy = str(c["policy"])
        if "meta_ttl" in c:
            cfg.cache.meta_ttl = float(c["meta_ttl"])
        if "prefetch" in c:
            cfg.cache.prefetch = int(c["prefetch"])
        if "verify" in c:
            cfg.cache.verify = bool(c["verify"])
        if "reverify_s" in c:
            cfg.cache.reverify_s = float(c["reverify_s"])
    cfg.raw = doc

    simple = {
        "NEARSTORE_HOST": "host",
        "NEARSTORE_DATA_DIR": "data_dir",
        "NEARSTORE_DOMAIN": "domain",
        "NEARSTORE_REGION": "region",
        "NEARSTORE_TLS_CERT": "tls_cert",
        "NEARSTORE_TLS_KEY": "tls_key",
        "NEARSTORE_LOCAL_SOCKET": "local_socket",
    }
    for var, name in simple.items():
        if env.get(var):
            setattr(cfg, name, env[var])
    if env.get("NEARSTORE_CACHE_DIR"):
        cfg.cache.dir = env["NEARSTORE_CACHE_DIR"]
    if env.get("NEARSTORE_CACHE_SIZE"):
        cfg.cache.size = parse_size(env["NEARSTORE_CACHE_SIZE"])
    if env.get("NEARSTORE_WORKERS"):
        cfg.workers = int(env["NEARSTORE_WORKERS"])
    if env.get("NEARSTORE_PORT"):
        cfg.port = int(env["NEARSTORE_PORT"])
    for var, name in _TIMEOUTS.items():
        if env.get(var):
            setattr(cfg, name, _seconds(env[var], var))
    ak, sk = env.get("NEARSTORE_ACCESS_KEY"), env.get("NEARSTORE_SECRET_KEY")
    if bool(ak) != bool(sk):
        raise ConfigError("set both NEARSTORE_ACCESS_KEY and NEARSTORE_SECRET_KEY, or neither")
    if ak and sk:
        cfg.credentials[ak] = sk

    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name.startswith("cache_"):
            attr = name[len("cache_"):]
            setattr(cfg.cache, attr, parse_size(value) if attr in ("size", "chunk_size") else value)
        else:
            setattr(cfg, name, value)
    if env.get("NEARSTORE_CLUSTER_DNS"):
        cfg.cluster_dns = env["NEARSTORE_CLUSTER_DNS"]
    if env.get("NEARSTORE_NODE_ID"):
        cfg.node_id = env["NEARSTORE_NODE_ID"]
    if env.get("NEARSTORE_CLUSTER_SECRET"):
        cfg.cluster_secret = env["NEARSTORE_CLUSTER_SECRET"]
    if (cfg.cluster_peers or cfg.cluster_dns) and not cfg.node_id:
        if cfg.host in ("0.0.0.0", "::", ""):
            raise ConfigError(
                "[cluster] on a wildcard address needs this node's id among the peers: "
                "node_id = \"10.0.0.7:9000\" or NEARSTORE_NODE_ID"
            )
        cfg.node_id = f"{cfg.host}:{cfg.port}"
    if (len(cfg.cluster_peers) > 1 or cfg.cluster_dns) and not cfg.cluster_secret:
        raise ConfigError("[cluster] needs a shared secret (secret = ... or NEARSTORE_CLUSTER_SECRET)")
    if not cfg.cache.dir:
        cfg.cache.dir = os.path.join(cfg.data_dir, "cache")
    if not cfg.local_socket:
        cfg.local_socket = os.path.join(os.path.abspath(cfg.data_dir), "nearstore.sock")
    if cfg.cache.chunk_size < 64 * 1024 or cfg.cache.size < cfg.cache.chunk_size:
        raise ConfigError("[cache] chunk_size must be at least 64 KiB and size at least one chunk")

    if not cfg.credentials:
        cfg.credentials[DEV_ACCESS_KEY] = DEV_SECRET_KEY
        cfg.using_dev_keys = True
    if DEV_SECRET_KEY in cfg.credentials.values() and not is_loopback(cfg.host):
        # The development keys are printed in the README: on an address
        # other machines reach, they would open every object to anyone.
        raise ConfigError(
            f"refusing to serve on {cfg.host} with the published development keys; set your own "
            "with NEARSTORE_ACCESS_KEY and NEARSTORE_SECRET_KEY (or [[credentials]] in the config file)"
        )
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("TLS needs both a certificate and a key")
    if not 1 <= cfg.workers <= 256:
        raise ConfigError(f"workers must be between 1 and 256, not {cfg.workers}")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"invalid port {cfg.port}")
    return cfg

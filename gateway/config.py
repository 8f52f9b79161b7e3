"""Configuration: a TOML file, then NEARSTORE_* environment variables, then
command-line flags, in rising precedence.

Example ``nearstore.toml``::

    [server]
    host = "0.0.0.0"
    port = 9000
    data_dir = "/var/lib/nearstore"
    domain = "s3.local"          # enables virtual-hosted-style requests
    region = "us-east-1"

    [[credentials]]              # the first user's keys, as many pairs as needed
    access_key = "trainer"
    secret_key = "..."

    [[users]]                    # more tenants: their own keys and buckets
    name = "vision"
    display_name = "Vision team" # default: name
    id = "..."                   # canonical user id (default: SHA-256 of name)
    keys = [{ access_key = "vision-1", secret_key = "..." }]

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
    owner = "vision"             # the user who owns it (default: the first)
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any

from nearstore.cache.eviction import POLICIES
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
    # Fills streaming from the backing store at once, node-wide (per
    # process that fills): each holds an upstream connection and up to
    # 1 MiB of write-behind; 64 x 16 MiB chunks keep any one backing store
    # busy, and more only queue inside its connection pool.
    max_fills: int = 64
    # Loaders' hints (cache.prefetch): objects worked on at once, and the
    # share of the budget prefetched chunks not read yet may take.
    hints: bool = True
    hint_lanes: int = 4
    hint_lanes_max: int = 32
    hint_share: float = 0.25
    # Write prefetched chunks with O_DIRECT (cache.store ChunkWriter): off by
    # default, for a dataset larger than the node's memory (bench/RESULTS.md).
    hint_direct: bool = False
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
    owner: str = ""  # the [[users]] name that owns it; "" the first user


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
    if bool(entry.get("access_key")) != bool(entry.get("secret_key")):
        raise ConfigError(f"[[buckets]] {name}: set both access_key and secret_key, or neither (a public "
                          "bucket, read with unsigned requests)")
    kwargs = {k: v for k, v in entry.items() if k not in ("name", "endpoint", "bucket", "addressing")}
    checks: dict[str, Callable[[object], Any]] = {
        "prefix": _text, "region": _text, "access_key": _text, "secret_key": _text,
        "connect_timeout": _seconds, "read_timeout": _seconds, "deadline": _seconds,
        "max_attempts": _integer(1, 100), "pool_size": _integer(1, 4096), "owner": _text,
    }
    for k, v in list(kwargs.items()):
        try:
            kwargs[k] = checks[k](v)
        except ValueError as e:
            raise ConfigError(f"[[buckets]] {name}: {k}: {e}") from None
    try:
        return UpstreamConfig(name=name, endpoint=endpoint, bucket=bucket, addressing=addressing, **kwargs)
    except TypeError as e:
        raise ConfigError(f"[[buckets]] {name}: {e}") from None


@dataclass(frozen=True)
class User:
    """A tenant: whose buckets are whose. ``id`` is the canonical user id
    (64 hex digits, as S3 shows it in Owner fields and grants)."""

    name: str
    id: str
    display_name: str


FIRST_USER = "owner"  # the name of the user the environment's and [[credentials]]' keys belong to


def _canonical_id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


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
    hot_path: bool = True
    # The control plane (metrics, ring): requests from this machine, or
    # signed by a user (the ring) or by an operator (metrics).
    control_from_loopback: bool = True
    operators: list[str] = field(default_factory=list)  # [[users]] names; empty: the first user
    metrics_token: str = ""  # a bearer token for metrics scrapers (Prometheus)
    max_uploads: int = 512  # requests with a body in flight at once; beyond: 503 SlowDown
    max_connections: int = 4096  # open client connections per process; beyond: 503 SlowDown, closed
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
    # Peers over TLS (https peer URLs, or DNS discovery on a node serving
    # HTTPS): the CA their certificates are checked against, the name they
    # must carry when addressed by IP, and this node's client certificate
    # for mutual TLS (cluster_mtls: peer routes demand one).
    cluster_ca: str = ""
    cluster_tls_name: str = ""
    cluster_cert: str = ""
    cluster_key: str = ""
    cluster_mtls: bool = False
    # Unix socket for short-circuit reads by clients on this machine
    # (cache/localsock.py); "" means <data_dir>/nearstore.sock, "off" none.
    local_socket: str = ""
    # Connection limits before and around a request (gateway/conn.py):
    # seconds to finish a request head, to keep an idle connection, and
    # between two body bytes while the body is awaited.
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 30.0
    send_timeout: float = 60.0  # a client that reads nothing of a response for this long is dropped
    # NEARSTORE_* variables no setting reads (a typo?), said at start-up.
    warnings: list[str] = field(default_factory=list)
    # The tenants, the first one holding ``credentials``' keys of its own
    # (the environment's and [[credentials]]'); ``key_users`` maps every
    # access key of ``credentials`` to its user.
    users: list[User] = field(default_factory=list)
    key_users: dict[str, User] = field(default_factory=dict)
    # users by canonical id, made once per list of users (see user_by_id)
    _by_id: tuple[int, int, dict[str, User]] | None = field(default=None, repr=False, compare=False)

    @property
    def first_user(self) -> User:
        if not self.users:  # a Config made by hand (tests, tools), not by load(): its keys are one user's
            first = next(iter(self.credentials), "")
            self.users = [User(FIRST_USER, _canonical_id(first), first)]
        return self.users[0]

    def user_of(self, access_key: str) -> User:
        """The user an authenticated access key belongs to. KeyError for a
        key no user holds (an anonymous request's "" included): never a
        default user, so a path that forgot to authenticate grants nothing."""
        if not self.key_users:  # made by hand (tests, tools): every key of ``credentials`` is the first user's
            if access_key not in self.credentials:
                raise KeyError(access_key)
            return self.first_user
        return self.key_users[access_key]

    def user_by_id(self, user_id: str) -> User | None:
        """The user with this canonical id (Owner fields, grants), if any."""
        users = self.users or [self.first_user]
        memo = self._by_id
        if memo is None or memo[0] != id(users) or memo[1] != len(users):
            memo = self._by_id = (id(users), len(users), {u.id: u for u in users})
        return memo[2].get(user_id)

    def is_operator(self, user: User) -> bool:
        """May read the control plane's metrics from anywhere."""
        return user.id in {self.user_named(n).id for n in self.operators or [""]}

    def user_named(self, name: str) -> User:
        """The user called ``name`` ("" is the first)."""
        if not name:
            return self.first_user
        for u in self.users:
            if u.name == name:
                return u
        raise ConfigError(f"no user named {name!r} (users: {', '.join(u.name for u in self.users)})")

    @property
    def limits(self) -> ConnLimits:
        return ConnLimits(head_timeout=self.head_timeout, idle_timeout=self.idle_timeout,
                          body_timeout=self.body_timeout, send_timeout=self.send_timeout,
                          max_connections=self.max_connections)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name, or a wildcard written otherwise: assume reachable
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)



# --- every setting, once -------------------------------------------------------
#
# The file, the environment and the command line are read through this one
# table, and docs/CONFIG.md is generated from it (``reference``). A TOML key
# or section that is not here is an error naming the file, the line and the
# nearest valid name.


@dataclass(frozen=True)
class Setting:
    section: str  # TOML table
    key: str  # TOML key
    attr: str  # Config attribute ("cache.size" for CacheConfig's)
    parse: Callable[[object], Any]  # a TOML value or a string from env/flag -> value
    help: str
    env: str | None = None
    flag: str | None = None
    secret: bool = False
    type_name: str = "string"

    @property
    def id(self) -> str:
        """The override key (and argparse dest): ``port``, ``cache_size``."""
        return self.attr.replace(".", "_")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, not {value!r}")
    return value


def _optional_text(value: object) -> str | None:
    return _text(value) or None


def _integer(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected a whole number, not {value!r}")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"expected a whole number, not {value!r}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}, not {n}")
        return n

    return parse


def _number(lo: float, hi: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, not {value!r}")
        try:
            x = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, not {value!r}") from None
        if not lo <= x <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}, not {value!r}")
        return x

    return parse


def _seconds(value: object) -> float:
    seconds = _number(0, 86400)(value)
    if seconds == 0:
        raise ValueError(f"must be between 0 and 86400 seconds, not {value!r}")
    return seconds


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, not {value!r}")


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size such as 10GiB, not {value!r}")
    try:
        return parse_size(value)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def _policy(value: object) -> str:
    name = _text(value)
    if name not in POLICIES:
        raise ValueError(f"one of {sorted(POLICIES)}, not {name!r}")
    return name


def _urls(value: object) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError("a list of URLs")
    return [x.strip().rstrip("/") for x in items if x.strip()]


def _names(value: object) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError("a list of names")
    return [x.strip() for x in items if x.strip()]


_INT, _SECONDS, _BOOL, _SIZE = "integer", "seconds", "boolean", "size"

SETTINGS: tuple[Setting, ...] = (
    Setting("server", "host", "host", _text, "Address to listen on. Anything but loopback needs your own keys.",
            "NEARSTORE_HOST", "--host"),
    Setting("server", "port", "port", _integer(1, 65535), "TCP port of the S3 endpoint.", "NEARSTORE_PORT",
            "--port", type_name=_INT),
    Setting("server", "data_dir", "data_dir", _text, "Where the local store keeps objects (and, by default, "
            "the chunk cache and the local socket).", "NEARSTORE_DATA_DIR", "--data-dir"),
    Setting("server", "domain", "domain", _optional_text, "Serve virtual-hosted-style requests for `<bucket>.DOMAIN`.",
            "NEARSTORE_DOMAIN", "--domain"),
    Setting("server", "region", "region", _text, "The region the node answers as (SigV4 scope).",
            "NEARSTORE_REGION"),
    Setting("server", "workers", "workers", _integer(1, 256), "Processes serving the port; the first fills "
            "and evicts for all.", "NEARSTORE_WORKERS", "--workers", type_name=_INT),
    Setting("server", "fsync", "fsync", _boolean, "fsync each object before it becomes visible.",
            "NEARSTORE_FSYNC", type_name=_BOOL),
    Setting("server", "hot_path", "hot_path", _boolean, "Serve GetObject and HeadObject on the lean httptools "
            "path (gateway/hotpath.py); off: aiohttp serves everything.", "NEARSTORE_HOT_PATH", type_name=_BOOL),
    Setting("server", "local_socket", "local_socket", _text, "Unix socket for short-circuit local reads; "
            "empty: `<data_dir>/nearstore.sock`; `off`: none.", "NEARSTORE_LOCAL_SOCKET"),
    Setting("server", "head_timeout", "head_timeout", _seconds, "Seconds to receive a request head.",
            "NEARSTORE_HEAD_TIMEOUT", type_name=_SECONDS),
    Setting("server", "idle_timeout", "idle_timeout", _seconds, "Seconds an idle keep-alive connection is kept.",
            "NEARSTORE_IDLE_TIMEOUT", type_name=_SECONDS),
    Setting("server", "body_timeout", "body_timeout", _seconds, "Seconds allowed between two bytes of a "
            "request body.", "NEARSTORE_BODY_TIMEOUT", type_name=_SECONDS),
    Setting("server", "send_timeout", "send_timeout", _seconds, "Seconds a client may read nothing of a response "
            "before it is dropped (a stalled reader holds a file, a socket and perhaps a backing stream).",
            "NEARSTORE_SEND_TIMEOUT", type_name=_SECONDS),
    Setting("server", "shutdown_timeout", "shutdown_timeout", _seconds, "Seconds in-flight requests get to "
            "finish on SIGTERM.", "NEARSTORE_SHUTDOWN_TIMEOUT", type_name=_SECONDS),
    Setting("server", "control_from_loopback", "control_from_loopback", _boolean, "Answer the control routes "
            "(`/_nearstore/metrics`, `/_nearstore/ring`) to requests from this machine unsigned; from elsewhere they "
            "must be signed (the ring by any user, metrics by an operator).", "NEARSTORE_CONTROL_FROM_LOOPBACK",
            type_name=_BOOL),
    Setting("server", "operators", "operators", _names, "The [[users]] who may read the metrics from elsewhere "
            "(default: the first user; env: comma-separated).", "NEARSTORE_OPERATORS", type_name="list of names"),
    Setting("server", "max_uploads", "max_uploads", _integer(1, 1_000_000), "Requests with a body (PUT, POST) "
            "received at once; beyond, 503 SlowDown with Retry-After before the body is read.",
            "NEARSTORE_MAX_UPLOADS", type_name=_INT),
    Setting("server", "max_connections", "max_connections", _integer(1, 1_000_000), "Client connections open "
            "at once (per process); a connection beyond it is answered 503 SlowDown with Retry-After and closed.",
            "NEARSTORE_MAX_CONNECTIONS", type_name=_INT),
    Setting("server", "metrics_token", "metrics_token", _text, "A bearer token that may read "
            "`/_nearstore/metrics` from elsewhere (`Authorization: Bearer ...`, what Prometheus sends); empty: none.",
            "NEARSTORE_METRICS_TOKEN", secret=True),
    Setting("tls", "cert", "tls_cert", _optional_text, "PEM certificate: serve HTTPS (with [tls] key).",
            "NEARSTORE_TLS_CERT", "--tls-cert"),
    Setting("tls", "key", "tls_key", _optional_text, "PEM private key of [tls] cert.", "NEARSTORE_TLS_KEY", "--tls-key"),
    Setting("cache", "enabled", "cache.enabled", _boolean, "Read [[buckets]] through the node-local chunk "
            "cache.", "NEARSTORE_CACHE_ENABLED", type_name=_BOOL),
    Setting("cache", "dir", "cache.dir", _text, "Chunk cache directory (empty: `<data_dir>/cache`).",
            "NEARSTORE_CACHE_DIR", "--cache-dir"),
    Setting("cache", "size", "cache.size", _size, "Chunk cache byte budget, e.g. 100GiB.",
            "NEARSTORE_CACHE_SIZE", "--cache-size", type_name=_SIZE),
    Setting("cache", "chunk_size", "cache.chunk_size", _size, "Size of the chunks objects are cached in "
            "(at least 64KiB).", "NEARSTORE_CHUNK_SIZE", type_name=_SIZE),
    Setting("cache", "policy", "cache.policy", _policy, f"Eviction policy: one of {', '.join(sorted(POLICIES))}.",
            "NEARSTORE_CACHE_POLICY"),
    Setting("cache", "meta_ttl", "cache.meta_ttl", _number(0, 86400), "Seconds an object's size and ETag are "
            "trusted without asking the backing store.", "NEARSTORE_META_TTL", type_name=_SECONDS),
    Setting("cache", "prefetch", "cache.prefetch", _integer(1, 1024), "Chunks filled ahead of the one being "
            "sent.", "NEARSTORE_PREFETCH", type_name=_INT),
    Setting("cache", "max_fills", "cache.max_fills", _integer(1, 100_000), "Chunk fills from the backing store "
            "in flight at once on the node; more wait their turn. A fill no reader waits for any more stops "
            "unless three quarters done.", "NEARSTORE_MAX_FILLS", type_name=_INT),
    Setting("cache", "hints", "cache.hints", _boolean, "Act on loaders' hints (`POST /_nearstore/hint`): fill "
            "the chunks they will read next, below clients' fills.", "NEARSTORE_CACHE_HINTS", type_name=_BOOL),
    Setting("cache", "hint_lanes", "cache.hint_lanes", _integer(1, 256), "Hinted objects prefetched at once at "
            "first (and always).", "NEARSTORE_HINT_LANES", type_name=_INT),
    Setting("cache", "hint_lanes_max", "cache.hint_lanes_max", _integer(1, 256), "Hinted objects prefetched at "
            "once at most: a lane is added each time a reader catches a prefetched chunk still filling (below "
            "`hint_lanes`, `hint_lanes` holds).", "NEARSTORE_HINT_LANES_MAX", type_name=_INT),
    Setting("cache", "hint_share", "cache.hint_share", _number(0.0, 0.9), "Share of [cache] size that "
            "prefetched chunks nobody has read yet may take.", "NEARSTORE_HINT_SHARE", type_name="number"),
    Setting("cache", "hint_direct", "cache.hint_direct", _boolean, "Write prefetched chunks with O_DIRECT: "
            "a third less node CPU per prefetched byte here, but chunks read back into memory later are re-read "
            "at 1.7x the CPU of chunks written through it. For datasets larger than the node's memory.",
            "NEARSTORE_HINT_DIRECT", type_name=_BOOL),
    Setting("cache", "verify", "cache.verify", _boolean, "Check each chunk's checksum before it is sent "
            "(off only to measure what it costs).", "NEARSTORE_CACHE_VERIFY", type_name=_BOOL),
    Setting("cache", "reverify_s", "cache.reverify_s", _number(0, 86400), "A chunk hashed this recently, its "
            "file unchanged, is sent without hashing again; 0: hash every read.", "NEARSTORE_REVERIFY_S",
            type_name=_SECONDS),
    Setting("cluster", "peers", "cluster_peers", _urls, "Base URLs of every node of the cluster, this one "
            "included (env: comma-separated).", "NEARSTORE_CLUSTER_PEERS", type_name="list of URLs"),
    Setting("cluster", "node_id", "node_id", _text, "This node's host:port among the peers (default: "
            "host:port).", "NEARSTORE_NODE_ID"),
    Setting("cluster", "secret", "cluster_secret", _text, "Shared secret the peers sign their requests with.",
            "NEARSTORE_CLUSTER_SECRET", secret=True),
    Setting("cluster", "dns", "cluster_dns", _text, "Members are this DNS name's addresses (a headless "
            "Service); reached over https when this node serves HTTPS ([tls]).", "NEARSTORE_CLUSTER_DNS"),
    Setting("cluster", "ca", "cluster_ca", _text, "PEM CA bundle the peers' HTTPS certificates are checked "
            "against (empty: the system's). With [cluster] mtls, also the CA of the peers' client certificates.",
            "NEARSTORE_CLUSTER_CA"),
    Setting("cluster", "tls_name", "cluster_tls_name", _text, "Name the peers' certificates must carry "
            "(empty: the host of each peer's URL; with [cluster] dns, that DNS name).", "NEARSTORE_CLUSTER_TLS_NAME"),
    Setting("cluster", "cert", "cluster_cert", _text, "PEM client certificate this node presents to its peers "
            "(mutual TLS; with [cluster] key).", "NEARSTORE_CLUSTER_CERT"),
    Setting("cluster", "key", "cluster_key", _text, "PEM private key of [cluster] cert.", "NEARSTORE_CLUSTER_KEY"),
    Setting("cluster", "mtls", "cluster_mtls", _boolean, "Mutual TLS between peers: the peer API answers "
            "only requests over TLS with a client certificate from [cluster] ca (S3 clients need none).",
            "NEARSTORE_CLUSTER_MTLS", type_name=_BOOL),
)
_BY_KEY = {(s.section, s.key): s for s in SETTINGS}
TABLES = sorted({s.section for s in SETTINGS})
ARRAYS = {
    "credentials": ("access_key", "secret_key"),
    "users": ("name", "id", "display_name", "keys"),
    "buckets": tuple(UpstreamConfig.__dataclass_fields__),
}
# Read by the clients and the tools, not by a node: not typos.
CLIENT_VARIABLES = {"NEARSTORE_ENDPOINT", "NEARSTORE_ACCESS_KEY", "NEARSTORE_SECRET_KEY", "NEARSTORE_LOCAL_READS"}
# The processes a node starts are told they are workers.
_INTERNAL = {"worker"}


def _get(cfg: Config, attr: str) -> Any:
    obj: Any = cfg
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Config, attr: str, value: Any) -> None:
    *path, last = attr.split(".")
    obj: Any = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _nearest(name: str, names: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f" (valid: {', '.join(sorted(names))})"


def _line_of(text: str, table: str | None, key: str | None) -> int | None:
    """The line of ``[table]`` (key None) or of ``key =`` inside it."""
    current: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\[?\s*([^\]\s]+)\s*\]\]?", line)
        if header:
            current = header.group(1).strip('"')
            if key is None and current == table:
                return n
            continue
        if key is not None and current == table and re.match(rf"\s*[\"']?{re.escape(key)}[\"']?\s*=", line):
            return n
    return None


class _Where:
    """Error messages that point at the file and line."""

    def __init__(self, path: str, text: str) -> None:
        self.path, self.text = path, text

    def error(self, message: str, table: str | None = None, key: str | None = None) -> ConfigError:
        line = _line_of(self.text, table, key) if table else None
        return ConfigError(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")


def _check_names(doc: Mapping[str, Any], where: _Where) -> None:
    valid_tables = [*TABLES, *ARRAYS]
    for table, content in doc.items():
        if table not in valid_tables:
            raise where.error(f"unknown section [{table}]{_nearest(table, valid_tables)}", table)
        if table in ARRAYS:
            if not isinstance(content, list) or not all(isinstance(e, Mapping) for e in content):
                raise where.error(f"[[{table}]] must be an array of tables ([[{table}]] headers)", table)
            for entry in content:
                for key in entry:
                    if key not in ARRAYS[table]:
                        raise where.error(f"[[{table}]] unknown setting {key!r}{_nearest(key, ARRAYS[table])}",
                                          table, key)
            continue
        if not isinstance(content, Mapping):
            raise where.error(f"[{table}] must be a table", table)
        keys = [s.key for s in SETTINGS if s.section == table]
        for key in content:
            if key not in keys:
                raise where.error(f"[{table}] unknown setting {key!r}{_nearest(key, keys)}", table, key)


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """The configuration from a TOML file, then NEARSTORE_* variables, then
    ``overrides`` (flags, keyed by ``Setting.id``), in rising precedence."""
    env = os.environ if env is None else env
    cfg = Config()
    declared: list[tuple[User, dict[str, str]]] = []
    if path:
        try:
            with open(path, "rb") as f:
                raw = f.read()
            doc = tomllib.loads(raw.decode())
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"invalid TOML in {path}: {e}") from e
        where = _Where(path, raw.decode())
        _check_names(doc, where)
        for table in TABLES:
            for key, value in doc.get(table, {}).items():
                setting = _BY_KEY[(table, key)]
                try:
                    _set(cfg, setting.attr, setting.parse(value))
                except ValueError as e:
                    raise where.error(f"[{table}] {key}: {e}", table, key) from None
        for c in doc.get("credentials", []):
            try:
                cfg.credentials[_text(c["access_key"])] = _text(c["secret_key"])
            except (KeyError, ValueError):
                raise where.error("each [[credentials]] needs access_key and secret_key (strings)",
                                  "credentials") from None
        for u in doc.get("users", []):
            declared.append(_user(u, where))
        cfg.upstreams = [_upstream(b) for b in doc.get("buckets", [])]
        names = [u.name for u in cfg.upstreams]
        if len(names) != len(set(names)):
            raise where.error("[[buckets]]: a bucket name is mapped twice", "buckets")

    for setting in SETTINGS:
        if setting.env and env.get(setting.env):
            try:
                _set(cfg, setting.attr, setting.parse(env[setting.env]))
            except ValueError as e:
                raise ConfigError(f"{setting.env}: {e}") from None
    ak, sk = env.get("NEARSTORE_ACCESS_KEY"), env.get("NEARSTORE_SECRET_KEY")
    if bool(ak) != bool(sk):
        raise ConfigError("set both NEARSTORE_ACCESS_KEY and NEARSTORE_SECRET_KEY, or neither")
    if ak and sk:
        cfg.credentials[ak] = sk
    known_env = {s.env for s in SETTINGS if s.env} | CLIENT_VARIABLES
    for var in sorted(v for v in env if v.startswith("NEARSTORE_") and v not in known_env):
        if not var.startswith("NEARSTORE_IT_"):  # the test suite's own
            cfg.warnings.append(f"{var} is not a nearstore setting{_nearest(var, sorted(known_env))}")

    by_id = {s.id: s for s in SETTINGS}
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name in _INTERNAL:
            setattr(cfg, name, value)
            continue
        setting = by_id[name]
        try:
            _set(cfg, setting.attr, setting.parse(value))
        except ValueError as e:
            raise ConfigError(f"{setting.flag or name}: {e}") from None

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
    _settle_users(cfg, declared, env.get("NEARSTORE_ACCESS_KEY") or None)
    if DEV_SECRET_KEY in cfg.credentials.values() and not is_loopback(cfg.host):
        # The development keys are printed in the README: on an address
        # other machines reach, they would open every object to anyone.
        raise ConfigError(
            f"refusing to serve on {cfg.host} with the published development keys; set your own "
            "with NEARSTORE_ACCESS_KEY and NEARSTORE_SECRET_KEY (or [[credentials]] in the config file)"
        )
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("TLS needs both a certificate and a key")
    _check_cluster_tls(cfg)
    for name in cfg.operators:
        cfg.user_named(name)  # ConfigError for a name no user has
    return cfg


def _check_cluster_tls(cfg: Config) -> None:
    """Peers reach each other at the address clients use: a node serving
    HTTPS has https peers (an http:// peer URL would fail, or worse, reach
    something else in clear), and mutual TLS needs all of its parts."""
    plain = [u for u in cfg.cluster_peers if not u.startswith("https://")]
    if cfg.tls_cert and plain:
        raise ConfigError(f"this node serves HTTPS ([tls]); its [cluster] peers must be https:// URLs, not {plain}")
    if bool(cfg.cluster_cert) != bool(cfg.cluster_key):
        raise ConfigError("[cluster] cert and key go together (this node's client certificate)")
    if cfg.cluster_mtls and not (cfg.tls_cert and cfg.cluster_ca and cfg.cluster_cert):
        raise ConfigError("[cluster] mtls needs [tls] cert and key (peers talk HTTPS), [cluster] ca (who may "
                          "connect) and [cluster] cert and key (what this node presents)")


def _user(entry: Mapping[str, Any], where: _Where) -> tuple[User, dict[str, str]]:
    """One [[users]] entry: the user and its keys (access key -> secret)."""
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise where.error("each [[users]] needs a name", "users")
    if name == FIRST_USER:
        raise where.error(f"[[users]] {name}: the name is the first user's, whose keys are the environment's "
                          "and [[credentials]]'", "users", "name")
    uid = entry.get("id", _canonical_id(name))
    if not isinstance(uid, str) or not re.fullmatch(r"[0-9a-f]{64}", uid):
        raise where.error(f"[[users]] {name}: id is a canonical user id, 64 lower-case hex digits", "users", "id")
    display = entry.get("display_name", name)
    if not isinstance(display, str) or not display:
        raise where.error(f"[[users]] {name}: display_name is a string", "users", "display_name")
    keys: dict[str, str] = {}
    raw = entry.get("keys")
    if not isinstance(raw, list) or not raw:
        raise where.error(f"[[users]] {name}: keys = [{{ access_key = ..., secret_key = ... }}, ...], one or more",
                          "users", "keys")
    for k in raw:
        if not (isinstance(k, Mapping) and set(k) == {"access_key", "secret_key"}
                and all(isinstance(v, str) and v for v in k.values())):
            raise where.error(f"[[users]] {name}: each key is {{ access_key = \"...\", secret_key = \"...\" }}",
                              "users", "keys")
        keys[k["access_key"]] = k["secret_key"]
    return User(name, uid, display), keys


def _settle_users(cfg: Config, declared: list[tuple[User, dict[str, str]]], env_key: str | None) -> None:
    """The first user holds the keys read so far (the environment's first:
    its canonical id is that key's hash, as every Owner field showed before
    there were users); the declared users follow with their own keys."""
    first_key = env_key if env_key in cfg.credentials else next(iter(cfg.credentials))
    first = User(FIRST_USER, _canonical_id(first_key), first_key)
    cfg.users = [first]
    cfg.key_users = {ak: first for ak in cfg.credentials}
    for user, keys in declared:
        for u in cfg.users:
            if u.name == user.name or u.id == user.id:
                raise ConfigError(f"[[users]] {user.name}: the {'name' if u.name == user.name else 'id'} "
                                  f"is also user {u.name!r}'s")
        for ak, sk in keys.items():
            if ak in cfg.key_users:
                raise ConfigError(f"[[users]] {user.name}: access key {ak!r} is also user "
                                  f"{cfg.key_users[ak].name!r}'s")
            cfg.credentials[ak] = sk
            cfg.key_users[ak] = user
        cfg.users.append(user)
    for up in cfg.upstreams:
        cfg.user_named(up.owner)  # a typo is an error now, not a bucket nobody owns


# --- showing it ------------------------------------------------------------------

MASK = "********"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return '""'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(cfg: Config) -> str:
    """The effective configuration as TOML, secrets masked
    (``nearstore serve --print-config``)."""
    out: list[str] = []
    for table in ("server", "tls", "cache", "cluster"):
        out.append(f"[{table}]")
        for s in SETTINGS:
            if s.section == table:
                value = _get(cfg, s.attr)
                out.append(f"{s.key} = {_toml(MASK if s.secret and value else value)}")
        out.append("")
    first = cfg.users[0] if cfg.users else None
    for ak in cfg.credentials:
        if first is not None and cfg.key_users.get(ak) is not first:
            continue
        note = "  # the published development keys" if cfg.using_dev_keys else ""
        out += ["[[credentials]]", f"access_key = {_toml(ak)}{note}", f"secret_key = {_toml(MASK)}", ""]
    for user in cfg.users[1:]:
        keys = ", ".join(f"{{ access_key = {_toml(ak)}, secret_key = {_toml(MASK)} }}"
                         for ak, u in cfg.key_users.items() if u is user)
        out += ["[[users]]", f"name = {_toml(user.name)}", f"id = {_toml(user.id)}",
                f"display_name = {_toml(user.display_name)}", f"keys = [{keys}]", ""]
    for up in cfg.upstreams:
        out.append("[[buckets]]")
        for name in ARRAYS["buckets"]:
            value = getattr(up, name)
            out.append(f"{name} = {_toml(MASK if name == 'secret_key' and value else value)}")
        out.append("")
    return "\n".join(out)


def reference() -> str:
    """docs/CONFIG.md: every setting, from ``SETTINGS``."""
    defaults = Config()
    lines = [
        "# Configuration reference",
        "",
        "Generated from `gateway/config.py` (`SETTINGS`) by `make config-doc`; a test keeps it equal to the code.",
        "",
        "A node reads a TOML file (`nearstore serve --config FILE`), then `NEARSTORE_*` environment",
        "variables, then flags, each overriding the one before. A key or section the file does not",
        "define is an error naming the file, the line and the nearest valid name; a `NEARSTORE_*`",
        "variable no setting reads is warned about at start-up. `nearstore serve --print-config`",
        "shows the effective configuration, secrets masked.",
        "",
    ]
    for table in ("server", "tls", "cache", "cluster"):
        lines += [f"## [{table}]", "", "| key | type | default | environment | flag | meaning |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for s in SETTINGS:
            if s.section != table:
                continue
            default = _get(defaults, s.attr)
            shown = "" if default in ("", None, []) else f"`{_toml(default)}`"
            if s.attr == "cache.size" or s.attr == "cache.chunk_size":
                shown = f"`{default >> 20} MiB`" if default < 1 << 30 else f"`{default >> 30} GiB`"
            lines.append(f"| `{s.key}` | {s.type_name} | {shown} | `{s.env}` | {f'`{s.flag}`' if s.flag else ''} "
                         f"| {s.help} |")
        lines.append("")
    lines += [
        "## [[credentials]]",
        "",
        "As many as needed; each is a key pair clients sign with. Environment: `NEARSTORE_ACCESS_KEY` and",
        "`NEARSTORE_SECRET_KEY` (one pair). Without any, the published development keys, on loopback only.",
        "",
        "| key | meaning |",
        "| --- | --- |",
        "| `access_key` | the access key id |",
        "| `secret_key` | its secret |",
        "",
        "## [[users]]",
        "",
        "More tenants, each with its own keys and buckets. The keys of `[[credentials]]` and the environment",
        f"belong to the first user, `{FIRST_USER}`. A bucket belongs to the user who created it; only its owner",
        "may read, list or write it (AccessDenied otherwise, on every node, cache hits included).",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
        "| `name` | required | the user's name (`[[buckets]] owner` names it) |",
        "| `id` | SHA-256 of `name` | the canonical user id, 64 hex digits, shown in Owner fields |",
        "| `display_name` | `name` | the DisplayName shown with it |",
        "| `keys` | required | `[{ access_key = \"...\", secret_key = \"...\" }, ...]`, one or more |",
        "",
        "## [[buckets]]",
        "",
        "Each entry fronts a bucket of another S3 store (read through the cache when `[cache] enabled`).",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
    ]
    meaning = {
        "name": "the bucket clients see; `\"*\"` maps every bucket of the store by its own name",
        "endpoint": "the store's URL, `http(s)://host:port`",
        "bucket": "the store's bucket (default: `name`)",
        "prefix": "a key prefix inside it",
        "region": "the store's region (SigV4 scope)",
        "addressing": "`path` (MinIO, Ceph, SeaweedFS) or `virtual` (AWS)",
        "access_key": "the store's own access key",
        "secret_key": "its secret",
        "connect_timeout": "seconds to connect",
        "read_timeout": "seconds without a byte before a request fails",
        "deadline": "seconds one request may spend on retries before the client gets 503",
        "max_attempts": "attempts per request",
        "pool_size": "connections kept to the store",
        "owner": "the `[[users]]` name that owns the bucket (default: the first user)",
    }
    for name, f in UpstreamConfig.__dataclass_fields__.items():
        default = "" if f.default is MISSING or f.default in ("", None) else f"`{_toml(f.default)}`"
        if name in ("name", "endpoint"):
            default = "required"
        lines.append(f"| `{name}` | {default} | {meaning.get(name, '')} |")
    return "\n".join(lines) + "\n"


def add_flags(parser: Any) -> None:
    """The settings that have a flag, as ``nearstore serve`` arguments."""
    for s in SETTINGS:
        if s.flag:
            parser.add_argument(s.flag, dest=s.id, metavar=s.key.upper(), help=f"{s.help} ({s.env})")


if __name__ == "__main__":  # python -m nearstore.gateway.config > docs/CONFIG.md
    print(reference(), end="")

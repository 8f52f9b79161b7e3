"""Cache-aware parallel reads: each chunk straight from the node that caches it.

In a cluster every chunk of a cached bucket has one owner on the ring, and
a node asked for a chunk it does not own fetches it from the owner first:
a plain ranged read through one node of N pays that extra hop for
(N-1)/N of its bytes. This reader asks the node it is given for the ring
and the bucket's chunk layout (``GET /_nearstore/ring?bucket=B``, see
gateway/app.py), rebuilds the same ring locally (``Ring.build`` is a pure
function of the membership, and the down nodes are routed around as the
node does), computes each chunk's id (``metadata.identity.chunk_id``) and owner,
and sends each chunk-aligned ranged GET (If-Match the ETag) to the owner's
own S3 endpoint, which serves it from its cache. (The ring route needs no
signature, like the ring itself: it tells the cluster's configuration, not
data; every byte still comes by a signed GET.)

Same shapes as ``clients.ranged`` (``s3`` is a boto3 client for any node,
e.g. ``nearstore.connect()``)::

    read_into(s3, bucket, key, out=None, *, streams=16, chunk=CHUNK) -> memoryview
    read_bytes(s3, bucket, key, *, streams=16, chunk=CHUNK) -> bytes
    download(s3, bucket, key, path, *, streams=16, chunk=CHUNK) -> int
    await aread_into(...), await aread_bytes(...), await adownload(...)

Ranges are the bucket's chunks (its cache chunk size); ``chunk`` is the
range size when the reads fall back to the given node:

- the bucket is not read through the cache, the ring has one node, or the
  ring cannot be had (an older node, an error): plain ranged reads;
- an owner fails (refused, reset, timed out, 5xx): that chunk is read again
  through the given node (which routes around the owner), the owner is
  suspect for ``SUSPECT_S`` seconds (its chunks go through the given node),
  and the next read fetches the ring again. The ring is fetched every
  ``RING_TTL`` seconds anyway and rebuilt when the node's membership
  version (or anything else in it) has changed.

An ETag change mid-read still raises ``ObjectChanged`` (a 412 from any
node), never a fallback. An owner is asked once per chunk and given up on
after 5 s without a byte (the given node is the retry, with the retries of
``clients.ranged``). The GETs to an owner are presigned by a boto3 client
made from the given one: its settings and credentials (the same refreshing
object). What a reader knows of a cluster (`ClusterView`: ring, layouts,
clients, suspects) is kept per boto3 client and shared by its reads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import boto3

from nearstore.clients.ranged import (
    CHUNK,
    STREAMS,
    Functions,
    ObjectChanged,
    Pinned,
    RangedReader,
    Span,
    _ssl_context,
)
from nearstore.metadata.identity import chunk_id
from nearstore.metadata.ring import Node, NoLiveNodes, Ring

__all__ = [
    "ClusterView", "DirectReader", "Layout", "ObjectChanged", "adownload", "aread_bytes", "aread_into",
    "download", "read_bytes", "read_into",
]

log = logging.getLogger(__name__)

RING_TTL = 2.0  # seconds a fetched ring is trusted (health checks mark a dead node down within 3 s)
SUSPECT_S = 10.0  # seconds a failed owner's chunks go through the given node
RING_TIMEOUT = 2.0


@dataclass(frozen=True)
class Layout:
    """Where one bucket's chunks live: the ring as the given node sees it."""

    ring: Ring
    self_id: str  # the given node's id on the ring
    store: str  # the backing store's name, part of every chunk id
    chunk_size: int


@dataclass(frozen=True)
class _Placed(Pinned):
    layout: Layout | None = None


class ClusterView:
    """What a client knows of the cluster behind one node: the ring and the
    buckets' layouts (re-fetched after ``ring_ttl`` s), a boto3 client per
    node, and the suspect nodes. Thread-safe; one per boto3 client (`of`)."""

    _views: weakref.WeakKeyDictionary[Any, ClusterView] = weakref.WeakKeyDictionary()
    _views_lock = threading.Lock()

    def __init__(self, s3: Any, *, ring_ttl: float = RING_TTL, suspect_s: float = SUSPECT_S) -> None:
        self.endpoint = str(s3.meta.endpoint_url).rstrip("/")
        self.ring_ttl, self.suspect_s = ring_ttl, suspect_s
        self._ssl = _ssl_context(s3) if self.endpoint.startswith("https:") else None
        self._credentials = getattr(getattr(s3, "_request_signer", None), "_credentials", None)
        self._config = s3.meta.config
        self._region = s3.meta.region_name
        self._verify = getattr(getattr(getattr(s3, "_endpoint", None), "http_session", None), "_verify", None)
        self._lock = threading.Lock()
        self._ring: tuple[tuple[Any, ...], Ring] | None = None  # (what it was built from, the ring)
        self._layouts: dict[str, tuple[float, Layout | None]] = {}
        self._clients: dict[str, Any] = {}
        self._suspects: dict[str, float] = {}
        self._session: boto3.session.Session | None = None

    @classmethod
    def of(cls, s3: Any) -> ClusterView:
        with cls._views_lock:
            view = cls._views.get(s3)
            if view is None:
                view = cls._views[s3] = cls(s3)
            return view

    # -- the ring and the layouts
    def fetch(self, bucket: str) -> dict[str, Any]:
        """The ring and the bucket's layout, asked with the client's own
        signature (a node answers its control plane to signed users, or to
        its own machine)."""
        url = f"{self.endpoint}/_nearstore/ring?bucket={quote(bucket, safe='')}"
        headers: dict[str, str] = {}
        if self._credentials is not None:
            from botocore.auth import S3SigV4Auth
            from botocore.awsrequest import AWSRequest

            signed = AWSRequest(method="GET", url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
            S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region or "us-east-1").add_auth(signed)
            headers = dict(signed.headers.items())
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=RING_TIMEOUT, context=self._ssl) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc

    def layout(self, bucket: str) -> Layout | None:
        """The bucket's layout, or None when its reads go through the given node."""
        now = time.monotonic()
        with self._lock:
            known = self._layouts.get(bucket)
        if known is not None and now - known[0] < self.ring_ttl:
            return known[1]
        try:
            layout = self._layout(self.fetch(bucket))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.info("no ring from %s (%s): reading through it", self.endpoint, e)
            layout = None
        with self._lock:
            self._layouts[bucket] = (now, layout)
        return layout

    def _layout(self, doc: dict[str, Any]) -> Layout | None:
        about = doc.get("bucket") or {}
        nodes = doc["nodes"]
        if not about.get("cached") or len(nodes) < 2:
            return None
        params = {str(k): int(v) for k, v in doc.get("params", {}).items()}
        basis = (doc["self"], doc["version"], doc.get("membership_version"), doc["algorithm"],
                 tuple(sorted(params.items())),
                 tuple((n["id"], n["address"], float(n["weight"]), bool(n["down"])) for n in nodes))
        with self._lock:
            built = self._ring
        if built is None or built[0] != basis:
            ring = Ring.build([Node(n["id"], n["address"], float(n["weight"])) for n in nodes],
                              version=int(doc["version"]), algorithm=doc["algorithm"], **params)
            built = (basis, ring.without([n["id"] for n in nodes if n["down"]]))
            with self._lock:
                self._ring = built
        return Layout(built[1], doc["self"], str(about["store"]), int(about["chunk_size"]))

    # -- owners
    def owner(self, obj: _Placed, index: int) -> Node | None:
        """The node to ask for chunk ``index`` directly; None: the given node."""
        lay = obj.layout
        if lay is None:
            return None
        try:
            node = lay.ring.owner(chunk_id(lay.store, obj.bucket, obj.key, obj.etag, lay.chunk_size, index))
        except NoLiveNodes:
            return None
        if node.id == lay.self_id:
            return None
        with self._lock:
            if self._suspects.get(node.id, 0.0) > time.monotonic():
                return None
        return node

    def suspect(self, node_id: str, error: BaseException) -> None:
        log.warning("cache node %s failed (%s): its chunks go through %s for %.0f s", node_id, error,
                    self.endpoint, self.suspect_s)
        with self._lock:
            self._suspects[node_id] = time.monotonic() + self.suspect_s
            self._layouts.clear()  # the next read asks for the ring again

    def client(self, node: Node) -> Any:
        """A boto3 client for the node's S3 endpoint (made once; it presigns
        the GETs sent there)."""
        with self._lock:
            s3 = self._clients.get(node.address)
            if s3 is None:
                if self._session is None:
                    self._session = boto3.session.Session()
                frozen = self._credentials.get_frozen_credentials() if self._credentials else None
                s3 = self._session.client(
                    "s3", endpoint_url=node.address, region_name=self._region, config=self._config,
                    verify=self._verify,
                    aws_access_key_id=frozen.access_key if frozen else None,
                    aws_secret_access_key=frozen.secret_key if frozen else None,
                    aws_session_token=frozen.token if frozen else None,
                )
                if self._credentials is not None:
                    s3._request_signer._credentials = self._credentials  # refreshes as the given client's do
                self._clients[node.address] = s3
            return s3


class DirectReader(RangedReader):
    """A `RangedReader` that reads each chunk from its owner (see the module
    docstring). ``sent`` counts the ranges each node served (owners by
    their node id, the given node by its endpoint URL); ``failovers`` the
    owners' failures."""

    # Every range goes to its owner over HTTP; the local node's socket would
    # fetch other owners' chunks through that node instead.
    local_reads = False

    def __init__(self, s3: Any, *, streams: int = STREAMS, chunk: int = CHUNK, view: ClusterView | None = None,
                 local: bool = False) -> None:
        super().__init__(s3, streams=streams, chunk=chunk, local=local)
        self.view = view or ClusterView.of(s3)
        self.failovers = 0

    def open(self, bucket: str, key: str) -> Pinned:
        layout = self.view.layout(bucket)
        obj = super().open(bucket, key)
        if layout is None:
            return obj
        return _Placed(bucket, key, obj.size, obj.etag, layout.chunk_size, layout)

    def route(self, obj: Pinned, span: Span) -> Sequence[tuple[str, Any]]:
        node = self.view.owner(obj, span[0] // obj.chunk) if isinstance(obj, _Placed) else None
        through = super().route(obj, span)
        return through if node is None else [(node.id, self.view.client(node)), *through]

    def failed(self, name: str, error: Exception) -> None:
        self.failovers += 1
        self.view.suspect(name, error)


_functions = Functions(DirectReader)
read_into, read_bytes, download = _functions.read_into, _functions.read_bytes, _functions.download
aread_into, aread_bytes, adownload = _functions.aread_into, _functions.aread_bytes, _functions.adownload

"""Prometheus metrics of the chunk cache and the backing store (served at
``/_nearstore/metrics``).

A node with several worker processes runs prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``nearstore serve`` before this
module is imported): every process writes its values to files there and
``exposition()`` sums them, so any process answers for the whole node."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

HITS = Counter("nearstore_cache_hits", "Chunk reads served from the cache", registry=REGISTRY)
MISSES = Counter("nearstore_cache_misses", "Chunk reads that needed a fill", registry=REGISTRY)
JOINS = Counter("nearstore_cache_joins", "Chunk reads that waited for a fill already in flight (neither a hit "
                "nor a miss: the read started no fill, and waited)", registry=REGISTRY)
BYTES_FROM_CACHE = Counter("nearstore_bytes_from_cache", "Bytes sent to clients from cached chunks", registry=REGISTRY)
BYTES_FROM_BACKING_STREAMED = Counter(
    "nearstore_bytes_streamed_while_filling",
    "Bytes sent to clients from chunks still being filled (cold reads)",
    registry=REGISTRY,
)
BYTES_FROM_PEERS = Counter(
    "nearstore_bytes_from_peers", "Bytes of chunks read from their owners on other nodes", registry=REGISTRY
)
BYTES_FROM_BACKING = Counter("nearstore_bytes_from_backing", "Bytes read from the backing store", registry=REGISTRY)
FILLS_IN_FLIGHT = Gauge("nearstore_fills_in_flight", "Chunk fills in progress", registry=REGISTRY,
                        multiprocess_mode="livesum")
PREFETCH_HINTS = Counter("nearstore_prefetch_hints", "Objects named by loaders' hints", registry=REGISTRY)
PREFETCH_CHUNKS = Counter("nearstore_prefetch_chunks", "Chunk fills started from hints", registry=REGISTRY)
PREFETCH_USED = Counter("nearstore_prefetch_used", "Prefetched chunks read before they were evicted",
                        registry=REGISTRY)
PREFETCH_LATE = Counter("nearstore_prefetch_late", "Prefetched chunks a reader asked for while they were "
                        "still filling (the prefetch was not far enough ahead)", registry=REGISTRY)
PREFETCH_LANES = Gauge("nearstore_prefetch_lanes", "Objects the prefetcher may work on at once (grows while "
                       "readers catch it up)", registry=REGISTRY, multiprocess_mode="max")
PREFETCH_WASTED = Counter("nearstore_prefetch_wasted_bytes", "Bytes of prefetched chunks evicted unread",
                          registry=REGISTRY)
FILLS_ABANDONED = Counter("nearstore_fills_abandoned", "Fills stopped because no reader waited for them any more",
                          registry=REGISTRY)
LOCAL_READS = Counter("nearstore_local_reads", "Short-circuit reads answered on the Unix socket",
                      registry=REGISTRY)
LOCAL_BYTES = Counter("nearstore_local_read_bytes",
                      "Bytes of short-circuit reads (file descriptors handed out, or sent inline)",
                      registry=REGISTRY)
HANDED_OFF = Counter("nearstore_connections_handed_off",
                     "Connections the hot path handed to aiohttp, at their first request it does not serve",
                     registry=REGISTRY)
REFUSED_CONNECTIONS = Counter("nearstore_connections_refused",
                              "Connections answered SlowDown and closed: [server] max_connections were open",
                              registry=REGISTRY)
EVICTIONS = Counter("nearstore_cache_evictions", "Chunks evicted", registry=REGISTRY)
CHECKSUM_FAILURES = Counter("nearstore_cache_checksum_failures", "Chunks that failed verification", registry=REGISTRY)
FILL_ERRORS = Counter("nearstore_cache_fill_errors", "Fills that failed (served from backing instead)", registry=REGISTRY)
# Only the owner process fills and evicts: its value is the node's.
CACHE_BYTES = Gauge("nearstore_cache_bytes", "Bytes of chunks on disk", registry=REGISTRY, multiprocess_mode="max")
CACHE_CAPACITY = Gauge("nearstore_cache_capacity_bytes", "The cache's byte budget", registry=REGISTRY,
                       multiprocess_mode="max")
BACKING_LATENCY = Histogram(
    "nearstore_backing_fill_seconds",
    "Time to fill one chunk from the backing store",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


def exposition() -> tuple[bytes, str]:
    """The node's metrics in the Prometheus text format, and its type."""
    import os

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

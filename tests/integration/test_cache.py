"""The node-local chunk cache, end to end: nearstore in front of moto with a
``[cache]`` section, real processes on 127.0.0.1, boto3 with default
settings as the client.

The invariants come from ``cache/readpath.py`` and
``cache/store.py``: a read never mixes two versions; a flipped bit is never
served; the budget is exceeded at most by the chunks being filled; a warm
cache stays warm across a restart; a cache fault is a miss served from the
backing store; pinned chunks are never evicted.

One moto process serves the whole module; each test runs its own node (its
own cache directory and metrics). Objects stay small (moto re-reads a whole
object for every ranged GET) and chunks are 1 MiB.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.helpers.cachenode import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    CacheNode,
    MiB,
    Proc,
    chunk_file_ok,
    flip_byte,
    moto_client,
)

NodeFactory = Callable[..., CacheNode]


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def backing(moto: Proc) -> Any:
    """boto3 straight to moto (bypassing nearstore)."""
    return moto_client(moto)


@pytest.fixture
def bucket(backing: Any, request: pytest.FixtureRequest) -> str:
    name = f"{request.node.name.replace('_', '-')[:30].strip('-')}-{uuid.uuid4().hex[:8]}".lower()
    backing.create_bucket(Bucket=name)
    return name


@pytest.fixture
def make_node(tmp_path: Path, moto: Proc) -> Iterator[NodeFactory]:
    """Start nodes in front of moto; each is stopped at teardown and its log
    printed (pytest shows it when the test fails)."""
    nodes: list[CacheNode] = []

    def make(name: str = "node", start: bool = True, **cache: Any) -> CacheNode:
        node = CacheNode(tmp_path / name, moto.url, cache)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in nodes:
        node.stop()
        print(f"--- {node.workdir.name} log (port {node.port}) ---\n{node.log_text(8000)}")


# -- helpers --------------------------------------------------------------------------


def get(s3: Any, bucket: str, key: str, rng: str | None = None) -> bytes:
    kwargs = {"Range": rng} if rng else {}
    resp = s3.get_object(Bucket=bucket, Key=key, **kwargs)
    return bytes(resp["Body"].read())


def _text(value: str | bytes | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


HITS = "nearstore_cache_hits_total"
MISSES = "nearstore_cache_misses_total"
FROM_CACHE = "nearstore_bytes_from_cache_total"
STREAMED = "nearstore_bytes_streamed_while_filling_total"
FROM_BACKING = "nearstore_bytes_from_backing_total"
EVICTIONS = "nearstore_cache_evictions_total"
CHECKSUM_FAILURES = "nearstore_cache_checksum_failures_total"
FILL_ERRORS = "nearstore_cache_fill_errors_total"
FILLS_IN_FLIGHT = "nearstore_fills_in_flight"
CACHE_BYTES = "nearstore_cache_bytes"


def chunks_of(size: int, chunk: int = MiB) -> int:
    return -(-size // chunk)


def put_objects(backing: Any, bucket: str, prefix: str, count: int, size: int) -> dict[str, bytes]:
    objs = {f"{prefix}{i:03d}": os.urandom(size) for i in range(count)}
    for key, data in objs.items():
        backing.put_object(Bucket=bucket, Key=key, Body=data)
    return objs


# -- 1. cold then warm ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cold_then_warm_read(make_node: NodeFactory, backing: Any, bucket: str) -> None:
    node = make_node()
    s3 = node.client()
    size = 5 * MiB + 123
    n = chunks_of(size)
    data = os.urandom(size)
    backing.put_object(Bucket=bucket, Key="obj", Body=data)

    m0 = node.metrics()
    assert get(s3, bucket, "obj") == data
    m1 = node.metrics()
    assert delta(m1, m0, MISSES) == n, "a cold read fills every chunk once"
    assert len(node.chunk_files()) == n

    assert get(s3, bucket, "obj") == data
    m2 = node.metrics()
    assert delta(m2, m1, MISSES) == 0, "the second read must be all hits"
    assert delta(m2, m1, HITS) == n
    assert delta(m2, m1, FROM_CACHE) == size
    assert delta(m2, m1, FROM_BACKING) == 0
    # The backing store saw each chunk once over both reads.
    assert m2[FROM_BACKING] == size
    # A cold read streams each chunk from its file while it fills (counted
    # apart); what it sends after a fill completed counts as from cache.
    assert m2[FROM_CACHE] + m2.get(STREAMED, 0.0) == 2 * size


@pytest.mark.timeout(60)
def test_get_with_checksum_mode_is_served_from_cache(
    make_node: NodeFactory, backing: Any, bucket: str
) -> None:
    """boto3's default (botocore >= 1.36, response_checksum_validation =
    when_supported) sends ``x-amz-checksum-mode: ENABLED`` on every GetObject:
    such reads must use the cache too, or default clients never do."""
    node = make_node()
    size = 2 * MiB + 9
    data = os.urandom(size)
    backing.put_object(Bucket=bucket, Key="cm", Body=data)

    plain = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
    ).client("s3", endpoint_url=node.url, config=Config(response_checksum_validation="when_required"))
    m0 = node.metrics()
    assert get(plain, bucket, "cm") == data  # no checksum mode: fills the cache
    m1 = node.metrics()
    assert delta(m1, m0, MISSES) == chunks_of(size)

    s3 = node.client()  # defaults: checksum mode on
    sent: list[str] = []
    s3.meta.events.register(
        "before-send.s3.GetObject",
        lambda request, **_: sent.append(_text(request.headers.get("x-amz-checksum-mode"))),
    )
    resp = s3.get_object(Bucket=bucket, Key="cm")
    assert resp["Body"].read() == data
    m2 = node.metrics()
    assert sent == ["ENABLED"], sent
    # The stored checksum still comes back (boto3 validates it when present).
    direct = backing.get_object(Bucket=bucket, Key="cm", ChecksumMode="ENABLED")
    direct["Body"].read()
    for name in [k for k in direct if k.startswith("Checksum") and k != "ChecksumType"]:
        assert resp.get(name) == direct[name], name
    assert delta(m2, m1, HITS) == chunks_of(size), "a checksum-mode GET bypassed the cache"
    assert delta(m2, m1, FROM_BACKING) == 0
    assert get(s3, bucket, "cm", f"bytes={MiB - 1}-{MiB}") == data[MiB - 1:MiB + 1]
    assert delta(node.metrics(), m2, FROM_BACKING) == 0


# -- 2. ranged reads ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ranged_reads_fill_only_needed_chunks(make_node: NodeFactory, backing: Any, bucket: str) -> None:
    node = make_node()
    s3 = node.client()
    cs = node.chunk_size
    size = 8 * cs + 4321  # 9 chunks, the last one short
    data = os.urandom(size)
    backing.put_object(Bucket=bucket, Key="r", Body=data)

    def check(first: int, last: int, rng: str, misses: int, files: int) -> None:
        before = node.metrics()
        assert get(s3, bucket, "r", rng) == data[first:last + 1], rng
        after = node.metrics()
        assert delta(after, before, MISSES) == misses, f"{rng}: misses"
        # A cold read streams from the chunk while it fills: the file is
        # renamed into place a moment after the last byte went out.
        deadline = time.monotonic() + 5
        while len(node.chunk_files()) != files and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(node.chunk_files()) == files, f"{rng}: chunk files"

    # Across the chunk 0 / chunk 1 boundary: two chunks.
    check(cs - 10, cs + 9, f"bytes={cs - 10}-{cs + 9}", misses=2, files=2)
    # The first byte of chunk 5 alone.
    check(5 * cs, 5 * cs, f"bytes={5 * cs}-{5 * cs}", misses=1, files=3)
    # The last byte of chunk 6 alone.
    check(7 * cs - 1, 7 * cs - 1, f"bytes={7 * cs - 1}-{7 * cs - 1}", misses=1, files=4)
    # Exactly chunk 3.
    check(3 * cs, 4 * cs - 1, f"bytes={3 * cs}-{4 * cs - 1}", misses=1, files=5)
    # A suffix range: the short last chunk only.
    check(size - 100, size - 1, "bytes=-100", misses=1, files=6)
    # Again: all hits, nothing new on disk.
    check(cs - 10, cs + 9, f"bytes={cs - 10}-{cs + 9}", misses=0, files=6)
    check(8 * cs, size - 1, f"bytes={8 * cs}-", misses=0, files=6)
    # Chunks 2..4 (2 and 4 are new) ending one byte before a boundary.
    check(2 * cs + 1, 5 * cs - 1, f"bytes={2 * cs + 1}-{5 * cs - 1}", misses=2, files=8)
    # Full read: only chunk 7 is left to fill.
    before = node.metrics()
    assert get(s3, bucket, "r") == data
    assert delta(node.metrics(), before, MISSES) == 1
    assert len(node.chunk_files()) == 9


# -- 3. bits flipped while running -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_flipped_bits_while_running_never_served(make_node: NodeFactory, backing: Any, bucket: str) -> None:
    node = make_node()
    s3 = node.client()
    cs = node.chunk_size
    size = 4 * cs + 100  # 5 chunks
    data = os.urandom(size)
    backing.put_object(Bucket=bucket, Key="f", Body=data)
    assert get(s3, bucket, "f") == data
    files = node.chunk_files()
    assert len(files) == 5

    at = 12345  # the same offset inside every full chunk; the short one: byte 50
    for path in files:
        flip_byte(path, at if path.stat().st_size > at else 50)

    m0 = node.metrics()
    # A ranged read of exactly the flipped byte of chunk 2, then around it.
    pos = 2 * cs + at
    assert get(s3, bucket, "f", f"bytes={pos}-{pos}") == data[pos:pos + 1]
    pos3 = 3 * cs + at
    assert get(s3, bucket, "f", f"bytes={pos3 - 5}-{pos3 + 5}") == data[pos3 - 5:pos3 + 6]
    assert get(s3, bucket, "f") == data
    m1 = node.metrics()
    assert delta(m1, m0, CHECKSUM_FAILURES) == 5, "each corrupt chunk fails its check once"
    assert node.alive()

    # Refilled: clean files, no new failures, all hits.
    assert all(chunk_file_ok(p) for p in node.chunk_files())
    assert get(s3, bucket, "f") == data
    m2 = node.metrics()
    assert delta(m2, m1, CHECKSUM_FAILURES) == 0
    assert delta(m2, m1, MISSES) == 0


# -- 4. bits flipped while stopped; warm cache stays warm ----------------------------------------


@pytest.mark.timeout(90)
def test_flipped_bits_while_stopped_and_warm_restart(
    make_node: NodeFactory, backing: Any, bucket: str
) -> None:
    node = make_node()
    s3 = node.client()
    size = 3 * MiB + 7  # 4 chunks each
    objs = put_objects(backing, bucket, "w/", 10, size)
    total_chunks = 10 * chunks_of(size)

    def read_all() -> tuple[float, float]:
        before = node.metrics()
        for key, data in objs.items():
            assert get(s3, bucket, key) == data, key
        after = node.metrics()
        return delta(after, before, HITS), delta(after, before, MISSES)

    read_all()  # cold
    hits, misses = read_all()  # warm
    assert (hits, misses) == (total_chunks, 0)
    ratio_before = (total_chunks - misses) / total_chunks

    assert node.stop() == 0, "SIGTERM: a clean exit"
    files = sorted(node.chunk_files())
    assert len(files) == total_chunks
    flipped = [files[3], files[len(files) // 2]]
    flipped_bytes = sum(p.stat().st_size for p in flipped)
    for path in flipped:
        flip_byte(path, path.stat().st_size // 2)
    node.start()

    m0 = node.metrics()
    hits, misses = read_all()
    m1 = node.metrics()
    assert delta(m1, m0, CHECKSUM_FAILURES) == len(flipped)
    assert misses == len(flipped), "only the corrupt chunks may miss after a restart"
    ratio_after = (total_chunks - misses) / total_chunks
    assert ratio_after >= 0.95 * ratio_before
    assert delta(m1, m0, FROM_BACKING) == flipped_bytes  # the refilled chunks, nothing else
    # Dropped and refilled: same id, same bytes, so the same name, now clean.
    for path in flipped:
        assert chunk_file_ok(path)
    assert len(node.chunk_files()) == total_chunks


# -- 5. the budget ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_budget_holds_while_reading_three_times_budget(
    make_node: NodeFactory, backing: Any, bucket: str
) -> None:
    node = make_node(size="8MiB", prefetch=4)
    cs, budget, prefetch = node.chunk_size, node.budget, 4
    size = 4 * MiB
    readers = 2
    objs = put_objects(backing, bucket, "b/", 6, size)  # 24 MiB = 3x the budget
    assert sum(len(v) for v in objs.values()) >= 3 * budget

    stop = threading.Event()
    worst = {"chunks": 0, "total": 0}

    def poll() -> None:
        while not stop.is_set():
            chunks, tmp = node.disk_bytes()
            worst["chunks"] = max(worst["chunks"], chunks)
            worst["total"] = max(worst["total"], chunks + tmp)
            time.sleep(0.002)

    errors: list[str] = []
    keys = sorted(objs)

    def read(mine: list[str]) -> None:
        s3 = node.client()
        for key in mine:
            try:
                if get(s3, bucket, key) != objs[key]:
                    errors.append(f"{key}: wrong bytes")
            except Exception as e:
                errors.append(f"{key}: {e!r}")

    poller = threading.Thread(target=poll)
    poller.start()
    threads = [threading.Thread(target=read, args=(keys[i::readers],)) for i in range(readers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        poller.join(10)
    assert not errors
    m = node.metrics()
    print(f"worst on disk: {worst}; budget {budget}")
    # Chunk files: the budget, plus at most the one chunk being committed
    # (renamed into place, eviction not yet done).
    assert worst["chunks"] <= budget + cs, worst
    # Chunk files plus fills in progress: each reader fills its window.
    assert worst["total"] <= budget + (readers * (prefetch + 1) + 1) * cs, worst
    chunks, tmp = node.disk_bytes()
    assert chunks <= budget and tmp == 0
    assert m[CACHE_BYTES] <= budget
    assert m[EVICTIONS] > 0
    assert m[FILLS_IN_FLIGHT] == 0


# -- 6. cache faults ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cache_tmp_replaced_by_file_reads_from_backing(
    make_node: NodeFactory, backing: Any, bucket: str
) -> None:
    node = make_node()
    s3 = node.client()
    size = 3 * MiB + 11
    a, b = os.urandom(size), os.urandom(size)
    backing.put_object(Bucket=bucket, Key="a", Body=a)
    backing.put_object(Bucket=bucket, Key="b", Body=b)
    assert get(s3, bucket, "a") == a

    tmp = node.cache_dir / "tmp"
    shutil.rmtree(tmp)
    tmp.write_bytes(b"not a directory")

    m0 = node.metrics()
    assert get(s3, bucket, "b") == b
    assert get(s3, bucket, "b", f"bytes={MiB - 3}-{MiB + 3}") == b[MiB - 3:MiB + 4]
    assert get(s3, bucket, "a") == a  # cached chunks still serve
    m1 = node.metrics()
    assert node.alive()
    assert delta(m1, m0, FILL_ERRORS) > 0
    assert delta(m1, m0, FROM_BACKING) >= size
    assert "cache fill failed" in node.log_text() or "serving from the backing store" in node.log_text()
    assert get(s3, bucket, "b") == b  # still fine on a second try
    assert node.alive()


@pytest.mark.timeout(60)
def test_cache_dir_under_regular_file_reads_from_backing(
    make_node: NodeFactory, backing: Any, bucket: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a regular file")
    node = make_node(start=False, dir=str(blocker / "cache"))
    try:
        node.start()
    except RuntimeError as e:
        pytest.fail(f"a node with an unusable cache directory must still start and serve: {e}")
    s3 = node.client()
    data = os.urandom(2 * MiB + 5)
    backing.put_object(Bucket=bucket, Key="x", Body=data)
    m0 = node.metrics()
    assert get(s3, bucket, "x") == data
    assert get(s3, bucket, "x", "bytes=100-2097160") == data[100:2097161]
    m1 = node.metrics()
    assert node.alive()
    assert delta(m1, m0, FILL_ERRORS) > 0
    assert blocker.read_bytes() == b"a regular file"


# -- 7. kill -9 during fills -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_kill9_during_fills_restarts_clean(make_node: NodeFactory, backing: Any, bucket: str) -> None:
    # Big chunks of big objects: moto re-reads the whole object for every
    # ranged GET, so each fill takes tens of milliseconds and the kill
    # reliably lands while some are in flight.
    node = make_node(chunk_size="8MiB", size="256MiB")
    size = 24 * MiB
    objs = put_objects(backing, bucket, "k/", 4, size)
    keys = sorted(objs)
    results: list[str] = []
    lock = threading.Lock()

    def reader(seed: int) -> None:
        s3 = node.client()
        order = keys[:]
        random.Random(seed).shuffle(order)
        for key in order:
            try:
                got = get(s3, bucket, key)
                outcome = "ok" if got == objs[key] else f"WRONG {key}"
            except (BotoCoreError, ClientError) as e:
                outcome = f"error {type(e).__name__}"
            except Exception as e:  # anything else is a finding too
                outcome = f"UNEXPECTED {e!r}"
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    filling: list[Path] = []
    while time.monotonic() < deadline and not filling:
        filling = node.temp_files()
    node.kill()
    assert filling, "no fill was in progress to interrupt"

    leftovers = node.temp_files()
    print(f"temp files left by kill -9: {len(leftovers)}; chunk files: {len(node.chunk_files())}")
    on_disk = node.chunk_files()
    bad = [p.name for p in on_disk if not chunk_file_ok(p)]
    assert not bad, f"chunk files that do not verify after kill -9: {bad}"

    node.start()
    # Start-up empties tmp/: none of the interrupted fills is left.
    assert not [p for p in leftovers if p.exists()]
    for t in threads:  # the readers' retries land on the restarted node
        t.join(60)
    assert not [r for r in results if r.startswith(("WRONG", "UNEXPECTED"))], results

    s3 = node.client()
    for key, data in objs.items():
        assert get(s3, bucket, key) == data, key
    bad = [p.name for p in node.chunk_files() if not chunk_file_ok(p)]
    assert not bad
    assert node.metrics()[CHECKSUM_FAILURES] == 0
    assert not node.temp_files()
    assert node.alive()


# -- 8. overwritten in the backing store under a reader ------------------------------------------------------


@pytest.mark.timeout(90)
def test_overwrite_in_backing_never_mixes_versions(
    make_node: NodeFactory, backing: Any, bucket: str
) -> None:
    ttl = 1.0
    node = make_node(meta_ttl=ttl)
    size = 3 * MiB + 5
    v1, v2, v3 = os.urandom(size), os.urandom(size), os.urandom(size)
    backing.put_object(Bucket=bucket, Key="o", Body=v1)
    cs = node.chunk_size
    ranges = [None, f"bytes={cs - 100}-{2 * cs + 100}", f"bytes={2 * cs}-"]

    def expected(rng: str | None, version: bytes) -> bytes:
        if rng is None:
            return version
        spec = rng.removeprefix("bytes=")
        lo, _, hi = spec.partition("-")
        return version[int(lo):int(hi) + 1] if hi else version[int(lo):]

    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def reader(i: int) -> None:
        s3 = node.client()
        n = 0
        while not stop.is_set():
            rng = ranges[(i + n) % len(ranges)]
            n += 1
            try:
                got = get(s3, bucket, "o", rng)
            except (BotoCoreError, ClientError) as e:
                outcome = f"error {type(e).__name__}"
            except Exception as e:
                outcome = f"UNEXPECTED {e!r}"
            else:
                e1, e2 = expected(rng, v1), expected(rng, v2)
                if got == e1:
                    outcome = "v1"
                elif got == e2:
                    outcome = "v2"
                elif len(got) < len(e1) and (e1.startswith(got) or e2.startswith(got)):
                    outcome = "short"
                else:
                    outcome = f"MIX range={rng} len={len(got)}"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for i in range(16):
            backing.put_object(Bucket=bucket, Key="o", Body=v2 if i % 2 == 0 else v1)
            time.sleep(0.15)
        backing.put_object(Bucket=bucket, Key="o", Body=v2)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    print(sorted((o, outcomes.count(o)) for o in set(outcomes)))
    bad = [o for o in outcomes if o.startswith(("MIX", "UNEXPECTED"))]
    assert not bad, f"{len(bad)} bad of {len(outcomes)}: {bad[:5]}"
    assert sum(o in ("v1", "v2") for o in outcomes) >= 10, outcomes
    assert node.alive()

    # After meta_ttl the new version is what everyone reads.
    time.sleep(ttl + 0.5)
    s3 = node.client()
    assert get(s3, bucket, "o") == v2
    assert get(s3, bucket, "o", ranges[1]) == expected(ranges[1], v2)

    # A write through nearstore is visible at once.
    s3.put_object(Bucket=bucket, Key="o", Body=v3)
    assert get(s3, bucket, "o") == v3
    assert get(s3, bucket, "o", ranges[2]) == expected(ranges[2], v3)
    assert get(backing, bucket, "o") == v3


# -- 9. warming and pinning ----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_warm_pin_then_flood(make_node: NodeFactory, backing: Any, bucket: str) -> None:
    node = make_node(size="16MiB")
    s3 = node.client()
    budget = node.budget
    hot_size = 3 * MiB + 1000  # 4 chunks each
    hot = put_objects(backing, bucket, "hot/", 3, hot_size)
    cold = put_objects(backing, bucket, "cold/", 6, 4 * MiB)  # 24 MiB > the budget
    hot_chunks = 3 * chunks_of(hot_size)
    hot_bytes = sum(len(v) for v in hot.values())

    m0 = node.metrics()
    res = node.warm_cli(f"s3://{bucket}/hot/", pin=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warmed 3 objects" in res.stdout, res.stdout
    assert ", 0 errors" in res.stdout, res.stdout
    assert "chunks not pinned: 0" in res.stdout, res.stdout
    m1 = node.metrics()
    assert delta(m1, m0, MISSES) == hot_chunks
    assert delta(m1, m0, FROM_BACKING) == hot_bytes
    assert len(node.chunk_files()) == hot_chunks
    hot_files = {p.name for p in node.chunk_files()}

    # The same through the HTTP route: the summary counts are exact.
    lines = node.warm_http(bucket, "hot/", pin=True)
    summary = lines[-1]
    assert summary["done"] is True
    assert summary["objects"] == summary["objects_total"] == 3
    assert summary["bytes"] == summary["bytes_total"] == hot_bytes
    assert summary["chunks"] == hot_chunks
    assert summary["errors"] == 0
    assert summary["not_pinned_chunks"] == 0
    assert "gbps" in summary
    m2 = node.metrics()
    assert delta(m2, m1, MISSES) == 0, "re-warming warm objects fills nothing"

    # Reads after warming: all hits.
    for key, data in hot.items():
        assert get(s3, bucket, key) == data
    m3 = node.metrics()
    assert delta(m3, m2, MISSES) == 0
    assert delta(m3, m2, HITS) == hot_chunks

    # A flood larger than the budget.
    for key, data in cold.items():
        assert get(s3, bucket, key) == data
    m4 = node.metrics()
    assert delta(m4, m3, EVICTIONS) > 0
    assert m4[CACHE_BYTES] <= budget
    assert hot_files <= {p.name for p in node.chunk_files()}, "pinned chunks were evicted"

    for key, data in hot.items():
        assert get(s3, bucket, key) == data
    m5 = node.metrics()
    assert delta(m5, m4, MISSES) == 0, "pinned chunks must still be hits after the flood"
    assert delta(m5, m4, HITS) == hot_chunks

"""clients.hints and the datasets' hints against a fake node: a small HTTP
server on 127.0.0.1 that records each hint call and answers 200 (a node)
or 404 (a plain S3). The data comes from a local directory, through a
source that sends its hints to the fake node: the hint path is the one
S3Source uses (``hints.post`` with a boto3 client's signature), without a
whole S3 server for the reads."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nearstore.clients import hints
from nearstore.clients.connect import connect
from nearstore.clients.datasets import (
    LocalSource,
    ObjectDataset,
    ObjectStream,
    S3Source,
    TarDataset,
    epoch_order,
    split,
)

from .test_datasets import make_tar


class FakeNode:
    """Records hint calls; answers ``status`` (200: the node's JSON)."""

    def __init__(self, status: int = 200, body: bytes | None = None) -> None:
        self.status, self.body = status, body
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        node = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                doc = json.loads(raw)
                with node.lock:
                    node.calls.append({"path": self.path, "headers": dict(self.headers.items()), "raw": raw,
                                       "stream": doc["stream"], "keys": doc["keys"]})
                out = node.body if node.body is not None else json.dumps(
                    {"accepted": len(doc["keys"]), "queued": len(doc["keys"])}).encode()
                self.send_response(node.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def streams(self) -> dict[str, list[list[str]]]:
        out: dict[str, list[list[str]]] = {}
        with self.lock:
            for c in self.calls:
                out.setdefault(c["stream"], []).append(c["keys"])
        return out


@pytest.fixture
def node() -> Iterator[FakeNode]:
    n = FakeNode()
    yield n
    n.close()


@pytest.fixture
def plain_s3() -> Iterator[FakeNode]:
    n = FakeNode(404, b"<Error><Code>NoSuchBucket</Code></Error>")
    yield n
    n.close()


class HintedLocal(LocalSource):
    """A local directory whose hints go to a (fake) node, as S3Source's do.
    Picklable: the boto3 client is made lazily in each process."""

    def __init__(self, root: Path, endpoint: str) -> None:
        super().__init__(root)
        self.endpoint = endpoint
        self.hints_off = False
        self._s3: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_s3": None}

    def send_hint(self, stream: str, keys: list[str]) -> dict[str, Any]:
        if self._s3 is None:
            self._s3 = connect(self.endpoint)
        return hints.post(self._s3, "bucket", stream, keys)


def write_objects(root: Path, n: int) -> list[str]:
    for i in range(n):
        (root / f"o{i:04d}").write_bytes(str(i).encode())
    return [f"o{i:04d}" for i in range(n)]


def assert_slices(windows: list[list[str]], plan: Sequence[str], where: Any = None) -> None:
    """Each window is plan[s : s + len] for an s after the previous
    window's (``where(key)``: a key's position, when not by a scan)."""
    if where is None:
        where = {k: i for i, k in enumerate(plan)}.__getitem__
    last = -1
    for w in windows:
        if not w:
            continue
        start = where(w[0])
        assert list(plan[start : start + len(w)]) == w
        assert start > last
        last = start


def wait_calls(node: FakeNode, n: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while len(node.calls) < n and time.monotonic() < deadline:
        time.sleep(0.01)


# -- the hinter on its own ------------------------------------------------------


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.windows: list[list[str]] = []
        self.fail = fail
        self.done = threading.Event()

    def __call__(self, stream: str, keys: list[str]) -> None:
        self.windows.append(keys)
        if self.fail:
            raise hints.HintsUnavailable("HTTP 404")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_windows_are_consecutive_slices_sized_by_the_rate() -> None:
    """At 100 items/s and 1 s ahead: windows of 100, one call per 50 items."""
    plan = [f"k{i}" for i in range(5000)]
    rec, clock = Recorder(), Clock()
    h = hints.Hinter(rec, "job/0/0", plan, ahead_s=1.0, clock=clock)
    for i in range(len(plan)):
        clock.t = i / 100
        h.at(i)
        while i == 0 and not rec.windows:
            time.sleep(0.001)
        if i % 25 == 0:
            time.sleep(0.002)  # let the sender run (a window queued while one is in flight replaces it)
    h.close(wait=2)
    assert rec.windows[0] == plan[1:17]  # the first window: `initial` keys, after the one being read
    assert_slices(rec.windows, plan)
    assert h.window() == 100
    assert len(rec.windows) <= h.calls <= len(plan) // 50 + 10  # batched: ~2 per window
    sent = set().union(*map(set, rec.windows))
    assert len(sent) >= 0.9 * len(plan)  # nearly all of the plan was hinted ahead at some point


def test_window_bounds() -> None:
    rec, clock = Recorder(), Clock()
    fast = hints.Hinter(rec, "s", [str(i) for i in range(100_000)], clock=clock)
    fast.at(0)
    clock.t = 0.001
    fast.at(20)  # 20,000 items/s: clamped at 1000
    assert fast.window() == hints.MAX_KEYS
    slow = hints.Hinter(rec, "s", [str(i) for i in range(100)], clock=clock)
    clock.t = 0
    slow.at(0)
    clock.t = 1000.0
    slow.at(9)  # 1 item per 100 s: at least min_keys
    assert slow.window() == hints.MIN_KEYS
    fast.close(wait=2)
    slow.close(wait=2)


def test_a_million_object_plan_sends_bounded_bodies(node: FakeNode, tmp_path: Path) -> None:
    """Long keys, a million of them, read fast: every call within the
    node's limits (1000 keys, 256 KiB), far fewer calls than reads."""

    class Lazy(Sequence[str]):
        def __len__(self) -> int:
            return 1_000_000

        def __getitem__(self, i: Any) -> Any:
            if isinstance(i, slice):
                return [self[j] for j in range(*i.indices(len(self)))]
            return f"{i:07d}/" + "x" * 900

    plan = Lazy()
    src = HintedLocal(tmp_path, node.endpoint)
    h = hints.for_source(src, None, "job/0/0", plan)
    assert h is not None
    for i in range(0, 20_000):
        h.at(i)
        if i % 500 == 0:
            wait_calls(node, min(i // 500 + 1, 3), timeout=1)  # let the sender catch up now and then
    h.close(wait=3)
    wait_calls(node, 2)
    assert 1 <= len(node.calls) <= 200
    for c in node.calls:
        assert len(c["raw"]) <= hints.MAX_BODY and len(c["keys"]) <= hints.MAX_KEYS
    assert max(len(c["keys"]) for c in node.calls) > 200  # trimmed by bytes, not down to nothing
    assert_slices([c["keys"] for c in node.calls], plan, where=lambda k: int(k[:7]))


def test_early_stop_drops_the_window_and_the_end_does_not() -> None:
    rec = Recorder()
    h = hints.Hinter(rec, "s", [str(i) for i in range(100)])
    h.at(0)
    h.close(wait=2)
    assert rec.windows[-1] == []
    rec2 = Recorder()
    h2 = hints.Hinter(rec2, "s", [str(i) for i in range(10)])
    for i in range(10):
        h2.at(i)
    h2.close(wait=2)
    assert rec2.windows and rec2.windows[-1] != []


def test_a_failure_stops_the_hinter() -> None:
    rec, failed = Recorder(fail=True), []
    h = hints.Hinter(rec, "s", [str(i) for i in range(1000)], initial=4, on_fail=failed.append)
    h.at(0)
    deadline = time.monotonic() + 2
    while not h.dead and time.monotonic() < deadline:
        time.sleep(0.005)
    for i in range(1, 1000):
        h.at(i)
    h.close(wait=2)
    assert len(rec.windows) == 1 and len(failed) == 1 and h.dead


def test_stream_ids_and_job_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in hints.JOB_VARS:
        monkeypatch.delenv(var, raising=False)
    assert hints.job_token("s3://a/") != hints.job_token("s3://a/")  # random per dataset object
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run42")
    train, val = hints.job_token("s3://a/train"), hints.job_token("s3://a/val")
    assert train == hints.job_token("s3://a/train") and train.startswith("run42:") and train != val
    long = hints.stream_id("j" * 500, 3, 7)
    assert len(long) == hints.MAX_STREAM and long.endswith("/3/7")


def test_switches(node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = HintedLocal(tmp_path, node.endpoint)
    assert hints.for_source(src, None, "s", ["a"]) is not None
    assert hints.for_source(src, False, "s", ["a"]) is None
    assert hints.for_source(src, None, "s", []) is None
    assert hints.for_source(LocalSource(tmp_path), None, "s", ["a"]) is None
    monkeypatch.setenv("NEARSTORE_HINTS", "0")
    assert hints.for_source(src, None, "s", ["a"]) is None
    assert hints.for_source(src, True, "s", ["a"]) is None  # the environment wins: an operator's off switch


# -- the wire ---------------------------------------------------------------------


def test_post_is_signed_json(node: FakeNode) -> None:
    s3 = connect(node.endpoint, access_key="AK", secret_key="SK")
    answer = hints.post(s3, "my bucket", "job/0/1", ["a", "b/c"])
    assert answer == {"accepted": 2, "queued": 2}
    (call,) = node.calls
    assert call["path"] == "/_nearstore/hint?bucket=my%20bucket"
    h = {k.lower(): v for k, v in call["headers"].items()}
    assert h["content-type"] == "application/json"
    assert h["x-amz-content-sha256"] == hashlib.sha256(call["raw"]).hexdigest()
    assert h["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AK/")
    assert "x-amz-content-sha256" in h["authorization"]  # the body's hash is signed
    assert json.loads(call["raw"]) == {"stream": "job/0/1", "keys": ["a", "b/c"]}


@pytest.mark.parametrize("status,body", [(404, b"<Error/>"), (405, b""), (501, b""), (403, b"<Error/>"),
                                         (200, b"<xml/>"), (200, b'{"other": 1}')])
def test_post_refused(status: int, body: bytes) -> None:
    n = FakeNode(status, body)
    try:
        with pytest.raises(hints.HintsUnavailable):
            hints.post(connect(n.endpoint), "b", "s", ["a"])
    finally:
        n.close()


def test_post_no_connection() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(hints.HintsUnavailable):
        hints.post(connect(f"http://127.0.0.1:{port}"), "b", "s", ["a"], timeout=1)


def test_s3source_sends_to_its_endpoint(node: FakeNode) -> None:
    src = S3Source("bkt", endpoint=node.endpoint)
    assert src.send_hint("j/0/0", ["x"])["accepted"] == 1
    assert node.calls[0]["path"] == "/_nearstore/hint?bucket=bkt"


# -- the datasets ---------------------------------------------------------------------


def test_object_stream_hints_its_order_batched(node: FakeNode, tmp_path: Path) -> None:
    keys = write_objects(tmp_path, 600)
    ds = ObjectStream(HintedLocal(tmp_path, node.endpoint), shuffle=True, seed=3, rank=1, world_size=2,
                      prefetch=4)
    ds.set_epoch(2)
    got = [k for k, _ in ds]
    order = [keys[i] for i in split(epoch_order(600, shuffle=True, seed=3, epoch=2), rank=1, world_size=2)]
    assert got == order
    wait_calls(node, 1)
    (stream,) = node.streams()
    assert stream.endswith("/1/0")
    windows = node.streams()[stream]
    assert_slices(windows, order)
    assert order.index(windows[0][0]) <= 20  # from the start (a later window may have replaced the first)
    assert len(windows) <= 30  # 300 reads: a handful of calls, never one per read


def test_tar_dataset_hints_shards(node: FakeNode, tmp_path: Path) -> None:
    names = []
    for s in range(40):
        name = f"shard-{s:03d}.tar"
        (tmp_path / name).write_bytes(make_tar([(f"{s:03d}{i}.cls", b"1") for i in range(3)]))
        names.append(name)
    ds = TarDataset(HintedLocal(tmp_path, node.endpoint), shuffle=True, seed=1, prefetch=2)
    assert len(list(ds)) == 40 * 3
    wait_calls(node, 1)
    order = [names[i] for i in epoch_order(40, shuffle=True, seed=1, epoch=0)]
    (windows,) = node.streams().values()
    assert order.index(windows[0][0]) <= 10
    assert_slices(windows, order)


def test_a_plain_s3_gets_one_hint_and_the_loader_reads_on(plain_s3: FakeNode, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    keys = write_objects(tmp_path, 200)
    src = HintedLocal(tmp_path, plain_s3.endpoint)
    ds = ObjectStream(src, prefetch=2)
    with caplog.at_level(logging.INFO, logger="nearstore.clients.hints"):
        assert [k for k, _ in ds] == keys
        deadline = time.monotonic() + 3
        while not src.hints_off and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [k for k, _ in ds] == keys  # a second epoch: no more calls
    assert src.hints_off and len(plain_s3.calls) == 1
    assert sum("no read-ahead hints" in r.getMessage() for r in caplog.records) == 1


def test_hints_off_sends_nothing(node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = write_objects(tmp_path, 50)
    assert [k for k, _ in ObjectStream(HintedLocal(tmp_path, node.endpoint), hints=False)] == keys
    monkeypatch.setenv("NEARSTORE_HINTS", "0")
    assert [k for k, _ in ObjectStream(HintedLocal(tmp_path, node.endpoint))] == keys
    time.sleep(0.05)
    assert node.calls == []


def test_object_dataset_hints_the_given_order(node: FakeNode, tmp_path: Path) -> None:
    keys = write_objects(tmp_path, 300)
    ds = ObjectDataset(HintedLocal(tmp_path, node.endpoint))
    order = list(range(300))
    random.Random(5).shuffle(order)
    ds.hint(order)
    assert [ds[i][0] for i in order] == [keys[i] for i in order]
    wait_calls(node, 1)
    (windows,) = node.streams().values()
    assert_slices(windows, [keys[i] for i in order])
    assert 1 <= len(windows) <= 20


def test_object_dataset_hints_key_order_only_when_read_in_order(node: FakeNode, tmp_path: Path) -> None:
    keys = write_objects(tmp_path, 200)
    ds = ObjectDataset(HintedLocal(tmp_path, node.endpoint))
    shuffled = list(range(200))
    random.Random(9).shuffle(shuffled)
    for i in shuffled:
        ds[i]
    time.sleep(0.05)
    assert node.calls == []
    for i in range(200):
        ds[i]
    wait_calls(node, 1)
    (windows,) = node.streams().values()
    assert keys.index(windows[0][0]) >= 4  # from the 4th index in a row (or a later window that replaced it)
    assert_slices(windows, keys)


def test_dataloader_workers(node: FakeNode, tmp_path: Path) -> None:
    """Two worker processes: each its own stream (same job, its worker id),
    each hinting its own share in order."""
    torch_data = pytest.importorskip("torch.utils.data")
    keys = write_objects(tmp_path, 400)
    ds = ObjectStream(HintedLocal(tmp_path, node.endpoint), shuffle=True, seed=7, rank=0, world_size=1,
                      decode=slow_key, prefetch=2)
    loader = torch_data.DataLoader(ds, batch_size=20, num_workers=2, collate_fn=list,
                                   multiprocessing_context="fork")
    got = [k for batch in loader for k in batch]
    assert sorted(got) == keys
    wait_calls(node, 2)
    streams = node.streams()
    assert sorted(s.rsplit("/", 2)[1:] for s in streams) == [["0", "0"], ["0", "1"]]
    assert len({s.rsplit("/", 2)[0] for s in streams}) == 1  # one job token, made once per dataset
    order = epoch_order(400, shuffle=True, seed=7, epoch=0)
    for stream, windows in streams.items():
        worker = int(stream.rsplit("/", 1)[1])
        assert_slices(windows, [keys[i] for i in split(order, rank=0, world_size=1, worker=worker, workers=2)])
        assert len(windows) <= 20


def test_object_dataset_without_a_node_stops_trying(tmp_path: Path) -> None:
    keys = write_objects(tmp_path, 20)
    ds = ObjectDataset(LocalSource(tmp_path))
    assert [ds[i][0] for i in range(20)] == keys
    assert ds._no_hints and ds._hinter is None  # decided once, not at every read


def slow_key(kv: tuple[str, bytes]) -> str:
    """A training step's worth of time per sample: a worker that ends in a
    few ms (a test's) ends before its first hint is made (a boto3 client)."""
    time.sleep(0.003)
    return kv[0]


def test_object_dataset_in_dataloader_workers(node: FakeNode, tmp_path: Path) -> None:
    """The order given to hint() before the workers start reaches each
    worker, which hints it from where its own reads are."""
    torch_data = pytest.importorskip("torch.utils.data")
    keys = write_objects(tmp_path, 300)
    ds = ObjectDataset(HintedLocal(tmp_path, node.endpoint), decode=slow_key)
    order = list(range(300))
    random.Random(2).shuffle(order)
    ds.hint(order)
    loader = torch_data.DataLoader(ds, batch_size=10, sampler=order, num_workers=2, collate_fn=list,
                                   multiprocessing_context="fork")
    assert [k for batch in loader for k in batch] == [keys[i] for i in order]
    wait_calls(node, 2)
    streams = node.streams()
    assert sorted(s.rsplit("/", 1)[1] for s in streams) == ["0", "1"]
    for windows in streams.values():
        assert_slices(windows, [keys[i] for i in order])
        assert len(windows) <= 30

"""The pure parts of `nearstore bench faults` and `soak`: content stamping,
byte comparison, how a read is judged, error names, the soak's model of
what a key may hold, recovery times and the tables. No servers: reads are
judged through a fake client."""

from __future__ import annotations

import io
import math
import threading
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, IncompleteReadError

from nearstore.bench import faults, soak
from nearstore.bench.harness import (
    BLOCK,
    Op,
    Threads,
    Version,
    content,
    error_kind,
    get_checked,
    mismatch,
)

# -- content and comparison ---------------------------------------------------------------


def test_content_is_deterministic_and_exactly_sized() -> None:
    for size in (0, 1, 15, 16, 17, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5):
        a, b = content(7, size), content(7, size)
        assert a == b and len(a) == size


def test_content_blocks_carry_seed_and_offset() -> None:
    """A block of another object, another version or another offset never
    compares equal: what makes a misplaced chunk visible."""
    one = content(1, 4 * BLOCK)
    blocks = [one[i * BLOCK : (i + 1) * BLOCK] for i in range(4)]
    assert len(set(blocks)) == 4  # same seed, other offsets
    other = content(2, 4 * BLOCK)
    assert all(one[i * BLOCK : (i + 1) * BLOCK] != other[i * BLOCK : (i + 1) * BLOCK]
               for i in range(4))
    assert content(1, 2 * BLOCK) == one[: 2 * BLOCK]  # a shorter version: its prefix


def test_mismatch_counts_wrong_and_extra_bytes() -> None:
    want = content(3, 10_000)
    assert mismatch(want, want) == 0
    assert mismatch(want[:500], want) == 0  # short: judged on what it has
    bad = bytearray(want)
    bad[10] ^= 1
    bad[9_000] ^= 0xFF
    assert mismatch(bytes(bad), want) == 2
    assert mismatch(want + b"xyz", want) == 3
    assert mismatch(b"\0" * 10, b"\1" * 5) == 10  # 5 wrong, 5 beyond


# -- judging reads ---------------------------------------------------------------------------


class FakeBody:
    """A StreamingBody that yields ``data`` and then raises ``error``."""

    def __init__(self, data: bytes, error: Exception | None = None) -> None:
        self._buf = io.BytesIO(data)
        self._error = error

    def read(self, n: int) -> bytes:
        piece = self._buf.read(n)
        if not piece and self._error is not None:
            raise self._error
        return piece

    def close(self) -> None:
        pass


class FakeS3:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls: list[dict[str, Any]] = []

    def get_object(self, **kw: Any) -> Any:
        self.calls.append(kw)
        if isinstance(self.result, Exception):
            raise self.result
        return {"Body": self.result}


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": ""},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _op() -> Op:
    return Op("get", 0, 0, 0.0)


def test_a_right_read_matches_its_candidate() -> None:
    old, new = content(1, 5000), content(2, 5000)
    op = _op()
    assert get_checked(FakeS3(FakeBody(new)), "k", [old, new], op) == 1
    assert op.ok and op.nbytes == 5000


def test_wrong_bytes_are_counted_against_the_nearest_candidate() -> None:
    want = content(1, 5000)
    got = bytearray(want)
    got[100] ^= 1
    op = _op()
    assert get_checked(FakeS3(FakeBody(bytes(got))), "k", [want], op) is None
    assert op.corrupt == 1 and op.error is None and "1 of 5000" in op.detail


def test_a_broken_body_is_an_error_and_its_bytes_are_still_checked() -> None:
    want = content(1, 5000)
    op = _op()
    assert get_checked(FakeS3(FakeBody(want[:1000], IncompleteReadError(
        actual_bytes=1000, expected_bytes=5000))), "k", [want], op) is None
    assert op.error == "short body" and op.corrupt == 0
    wrong = bytearray(want[:1000])
    wrong[0] ^= 1
    op = _op()
    get_checked(FakeS3(FakeBody(bytes(wrong), ConnectionResetError())), "k", [want], op)
    assert op.error == "connection reset" and op.corrupt == 1


def test_a_silently_short_body_is_corrupt() -> None:
    """No exception but fewer bytes than the object: the server lied about
    its length, which a client cannot see."""
    want = content(1, 5000)
    op = _op()
    assert get_checked(FakeS3(FakeBody(want[:4000])), "k", [want], op) is None
    assert op.corrupt == 1000 and op.error is None


def test_ranges_are_judged_on_the_slice() -> None:
    want = content(4, 300_000)
    op = _op()
    s3 = FakeS3(FakeBody(want[1000:2001]))
    assert get_checked(s3, "k", [want], op, (1000, 2000)) == 0
    assert s3.calls[0]["Range"] == "bytes=1000-2000"


def test_absence_is_right_only_where_allowed() -> None:
    missing = FakeS3(_client_error(404, "NoSuchKey"))
    op = _op()
    assert get_checked(missing, "k", [content(1, 10), None], op) == 1 and op.ok
    op = _op()
    assert get_checked(missing, "k", [content(1, 10)], op) is None
    assert op.error == "404 NoSuchKey"
    op = _op()  # a body where there must be none
    assert get_checked(FakeS3(FakeBody(b"ghost")), "k", [None], op) is None
    assert op.corrupt == 5


def test_error_names() -> None:
    assert error_kind(_client_error(503, "SlowDown")) == "503 SlowDown"
    assert error_kind(_client_error(403, "403")) == "403"  # a HEAD: no code of its own
    assert error_kind(EndpointConnectionError(endpoint_url="http://x")) == "refused"
    assert error_kind(IncompleteReadError(actual_bytes=1, expected_bytes=2)) == "short body"
    assert error_kind(ValueError("x")) == "ValueError"


# -- the soak's model ------------------------------------------------------------------------


def test_model_tracks_acknowledged_failed_and_older_states() -> None:
    m = soak.Model(["k"])
    assert m.acceptable("k") == [None] and m.certain("k") is None
    v1, v2, v3 = Version("k", 1, 10), Version("k", 2, 20), Version("k", 3, 30)
    m.acknowledged("k", v1)
    assert m.acceptable("k") == [v1] and m.certain("k") == v1
    states, n_ok = m.candidates("k")
    assert states == [v1, None] and n_ok == 1  # absent now means stale
    m.failed("k", v2)  # may or may not have happened
    assert m.acceptable("k") == [v1, v2] and m.certain("k") is False
    m.acknowledged("k", None)  # a delete
    assert m.acceptable("k") == [None]
    states, n_ok = m.candidates("k")
    assert n_ok == 1 and set(states[1:]) == {v1, v2}
    m.acknowledged("k", v3)
    assert soak.judge(m, "k", 0) == "ok"
    assert soak.judge(m, "k", 1) == "stale"
    assert soak.judge(m, "k", None) == "bad"


def test_model_keeps_a_bounded_history() -> None:
    m = soak.Model(["k"])
    for seed in range(1, 20):
        m.acknowledged("k", Version("k", seed, seed))
    assert len(m.keys["k"].older) <= soak.Model.OLDER_KEPT
    assert m.keys["k"].older[-1] == Version("k", 18, 18)


def test_interval_and_summary_lines() -> None:
    ops = [Op("get", 0, 0, 0.0, t1=0.010), Op("get", 0, 0, 0.0, t1=0.020, error="503 SlowDown")]
    iv = soak.interval_of(ops, 60.0, [100 << 20, 120 << 20])
    assert iv.requests == 2 and iv.errors == 1 and iv.error_rate == 0.5
    assert iv.p50_ms == pytest.approx(10.0) and iv.p99_ms == pytest.approx(20.0)
    assert "RSS MiB    100    120" in soak.interval_line(iv)
    s = soak.Summary(1.0, 2, requests=2, rss_start_mib=[1.0], rss_end_mib=[2.0], rss_max_mib=[3.0])
    assert soak.render_summary(s).endswith("PASS")
    s.lost_writes = 1
    assert not s.passed and soak.render_summary(s).endswith("FAIL")


# -- the fault table ---------------------------------------------------------------------------


def test_recovery_is_the_later_of_the_last_error_and_every_target_served() -> None:
    ops = [Op("get", 0, 0, 0.0, t1=9.0, error="refused"),  # before the heal: not counted
           Op("get", 1, 1, 9.5, t1=12.5, error="refused"),
           Op("get", 0, 0, 10.0, t1=10.2),
           Op("get", 1, 1, 12.6, t1=13.0)]
    assert faults.recovery(ops, 10.0, {0, 1}) == pytest.approx(3.0)
    assert faults.recovery(ops[:3], 10.0, {0, 1}) != faults.recovery(ops[:3], 10.0, {0, 1})  # NaN
    assert faults.recovery(ops, 0.0, {0, 1}) == 0.0  # never healed: nothing to recover from
    assert math.isnan(faults.recovery([], 10.0, {0}))


class _Faulty(faults.Fault):
    name = "made-up"
    help = "a fault for the table"

    def expected(self, ctx: faults.Context, op: Op) -> bool:
        return op.error == "refused"


def test_rows_split_expected_from_unexpected_and_render() -> None:
    ctx = faults.Context("made-up", None, None, faults.Options(), 1, ["u0", "u1"], [])  # type: ignore[arg-type]
    ctx.t_fault, ctx.t_heal = 1.0, 2.0
    ops = [Op("get", 1, 1, 1.0, t1=1.5, error="refused"),
           Op("put", 0, 0, 1.0, t1=1.6, error="500 InternalError"),
           Op("get", 0, 0, 2.1, t1=2.2),
           Op("get", 1, 1, 2.3, t1=2.5, corrupt=3, detail="k: 3 of 10 bytes wrong")]
    row = faults.summarize(ctx, _Faulty(), ops)
    assert (row.requests, row.errors, row.unexpected, row.corrupt_bytes) == (4, 2, 1, 3)
    assert row.unexpected_kinds == {"put@node0: 500 InternalError": 1}
    assert not row.passed
    text = faults.render([row, faults.Row("other", "x", skipped="needs root")])
    header, _rule, first, second = text.splitlines()[:4]
    assert header.startswith("| fault | requests | errors | unexpected | corrupt bytes")
    assert first.startswith("| made-up | 4 | 2 | 1 | 3 | 0 of 0 |")
    assert "skipped: needs root" in second
    assert "CORRUPT: k: 3 of 10 bytes wrong" in text
    assert "unexpected: put@node0: 500 InternalError x1" in text


def test_every_fault_is_listed_with_its_help() -> None:
    assert len(faults.FAULTS) >= 15
    for name, cls in faults.FAULTS.items():
        assert cls.name == name and cls.help
    parser = faults.build_parser()
    args = parser.parse_args(["--faults", "kill-put, backing-503", "--seconds", "0.5"])
    assert args.faults == ["kill-put", "backing-503"] and args.seconds == 0.5


def test_threads_pause_between_requests() -> None:
    """`paused` returns only when no thread is inside a request, and holds
    them there until it ends."""
    inside = threading.Semaphore(0)
    busy = [0]
    lock = threading.Lock()
    seen_busy_while_paused: list[int] = []

    def body(i: int, stop: threading.Event) -> None:
        while not stop.is_set():
            threads.checkpoint(i)
            with lock:
                busy[0] += 1
            inside.release()
            stop.wait(0.001)  # "a request"
            with lock:
                busy[0] -= 1

    threads = Threads(body, 3)
    threads.start()
    try:
        for _ in range(3):
            assert inside.acquire(timeout=10)  # they are running
        with threads.paused(timeout=10):
            for _ in range(20):
                with lock:
                    seen_busy_while_paused.append(busy[0])
        assert inside.acquire(timeout=10)  # and running again after
    finally:
        threads.stop(timeout=10)
    assert set(seen_busy_while_paused) == {0}
    assert not threads.failures

"""nearstore in front of a failing upstream: nearstore -> FaultProxy -> moto.

The client here never retries (``total_max_attempts=1``): whatever survives a
fault survives because nearstore retried or resumed. Bytes are checked
against the object's digest: a client may see an error or a short read,
never wrong or silently truncated bytes.

The mapping's timeouts are short so that the tests are: connect 1 s, read
2 s, deadline 4 s.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from tests.conftest import ServerPool
from tests.helpers.faultproxy import FaultProxy
from tests.helpers.s3util import md5_hex, pattern
from tests.helpers.servers import S3Server, upstream_mapping

MiB = 1024 * 1024
READ_TIMEOUT = 2.0
DEADLINE = 4.0
# How long nearstore may take to give up on an unreachable upstream: its
# deadline plus one backoff step and the client's own overhead.
GIVE_UP = DEADLINE + 2.0


@dataclass
class FaultEnv:
    proxy: FaultProxy
    nearstore: S3Server
    moto: S3Server
    s3: Any  # boto3 -> nearstore, no client retries
    s3_retrying: Any  # boto3 -> nearstore, default retries
    backing: Any  # boto3 -> moto directly
    bucket: str


@pytest.fixture(scope="module")
def fault_stack(servers: ServerPool) -> Iterator[tuple[FaultProxy, S3Server, S3Server]]:
    moto = servers.get("moto")
    proxy = FaultProxy(moto.host, moto.port).start()
    try:
        mapping = upstream_mapping(moto, "*", endpoint=proxy.url, connect_timeout=1.0,
                                   read_timeout=READ_TIMEOUT, deadline=DEADLINE)
        ns = servers.private(f"nearstore-faults-{proxy.port}", "nearstore", buckets=[mapping],
                             label="nearstore-faults", extra={"upstream": moto, "proxy": proxy})
        yield proxy, ns, moto
    finally:
        proxy.stop()


@pytest.fixture
def env(fault_stack: tuple[FaultProxy, S3Server, S3Server], servers: ServerPool) -> FaultEnv:
    proxy, ns, moto = fault_stack
    proxy.reset()
    s3 = ns.client(retries={"total_max_attempts": 1}, read_timeout=30)
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    servers.client("moto").create_bucket(Bucket=bucket)
    proxy.clear_log()
    return FaultEnv(proxy, ns, moto, s3, ns.client(), servers.client("moto"), bucket)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class RawGet:
    status: int
    content_length: int | None
    data: bytes
    error: str | None  # how the body ended early, if it did


def raw_get(env: FaultEnv, key: str, timeout: float = 30) -> RawGet:
    """GET through a presigned URL with http.client: we see exactly what came,
    how many bytes were promised, and how the body ended."""
    url = env.s3.generate_presigned_url("get_object", Params={"Bucket": env.bucket, "Key": key},
                                        ExpiresIn=300)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        chunks: list[bytes] = []
        error = None
        while True:
            try:
                piece = resp.read(256 * 1024)
            except http.client.IncompleteRead as e:
                chunks.append(e.partial)
                error = f"IncompleteRead({len(e.partial)} more bytes)"
                break
            except (ConnectionError, TimeoutError) as e:
                error = repr(e)
                break
            if not piece:
                break
            chunks.append(piece)
        data = b"".join(chunks)
        if error is None and length is not None and len(data) < int(length):
            # http.client's read(n) returns b"" at an early EOF without raising.
            error = f"connection closed after {len(data)} of {length} bytes"
        return RawGet(resp.status, int(length) if length is not None else None, data, error)
    finally:
        conn.close()


def assert_never_wrong(got: RawGet, body: bytes) -> None:
    """Whole and right, or visibly short (fewer bytes than Content-Length, or
    a broken connection), with every byte that came right."""
    assert got.status == 200
    assert got.content_length == len(body)
    assert got.data == body[: len(got.data)], "bytes differ from the object's"
    if len(got.data) < len(body):
        assert got.error is not None, "short body without an error"


def gets_of(env: FaultEnv, key: str) -> list[Any]:
    return env.proxy.events(method="GET", path=f"/{env.bucket}/{key}$")


def range_start(event: Any) -> int:
    rng = event.headers.get("range")
    if not rng:
        return 0
    return int(rng.split("=", 1)[1].split("-", 1)[0])


# -- transient errors -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_get_survives_transient_503s(env: FaultEnv) -> None:
    body = pattern(2 * MiB + 3, seed=40)
    env.backing.put_object(Bucket=env.bucket, Key="obj", Body=body)
    env.proxy.fail(times=2, method="GET", path="/obj$")
    got = env.s3.get_object(Bucket=env.bucket, Key="obj")["Body"].read()
    assert sha(got) == sha(body)
    gets = gets_of(env, "obj")
    assert [e.status for e in gets[:2]] == [503, 503], gets
    assert gets[-1].status in (200, 206) and gets[-1].complete, gets


@pytest.mark.timeout(60)
def test_head_and_list_survive_transient_503s(env: FaultEnv) -> None:
    env.backing.put_object(Bucket=env.bucket, Key="h", Body=b"head me")
    env.proxy.fail(times=2, method="HEAD")
    assert env.s3.head_object(Bucket=env.bucket, Key="h")["ContentLength"] == 7
    env.proxy.fail(times=2, code="InternalError", status=500, method="GET", query="list-type")
    listed = env.s3.list_objects_v2(Bucket=env.bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["h"]
    assert sum(e.action == "error" for e in env.proxy.events()) == 4


@pytest.mark.timeout(60)
def test_get_survives_dropped_connections(env: FaultEnv) -> None:
    body = pattern(300_000, seed=41)
    env.backing.put_object(Bucket=env.bucket, Key="d", Body=body)
    env.proxy.drop(times=2, method="GET", path="/d$")
    assert env.s3.get_object(Bucket=env.bucket, Key="d")["Body"].read() == body
    assert len(gets_of(env, "d")) >= 3


@pytest.mark.timeout(60)
def test_put_survives_a_503_with_default_client(env: FaultEnv) -> None:
    # A streamed PUT may not be replayable by nearstore; then the client gets
    # the 503 and its SDK retries. Either way the object arrives whole.
    body = pattern(3 * MiB, seed=42)
    env.proxy.fail(times=1, method="PUT", path="/p$")
    env.s3_retrying.put_object(Bucket=env.bucket, Key="p", Body=body)
    assert env.backing.get_object(Bucket=env.bucket, Key="p")["Body"].read() == body


@pytest.mark.timeout(60)
def test_persistent_503_reaches_client_with_retry_after(env: FaultEnv) -> None:
    env.backing.put_object(Bucket=env.bucket, Key="s", Body=b"x")
    env.proxy.fail(times=None, method="GET", path="/s$")
    t0 = time.monotonic()
    try:
        got = env.s3.get_object(Bucket=env.bucket, Key="s")
        data = got["Body"].read()
    except ClientError as e:
        error = e
    except BotoCoreError as e:
        pytest.fail(f"{got['ResponseMetadata']['HTTPStatusCode']} and then a broken body "
                    f"({type(e).__name__}) instead of 503; upstream saw {env.proxy.events()}")
    else:
        pytest.fail(f"GET succeeded ({data!r}) though every upstream GET failed")
    elapsed = time.monotonic() - t0
    meta = error.response["ResponseMetadata"]
    assert meta["HTTPStatusCode"] == 503
    assert error.response["Error"]["Code"] in ("SlowDown", "ServiceUnavailable")
    assert "retry-after" in meta["HTTPHeaders"]
    assert elapsed < GIVE_UP
    assert len(gets_of(env, "s")) >= 2, "nearstore did not retry a GET"


# -- broken bodies -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_get_truncated_mid_body_resumes_with_if_match(env: FaultEnv) -> None:
    body = pattern(8 * MiB + 11, seed=43)
    etag = env.backing.put_object(Bucket=env.bucket, Key="big", Body=body)["ETag"]
    cut = 3 * MiB
    env.proxy.truncate_response(after=cut, method="GET", path="/big$")
    got = raw_get(env, "big")
    assert_never_wrong(got, body)
    assert got.error is None and sha(got.data) == sha(body), "not resumed"
    gets = gets_of(env, "big")
    assert len(gets) >= 2, gets
    first, resumed = gets[0], gets[1]
    assert first.error and "truncated" in first.error
    # nearstore resumes after the last byte it consumed: at most what the
    # proxy sent (aiohttp drops what it buffered when the stream errors).
    assert range_start(first) < range_start(resumed) <= range_start(first) + cut, resumed.headers
    assert resumed.headers.get("if-match") == etag


@pytest.mark.timeout(60)
def test_get_reset_mid_body_resumes_or_fails_visibly(env: FaultEnv) -> None:
    body = pattern(8 * MiB, seed=44)
    etag = env.backing.put_object(Bucket=env.bucket, Key="big", Body=body)["ETag"]
    env.proxy.reset_response(after=2 * MiB + 5, method="GET", path="/big$")
    got = raw_get(env, "big")
    assert_never_wrong(got, body)
    # The promise: a broken upstream stream resumes.
    assert got.error is None and sha(got.data) == sha(body)
    later = [e for e in gets_of(env, "big")[1:] if e.headers.get("range")]
    assert later and all(e.headers.get("if-match") == etag for e in later)


@pytest.mark.timeout(60)
def test_get_with_boto3_reset_mid_body(env: FaultEnv) -> None:
    body = pattern(6 * MiB, seed=45)
    env.backing.put_object(Bucket=env.bucket, Key="b", Body=body)
    env.proxy.reset_response(after=MiB, method="GET", path="/b$")
    try:
        data = env.s3.get_object(Bucket=env.bucket, Key="b")["Body"].read()
    except (BotoCoreError, ClientError):  # a visible failure is acceptable ...
        return
    assert md5_hex(data) == md5_hex(body)  # ... wrong bytes are not


@pytest.mark.timeout(60)
def test_get_resume_never_mixes_versions(env: FaultEnv) -> None:
    old = pattern(6 * MiB, seed=46)
    new = pattern(6 * MiB, seed=47)
    env.backing.put_object(Bucket=env.bucket, Key="v", Body=old)
    moto = env.moto

    def overwrite() -> None:
        c = moto.client()
        c.put_object(Bucket=env.bucket, Key="v", Body=new)
        c.close()

    env.proxy.truncate_response(after=2 * MiB, method="GET", path="/v$", on_fire=overwrite)
    got = raw_get(env, "v")
    assert got.status == 200 and got.content_length == len(old)
    resumed = [e for e in gets_of(env, "v")[1:] if e.headers.get("range")]
    assert resumed and resumed[0].status == 412, resumed
    if got.data == new:
        # Through the cache the break happens while filling, before the
        # response starts: the changed object is read again, whole.
        return
    assert got.data == old[: len(got.data)], "bytes of the new version leaked in"
    assert len(got.data) < len(old) and got.error is not None, "must be cut short"


@pytest.mark.timeout(60)
def test_get_breaking_again_and_again_is_bounded_and_never_wrong(env: FaultEnv) -> None:
    body = pattern(8 * MiB, seed=48)
    env.backing.put_object(Bucket=env.bucket, Key="f", Body=body)
    env.proxy.truncate_response(after=256 * 1024, times=None, method="GET", path="/f$")
    t0 = time.monotonic()
    got = raw_get(env, "f")
    assert time.monotonic() - t0 < GIVE_UP + READ_TIMEOUT
    assert_never_wrong(got, body)
    assert len(gets_of(env, "f")) <= 40


# -- upstream down -----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_upstream_down_gives_fast_503_with_retry_after(env: FaultEnv) -> None:
    env.backing.put_object(Bucket=env.bucket, Key="k", Body=b"still here")
    env.proxy.down()
    try:
        calls = {
            "GET": lambda: env.s3.get_object(Bucket=env.bucket, Key="k"),
            "PUT": lambda: env.s3.put_object(Bucket=env.bucket, Key="n", Body=b"new"),
            "LIST": lambda: env.s3.list_objects_v2(Bucket=env.bucket),
            "HEAD": lambda: env.s3.head_object(Bucket=env.bucket, Key="k"),
        }
        for name, call in calls.items():
            t0 = time.monotonic()
            with pytest.raises(ClientError) as ei:
                call()
            elapsed = time.monotonic() - t0
            meta = ei.value.response["ResponseMetadata"]
            assert meta["HTTPStatusCode"] == 503, name
            if name != "HEAD":  # a HEAD answer has no body, so no code
                assert ei.value.response["Error"]["Code"] in (
                    "SlowDown", "ServiceUnavailable"), name
            assert meta["HTTPHeaders"].get("retry-after"), name
            assert elapsed < GIVE_UP, (name, elapsed)
    finally:
        env.proxy.up()
    # And back: the pool recovers.
    assert env.s3.get_object(Bucket=env.bucket, Key="k")["Body"].read() == b"still here"
    assert error_free_head(env, "n") is False


def error_free_head(env: FaultEnv, key: str) -> bool:
    try:
        env.backing.head_object(Bucket=env.bucket, Key=key)
        return True
    except ClientError:
        return False


# -- interrupted uploads -----------------------------------------------------------


def _upload_error(fn: Any, **kw: Any) -> str | None:
    """None if the call succeeded, else what the client saw."""
    try:
        fn(**kw)
        return None
    except ClientError as e:
        meta = e.response["ResponseMetadata"]
        return f"{meta['HTTPStatusCode']} {e.response['Error']['Code']}"
    except BotoCoreError as e:
        return type(e).__name__


@pytest.mark.timeout(60)
def test_put_reset_while_uploading_leaves_nothing(env: FaultEnv) -> None:
    body = pattern(6 * MiB, seed=49)
    env.proxy.reset_request(after=MiB, method="PUT", path="/up$")
    err = _upload_error(env.s3.put_object, Bucket=env.bucket, Key="up", Body=body)
    assert err is not None, "the client must learn that the upload failed"
    assert err.startswith("5") or not err[0].isdigit(), err
    puts = env.proxy.events(method="PUT", path="/up$")
    assert puts and puts[0].error and "reset" in puts[0].error
    assert not error_free_head(env, "up"), "a half-written object is visible upstream"
    assert env.s3.list_objects_v2(Bucket=env.bucket)["KeyCount"] == 0
    # A later upload goes through whole.
    env.s3.put_object(Bucket=env.bucket, Key="up", Body=body)
    assert sha(env.backing.get_object(Bucket=env.bucket, Key="up")["Body"].read()) == sha(body)


@pytest.mark.timeout(60)
def test_overwrite_reset_while_uploading_keeps_old_version(env: FaultEnv) -> None:
    old = pattern(MiB, seed=50)
    env.backing.put_object(Bucket=env.bucket, Key="o", Body=old)
    env.proxy.reset_request(after=MiB, method="PUT", path="/o$")
    err = _upload_error(env.s3.put_object, Bucket=env.bucket, Key="o",
                        Body=pattern(4 * MiB, seed=51))
    assert err is not None
    assert env.backing.get_object(Bucket=env.bucket, Key="o")["Body"].read() == old
    assert env.s3.get_object(Bucket=env.bucket, Key="o")["Body"].read() == old


@pytest.mark.timeout(90)
def test_multipart_part_reset_while_uploading(env: FaultEnv) -> None:
    parts = [pattern(5 * MiB, seed=52), pattern(5 * MiB, seed=53), b"last"]
    uid = env.s3.create_multipart_upload(Bucket=env.bucket, Key="mp")["UploadId"]
    etags = [env.s3.upload_part(Bucket=env.bucket, Key="mp", UploadId=uid, PartNumber=1,
                                Body=parts[0])["ETag"]]
    env.proxy.reset_request(after=2 * MiB, method="PUT", query="partNumber=2")
    err = _upload_error(env.s3.upload_part, Bucket=env.bucket, Key="mp", UploadId=uid,
                        PartNumber=2, Body=parts[1])
    assert err is not None, "the client must learn that the part failed"
    # Upstream: part 1 whole, no half part 2, no object.
    listed = env.backing.list_parts(Bucket=env.bucket, Key="mp", UploadId=uid).get("Parts", [])
    assert [(p["PartNumber"], p["Size"]) for p in listed] == [(1, 5 * MiB)]
    assert not error_free_head(env, "mp")
    for n, data in ((2, parts[1]), (3, parts[2])):
        etags.append(env.s3.upload_part(Bucket=env.bucket, Key="mp", UploadId=uid,
                                        PartNumber=n, Body=data)["ETag"])
    env.s3.complete_multipart_upload(
        Bucket=env.bucket, Key="mp", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e}
                                   for n, e in enumerate(etags, 1)]})
    got = env.backing.get_object(Bucket=env.bucket, Key="mp")["Body"].read()
    assert sha(got) == sha(b"".join(parts))


# -- slow upstream -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_delays_under_the_read_timeout_just_work(env: FaultEnv) -> None:
    body = pattern(MiB, seed=54)
    env.proxy.delay(0.5)
    t0 = time.monotonic()
    env.s3.put_object(Bucket=env.bucket, Key="slow", Body=body)
    assert env.s3.get_object(Bucket=env.bucket, Key="slow")["Body"].read() == body
    assert [o["Key"] for o in env.s3.list_objects_v2(Bucket=env.bucket)["Contents"]] == ["slow"]
    assert time.monotonic() - t0 >= 1.5
    # One upstream request per client request: nothing timed out and retried.
    # (The proxy marks an exchange complete just after relaying its last
    # byte, which can be a moment after the client has it.)
    deadline = time.monotonic() + 3
    while not all(e.complete for e in env.proxy.events()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(e.action == "delay" and e.complete for e in env.proxy.events()), env.proxy.events()
    assert len(gets_of(env, "slow")) == 1


@pytest.mark.timeout(60)
def test_one_answer_slower_than_the_read_timeout_is_retried(env: FaultEnv) -> None:
    body = pattern(100_000, seed=55)
    env.backing.put_object(Bucket=env.bucket, Key="late", Body=body)
    env.proxy.delay(READ_TIMEOUT + 1.5, times=1, method="GET", path="/late$")
    t0 = time.monotonic()
    assert env.s3.get_object(Bucket=env.bucket, Key="late")["Body"].read() == body
    assert READ_TIMEOUT <= time.monotonic() - t0 < GIVE_UP + READ_TIMEOUT
    assert len(gets_of(env, "late")) == 2

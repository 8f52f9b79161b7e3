"""Process-level robustness of nearstore: crashes, signals, concurrent writers,
memory use. Every test starts its own server (``fresh_server``)."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.s3util import error_of, pattern
from tests.helpers.servers import S3Server

MiB = 1024 * 1024


def _start_put(server: S3Server, path: str, size: int) -> Any:
    """Open a PUT of ``size`` bytes and send only its headers; returns the socket."""
    headers = rawhttp.sign_headers(server, "PUT", path, headers={"Content-Length": str(size)},
                                   payload_hash="UNSIGNED-PAYLOAD")
    sock = rawhttp.raw_socket(server, timeout=15)
    head = f"PUT {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    return sock


def test_health_endpoint(nearstore_server: S3Server) -> None:
    resp = rawhttp.send(nearstore_server, "GET", "/_nearstore/health")
    assert resp.status == 200


@pytest.mark.timeout(90)
def test_kill_9_during_put_leaves_no_partial_object(fresh_server: Any) -> None:
    server = fresh_server("nearstore")
    s3 = server.client()
    s3.create_bucket(Bucket="crash")
    old = pattern(1 * MiB, seed=20)
    s3.put_object(Bucket="crash", Key="existing", Body=old)
    block = pattern(1 * MiB, seed=21)
    socks = []
    for key in ("existing", "new-object"):
        sock = _start_put(server, key_path("crash", key), 64 * MiB)
        for _ in range(16):  # 16 of 64 MiB sent, then the server dies
            sock.sendall(block)
        socks.append(sock)
    time.sleep(0.3)
    server.kill()
    for sock in socks:
        sock.close()
    server.restart()
    s3 = server.client()
    assert error_of(s3.head_object, Bucket="crash", Key="new-object") == (404, "404")
    got = s3.get_object(Bucket="crash", Key="existing")["Body"].read()
    assert got == old, "the previous version must survive whole"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="crash").get("Contents", [])]
    assert keys == ["existing"]
    assert not s3.list_multipart_uploads(Bucket="crash").get("Uploads")
    # And the store still works.
    s3.put_object(Bucket="crash", Key="new-object", Body=b"after restart")
    assert s3.get_object(Bucket="crash", Key="new-object")["Body"].read() == b"after restart"


@pytest.mark.timeout(90)
def test_sigterm_lets_inflight_get_finish(fresh_server: Any) -> None:
    server = fresh_server("nearstore")
    s3 = server.client()
    s3.create_bucket(Bucket="term")
    data = pattern(32 * MiB, seed=22)
    s3.put_object(Bucket="term", Key="big", Body=data)
    path = key_path("term", "big")
    headers = rawhttp.sign_headers(server, "GET", path)
    conn = rawhttp.connection(server, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200
        digest = hashlib.md5()
        first = resp.read(1 * MiB)
        digest.update(first)
        server.signal(signal.SIGTERM)
        received = len(first)
        while True:
            chunk = resp.read(1 * MiB)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
            time.sleep(0.005)  # a slow reader
    finally:
        conn.close()
    assert received == len(data)
    assert digest.hexdigest() == hashlib.md5(data).hexdigest()
    assert server.wait(timeout=30) == 0


@pytest.mark.timeout(90)
def test_sigterm_lets_inflight_put_finish(fresh_server: Any) -> None:
    server = fresh_server("nearstore")
    s3 = server.client()
    s3.create_bucket(Bucket="term")
    size = 16 * MiB
    block = pattern(1 * MiB, seed=23)
    sock = _start_put(server, key_path("term", "put"), size)
    try:
        for _ in range(4):
            sock.sendall(block)
        server.signal(signal.SIGTERM)
        time.sleep(0.2)
        for _ in range(12):
            sock.sendall(block)
        status, _, body = rawhttp.parse_raw_response(rawhttp.read_http_response(sock))
    finally:
        sock.close()
    assert status == 200, body
    assert server.wait(timeout=30) == 0
    # New connections after SIGTERM were refused; the finished PUT is durable.
    server.restart()
    got = server.client().get_object(Bucket="term", Key="put")["Body"].read()
    assert got == block * 16


@pytest.mark.timeout(120)
def test_concurrent_puts_one_key_one_whole_version(server: S3Server, s3: Any,
                                                   bucket: str) -> None:
    versions = [pattern(1 * MiB + i, seed=100 + i) for i in range(8)]
    digests = {hashlib.md5(v).hexdigest() for v in versions}
    s3.put_object(Bucket=bucket, Key="race", Body=versions[0])
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def reader() -> None:
        client = server.client()
        try:
            while not stop.is_set():
                body = client.get_object(Bucket=bucket, Key="race")["Body"].read()
                seen.append(hashlib.md5(body).hexdigest())
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            for _round in range(2):
                list(pool.map(lambda v: server.client().put_object(
                    Bucket=bucket, Key="race", Body=v), versions))
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=30)
    assert not errors, errors
    assert seen and set(seen) <= digests, "a reader saw a mixed or partial version"
    final = s3.get_object(Bucket=bucket, Key="race")
    body = final["Body"].read()
    assert hashlib.md5(body).hexdigest() in digests
    assert final["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert final["ContentLength"] == len(body)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["race"]


@pytest.mark.timeout(180)
def test_memory_stays_flat_for_large_put_and_get(fresh_server: Any, tmp_path: Any) -> None:
    server = fresh_server("nearstore")
    s3 = server.client()
    s3.create_bucket(Bucket="mem")
    size = 200 * MiB
    block = pattern(4 * MiB, seed=24)
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    baseline = server.proc_status("VmRSS")
    with open(src, "rb") as f:
        s3.put_object(Bucket="mem", Key="big", Body=f)
    path = key_path("mem", "big")
    conn = rawhttp.connection(server, timeout=60)
    try:
        conn.request("GET", path, headers=rawhttp.sign_headers(server, "GET", path))
        resp = conn.getresponse()
        assert resp.status == 200
        received = 0
        while chunk := resp.read(1 * MiB):
            received += len(chunk)
    finally:
        conn.close()
    assert received == size
    hwm = server.proc_status("VmHWM")
    assert hwm < 150 * MiB, f"server peak RSS {hwm / MiB:.0f} MiB (baseline {baseline / MiB:.0f})"
    src.unlink()


def test_uploads_beyond_the_cap_are_told_to_slow_down(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 16: at most [server] max_uploads bodies are received at once;
    the next upload gets 503 SlowDown with Retry-After before its body is
    read, and the node takes uploads again as soon as one ends."""
    import socket

    from tests.helpers.servers import start_server

    server = start_server("nearstore", tmp_path_factory.mktemp("capped"), config_text="[server]\nmax_uploads = 2\n")
    try:
        s3 = server.client()
        s3.create_bucket(Bucket="capped")
        path = rawhttp.presign(server, "PUT", key_path("capped", "slow"))
        holders = []
        for _ in range(2):  # two slow uploads: headers and a first byte, then nothing
            s = socket.create_connection((server.host, server.port), timeout=10)
            s.sendall(f"PUT {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nContent-Length: 1000\r\n\r\nx"
                      .encode())
            holders.append(s)
        deadline, refused = time.monotonic() + 10, None
        while refused is None and time.monotonic() < deadline:
            resp = rawhttp.send(server, "PUT", path, {}, b"small")
            if resp.status == 503:
                refused = resp
        assert refused is not None, "the third upload was not refused"
        assert b"<Code>SlowDown</Code>" in refused.body and refused.header("Retry-After") == "1"
        for s in holders:
            s.close()
        deadline, accepted = time.monotonic() + 10, False
        while not accepted and time.monotonic() < deadline:
            accepted = rawhttp.send(server, "PUT", path, {}, b"small").status == 200
        assert accepted
        assert s3.get_object(Bucket="capped", Key="slow")["Body"].read() == b"small"
    finally:
        server.stop()


def test_connections_beyond_the_cap_are_told_to_slow_down(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 16: at most [server] max_connections are open; the next one is
    answered 503 SlowDown with Retry-After and closed, and the node accepts
    again as soon as one closes."""
    import socket

    from tests.helpers.servers import start_server

    server = start_server("nearstore", tmp_path_factory.mktemp("conncap"), config_text="[server]\nmax_connections = 3\n")
    try:
        held = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(3)]
        with socket.create_connection((server.host, server.port), timeout=10) as extra:
            answer = b""
            while chunk := extra.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer and b"<Code>SlowDown</Code>" in answer
        held.pop().close()
        deadline, served = time.monotonic() + 10, False
        while not served and time.monotonic() < deadline:
            served = rawhttp.send(server, "GET", "/_nearstore/health", {}).status == 200
        assert served
        for s in held:
            s.close()
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_a_thousand_slow_uploads_keep_memory_bounded(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 16: 1,000 uploads at once, each trickling its body (16 rounds
    of 16 KiB, far apart): the node receives them all, stores each exactly,
    keeps serving others meanwhile, and its memory stays bounded (a buffer
    per upload, not the body)."""
    import selectors
    import socket

    from tests.helpers.servers import start_server

    n, rounds, piece = 1000, 16, 16 * 1024
    server = start_server("nearstore", tmp_path_factory.mktemp("slow-uploads"),
                          config_text="[server]\nmax_uploads = 1100\nmax_connections = 1200\nbody_timeout = 60\n")
    try:
        s3 = server.client()
        s3.create_bucket(Bucket="slow")
        baseline = server.proc_status("VmRSS")
        socks: list[socket.socket] = []
        for i in range(n):
            path = rawhttp.presign(server, "PUT", key_path("slow", f"k{i}"))
            s = socket.create_connection((server.host, server.port), timeout=30)
            s.sendall(f"PUT {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
                      f"Content-Length: {rounds * piece}\r\n\r\n".encode())
            socks.append(s)
        for r in range(rounds):
            for i, s in enumerate(socks):
                s.sendall(pattern(piece, seed=i * rounds + r))
            # Between rounds the node holds 1,000 half-received bodies, and
            # still answers others.
            assert s3.head_bucket(Bucket="slow")["ResponseMetadata"]["HTTPStatusCode"] == 200
        sel = selectors.DefaultSelector()
        replies: dict[int, bytes] = {}
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        deadline = time.monotonic() + 120
        while len(replies) < n and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                replies[key.data] = replies.get(key.data, b"") + data
                if b"\r\n\r\n" in replies[key.data] or not data:
                    sel.unregister(key.fileobj)
        sel.close()
        statuses = sorted({r.split(b" ", 2)[1] for r in replies.values() if r})
        assert len(replies) == n and statuses == [b"200"], (len(replies), statuses)
        hwm = server.proc_status("VmHWM")
        # Measured +46 MiB; whole bodies held would be +250 MiB.
        assert hwm < baseline + 128 * MiB, f"peak RSS {hwm / MiB:.0f} MiB (baseline {baseline / MiB:.0f})"
        for i in (0, 499, 999):
            body = s3.get_object(Bucket="slow", Key=f"k{i}")["Body"].read()
            assert body == b"".join(pattern(piece, seed=i * rounds + r) for r in range(rounds))
    finally:
        for s in socks:
            s.close()
        server.stop()

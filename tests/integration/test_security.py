"""Holes that cost an attacker little: a POST form whose fields repeat in
another case, connections that never finish their request, files other local
users could read, and the published development keys on a public address.
(A peer that lies about an object's size: tests/cluster/test_cluster.py.)
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.s3util import error_of, post_form
from tests.helpers.servers import VENV_BIN, S3Server, free_port

MiB = 1024 * 1024


def _error_code(resp: rawhttp.Response) -> str | None:
    assert "xml" in (resp.header("Content-Type") or ""), resp
    return resp.xml().findtext("Code")


@pytest.fixture
def post_bucket(nearstore_server: S3Server) -> Iterator[tuple[Any, str]]:
    s3 = nearstore_server.client()
    name = f"post-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield s3, name


# -- 1. POST policy bypass ------------------------------------------------------------


@pytest.mark.parametrize("extra", [("Key", "secret.txt"), ("KEY", "allowed/../secret.txt"),
                                   ("X-Amz-Meta-Owner", "mallory")])
def test_post_field_repeated_in_another_case_is_refused(
    nearstore_server: S3Server, post_bucket: tuple[Any, str], extra: tuple[str, str]
) -> None:
    s3, bucket = post_bucket
    s3.put_object(Bucket=bucket, Key="secret.txt", Body=b"original")
    post = s3.generate_presigned_post(
        bucket, "allowed/x", Fields={"x-amz-meta-owner": "alice"},
        Conditions=[["starts-with", "$key", "allowed/"], {"x-amz-meta-owner": "alice"}], ExpiresIn=300)
    pairs = [*post["fields"].items(), extra]
    body, ctype = post_form(pairs, b"overwritten")
    resp = rawhttp.send(nearstore_server, "POST", key_path(bucket), {"Content-Type": ctype}, body)
    assert resp.status == 400 and _error_code(resp) == "InvalidArgument", resp
    assert s3.get_object(Bucket=bucket, Key="secret.txt")["Body"].read() == b"original"
    assert error_of(s3.head_object, Bucket=bucket, Key="allowed/x") == (404, "404")
    # The same form without the repeat is accepted: the policy is right.
    body, ctype = post_form(list(post["fields"].items()), b"fine")
    resp = rawhttp.send(nearstore_server, "POST", key_path(bucket), {"Content-Type": ctype}, body)
    assert resp.status == 204, resp
    assert s3.head_object(Bucket=bucket, Key="allowed/x")["Metadata"] == {"owner": "alice"}


@pytest.mark.parametrize(("count", "name_len"), [(1000, 1024), (150, 4)])
def test_post_field_names_and_count_are_bounded(
    nearstore_server: S3Server, post_bucket: tuple[Any, str], count: int, name_len: int
) -> None:
    """Long names with empty values (once 160 MiB before authentication),
    and many short ones: both refused before the signature is looked at."""
    _s3, bucket = post_bucket
    pairs = [(f"f{i:04d}".ljust(name_len, "n"), "") for i in range(count)]
    body, ctype = post_form(pairs, b"x")
    resp = rawhttp.send(nearstore_server, "POST", key_path(bucket), {"Content-Type": ctype}, body)
    assert resp.status == 400 and _error_code(resp) == "MaxPostPreDataLengthExceededError", resp


@pytest.mark.parametrize("part_headers", [
    b"X-Long: " + b"a" * 9000 + b"\r\n",  # one line over 8 KiB
    b"".join(b"X-Many-%d: a\r\n" % i for i in range(150)),  # more lines than allowed
], ids=["long-line", "many-lines"])
def test_post_part_headers_are_bounded(
    nearstore_server: S3Server, post_bucket: tuple[Any, str], part_headers: bytes
) -> None:
    _s3, bucket = post_bucket
    boundary = b"----nearstore" + uuid.uuid4().hex.encode()
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="key"\r\n' + part_headers
            + b"\r\nx\r\n--" + boundary + b"--\r\n")
    ctype = "multipart/form-data; boundary=" + boundary.decode()
    resp = rawhttp.send(nearstore_server, "POST", key_path(bucket), {"Content-Type": ctype}, body)
    assert resp.status == 400 and _error_code(resp) == "MalformedPOSTRequest", resp


# -- 2. connection limits ------------------------------------------------------------

HEAD_TIMEOUT, IDLE_TIMEOUT, BODY_TIMEOUT, SEND_TIMEOUT = 2.0, 3.0, 2.0, 2.0


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    from tests.helpers.servers import start_server

    srv = start_server(
        "nearstore", tmp_path_factory.mktemp("limited"),
        config_text=(f"[server]\nhead_timeout = {HEAD_TIMEOUT}\nidle_timeout = {IDLE_TIMEOUT}\n"
                     f"body_timeout = {BODY_TIMEOUT}\nsend_timeout = {SEND_TIMEOUT}\n"))
    try:
        yield srv
    finally:
        srv.stop()


def _connect(server: S3Server) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=10)


def _closed_within(socks: list[socket.socket], seconds: float) -> int:
    """How many of ``socks`` the server closed (EOF or reset) within
    ``seconds``; what they were sent before is read and dropped."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed = 0
    deadline = time.monotonic() + seconds
    while closed < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                closed += 1
    sel.close()
    return closed


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(120)
def test_a_thousand_half_sent_heads_are_bounded_and_closed(limited: S3Server) -> None:
    # Each: a request line and 24 KB of headers, every line within the
    # parser's bounds, the head never finished.
    head = b"GET /bucket/key HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"a" * 7900) for i in range(3))
    socks: list[socket.socket] = []
    try:
        start = time.monotonic()
        for _ in range(1000):
            s = _connect(limited)
            s.sendall(head)
            socks.append(s)
        sent = time.monotonic() - start
        closed = _closed_within(socks, HEAD_TIMEOUT + sent + 5.0)
        waited = time.monotonic() - start
        assert closed == len(socks), f"{closed} of {len(socks)} closed after {waited:.1f} s"
        assert _peak_rss_mib(limited.pid) < 150
    finally:
        for s in socks:
            s.close()
    # The node still serves.
    resp = rawhttp.send(limited, "GET", "/_nearstore/health", {}, b"")
    assert resp.status == 200


@pytest.mark.timeout(90)
def test_readers_that_stop_reading_are_dropped_while_others_are_served(limited: S3Server) -> None:
    """Two clients ask for 48 MiB and read nothing (one on the hot path, one
    through aiohttp: an Origin header sends it there); both are dropped
    after the send timeout, long before their bodies could have fitted in
    the socket buffers, and other clients are served meanwhile."""
    s3 = limited.client()
    bucket = f"stall-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    size = 48 * 1024 * 1024
    s3.put_object(Bucket=bucket, Key="big", Body=os.urandom(size))
    socks = []
    for extra in ({}, {"Origin": "https://example.com"}):
        headers = rawhttp.sign_headers(limited, "GET", key_path(bucket, "big"), headers=extra)
        s = _connect(limited)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET {key_path(bucket, 'big')} HTTP/1.1\r\n".encode()
                  + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n")
        socks.append(s)
    try:
        t0 = time.monotonic()
        for i in range(5):  # the node serves others while those two stall
            s3.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x" * 1000)
            assert s3.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == b"x" * 1000
        # Stalled: nothing read for longer than the send timeout. Then
        # drain what the kernel holds, to find the node's close.
        time.sleep(max(0.0, t0 + SEND_TIMEOUT + 1.5 - time.monotonic()))
        received, closed = [0, 0], [False, False]
        deadline = time.monotonic() + 15
        for i, s in enumerate(socks):
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while data := s.recv(1 << 20):
                    received[i] += len(data)
                closed[i] = True
            except ConnectionResetError:
                closed[i] = True
            except TimeoutError:
                pass
        assert closed == [True, True], (closed, received)
        assert all(r < size for r in received), received
    finally:
        for s in socks:
            s.close()


@pytest.mark.timeout(60)
def test_a_connection_that_sends_nothing_is_closed(limited: S3Server) -> None:
    s = _connect(limited)
    t0 = time.monotonic()
    assert _closed_within([s], HEAD_TIMEOUT + 5.0) == 1
    assert time.monotonic() - t0 >= HEAD_TIMEOUT - 0.5
    s.close()


@pytest.mark.timeout(60)
def test_an_idle_keepalive_connection_is_closed(limited: S3Server) -> None:
    s = _connect(limited)
    s.sendall(b"GET /_nearstore/health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    t0 = time.monotonic()
    assert _closed_within([s], IDLE_TIMEOUT + 5.0) == 1
    # The idle timeout, not the (shorter) head timeout, governed the wait.
    assert time.monotonic() - t0 >= IDLE_TIMEOUT - 0.5
    s.close()


@pytest.mark.parametrize("headers", [
    [(f"X-Pad-{i}", "a" * 1000) for i in range(40)],  # 40 KB in all
    [(f"X-Many-{i}", "a") for i in range(150)],  # more headers than allowed
    [("X-Long", "a" * 9000)],  # one header over its bound
], ids=["total", "count", "one"])
def test_an_oversized_head_gets_an_s3_error(limited: S3Server, headers: list[tuple[str, str]]) -> None:
    s = _connect(limited)
    s.sendall(b"GET /bucket/key HTTP/1.1\r\nHost: x\r\n"
              + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n")
    reply = bytearray()
    while chunk := s.recv(65536):
        reply += chunk
    s.close()
    assert reply.split(b" ", 2)[1] == b"400", reply[:200]  # HTTP/1.0 from aiohttp's parser errors
    assert b"<Code>RequestHeaderSectionTooLarge</Code>" in reply or b"<Code>BadRequest</Code>" in reply, reply


def _presigned_put(server: S3Server) -> tuple[Any, str, str]:
    """A client, a new bucket, and the request target of a presigned PUT of
    its key "k"."""
    s3 = server.client()
    bucket = f"put-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=300)
    parts = urlsplit(url)
    return s3, bucket, f"{parts.path}?{parts.query}"


@pytest.mark.timeout(60)
def test_a_stalled_body_gets_request_timeout_and_no_object(limited: S3Server) -> None:
    s3, bucket, target = _presigned_put(limited)
    s = _connect(limited)
    s.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b"x" * 10)
    t0 = time.monotonic()
    reply = bytearray()
    while chunk := s.recv(65536):
        reply += chunk
    waited = time.monotonic() - t0
    s.close()
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert b"<Code>RequestTimeout</Code>" in reply, reply
    assert BODY_TIMEOUT - 0.5 <= waited <= BODY_TIMEOUT + 5.0
    assert error_of(s3.head_object, Bucket=bucket, Key="k") == (404, "404")


@pytest.mark.timeout(60)
def test_a_slow_steady_body_is_not_cut(limited: S3Server) -> None:
    """The body timeout bounds a pause, not the upload."""
    s3, bucket, target = _presigned_put(limited)
    s = _connect(limited)
    pieces = 5
    s.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {pieces * 100}\r\n\r\n".encode())
    for i in range(pieces):  # longer in all than the body timeout
        time.sleep(BODY_TIMEOUT * 0.6)
        s.sendall(bytes([65 + i]) * 100)
    reply = s.recv(65536)
    s.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"".join(bytes([65 + i]) * 100
                                                                          for i in range(pieces))


# -- 3. files private to the node's user ----------------------------------------------


def _loose_modes(root: Path, allow_dir: int = 0, socket_ok: bool = True) -> list[str]:
    """Paths under ``root`` (itself included) that another user could read."""
    loose = []
    for dirpath, _dirnames, filenames in os.walk(root):
        mode = stat.S_IMODE(os.stat(dirpath).st_mode)
        if mode & 0o077 & ~allow_dir:
            loose.append(f"{dirpath} {oct(mode)}")
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and socket_ok:
                continue
            if stat.S_IMODE(st.st_mode) & 0o077:
                loose.append(f"{path} {oct(stat.S_IMODE(st.st_mode))}")
    return loose


@pytest.mark.timeout(120)
def test_objects_chunks_and_index_are_private(fresh_server: Callable[..., S3Server]) -> None:
    local = fresh_server("nearstore")
    s3 = local.client()
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="a/b", Body=b"x" * 1000)
    upload = s3.create_multipart_upload(Bucket="private", Key="mp")
    s3.upload_part(Bucket="private", Key="mp", UploadId=upload["UploadId"], PartNumber=1, Body=b"p" * 1000)
    assert local.data_dir is not None
    # Group search on the data directory only, for the local socket in it.
    assert _loose_modes(local.data_dir, allow_dir=0o010) == []
    sock = local.data_dir / "nearstore.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert stat.S_IMODE(local.data_dir.stat().st_mode) == 0o710

    cached = fresh_server("nearstore-moto")
    s3 = cached.client()
    s3.create_bucket(Bucket="private-cached")
    s3.put_object(Bucket="private-cached", Key="k", Body=os.urandom(MiB))
    assert len(s3.get_object(Bucket="private-cached", Key="k")["Body"].read()) == MiB
    assert cached.data_dir is not None
    chunks = list((cached.data_dir / "cache" / "chunks").rglob("*.*"))
    assert chunks, "the GET filled no chunk"
    assert _loose_modes(cached.data_dir / "cache") == []


# -- 5. the development keys stay on loopback -----------------------------------------


def _serve(tmp_path: Path, host: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NEARSTORE_")}
    return subprocess.run(
        [str(VENV_BIN / "nearstore"), "serve", "--host", host, "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data")],
        env={**base, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("env", [{}, {"NEARSTORE_ACCESS_KEY": "nearstore-dev",
                                      "NEARSTORE_SECRET_KEY": "nearstore-dev-secret-key"}],
                         ids=["no-keys", "dev-keys-given"])
@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_dev_keys_refused_beyond_loopback(tmp_path: Path, host: str, env: dict[str, str]) -> None:
    done = _serve(tmp_path, host, env)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "NEARSTORE_ACCESS_KEY" in lines[0] and "NEARSTORE_SECRET_KEY" in lines[0], lines

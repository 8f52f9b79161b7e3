"""The hot path (gateway/hotpath.py) against aiohttp's front, on one node.

A new connection's GetObject and HeadObject are served by the hot path; a
connection whose first request is anything else (here GET
/_nearstore/health) belongs to aiohttp from then on. The same requests sent
down both must get the same answers, byte for byte, but for the headers
that differ by nature (Date, request ids, Connection). Framing cases the
hot path owns (pipelining, split heads, a request with a body after a hot
one, HTTP/1.0) are tried on raw sockets."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator

import pytest

from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.s3util import pattern
from tests.helpers.servers import S3Server

BUCKET = "hotpath"
SMALL = pattern(5000, seed=1)
LARGE = pattern(300_000, seed=2)  # above sendfile.SMALL_BODY: sent by sendfile
VARYING = {"date", "x-amz-request-id", "x-amz-id-2", "connection", "keep-alive"}


@pytest.fixture(scope="module")
def node(nearstore_server: S3Server) -> Iterator[S3Server]:
    s3 = nearstore_server.client()
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="small", Body=SMALL, ContentType="text/plain",
                  Metadata={"owner": "team-a"}, CacheControl="max-age=60")
    s3.put_object(Bucket=BUCKET, Key="large", Body=LARGE)
    s3.put_object(Bucket=BUCKET, Key="empty", Body=b"")
    s3.put_object(Bucket=BUCKET, Key="odd key/ü+%2F", Body=SMALL)
    yield nearstore_server


def _conn(server: S3Server, *, handed_off: bool) -> http.client.HTTPConnection:
    conn = rawhttp.connection(server)
    if handed_off:
        conn.request("GET", "/_nearstore/health")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    return conn


def _exchange(conn: http.client.HTTPConnection, method: str, target: str,
              headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def _cases(server: S3Server) -> list[tuple[str, str, str, dict[str, str]]]:
    """(name, method, path+query, headers): signed now, for both connections."""
    host = {"Host": f"{server.host}:{server.port}"}

    def signed(method: str, path: str, query: str = "", headers: dict[str, str] | None = None,
               **kw: str) -> tuple[str, str, dict[str, str]]:
        h = rawhttp.sign_headers(server, method, path, query, {**host, **(headers or {})}, **kw)  # type: ignore[arg-type]
        return method, path + (f"?{query}" if query else ""), h

    small, large = key_path(BUCKET, "small"), key_path(BUCKET, "large")
    etag = '"' + __import__("hashlib").md5(SMALL).hexdigest() + '"'
    cases: list[tuple[str, tuple[str, str, dict[str, str]]]] = [
        ("get small", signed("GET", small)),
        ("get large", signed("GET", large)),
        ("get empty", signed("GET", key_path(BUCKET, "empty"))),
        ("get odd key", signed("GET", key_path(BUCKET, "odd key/ü+%2F"))),
        ("head", signed("HEAD", small)),
        ("range", signed("GET", large, headers={"Range": "bytes=10-99"})),
        ("suffix range", signed("GET", large, headers={"Range": "bytes=-5"})),
        ("range not satisfiable", signed("GET", small, headers={"Range": "bytes=999999-"})),
        ("if-none-match", signed("GET", small, headers={"If-None-Match": etag})),
        ("if-match fails", signed("GET", small, headers={"If-Match": '"nope"'})),
        ("head if-match fails", signed("HEAD", small, headers={"If-Match": '"nope"'})),
        ("no such key", signed("GET", key_path(BUCKET, "missing"))),
        ("head no such key", signed("HEAD", key_path(BUCKET, "missing"))),
        ("no such bucket", signed("GET", key_path("no-such-bucket-x", "k"))),
        ("bad signature", signed("GET", small, secret_key="wrong-secret")),
        ("v2 header", signed("GET", small, sign="v2")),
        ("part 1", signed("GET", small, "partNumber=1")),
        ("part 2", signed("GET", small, "partNumber=2")),
        ("overrides", signed("GET", small, "response-content-type=x%2Fy&response-cache-control=no-store")),
        ("override with a line break", signed("GET", small, "response-content-type=a%0D%0AX-Evil%3A%201")),
        ("checksum mode", signed("GET", small, headers={"x-amz-checksum-mode": "ENABLED"})),
        ("version null", signed("GET", small, "versionId=null")),
        ("version other", signed("GET", small, "versionId=abc")),
        ("anonymous", ("GET", small, dict(host))),
        ("presigned v4", ("GET", rawhttp.presign(server, "GET", small), dict(host))),
        ("presigned v2", ("GET", rawhttp.presign(server, "GET", large, version="v2"), dict(host))),
        ("expired presign", ("GET", rawhttp.presign(server, "GET", small, expires=-10), dict(host))),
    ]
    return [(name, *req) for name, req in cases]


def _handed_off(server: S3Server) -> float:
    """The node's count of connections handed to aiohttp (this request's own included)."""
    text = rawhttp.send(server, "GET", "/_nearstore/metrics").body.decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("nearstore_connections_handed_off_total"))


def test_the_hot_path_answers_as_aiohttp_does(node: S3Server) -> None:
    hot, cold = _conn(node, handed_off=False), _conn(node, handed_off=True)
    try:
        for name, method, target, headers in _cases(node):
            before = _handed_off(node)
            a = _exchange(hot, method, target, headers)
            # The hot connection stayed hot: only the metrics read was handed off.
            assert _handed_off(node) == before + 1, name
            b = _exchange(cold, method, target, headers)
            assert a[0] == b[0], (name, a, b)
            assert {k: v for k, v in a[1].items() if k not in VARYING} == \
                   {k: v for k, v in b[1].items() if k not in VARYING}, name
            # Error bodies name their request.
            assert a[2].replace(a[1]["x-amz-request-id"].encode(), b"ID") == \
                   b[2].replace(b[1]["x-amz-request-id"].encode(), b"ID"), name
            assert a[1]["x-amz-request-id"] and a[1]["date"], name
    finally:
        hot.close()
        cold.close()


def test_answers_are_what_s3_says(node: S3Server) -> None:
    conn = _conn(node, handed_off=False)
    try:
        answers = {name: _exchange(conn, m, t, h) for name, m, t, h in _cases(node)}
    finally:
        conn.close()
    expect = {
        "get small": 200, "get large": 200, "get empty": 200, "get odd key": 200, "head": 200, "range": 206,
        "suffix range": 206, "range not satisfiable": 416, "if-none-match": 304, "if-match fails": 412,
        "head if-match fails": 412, "no such key": 404, "head no such key": 404, "no such bucket": 404,
        "bad signature": 403, "v2 header": 200, "part 1": 206, "part 2": 416, "overrides": 200,
        "override with a line break": 400, "checksum mode": 200, "version null": 200, "version other": 400,
        "anonymous": 403, "presigned v4": 200, "presigned v2": 200, "expired presign": 400,
    }
    assert {name: a[0] for name, a in answers.items()} == expect
    assert answers["get small"][2] == SMALL and answers["get large"][2] == LARGE
    assert answers["range"][2] == LARGE[10:100] and answers["suffix range"][2] == LARGE[-5:]
    assert answers["range"][1]["content-range"] == f"bytes 10-99/{len(LARGE)}"
    head = answers["head"][1]
    assert (head["content-length"], head["content-type"], head["x-amz-meta-owner"], head["cache-control"]) == \
           (str(len(SMALL)), "text/plain", "team-a", "max-age=60")
    assert answers["head"][2] == b"" and answers["head no such key"][2] == b""
    assert answers["head no such key"][1]["x-amz-error-code"] == "NoSuchKey"
    assert b"<Code>NoSuchKey</Code>" in answers["no such key"][2]
    assert b"<Code>SignatureDoesNotMatch</Code>" in answers["bad signature"][2]
    assert answers["overrides"][1]["content-type"] == "x/y"
    assert "x-evil" not in answers["override with a line break"][1]


def _read_response(sock: socket.socket, buf: bytearray, head_only: bool = False) -> tuple[int, bytes]:
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        assert more, bytes(buf)
        buf += more
    end = buf.index(b"\r\n\r\n") + 4
    status, headers, _ = rawhttp.parse_raw_response(bytes(buf[:end]))
    length = 0 if head_only or status == 304 else int(headers.get("content-length", "0"))
    while len(buf) < end + length:
        more = sock.recv(65536)
        assert more
        buf += more
    body = bytes(buf[end:end + length])
    del buf[:end + length]
    return status, body


def _raw(server: S3Server, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes = b"", version: str = "1.1") -> bytes:
    h = {"Host": f"{server.host}:{server.port}", **(headers or {})}
    if body or method == "PUT":
        h["Content-Length"] = str(len(body))
    h = rawhttp.sign_headers(server, method, path, "", h, body)
    return (f"{method} {path} HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
            + "\r\n").encode() + body


def test_pipelined_requests_are_answered_in_order_across_the_hand_off(node: S3Server) -> None:
    small, large = key_path(BUCKET, "small"), key_path(BUCKET, "large")
    new = key_path(BUCKET, "pipelined-put")
    burst = (_raw(node, "GET", small) + _raw(node, "HEAD", large) + _raw(node, "GET", large)
             + _raw(node, "PUT", new, body=b"written in the middle") + _raw(node, "GET", new))
    with rawhttp.raw_socket(node) as sock:
        sock.sendall(burst)
        buf = bytearray()
        assert _read_response(sock, buf) == (200, SMALL)
        assert _read_response(sock, buf, head_only=True) == (200, b"")
        assert _read_response(sock, buf) == (200, LARGE)
        assert _read_response(sock, buf)[0] == 200
        assert _read_response(sock, buf) == (200, b"written in the middle")


def test_a_head_in_pieces_is_put_together(node: S3Server) -> None:
    req = _raw(node, "GET", key_path(BUCKET, "small"))
    with rawhttp.raw_socket(node) as sock:
        for i in range(0, len(req), 97):
            sock.sendall(req[i:i + 97])
            time.sleep(0.01)
        assert _read_response(sock, bytearray()) == (200, SMALL)


def test_a_body_on_a_get_goes_to_aiohttp_whole(node: S3Server) -> None:
    # A GET with a body is not hot: aiohttp reads it (and ignores it) and
    # the next request on the connection still parses.
    small = key_path(BUCKET, "small")
    with rawhttp.raw_socket(node) as sock:
        sock.sendall(_raw(node, "GET", small, body=b"ignored") + _raw(node, "GET", small))
        buf = bytearray()
        assert _read_response(sock, buf) == (200, SMALL)
        assert _read_response(sock, buf) == (200, SMALL)


@pytest.mark.parametrize("connection, closes", [("", True), ("keep-alive", False)])
def test_http_1_0(node: S3Server, connection: str, closes: bool) -> None:
    req = _raw(node, "GET", key_path(BUCKET, "small"), {"Connection": connection} if connection else {},
               version="1.0")
    with rawhttp.raw_socket(node) as sock:
        sock.sendall(req)
        buf = bytearray()
        assert _read_response(sock, buf) == (200, SMALL)
        sock.settimeout(2)
        if closes:
            assert sock.recv(10) == b""
        else:
            sock.sendall(req)
            assert _read_response(sock, buf) == (200, SMALL)


def test_a_client_gone_mid_body_leaves_the_node_serving(node: S3Server) -> None:
    req = _raw(node, "GET", key_path(BUCKET, "large"))
    for _ in range(5):
        with rawhttp.raw_socket(node) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(req)
            sock.recv(1000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with rawhttp.raw_socket(node) as sock:
        sock.sendall(req)
        assert _read_response(sock, bytearray()) == (200, LARGE)

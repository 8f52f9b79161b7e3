"""Hostile and malformed requests, sent as raw HTTP. Every error must be an S3
XML error (Code, Message, RequestId; x-amz-request-id header) with the right
status, never a 500 and never a hang."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import pytest

from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.s3util import checksum_b64, error_of
from tests.helpers.servers import S3Server


def assert_s3_error(resp: rawhttp.Response, status: int, *codes: str) -> None:
    assert resp.status == status, resp
    ctype = resp.header("Content-Type") or ""
    assert "xml" in ctype, resp
    root = resp.xml()
    assert root.tag == "Error", resp
    assert root.findtext("Code") in codes, resp
    assert root.findtext("Message"), resp
    rid = root.findtext("RequestId")
    assert rid, resp
    assert resp.header("x-amz-request-id") == rid, resp


def _md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


def _post_xml(server: S3Server, path: str, query: str, body: bytes) -> rawhttp.Response:
    return rawhttp.request(server, "POST", path, query, {"Content-MD5": _md5(body),
                                                        "Content-Type": "application/xml"},
                           body)


MALFORMED_BODIES = [
    b"",
    b"not xml at all",
    b"<Delete><Object><Key>a</Key></Object>",  # unterminated
    b"<Wrong><Object><Key>a</Key></Object></Wrong>",
    b'<?xml version="1.0"?><Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></Delete>',
]

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Delete><Object><Key>&lol9;</Key></Object></Delete>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Delete><Object><Key>&xxe;</Key></Object></Delete>"""


@pytest.mark.parametrize("body", MALFORMED_BODIES, ids=lambda b: repr(b[:20]))
def test_delete_objects_malformed_xml(server: S3Server, bucket: str, body: bytes) -> None:
    assert_s3_error(_post_xml(server, key_path(bucket), "delete", body), 400, "MalformedXML")


def test_complete_multipart_malformed_xml(server: S3Server, s3: Any, bucket: str) -> None:
    uid = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    path = key_path(bucket, "mp")
    for body in (b"garbage", b"<CompleteMultipartUpload><Part><PartNumber>x</PartNumber>"
                 b"<ETag>\"a\"</ETag></Part></CompleteMultipartUpload>",
                 b"<CompleteMultipartUpload><Part>"):
        resp = _post_xml(server, path, f"uploadId={uid}", body)
        assert_s3_error(resp, 400, "MalformedXML")
    assert s3.list_parts(Bucket=bucket, Key="mp", UploadId=uid)["ResponseMetadata"][
        "HTTPStatusCode"] == 200


@pytest.mark.timeout(30)
@pytest.mark.parametrize("payload", [BILLION_LAUGHS, XXE], ids=["billion-laughs", "xxe"])
def test_xml_entity_attacks_rejected_fast(server: S3Server, s3: Any, bucket: str,
                                          payload: bytes) -> None:
    uid = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    for path, query, body in (
        (key_path(bucket), "delete", payload),
        (key_path(bucket, "mp"), f"uploadId={uid}",
         payload.replace(b"<Delete><Object><Key>", b"<CompleteMultipartUpload><Part><ETag>")
         .replace(b"</Key></Object></Delete>", b"</ETag><PartNumber>1</PartNumber></Part>"
                  b"</CompleteMultipartUpload>")),
        (key_path(bucket, "mp"), "tagging",
         payload.replace(b"<Delete><Object><Key>", b"<Tagging><TagSet><Tag><Key>k</Key><Value>")
         .replace(b"</Key></Object></Delete>", b"</Value></Tag></TagSet></Tagging>")),
    ):
        t0 = time.monotonic()
        if query == "tagging":
            s3.put_object(Bucket=bucket, Key="mp", Body=b"x")
            resp = rawhttp.request(server, "PUT", path, query,
                                   {"Content-MD5": _md5(body)}, body, timeout=20)
        else:
            resp = rawhttp.request(server, "POST", path, query,
                                   {"Content-MD5": _md5(body)}, body, timeout=20)
        assert time.monotonic() - t0 < 5, "entity expansion was not refused quickly"
        assert_s3_error(resp, 400, "MalformedXML")
        assert b"root:" not in resp.body
    assert s3.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_wrong_and_invalid_content_md5(server: S3Server, s3: Any, bucket: str) -> None:
    path = key_path(bucket, "md5")
    assert_s3_error(rawhttp.request(server, "PUT", path, headers={"Content-MD5": _md5(b"y")},
                                    body=b"x"), 400, "BadDigest")
    for bad in ("not base64!", base64.b64encode(b"short").decode()):
        assert_s3_error(rawhttp.request(server, "PUT", path, headers={"Content-MD5": bad},
                                        body=b"x"), 400, "InvalidDigest")
    body = b"<Delete><Object><Key>a</Key></Object></Delete>"
    resp = rawhttp.request(server, "POST", key_path(bucket), "delete",
                           {"Content-MD5": _md5(b"other")}, body)
    assert_s3_error(resp, 400, "BadDigest")
    assert error_of(s3.head_object, Bucket=bucket, Key="md5") == (404, "404")


def test_delete_objects_with_checksum_header_instead_of_md5(server: S3Server, s3: Any,
                                                            bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="a", Body=b"1")
    body = b"<Delete><Object><Key>a</Key></Object><Quiet>true</Quiet></Delete>"
    resp = rawhttp.request(server, "POST", key_path(bucket), "delete",
                           {"x-amz-checksum-crc32": checksum_b64("CRC32", body)}, body)
    assert resp.status == 200, resp
    assert error_of(s3.head_object, Bucket=bucket, Key="a") == (404, "404")
    resp = rawhttp.request(server, "POST", key_path(bucket), "delete",
                           {"x-amz-checksum-crc32": checksum_b64("CRC32", b"x")}, body)
    assert resp.status == 400, resp


def test_wrong_checksum_crc32_header(server: S3Server, s3: Any, bucket: str) -> None:
    resp = rawhttp.request(server, "PUT", key_path(bucket, "c"), body=b"data",
                           headers={"x-amz-checksum-crc32": checksum_b64("CRC32", b"atad")})
    assert resp.status == 400, resp
    assert resp.error_code in ("BadDigest", "XAmzContentChecksumMismatch", "InvalidRequest")
    assert_s3_error(resp, 400, resp.error_code or "")
    assert error_of(s3.head_object, Bucket=bucket, Key="c") == (404, "404")


def test_wrong_content_sha256(server: S3Server, bucket: str) -> None:
    resp = rawhttp.request(server, "PUT", key_path(bucket, "sha"), body=b"data",
                           payload_hash=hashlib.sha256(b"other").hexdigest())
    assert_s3_error(resp, 400, "XAmzContentSHA256Mismatch")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["put", "upload_part"])
def test_truncated_body_leaves_nothing(server: S3Server, s3: Any, bucket: str, op: str) -> None:
    query = ""
    if op == "upload_part":
        uid = s3.create_multipart_upload(Bucket=bucket, Key="trunc")["UploadId"]
        query = f"partNumber=1&uploadId={uid}"
    path = key_path(bucket, "trunc")
    declared = 1_000_000
    headers = rawhttp.sign_headers(server, "PUT", path, query,
                                   {"Content-Length": str(declared)},
                                   payload_hash="UNSIGNED-PAYLOAD")
    sock = rawhttp.raw_socket(server)
    try:
        target = path + (f"?{query}" if query else "")
        head = f"PUT {target} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode() + b"x" * 300_000)
        time.sleep(0.2)
    finally:
        sock.close()
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:  # the server notices the close asynchronously
        time.sleep(0.25)
        if op == "put":
            assert error_of(s3.head_object, Bucket=bucket, Key="trunc") == (404, "404")
        else:
            parts = s3.list_parts(Bucket=bucket, Key="trunc", UploadId=uid).get("Parts", [])
            assert parts == []
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shape", ["one-huge-header", "many-headers", "huge-url"])
def test_oversized_headers(server: S3Server, bucket: str, shape: str) -> None:
    path = key_path(bucket, "k")
    extra = ""
    if shape == "one-huge-header":
        extra = "x-amz-meta-big: " + "a" * 70_000 + "\r\n"
    elif shape == "many-headers":
        extra = "".join(f"x-amz-meta-h{i}: {'b' * 200}\r\n" for i in range(500))
    else:
        path += "?" + "q" * 70_000
    sock = rawhttp.raw_socket(server, timeout=15)
    try:
        req = (f"GET {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n{extra}"
               f"Connection: close\r\n\r\n")
        try:
            sock.sendall(req.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all
        raw = rawhttp.read_http_response(sock)
    finally:
        sock.close()
    status, hdrs, body = rawhttp.parse_raw_response(raw)
    assert status in (400, 431, 414), raw[:400]
    assert b"<Error>" in body and b"<Code>" in body, raw[:400]
    assert "xml" in hdrs.get("content-type", ""), raw[:400]


INVALID_BUCKETS = ["AB", "ab", "UpperCase", "under_score", "-leading", "trailing-",
                   "a" * 64, "dots..dots", "192.168.1.1", "xn--punycode", "ends-s3alias",
                   "bad!char"]


@pytest.mark.parametrize("name", INVALID_BUCKETS)
def test_invalid_bucket_names(server: S3Server, name: str) -> None:
    resp = rawhttp.request(server, "PUT", key_path(name))
    assert_s3_error(resp, 400, "InvalidBucketName")


def test_bucket_already_owned_and_missing(server: S3Server, bucket: str) -> None:
    resp = rawhttp.request(server, "GET", key_path(bucket + "-absent"))
    assert_s3_error(resp, 404, "NoSuchBucket")
    resp = rawhttp.request(server, "GET", key_path(bucket, "absent"))
    assert_s3_error(resp, 404, "NoSuchKey")


@pytest.mark.parametrize("raw_path", [
    "/{b}/../../etc/passwd",
    "/{b}/..%2F..%2F..%2Fetc%2Fpasswd",
    "/{b}/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/{b}/..",
    "/{b}/%2E%2E",
    "/../../../../etc/passwd",
    "/{b}/a/../../../../../../etc/passwd",
])
def test_traversal_never_escapes(server: S3Server, s3: Any, bucket: str, raw_path: str) -> None:
    path = raw_path.format(b=bucket)
    resp = rawhttp.request(server, "GET", path)
    assert resp.status in (400, 403, 404), resp
    assert b"root:" not in resp.body
    assert resp.error_code, resp
    put = rawhttp.request(server, "PUT", path, body=b"escaped?")
    assert put.status != 500, put
    # Whatever was stored, it is inside the data dir and listed as an S3 key.
    if server.data_dir is not None:
        outside = server.data_dir.parent
        assert not (outside / "etc" / "passwd").exists()
        assert not any(p.name == "passwd" and server.data_dir not in p.parents
                       for p in outside.rglob("passwd"))


def test_traversal_keys_via_sdk_stay_inside(server: S3Server, s3: Any, bucket: str) -> None:
    keys = ["../../etc/passwd", "..", "../..", "a/../../b", "./.", "..\\..\\x"]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    for k in keys:
        assert s3.get_object(Bucket=bucket, Key=k)["Body"].read() == k.encode()
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(listed) == sorted(keys)
    if server.data_dir is not None:
        assert not (server.data_dir.parent / "etc").exists()
        assert not (server.data_dir.parent / "b").exists()


def test_key_with_nul_byte(server: S3Server, s3: Any, bucket: str) -> None:
    path = key_path(bucket, "nul\x00byte")
    resp = rawhttp.request(server, "PUT", path, body=b"nul")
    assert resp.status in (200, 400), resp
    if resp.status == 400:
        assert_s3_error(resp, 400, resp.error_code or "")
    else:
        assert rawhttp.request(server, "GET", path).body == b"nul"
    # Never truncated at the NUL.
    assert error_of(s3.head_object, Bucket=bucket, Key="nul") == (404, "404")


def test_key_too_long(server: S3Server, bucket: str) -> None:
    resp = rawhttp.request(server, "PUT", key_path(bucket, "k" * 1025), body=b"x")
    assert_s3_error(resp, 400, "KeyTooLongError")
    resp = rawhttp.request(server, "PUT", key_path(bucket, "é" * 513), body=b"x")  # 1026 bytes
    assert_s3_error(resp, 400, "KeyTooLongError")
    ok = rawhttp.request(server, "PUT", key_path(bucket, "é" * 512), body=b"x")  # 1024 bytes
    assert ok.status == 200, ok


@pytest.mark.parametrize(("method", "target", "query"), [
    ("GET", "bucket", "website"),
    ("PUT", "bucket", "replication"),
    ("GET", "bucket", "analytics&id=x"),
    ("GET", "bucket", "inventory&id=x"),
    ("GET", "key", "torrent"),
    ("POST", "key", "restore"),
    ("POST", "key", "select&select-type=2"),
])
def test_unknown_subresources_not_implemented(server: S3Server, s3: Any, bucket: str,
                                              method: str, target: str, query: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    path = key_path(bucket) if target == "bucket" else key_path(bucket, "k")
    body = b"<X/>" if method in ("PUT", "POST") else b""
    headers = {"Content-MD5": _md5(body)} if body else {}
    resp = rawhttp.request(server, method, path, query, headers, body)
    assert_s3_error(resp, 501, "NotImplemented")


def test_method_not_allowed(server: S3Server, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    resp = rawhttp.request(server, "PATCH", key_path(bucket, "k"), body=b"x")
    assert resp.status in (405, 501), resp
    assert_s3_error(resp, resp.status, "MethodNotAllowed", "NotImplemented")


@pytest.mark.parametrize("query", ["max-keys=-1", "max-keys=abc", "list-type=2&max-keys=-5",
                                   "encoding-type=base64"])
def test_invalid_list_arguments(server: S3Server, bucket: str, query: str) -> None:
    assert_s3_error(rawhttp.request(server, "GET", key_path(bucket), query), 400,
                    "InvalidArgument")


@pytest.mark.parametrize("part", ["0", "10001", "abc"])
def test_invalid_part_numbers(server: S3Server, s3: Any, bucket: str, part: str) -> None:
    uid = s3.create_multipart_upload(Bucket=bucket, Key="p")["UploadId"]
    resp = rawhttp.request(server, "PUT", key_path(bucket, "p"),
                           f"partNumber={part}&uploadId={uid}", body=b"x")
    assert_s3_error(resp, 400, "InvalidArgument")


def test_errors_are_xml_with_request_id(server: S3Server, bucket: str) -> None:
    cases = [
        (rawhttp.request(server, "GET", key_path(bucket, "missing")), 404, "NoSuchKey"),
        (rawhttp.request(server, "GET", key_path(bucket + "-nope")), 404, "NoSuchBucket"),
        (rawhttp.request(server, "GET", key_path(bucket), sign=None), 403, "AccessDenied"),
        (rawhttp.request(server, "GET", key_path(bucket), secret_key="bad"), 403,
         "SignatureDoesNotMatch"),
        (rawhttp.request(server, "GET", key_path(bucket), access_key="AKIANOPE"), 403,
         "InvalidAccessKeyId"),
        (rawhttp.request(server, "DELETE", key_path(bucket, "k"), "uploadId=nope"), 404,
         "NoSuchUpload"),
        (rawhttp.send(server, "GET", key_path(bucket), {"Authorization": "AWS4-HMAC-SHA256 junk"}),
         400, "AuthorizationHeaderMalformed"),
    ]
    for resp, status, code in cases:
        assert_s3_error(resp, status, code)
        if code != "AccessDenied":
            assert resp.header("x-amz-request-id")
    head = rawhttp.request(server, "HEAD", key_path(bucket, "missing"))
    assert head.status == 404
    assert head.header("x-amz-request-id")
    assert head.body == b""


@pytest.mark.parametrize("token", ["", "bm90LWEtdG9rZW4%3D", "xyz"], ids=["empty", "not-ours", "garbage"])
def test_list_v2_bad_continuation_token(server: S3Server, bucket: str, token: str) -> None:
    resp = rawhttp.request(server, "GET", key_path(bucket), f"list-type=2&continuation-token={token}")
    assert_s3_error(resp, 400, "InvalidArgument")


def test_a_request_without_length_or_framing_has_an_empty_body(nearstore_server: S3Server) -> None:
    """HTTP/1.1: no Content-Length and no Transfer-Encoding is an empty body.
    ``curl -X PUT`` creates a bucket (S3 does the same); PutObject still
    needs a length, as S3 answers it (411 MissingContentLength)."""
    import uuid

    server = nearstore_server
    bucket = f"unsized-{uuid.uuid4().hex[:12]}"

    def bare(method: str, target: str) -> tuple[int, bytes]:
        sock = rawhttp.raw_socket(server)
        try:
            sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            status, _, body = rawhttp.parse_raw_response(rawhttp.read_http_response(sock))
        finally:
            sock.close()
        return status, body

    status, body = bare("PUT", rawhttp.presign(server, "PUT", key_path(bucket)))
    assert status == 200, body
    server.client().head_bucket(Bucket=bucket)
    status, body = bare("PUT", rawhttp.presign(server, "PUT", key_path(bucket, "obj")))
    assert status == 411 and b"<Code>MissingContentLength</Code>" in body


def test_a_garbled_request_logs_one_line_not_a_traceback(nearstore_server: S3Server) -> None:
    """Issue 16: the parser's complaint, once per request, and never the
    request's headers (they may carry credentials)."""
    import os
    import socket

    since = os.path.getsize(nearstore_server.log_path)
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nAuthorization: AWS secret-ish:sig\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    for payload in payloads:
        with socket.create_connection((nearstore_server.host, nearstore_server.port), timeout=5) as s:
            s.sendall(payload)
            assert s.recv(64).startswith(b"HTTP/1.")
    deadline = time.monotonic() + 5
    while nearstore_server.log_text(since).count("bad request from") < len(payloads) and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = nearstore_server.log_text(since)
    assert logged.count("bad request from") == len(payloads), logged
    assert "Traceback" not in logged and "secret-ish" not in logged

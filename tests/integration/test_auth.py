"""Authentication and payload integrity: SigV4/SigV2 headers and presigned
URLs, browser POST policies, streaming (aws-chunked) uploads, checksums,
clock skew, anonymous access. Runs against nearstore over HTTP and HTTPS
(moto accepts any signature, so it is no reference here)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import time
from typing import Any

import pytest
from botocore import UNSIGNED
from botocore.auth import HmacV1QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.helpers import rawhttp
from tests.helpers.rawhttp import frozen_clock, key_path
from tests.helpers.s3util import (
    checksum_b64,
    error_of,
    pattern,
    post_form,
    signed_chunks,
    signing_key,
    unsigned_trailer_chunks,
)
from tests.helpers.servers import S3Server


def assert_error(resp: rawhttp.Response, status: int, *codes: str) -> None:
    assert resp.status == status, resp
    assert resp.error_code in codes, resp
    assert resp.header("x-amz-request-id"), resp


def _path_and_query(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


# -- header signatures ------------------------------------------------------------


def test_wrong_secret_is_signature_does_not_match(server: S3Server, bucket: str) -> None:
    bad = server.client(secret_key="wrong" + server.secret_key)
    assert error_of(bad.list_objects_v2, Bucket=bucket) == (403, "SignatureDoesNotMatch")
    assert error_of(bad.put_object, Bucket=bucket, Key="k", Body=b"x") == (
        403, "SignatureDoesNotMatch")


def test_unknown_access_key(server: S3Server, bucket: str) -> None:
    bad = server.client(access_key="AKIAUNKNOWNUNKNOWN00")
    assert error_of(bad.list_objects_v2, Bucket=bucket) == (403, "InvalidAccessKeyId")


def test_anonymous_is_access_denied(server: S3Server, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"secret")
    anon = server.client(signature_version=UNSIGNED)
    assert error_of(anon.get_object, Bucket=bucket, Key="k") == (403, "AccessDenied")
    assert error_of(anon.list_buckets) == (403, "AccessDenied")
    for method, path in (("GET", key_path(bucket, "k")), ("GET", key_path(bucket)),
                         ("PUT", key_path(bucket, "anon")), ("GET", "/")):
        resp = rawhttp.request(server, method, path, sign=None, body=b"x" if method == "PUT"
                               else b"")
        assert_error(resp, 403, "AccessDenied")
    assert error_of(s3.head_object, Bucket=bucket, Key="anon") == (404, "404")


@pytest.mark.parametrize("sign", ["v4", "v2"])
def test_clock_skew(server: S3Server, s3: Any, bucket: str, sign: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    path = key_path(bucket, "k")
    for minutes in (-20, 20):
        at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=minutes)
        with frozen_clock(at):
            hdrs = rawhttp.sign_headers(server, "GET", path, sign=sign)
        assert_error(rawhttp.send(server, "GET", path, hdrs), 403, "RequestTimeTooSkewed")
    at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)
    with frozen_clock(at):
        hdrs = rawhttp.sign_headers(server, "GET", path, sign=sign)
    assert rawhttp.send(server, "GET", path, hdrs).status == 200


def test_sigv2_bucket_path_without_trailing_slash(server: S3Server, bucket: str) -> None:
    # SigV2's CanonicalizedResource is the undecoded request path: "/bucket" here.
    for path in (key_path(bucket), key_path(bucket) + "/"):
        resp = rawhttp.request(server, "GET", path, sign="v2")
        assert resp.status == 200, (path, resp)


def test_sigv2_header_client(server: S3Server, bucket: str) -> None:
    v2 = server.client(signature_version="s3")
    v2.put_object(Bucket=bucket, Key="dir/v2 key+ü", Body=b"signed v2", ContentType="text/v2",
                  Metadata={"m": "x"})
    got = v2.get_object(Bucket=bucket, Key="dir/v2 key+ü")
    assert got["Body"].read() == b"signed v2"
    assert got["Metadata"] == {"m": "x"}
    assert [o["Key"] for o in v2.list_objects(Bucket=bucket, Prefix="dir/")["Contents"]] == [
        "dir/v2 key+ü"]
    v2.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "dir/v2 key+ü"})
    up = v2.create_multipart_upload(Bucket=bucket, Key="mp")
    e = v2.upload_part(Bucket=bucket, Key="mp", UploadId=up["UploadId"], PartNumber=1,
                       Body=b"p")["ETag"]
    v2.complete_multipart_upload(Bucket=bucket, Key="mp", UploadId=up["UploadId"],
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e}]})
    v2.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "copy"}, {"Key": "mp"}]})
    bad = server.client(signature_version="s3", secret_key="nope")
    assert error_of(bad.get_object, Bucket=bucket, Key="dir/v2 key+ü") == (
        403, "SignatureDoesNotMatch")


def test_wrong_region_in_credential_scope_is_accepted(server: S3Server, bucket: str) -> None:
    resp = rawhttp.request(server, "GET", key_path(bucket), "list-type=2", region="eu-central-1")
    assert resp.status == 200, resp


# -- presigned URLs -----------------------------------------------------------------


def test_presigned_get_and_put_default_signature(server: S3Server, s3: Any, bucket: str) -> None:
    # boto3's default presigner for S3 is SigV2 (query Signature/Expires).
    s3.put_object(Bucket=bucket, Key="pre/get me", Body=b"presigned")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "pre/get me"})
    assert "Signature=" in url
    resp = rawhttp.send(server, "GET", _path_and_query(url))
    assert resp.status == 200, resp
    assert resp.body == b"presigned"
    put_url = s3.generate_presigned_url("put_object",
                                        Params={"Bucket": bucket, "Key": "pre/put"})
    resp = rawhttp.send(server, "PUT", _path_and_query(put_url), body=b"uploaded")
    assert resp.status == 200, resp
    assert s3.get_object(Bucket=bucket, Key="pre/put")["Body"].read() == b"uploaded"
    tampered = _path_and_query(url).replace("pre/get%20me", "pre/put")
    assert_error(rawhttp.send(server, "GET", tampered), 403, "SignatureDoesNotMatch")


def test_presigned_v4(server: S3Server, s3: Any, bucket: str) -> None:
    v4 = server.client(signature_version="s3v4")
    s3.put_object(Bucket=bucket, Key="v4", Body=b"sigv4 query")
    url = v4.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "v4"},
                                    ExpiresIn=300)
    assert "X-Amz-Signature=" in url
    resp = rawhttp.send(server, "GET", _path_and_query(url))
    assert (resp.status, resp.body) == (200, b"sigv4 query"), resp
    put_url = v4.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "v4put"})
    assert rawhttp.send(server, "PUT", _path_and_query(put_url), body=b"up").status == 200
    assert s3.get_object(Bucket=bucket, Key="v4put")["Body"].read() == b"up"
    bad = _path_and_query(url).replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert_error(rawhttp.send(server, "GET", bad), 403, "SignatureDoesNotMatch")


def test_presigned_expired(server: S3Server, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="exp", Body=b"x")
    path = key_path(bucket, "exp")
    # V4: signed an hour ago, valid for 60 s.
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    with frozen_clock(past):
        v4 = rawhttp.presign(server, "GET", path, version="v4", expires=60)
    assert_error(rawhttp.send(server, "GET", v4), 403, "AccessDenied")
    # V2: Expires (absolute epoch seconds) in the past.
    req = AWSRequest(method="GET", url=server.url + path)
    HmacV1QueryAuth(Credentials(server.access_key, server.secret_key), expires=-30).add_auth(req)
    assert_error(rawhttp.send(server, "GET", _path_and_query(req.url)), 403, "AccessDenied")
    # Still valid ones work.
    assert rawhttp.send(server, "GET", rawhttp.presign(server, "GET", path, version="v2",
                                                       expires=60)).status == 200
    # X-Amz-Expires above 7 days is rejected.
    too_long = rawhttp.presign(server, "GET", path, version="v4", expires=604801)
    assert_error(rawhttp.send(server, "GET", too_long), 400, "AuthorizationQueryParametersError")


# -- browser POST uploads --------------------------------------------------------------


# Also in front of each backing store: a form's file has no length until its
# end, and the upstream still needs one (once answered 411 there).
@pytest.mark.backend
@pytest.mark.parametrize("signature_version", [None, "s3v4"])
def test_presigned_post(server: S3Server, s3: Any, bucket: str,
                        signature_version: str | None) -> None:
    client = server.client(signature_version=signature_version) if signature_version else s3
    post = client.generate_presigned_post(
        bucket, "uploads/${filename}",
        Fields={"Content-Type": "image/png", "x-amz-meta-origin": "browser"},
        Conditions=[{"Content-Type": "image/png"}, {"x-amz-meta-origin": "browser"},
                    ["starts-with", "$key", "uploads/"], ["content-length-range", 1, 1000]],
        ExpiresIn=300)
    body, ctype = post_form(post["fields"].items(), b"\x89PNG data")
    resp = rawhttp.send(server, "POST", key_path(bucket), {"Content-Type": ctype}, body)
    assert resp.status == 204, resp
    head = s3.head_object(Bucket=bucket, Key="uploads/upload.bin")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"] == {"origin": "browser"}
    assert s3.get_object(Bucket=bucket, Key="uploads/upload.bin")["Body"].read() == b"\x89PNG data"
    # success_action_status=201 answers an XML PostResponse.
    fields = dict(post["fields"], success_action_status="201")
    post201 = client.generate_presigned_post(
        bucket, "uploads/${filename}", Fields=fields,
        Conditions=[{"Content-Type": "image/png"}, {"x-amz-meta-origin": "browser"},
                    ["starts-with", "$key", "uploads/"], {"success_action_status": "201"}])
    body, ctype = post_form(post201["fields"].items(), b"second")
    resp = rawhttp.send(server, "POST", key_path(bucket), {"Content-Type": ctype}, body)
    assert resp.status == 201, resp
    assert b"<PostResponse" in resp.body and b"<ETag>" in resp.body
    # Policy violations: a field the policy does not allow, a file too large.
    bad_fields = dict(post["fields"], key="elsewhere/x")
    body, ctype = post_form(bad_fields.items(), b"x")
    assert_error(rawhttp.send(server, "POST", key_path(bucket), {"Content-Type": ctype}, body),
                 403, "AccessDenied")
    body, ctype = post_form(post["fields"].items(), b"x" * 2000)
    assert_error(rawhttp.send(server, "POST", key_path(bucket), {"Content-Type": ctype}, body),
                 400, "EntityTooLarge")
    # A tampered signature.
    sig_field = "signature" if "signature" in post["fields"] else "x-amz-signature"
    tampered = dict(post["fields"], **{sig_field: base64.b64encode(b"0" * 20).decode()
                                       if sig_field == "signature" else "0" * 64})
    body, ctype = post_form(tampered.items(), b"x")
    assert_error(rawhttp.send(server, "POST", key_path(bucket), {"Content-Type": ctype}, body),
                 403, "SignatureDoesNotMatch")
    assert error_of(s3.head_object, Bucket=bucket, Key="elsewhere/x") == (404, "404")


def test_presigned_post_expired_policy(server: S3Server, s3: Any, bucket: str) -> None:
    post = s3.generate_presigned_post(bucket, "k", ExpiresIn=300)
    policy = json.loads(base64.b64decode(post["fields"]["policy"]))
    policy["expiration"] = "2001-01-01T00:00:00Z"
    # Re-sign the expired policy with the right key (SigV2 POST: HMAC-SHA1 of the policy).
    import hmac
    encoded = base64.b64encode(json.dumps(policy).encode()).decode()
    sig = base64.b64encode(hmac.new(server.secret_key.encode(), encoded.encode(),
                                    hashlib.sha1).digest()).decode()
    fields = dict(post["fields"], policy=encoded, signature=sig)
    body, ctype = post_form(fields.items(), b"x")
    assert_error(rawhttp.send(server, "POST", key_path(bucket), {"Content-Type": ctype}, body),
                 403, "AccessDenied")


# -- payload signing variants ------------------------------------------------------------


def test_unsigned_payload(server: S3Server, s3: Any, bucket: str) -> None:
    resp = rawhttp.request(server, "PUT", key_path(bucket, "unsigned"), body=b"no hash",
                           payload_hash="UNSIGNED-PAYLOAD")
    assert resp.status == 200, resp
    assert s3.get_object(Bucket=bucket, Key="unsigned")["Body"].read() == b"no hash"


def test_wrong_content_sha256(server: S3Server, s3: Any, bucket: str) -> None:
    resp = rawhttp.request(server, "PUT", key_path(bucket, "bad-sha"), body=b"actual body",
                           payload_hash=hashlib.sha256(b"other body").hexdigest())
    assert_error(resp, 400, "XAmzContentSHA256Mismatch")
    resp = rawhttp.request(server, "PUT", key_path(bucket, "bad-sha"), body=b"actual body",
                           payload_hash="not-a-hash")
    assert resp.status == 400, resp
    assert error_of(s3.head_object, Bucket=bucket, Key="bad-sha") == (404, "404")


def _streaming_put(server: S3Server, bucket: str, key: str, data: bytes, *,
                   trailer: bool, tamper_chunk: int | None = None,
                   trailer_value: str | None = None) -> rawhttp.Response:
    marker = ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER" if trailer
              else "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    path = key_path(bucket, key)
    headers = {"Content-Encoding": "aws-chunked",
               "x-amz-decoded-content-length": str(len(data))}
    if trailer:
        headers["x-amz-trailer"] = "x-amz-checksum-crc32"
    # The encoded length depends only on sizes, so sign with a placeholder body length.
    chunk = 64 * 1024
    probe = signed_chunks(data, chunk, seed_signature="0" * 64, amz_date="0" * 16,
                          scope="x", key=b"k",
                          trailer=("x-amz-checksum-crc32", "A" * 8) if trailer else None)
    headers["Content-Length"] = str(len(probe))
    signed = rawhttp.sign_headers(server, "PUT", path, headers=headers, payload_hash=marker)
    auth = signed["Authorization"]
    seed = auth.rsplit("Signature=", 1)[1]
    amz_date = signed["X-Amz-Date"]
    scope = f"{amz_date[:8]}/{server.region}/s3/aws4_request"
    key_bytes = signing_key(server.secret_key, amz_date[:8], server.region)
    crc = trailer_value or checksum_b64("CRC32", data)
    body = signed_chunks(data, chunk, seed_signature=seed, amz_date=amz_date, scope=scope,
                         key=key_bytes, tamper_chunk=tamper_chunk,
                         trailer=("x-amz-checksum-crc32", crc) if trailer else None)
    assert len(body) == len(probe)
    return rawhttp.send(server, "PUT", path, signed, body)


@pytest.mark.parametrize("trailer", [False, True], ids=["signed-chunks", "signed-trailer"])
def test_streaming_signed_payload(server: S3Server, s3: Any, bucket: str, trailer: bool) -> None:
    data = pattern(200_000, seed=11)
    resp = _streaming_put(server, bucket, "stream", data, trailer=trailer)
    assert resp.status == 200, resp
    got = s3.get_object(Bucket=bucket, Key="stream", ChecksumMode="ENABLED")
    assert got["Body"].read() == data
    assert got["ContentLength"] == len(data)
    assert "ContentEncoding" not in got or got["ContentEncoding"] != "aws-chunked"
    if trailer:
        assert got.get("ChecksumCRC32") == checksum_b64("CRC32", data)
    # A chunk with a bad signature is rejected and nothing is stored.
    resp = _streaming_put(server, bucket, "tampered", data, trailer=trailer, tamper_chunk=1)
    assert_error(resp, 403, "SignatureDoesNotMatch")
    assert error_of(s3.head_object, Bucket=bucket, Key="tampered") == (404, "404")
    if trailer:
        resp = _streaming_put(server, bucket, "badcrc", data, trailer=True,
                              trailer_value=checksum_b64("CRC32", b"other"))
        assert resp.status == 400, resp
        assert resp.error_code in ("BadDigest", "XAmzContentChecksumMismatch",
                                   "InvalidRequest"), resp
        assert error_of(s3.head_object, Bucket=bucket, Key="badcrc") == (404, "404")


def test_streaming_unsigned_payload_trailer(server: S3Server, s3: Any, bucket: str) -> None:
    data = pattern(150_000, seed=12)
    path = key_path(bucket, "unsigned-trailer")
    for algo in ("CRC32", "CRC32C", "CRC64NVME", "SHA256"):
        name = f"x-amz-checksum-{algo.lower()}"
        body = unsigned_trailer_chunks(data, 65536, (name, checksum_b64(algo, data)))
        headers = {"Content-Encoding": "aws-chunked", "x-amz-trailer": name,
                   "x-amz-decoded-content-length": str(len(data)),
                   "Content-Length": str(len(body))}
        resp = rawhttp.request(server, "PUT", path, headers=headers, body=body,
                               payload_hash="STREAMING-UNSIGNED-PAYLOAD-TRAILER")
        assert resp.status == 200, (algo, resp)
        got = s3.get_object(Bucket=bucket, Key="unsigned-trailer", ChecksumMode="ENABLED")
        assert got["Body"].read() == data
        assert got.get(f"Checksum{algo}") == checksum_b64(algo, data), algo
    bad = unsigned_trailer_chunks(data, 65536, ("x-amz-checksum-crc32",
                                                checksum_b64("CRC32", b"nope")))
    headers = {"Content-Encoding": "aws-chunked", "x-amz-trailer": "x-amz-checksum-crc32",
               "x-amz-decoded-content-length": str(len(data)), "Content-Length": str(len(bad))}
    resp = rawhttp.request(server, "PUT", key_path(bucket, "bad-trailer"), headers=headers,
                           body=bad, payload_hash="STREAMING-UNSIGNED-PAYLOAD-TRAILER")
    assert resp.status == 400, resp
    assert resp.error_code in ("BadDigest", "XAmzContentChecksumMismatch", "InvalidRequest"), resp
    assert error_of(s3.head_object, Bucket=bucket, Key="bad-trailer") == (404, "404")


def test_boto3_default_transport_checksums(server: S3Server, bucket: str) -> None:
    """Over HTTPS boto3 sends aws-chunked with a trailing CRC32; over HTTP a
    CRC32 header. Either way the server verifies, stores and returns it."""
    client = server.client()
    seen: dict[str, str] = {}

    def capture(request: Any, **_: Any) -> None:
        seen.update({k.lower(): v.decode() if isinstance(v, bytes) else str(v)
                     for k, v in request.headers.items()})

    client.meta.events.register("before-send.s3.PutObject", capture)
    data = pattern(300_000, seed=13)
    client.put_object(Bucket=bucket, Key="default", Body=data)
    if server.tls:
        assert seen.get("content-encoding") == "aws-chunked"
        assert seen.get("x-amz-trailer") == "x-amz-checksum-crc32"
    else:
        assert "x-amz-checksum-crc32" in seen
    got = client.get_object(Bucket=bucket, Key="default", ChecksumMode="ENABLED")
    assert got["Body"].read() == data
    assert got.get("ChecksumCRC32") == checksum_b64("CRC32", data)
    assert got.get("ContentEncoding") in (None, "")


# -- Expect: 100-continue ----------------------------------------------------------------


def test_expect_100_continue(server: S3Server, s3: Any, bucket: str) -> None:
    data = b"after continue" * 1000
    path = key_path(bucket, "expect")
    headers = rawhttp.sign_headers(server, "PUT", path, headers={
        "Expect": "100-continue", "Content-Length": str(len(data))}, body=data)
    sock = rawhttp.raw_socket(server)
    try:
        head = f"PUT {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(data)
        status, _, body = rawhttp.parse_raw_response(rawhttp.read_http_response(sock))
        assert status == 200, body
    finally:
        sock.close()
    assert s3.get_object(Bucket=bucket, Key="expect")["Body"].read() == data


def test_expect_100_continue_rejected_before_body(server: S3Server, bucket: str) -> None:
    # With a bad signature the server answers the final status without waiting for the body.
    path = key_path(bucket, "expect-denied")
    headers = rawhttp.sign_headers(server, "PUT", path, headers={
        "Expect": "100-continue", "Content-Length": "10485760"},
        secret_key="wrong", payload_hash="UNSIGNED-PAYLOAD")
    sock = rawhttp.raw_socket(server, timeout=5)
    try:
        head = f"PUT {path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        t0 = time.monotonic()
        sock.sendall(head.encode())
        try:
            raw = rawhttp.read_http_response(sock)
        except TimeoutError:  # reported by the assertions below
            raw = b""
        status, _, body = rawhttp.parse_raw_response(raw)
        assert status == 403, raw[:500]
        assert b"<Code>SignatureDoesNotMatch</Code>" in body
        assert time.monotonic() - t0 < 5
    finally:
        sock.close()


# -- SigV4 header variations --------------------------------------------------------------


def test_sigv4_get_with_query_params_and_odd_key(server: S3Server, s3: Any, bucket: str) -> None:
    key = "q/ü ~!$&'()*+,;=:@%"
    s3.put_object(Bucket=bucket, Key=key, Body=b"odd")
    resp = rawhttp.request(server, "GET", key_path(bucket, key),
                           "response-content-type=text%2Fplain&versionId=null")
    assert resp.status == 200, resp
    assert resp.body == b"odd"
    assert resp.header("Content-Type") == "text/plain"


def test_checksum_header_verified_raw(server: S3Server, s3: Any, bucket: str) -> None:
    body = b"crc me"
    ok = rawhttp.request(server, "PUT", key_path(bucket, "crc"), body=body,
                         headers={"x-amz-checksum-crc32": checksum_b64("CRC32", body)})
    assert ok.status == 200, ok
    assert ok.header("x-amz-checksum-crc32") == checksum_b64("CRC32", body)
    bad = rawhttp.request(server, "PUT", key_path(bucket, "crc-bad"), body=body,
                          headers={"x-amz-checksum-crc32": checksum_b64("CRC32", b"x")})
    assert bad.status == 400, bad
    assert bad.error_code in ("BadDigest", "XAmzContentChecksumMismatch", "InvalidRequest"), bad
    assert error_of(s3.head_object, Bucket=bucket, Key="crc-bad") == (404, "404")

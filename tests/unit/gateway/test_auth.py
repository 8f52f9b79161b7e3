"""gateway.auth against AWS's published examples, botocore's own signers, and
the refusals S3 answers with.

Vectors: "Signature Calculations for the Authorization Header: Transferring
Payload in a Single Chunk" and "Authenticating Requests: Using Query
Parameters" (SigV4), "Signing and authenticating REST requests" (SigV2), and
the signing-key example of the SigV4 reference. Round trips: requests signed
by boto3 clients (captured just before sending) and by botocore's signer
classes, then tampered with one change at a time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import HmacV1Auth, HmacV1QueryAuth, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from multidict import CIMultiDict

from nearstore.gateway import auth
from nearstore.gateway.auth import (
    AuthContext,
    InvalidPolicyDocument,
    PostPolicy,
    SignedRequest,
    authenticate,
    authenticate_post,
    derive_signing_key,
    uri_encode,
)
from nearstore.gateway.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    AuthorizationQueryParametersError,
    EntityTooLarge,
    EntityTooSmall,
    InvalidAccessKeyId,
    InvalidArgument,
    InvalidRequest,
    RequestTimeTooSkewed,
    S3Error,
    SignatureDoesNotMatch,
)
from nearstore.gateway.errors import NotImplemented as S3NotImplemented

# --- helpers -------------------------------------------------------------------

AK = "AKIDNEARSTORE"
SK = "s3cr3t/with+odd=chars"
SECRETS = {AK: SK}
ENDPOINT = "http://localhost:9000"


def make_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    vhost: str | None = None,
) -> SignedRequest:
    path, _, query = target.partition("?")
    return SignedRequest(method, path, query, CIMultiDict(headers or []), vhost)


def from_url(method: str, url: str, headers: Any = ()) -> SignedRequest:
    """A request as the gateway would see it arrive for ``url``."""
    parts = urlsplit(url)
    items = headers.items() if hasattr(headers, "items") else headers
    cim: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        cim.add(name, value.decode() if isinstance(value, bytes) else value)
    if "Host" not in cim:  # added by the HTTP client, after signing
        cim["Host"] = parts.netloc
    host = parts.hostname or ""
    vhost = host.removesuffix(".localhost") if host.endswith(".localhost") else None
    return SignedRequest(method, parts.path, parts.query, cim, vhost)


def with_header(req: SignedRequest, name: str, value: str) -> SignedRequest:
    headers: CIMultiDict[str] = CIMultiDict(req.headers)
    headers[name] = value
    return replace(req, headers=headers)


def client(signature_version: str, style: str = "path", *, key: str = AK, secret: str = SK) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        # Any region must do: clients are configured with all sorts.
        region_name="eu-west-3",
        config=Config(signature_version=signature_version, s3={"addressing_style": style}),
    )


class _Sent(Exception):
    def __init__(self, request: Any) -> None:
        super().__init__("captured")
        self.request = request


def capture(s3: Any, operation: str, **params: Any) -> SignedRequest:
    """Run ``operation`` up to the wire and return the signed request."""

    def stop(request: Any, **_: Any) -> None:
        raise _Sent(request)

    s3.meta.events.register("before-send.s3", stop, unique_id="capture")
    try:
        getattr(s3, operation)(**params)
    except _Sent as sent:
        return from_url(sent.request.method, sent.request.url, sent.request.headers)
    finally:
        s3.meta.events.unregister("before-send.s3", unique_id="capture")
    raise AssertionError("request was not sent")


def raises(exc: type[S3Error], fn: Callable[[], object], match: str | None = None) -> S3Error:
    with pytest.raises(exc, match=match) as info:
        fn()
    assert type(info.value) is exc
    return info.value


# --- encoding and keys ------------------------------------------------------------


def test_uri_encode_keeps_only_unreserved_bytes() -> None:
    assert uri_encode("a-b_c.d~e", encode_slash=True) == "a-b_c.d~e"
    assert uri_encode("a b/c+d=é*", encode_slash=False) == "a%20b/c%2Bd%3D%C3%A9%2A"
    assert uri_encode("a/b", encode_slash=True) == "a%2Fb"
    assert uri_encode("日", encode_slash=True) == "%E6%97%A5"


def test_signing_key_matches_the_documented_derivation() -> None:
    # SigV4 reference, "Examples of how to derive a signing key".
    key = derive_signing_key(
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830", "us-east-1", "iam"
    )
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"


def test_signing_keys_are_cached() -> None:
    before = auth._cached_signing_key.cache_info().hits
    first = derive_signing_key("cache-me", "20240101", "xx-test-1")
    second = derive_signing_key("cache-me", "20240101", "xx-test-1")
    assert first is second
    assert auth._cached_signing_key.cache_info().hits == before + 1
    assert auth._cached_signing_key.cache_info().maxsize is not None


# --- SigV4: AWS's examples ---------------------------------------------------------

EX_KEY = "AKIAIOSFODNN7EXAMPLE"
EX_SECRETS = {EX_KEY: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
EX_NOW = datetime(2013, 5, 24, tzinfo=UTC)
EX_HOST = "examplebucket.s3.amazonaws.com"
EX_DATE = "20130524T000000Z"
EX_SCOPE = "20130524/us-east-1/s3/aws4_request"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
WELCOME_SHA256 = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"


def ex_authorization(signed_headers: str, signature: str) -> str:
    return (
        f"AWS4-HMAC-SHA256 Credential={EX_KEY}/{EX_SCOPE}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )


V4_EXAMPLES = [
    pytest.param(
        "GET",
        "/test.txt",
        [("Range", "bytes=0-9"), ("x-amz-content-sha256", EMPTY_SHA256), ("x-amz-date", EX_DATE)],
        "host;range;x-amz-content-sha256;x-amz-date",
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        id="get-object",
    ),
    pytest.param(
        "PUT",
        "/test%24file.text",
        [
            ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("x-amz-date", EX_DATE),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("x-amz-content-sha256", WELCOME_SHA256),
        ],
        "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
        id="put-object",
    ),
    pytest.param(
        "GET",
        "/?lifecycle",
        [("x-amz-date", EX_DATE), ("x-amz-content-sha256", EMPTY_SHA256)],
        "host;x-amz-content-sha256;x-amz-date",
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        id="get-bucket-lifecycle",
    ),
    pytest.param(
        "GET",
        "/?max-keys=2&prefix=J",
        [("x-amz-date", EX_DATE), ("x-amz-content-sha256", EMPTY_SHA256)],
        "host;x-amz-content-sha256;x-amz-date",
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        id="list-objects",
    ),
]


def test_the_put_example_payload_hash() -> None:
    assert hashlib.sha256(b"Welcome to Amazon S3.").hexdigest() == WELCOME_SHA256


@pytest.mark.parametrize(("method", "target", "headers", "signed", "signature"), V4_EXAMPLES)
def test_sigv4_documented_examples(
    method: str, target: str, headers: list[tuple[str, str]], signed: str, signature: str
) -> None:
    req = make_request(
        method,
        target,
        [("Host", EX_HOST), *headers, ("Authorization", ex_authorization(signed, signature))],
    )
    ctx = authenticate(req, EX_SECRETS, now=EX_NOW)
    assert ctx == AuthContext(
        access_key=EX_KEY,
        scheme="v4",
        content_sha256=dict(headers)["x-amz-content-sha256"],
        signing_key=derive_signing_key(EX_SECRETS[EX_KEY], "20130524", "us-east-1"),
        seed_signature=signature,
        amz_date=EX_DATE,
        scope=EX_SCOPE,
    )
    # One character off and S3 explains what it computed.
    bad = make_request(
        method,
        target,
        [("Host", EX_HOST), *headers, ("Authorization", ex_authorization(signed, "0" * 64))],
    )
    err = raises(SignatureDoesNotMatch, lambda: authenticate(bad, EX_SECRETS, now=EX_NOW))
    assert err.status == 403
    assert err.fields["AWSAccessKeyId"] == EX_KEY
    assert err.fields["SignatureProvided"] == "0" * 64
    assert err.fields["StringToSign"].startswith(f"AWS4-HMAC-SHA256\n{EX_DATE}\n{EX_SCOPE}\n")
    assert err.fields["CanonicalRequest"].startswith(f"{method}\n")
    assert err.fields["StringToSignBytes"].startswith("41 57 53 34")


def test_sigv4_canonical_request_of_the_get_example() -> None:
    headers = [
        ("Host", EX_HOST),
        ("Range", "bytes=0-9"),
        ("x-amz-content-sha256", EMPTY_SHA256),
        ("x-amz-date", EX_DATE),
        ("Authorization", ex_authorization("host;range;x-amz-content-sha256;x-amz-date", "0" * 64)),
    ]
    err = raises(
        SignatureDoesNotMatch,
        lambda: authenticate(make_request("GET", "/test.txt", headers), EX_SECRETS, now=EX_NOW),
    )
    assert err.fields["CanonicalRequest"] == (
        "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
        f"x-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{EX_DATE}\n\n"
        f"host;range;x-amz-content-sha256;x-amz-date\n{EMPTY_SHA256}"
    )


EX_PRESIGNED = (
    "/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
)


def test_sigv4_documented_presigned_url() -> None:
    req = make_request("GET", EX_PRESIGNED, [("Host", EX_HOST)])
    ctx = authenticate(req, EX_SECRETS, now=EX_NOW + timedelta(hours=23))
    assert ctx.scheme == "v4-query"
    assert ctx.content_sha256 == "UNSIGNED-PAYLOAD"
    assert ctx.seed_signature == "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    assert ctx.scope == EX_SCOPE and ctx.amz_date == EX_DATE


def test_sigv4_presigned_url_expires() -> None:
    req = make_request("GET", EX_PRESIGNED, [("Host", EX_HOST)])
    authenticate(req, EX_SECRETS, now=EX_NOW + timedelta(seconds=86400))  # the last second
    err = raises(
        AccessDenied,
        lambda: authenticate(req, EX_SECRETS, now=EX_NOW + timedelta(seconds=86401)),
        match="^Request has expired$",
    )
    assert err.fields == {
        "X-Amz-Expires": "86400",
        "Expires": "2013-05-25T00:00:00Z",
        "ServerTime": "2013-05-25T00:00:01Z",
    }


def test_sigv4_presigned_url_dated_in_the_future_is_not_yet_valid() -> None:
    req = make_request("GET", EX_PRESIGNED, [("Host", EX_HOST)])
    authenticate(req, EX_SECRETS, now=EX_NOW - timedelta(minutes=14))  # within the skew
    err = raises(
        AccessDenied,
        lambda: authenticate(req, EX_SECRETS, now=EX_NOW - timedelta(minutes=16)),
        match="^Request is not yet valid$",
    )
    assert err.fields["Expires"] == "2013-05-25T00:00:00Z"
    assert err.fields["ServerTime"] == "2013-05-23T23:44:00Z"


def test_sigv4_presigned_url_tampered() -> None:
    ok = make_request("GET", EX_PRESIGNED, [("Host", EX_HOST)])
    for req in (
        replace(ok, method="PUT"),
        replace(ok, raw_path="/test.txT"),
        replace(ok, raw_query=ok.raw_query + "&versionId=1"),
        replace(ok, raw_query=ok.raw_query.replace("X-Amz-Expires=86400", "X-Amz-Expires=86401")),
        with_header(ok, "Host", "otherbucket.s3.amazonaws.com"),
    ):
        raises(SignatureDoesNotMatch, partial(authenticate, req, EX_SECRETS, now=EX_NOW))


# --- SigV2: AWS's examples ---------------------------------------------------------

V2_EXAMPLES = [
    pytest.param(
        "GET",
        "/photos/puppy.jpg",
        "johnsmith",
        [("Date", "Tue, 27 Mar 2007 19:36:42 +0000")],
        "bWq2s1WEIj+Ydj0vQ697zp+IXMU=",
        id="object-get",
    ),
    pytest.param(
        "PUT",
        "/photos/puppy.jpg",
        "johnsmith",
        [
            ("Content-Type", "image/jpeg"),
            ("Content-Length", "94328"),
            ("Date", "Tue, 27 Mar 2007 21:15:45 +0000"),
        ],
        "MyyxeRY7whkBe+bq8fHCL/2kKUg=",
        id="object-put",
    ),
    pytest.param(
        "GET",
        "/?prefix=photos&max-keys=50&marker=puppy",
        "johnsmith",
        [("User-Agent", "Mozilla/5.0"), ("Date", "Tue, 27 Mar 2007 19:42:41 +0000")],
        "htDYFYduRNen8P9ZfE/s9SuKy0U=",
        id="list",
    ),
    pytest.param(
        "GET",
        "/?acl",
        "johnsmith",
        [("Date", "Tue, 27 Mar 2007 19:44:46 +0000")],
        "c2WLPFtWHVgbEmeEG93a4cG37dM=",
        id="fetch-acl",
    ),
    pytest.param(
        # The page's StringToSign for its DELETE example: x-amz-date empties
        # the Date line. (The signature printed on that page does not match
        # its own StringToSign; this one is HMAC-SHA1 of it.)
        "DELETE",
        "/johnsmith/photos/puppy.jpg",
        None,
        [
            ("Date", "Tue, 27 Mar 2007 21:20:27 +0000"),
            ("x-amz-date", "Tue, 27 Mar 2007 21:20:26 +0000"),
        ],
        "R4dJ53KECjStyBO5iTBJZ4XVOaI=",
        id="delete-with-x-amz-date",
    ),
    pytest.param(
        "PUT",
        "/db-backup.dat.gz",
        "static.johnsmith.net",
        [
            ("User-Agent", "curl/7.15.5"),
            ("Date", "Tue, 27 Mar 2007 21:06:08 +0000"),
            ("x-amz-acl", "public-read"),
            ("content-type", "application/x-download"),
            ("Content-MD5", "4gJE4saaMU4BqNR0kLY+lw=="),
            ("X-Amz-Meta-ReviewedBy", "joe@johnsmith.net"),
            ("X-Amz-Meta-ReviewedBy", "jane@johnsmith.net"),
            ("X-Amz-Meta-FileChecksum", "0x02661779"),
            ("X-Amz-Meta-ChecksumAlgorithm", "crc32"),
            ("Content-Disposition", "attachment; filename=database.dat"),
            ("Content-Encoding", "gzip"),
            ("Content-Length", "5913339"),
        ],
        "ilyl83RwaSoYIEdixDQcA4OnAnc=",
        id="upload-repeated-headers",
    ),
    pytest.param(
        "GET",
        "/",
        None,
        [("Date", "Wed, 28 Mar 2007 01:29:59 +0000")],
        "qGdzdERIC03wnaRNKh6OqZehG9s=",
        id="list-all-my-buckets",
    ),
    pytest.param(
        "GET",
        "/dictionary/fran%C3%A7ais/pr%c3%a9f%c3%a8re",
        None,
        [("Date", "Wed, 28 Mar 2007 01:49:49 +0000")],
        "DNEZGsoieTZ92F3bUfSPQcbGmlM=",
        id="unicode-keys-signed-as-sent",
    ),
]


@pytest.mark.parametrize(("method", "target", "vhost", "headers", "signature"), V2_EXAMPLES)
def test_sigv2_documented_examples(
    method: str, target: str, vhost: str | None, headers: list[tuple[str, str]], signature: str
) -> None:
    when = auth._parse_http_date(
        headers[0][1] if headers[0][0] == "Date" else dict(headers)["Date"]
    )
    assert when is not None
    authorization = ("Authorization", f"AWS {EX_KEY}:{signature}")
    req = make_request(method, target, [*headers, authorization], vhost)
    ctx = authenticate(req, EX_SECRETS, now=when)
    assert ctx == AuthContext(EX_KEY, "v2", None, None, None, None, None)
    bad = make_request(
        method, target, [*headers, ("Authorization", f"AWS {EX_KEY}:x{signature[1:]}")], vhost
    )
    err = raises(SignatureDoesNotMatch, lambda: authenticate(bad, EX_SECRETS, now=when))
    assert err.fields["SignatureProvided"] == "x" + signature[1:]
    assert "CanonicalRequest" not in err.fields


def test_sigv2_documented_presigned_url() -> None:
    target = (
        "/photos/puppy.jpg?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE"
        "&Signature=NpgCjnDzrM%2BWFzoENXmpNDUsSn8%3D&Expires=1175139620"
    )
    req = make_request("GET", target, [("Host", "johnsmith.s3.amazonaws.com")], "johnsmith")
    expires = datetime.fromtimestamp(1175139620, UTC)
    ctx = authenticate(req, EX_SECRETS, now=expires - timedelta(days=3))
    assert ctx.scheme == "v2-query" and ctx.access_key == EX_KEY
    authenticate(req, EX_SECRETS, now=expires)
    err = raises(
        AccessDenied,
        lambda: authenticate(req, EX_SECRETS, now=expires + timedelta(seconds=1)),
        match="^Request has expired$",
    )
    assert err.fields == {"Expires": "2007-03-29T03:40:20Z", "ServerTime": "2007-03-29T03:40:21Z"}
    tampered = replace(req, raw_path="/photos/puppy.jpeg")
    raises(SignatureDoesNotMatch, lambda: authenticate(tampered, EX_SECRETS, now=expires))


# --- round trips with boto3 ------------------------------------------------------------

KEYS = [
    "plain.txt",
    "a b/c d.txt",
    "ünïcödé/ключ/日本語.bin",
    "plus+sign",
    "percent%41%2Fliteral",
    "double//slash/",
    "dots/../and/./dots",
    "../leading",
    "tilde~x",
    "semi;colon,comma=eq:at@$&'()*!",
    "quest?ion#hash",
]

OPERATIONS: list[tuple[str, dict[str, Any]]] = [
    ("list_buckets", {}),
    ("list_objects", {"Bucket": "bkt", "Prefix": "a b/", "Delimiter": "/"}),
    ("list_objects_v2", {"Bucket": "bkt", "Prefix": "ü+/", "StartAfter": "x~y", "MaxKeys": 7}),
    ("get_bucket_acl", {"Bucket": "bkt"}),
    ("get_bucket_lifecycle_configuration", {"Bucket": "bkt"}),
    ("list_object_versions", {"Bucket": "bkt", "KeyMarker": "k m"}),
    ("list_multipart_uploads", {"Bucket": "bkt"}),
    ("delete_objects", {"Bucket": "bkt", "Delete": {"Objects": [{"Key": "a"}, {"Key": "b c"}]}}),
    ("head_object", {"Bucket": "bkt", "Key": "k", "IfNoneMatch": '"etag"'}),
    (
        "get_object",
        {
            "Bucket": "bkt",
            "Key": "dir/obj name.txt",
            "Range": "bytes=0-9",
            "VersionId": "v 1+/=",
            "ResponseContentType": "text/plain; charset=utf-8",
            "ResponseContentDisposition": 'attachment; filename="x y.txt"',
            "ResponseCacheControl": "no-cache",
            "ResponseExpires": datetime(2030, 1, 1, tzinfo=UTC),
        },
    ),
    (
        "put_object",
        {
            "Bucket": "bkt",
            "Key": "up/ü p+.txt",
            "Body": b"hello world",
            "ContentType": "text/plain",
            "ACL": "public-read",
            "Metadata": {"color": "  blue   and  green  ", "n": "1"},
            "StorageClass": "STANDARD_IA",
            "Tagging": "k=v&k2=v 2",
        },
    ),
    (
        "copy_object",
        {"Bucket": "bkt", "Key": "dst", "CopySource": {"Bucket": "src", "Key": "a b+c"}},
    ),
    (
        "put_object_tagging",
        {"Bucket": "bkt", "Key": "k", "Tagging": {"TagSet": [{"Key": "a", "Value": "b"}]}},
    ),
    ("create_multipart_upload", {"Bucket": "bkt", "Key": "big file"}),
    (
        "upload_part",
        {
            "Bucket": "bkt",
            "Key": "big file",
            "UploadId": "id/+=x",
            "PartNumber": 3,
            "Body": b"x" * 10,
        },
    ),
    ("abort_multipart_upload", {"Bucket": "bkt", "Key": "big file", "UploadId": "id/+=x"}),
]

SCHEMES = [("s3v4", "v4"), ("s3", "v2")]
STYLES = ["path", "virtual"]


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[tuple[str, str], Any]]:
    yield {(sv, style): client(sv, style) for sv, _ in SCHEMES for style in STYLES}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(("signature_version", "scheme"), SCHEMES)
@pytest.mark.parametrize(("operation", "params"), OPERATIONS, ids=[op for op, _ in OPERATIONS])
def test_boto3_requests_verify(
    clients: dict[tuple[str, str], Any],
    signature_version: str,
    scheme: str,
    style: str,
    operation: str,
    params: dict[str, Any],
) -> None:
    req = capture(clients[signature_version, style], operation, **params)
    ctx = authenticate(req, SECRETS)
    assert (ctx.access_key, ctx.scheme) == (AK, scheme)
    if scheme == "v4":
        assert ctx.content_sha256 == req.headers["x-amz-content-sha256"]
        assert ctx.signing_key is not None and ctx.scope is not None
        assert ctx.scope.endswith("/eu-west-3/s3/aws4_request")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(("signature_version", "scheme"), SCHEMES)
@pytest.mark.parametrize("key", KEYS)
def test_boto3_keys_verify_and_tampering_fails(
    clients: dict[tuple[str, str], Any], signature_version: str, scheme: str, style: str, key: str
) -> None:
    s3 = clients[signature_version, style]
    req = capture(s3, "get_object", Bucket="bkt", Key=key, VersionId="3/4", PartNumber=2)
    assert authenticate(req, SECRETS).scheme == scheme

    tampered = [
        replace(req, method="DELETE"),
        replace(req, raw_path=req.raw_path + "x"),
        replace(req, raw_query=req.raw_query.replace("versionId=3", "versionId=4")),
        replace(req, raw_query=req.raw_query + "&uploadId=1"),
    ]
    date_header = "x-amz-date" if scheme == "v4" else "Date"
    original = req.headers[date_header]
    if scheme == "v4":
        tampered.append(
            with_header(req, date_header, original[:-2] + ("1Z" if original[-2] == "0" else "0Z"))
        )
    else:
        tampered.append(with_header(req, date_header, original.replace(" GMT", " +0000")))
    for bad in tampered:
        raises(SignatureDoesNotMatch, partial(authenticate, bad, SECRETS))
    raises(SignatureDoesNotMatch, lambda: authenticate(req, {AK: SK + "x"}))


@pytest.mark.parametrize(("signature_version", "scheme"), SCHEMES)
def test_boto3_requests_are_refused_when_skewed(signature_version: str, scheme: str) -> None:
    req = capture(client(signature_version), "get_object", Bucket="bkt", Key="k")
    now = datetime.now(UTC)
    authenticate(req, SECRETS, now=now + timedelta(minutes=14))
    for shift in (timedelta(minutes=16), -timedelta(minutes=16)):
        err = raises(RequestTimeTooSkewed, partial(authenticate, req, SECRETS, now=now + shift))
        assert err.status == 403
        assert err.fields["MaxAllowedSkewMilliseconds"] == "900000"
        sent = req.headers["x-amz-date" if scheme == "v4" else "Date"]
        assert err.fields["RequestTime"] == sent
        assert err.fields["ServerTime"].endswith("Z")


@pytest.mark.parametrize(("signature_version", "_scheme"), SCHEMES)
def test_unknown_access_key(signature_version: str, _scheme: str) -> None:
    req = capture(client(signature_version, key="AKIDUNKNOWN"), "get_object", Bucket="bkt", Key="k")
    err = raises(InvalidAccessKeyId, lambda: authenticate(req, SECRETS))
    assert err.status == 403 and err.fields == {"AWSAccessKeyId": "AKIDUNKNOWN"}
    url = client(signature_version, key="AKIDUNKNOWN").generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": "k"}
    )
    raises(InvalidAccessKeyId, lambda: authenticate(from_url("GET", url), SECRETS))


# --- presigned URLs from boto3 --------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(("signature_version", "scheme"), SCHEMES)
@pytest.mark.parametrize("key", KEYS)
def test_presigned_get_urls_verify(
    signature_version: str, scheme: str, style: str, key: str
) -> None:
    url = client(signature_version, style).generate_presigned_url(
        "get_object",
        Params={
            "Bucket": "bkt",
            "Key": key,
            "VersionId": "v+1",
            "ResponseContentDisposition": 'attachment; filename="ü.txt"',
            "ResponseContentType": "text/plain",
        },
        ExpiresIn=300,
    )
    req = from_url("GET", url)
    ctx = authenticate(req, SECRETS)
    assert ctx.scheme == f"{scheme}-query"
    if scheme == "v4":
        assert ctx.content_sha256 == "UNSIGNED-PAYLOAD"
    raises(SignatureDoesNotMatch, lambda: authenticate(replace(req, method="PUT"), SECRETS))
    raises(
        SignatureDoesNotMatch,
        lambda: authenticate(replace(req, raw_path=req.raw_path + "2"), SECRETS),
    )
    cut = req.raw_query.replace(
        "response-content-type=text%2Fplain", "response-content-type=text%2Fhtml"
    )
    assert cut != req.raw_query
    raises(SignatureDoesNotMatch, lambda: authenticate(replace(req, raw_query=cut), SECRETS))


@pytest.mark.parametrize(("signature_version", "scheme"), SCHEMES)
def test_presigned_put_with_headers(signature_version: str, scheme: str) -> None:
    url = client(signature_version).generate_presigned_url(
        "put_object",
        Params={
            "Bucket": "bkt",
            "Key": "up load",
            "ContentType": "text/plain",
            "ACL": "public-read",
        },
    )
    # Sent as the SDK documents it: with the headers it signed.
    req = from_url("PUT", url, [("Content-Type", "text/plain"), ("x-amz-acl", "public-read")])
    assert authenticate(req, SECRETS).scheme == f"{scheme}-query"
    wrong_type = with_header(req, "Content-Type", "text/html")
    raises(SignatureDoesNotMatch, lambda: authenticate(wrong_type, SECRETS))
    if scheme == "v2":
        # botocore moved the signed headers into the query: the bare URL verifies.
        assert authenticate(from_url("PUT", url), SECRETS).scheme == "v2-query"


def test_presigned_v4_refuses_unsigned_amz_headers() -> None:
    url = client("s3v4").generate_presigned_url("put_object", Params={"Bucket": "bkt", "Key": "k"})
    req = from_url("PUT", url, [("x-amz-copy-source", "/other/secret"), ("X-Amz-Tagging", "a=b")])
    err = raises(AccessDenied, lambda: authenticate(req, SECRETS))
    assert err.text == "There were headers present in the request which were not signed"
    assert err.fields == {"HeadersNotSigned": "x-amz-copy-source, x-amz-tagging"}
    # The payload hash is exempt: it enters the canonical request anyway.
    req = from_url("PUT", url, [("x-amz-content-sha256", "UNSIGNED-PAYLOAD")])
    assert authenticate(req, SECRETS).content_sha256 == "UNSIGNED-PAYLOAD"


@pytest.mark.parametrize(("signature_version", "scheme"), SCHEMES)
def test_presigned_urls_expire(signature_version: str, scheme: str) -> None:
    url = client(signature_version).generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": "k"}, ExpiresIn=60
    )
    req = from_url("GET", url)
    now = datetime.now(UTC)
    authenticate(req, SECRETS, now=now + timedelta(seconds=50))
    err = raises(
        AccessDenied,
        lambda: authenticate(req, SECRETS, now=now + timedelta(seconds=120)),
        match="^Request has expired$",
    )
    expected = {"Expires", "ServerTime"} | ({"X-Amz-Expires"} if scheme == "v4" else set())
    assert set(err.fields) == expected


# --- botocore's signer classes, used directly --------------------------------------------------

CREDS = Credentials(AK, SK)


def signed_with(
    signer: Any,
    method: str,
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    data: bytes = b"",
) -> SignedRequest:
    request = AWSRequest(method=method, url=url, data=data)
    for name, value in headers:
        request.headers[name] = value  # HTTPHeaders appends repeated names
    signer.add_auth(request)
    return from_url(request.method, request.url, request.headers.items())


HEADERS = [
    ("Content-Type", "application/octet-stream"),
    ("Content-MD5", "1B2M2Y8AsgTpgAwUhZIfYw=="),
    ("x-amz-meta-spaced", "  a   b  "),
    ("x-amz-meta-twice", "one"),
    ("x-amz-meta-twice", "two"),
    ("X-Amz-Meta-Upper", "V"),
]
URL = f"{ENDPOINT}/bkt/dir/k%20e%2By%C3%BC~?acl&versionId=a%2Fb&uploads=&x=1&response-expires=Thu%2C%2001%20Jan%202030"


@pytest.mark.parametrize(
    ("signer", "scheme"),
    [
        pytest.param(S3SigV4Auth(CREDS, "s3", "ap-south-7"), "v4", id="S3SigV4Auth"),
        pytest.param(
            S3SigV4QueryAuth(CREDS, "s3", "us-east-1", expires=60),
            "v4-query",
            id="S3SigV4QueryAuth",
        ),
        pytest.param(HmacV1Auth(CREDS), "v2", id="HmacV1Auth"),
        pytest.param(HmacV1QueryAuth(CREDS, expires=60), "v2-query", id="HmacV1QueryAuth"),
    ],
)
def test_botocore_signers(signer: Any, scheme: str) -> None:
    # (The query signers would move a body into the query string.)
    body = b"" if scheme.endswith("-query") else b"body"
    req = signed_with(signer, "PUT", URL, HEADERS, body)
    assert authenticate(req, SECRETS).scheme == scheme
    # Repeated headers count in their order; collapsing them does not verify.
    headers: CIMultiDict[str] = CIMultiDict(req.headers)
    headers.popall("x-amz-meta-twice")
    headers.add("x-amz-meta-twice", "two")
    headers.add("x-amz-meta-twice", "one")
    raises(SignatureDoesNotMatch, lambda: authenticate(replace(req, headers=headers), SECRETS))
    raises(
        SignatureDoesNotMatch,
        lambda: authenticate(with_header(req, "x-amz-meta-upper", "W"), SECRETS),
    )


def test_v4_header_whitespace_is_trimmed_as_signed() -> None:
    req = signed_with(S3SigV4Auth(CREDS, "s3", "us-east-1"), "GET", f"{ENDPOINT}/bkt/k", HEADERS)
    assert authenticate(with_header(req, "x-amz-meta-spaced", "a b"), SECRETS).scheme == "v4"
    raises(
        SignatureDoesNotMatch,
        lambda: authenticate(with_header(req, "x-amz-meta-spaced", "ab"), SECRETS),
    )


def test_v4_date_header_instead_of_x_amz_date() -> None:
    # botocore signs a request carrying Date with that, not x-amz-date.
    now = datetime.now(UTC)
    stamp = now.strftime("%a, %d %b %Y %H:%M:%S GMT")
    req = signed_with(
        S3SigV4Auth(CREDS, "s3", "us-east-1"), "GET", f"{ENDPOINT}/bkt/k", [("Date", stamp)]
    )
    assert "x-amz-date" not in req.headers
    ctx = authenticate(req, SECRETS)
    assert ctx.amz_date == now.strftime("%Y%m%dT%H%M%SZ")


def test_v4_unsigned_amz_header_is_refused() -> None:
    req = signed_with(S3SigV4Auth(CREDS, "s3", "us-east-1"), "GET", f"{ENDPOINT}/bkt/k")
    err = raises(
        AccessDenied, lambda: authenticate(with_header(req, "x-amz-acl", "public-read"), SECRETS)
    )
    assert err.fields == {"HeadersNotSigned": "x-amz-acl"}
    # Not x-amz-: x-amzn-trace-id and friends are not S3's to require.
    assert authenticate(with_header(req, "x-amzn-trace-id", "Root=1"), SECRETS).scheme == "v4"


def test_v4_host_must_be_signed() -> None:
    headers = [
        ("Host", EX_HOST),
        ("x-amz-content-sha256", EMPTY_SHA256),
        ("x-amz-date", EX_DATE),
        ("Authorization", ex_authorization("x-amz-content-sha256;x-amz-date", "0" * 64)),
    ]
    err = raises(
        AccessDenied,
        lambda: authenticate(make_request("GET", "/k", headers), EX_SECRETS, now=EX_NOW),
    )
    assert err.fields == {"HeadersNotSigned": "host"}


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for signer in (S3SigV4Auth(CREDS, "s3", "us-east-1"), HmacV1Auth(CREDS)):
        authenticate(signed_with(signer, "GET", f"{ENDPOINT}/bkt/k"), SECRETS)
    assert len(calls) == 2


# --- refusals -----------------------------------------------------------------------------------


def v4_request(authorization: str, **headers: str) -> SignedRequest:
    base = {"Host": EX_HOST, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": EX_DATE}
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    return make_request("GET", "/k", [*base.items(), ("Authorization", authorization)])


def test_a_request_without_any_signature_is_anonymous() -> None:
    # What it may do is gateway.access's to decide (public grants only).
    ctx = authenticate(make_request("GET", "/bkt/k?x=1", [("Host", "h")]), SECRETS)
    assert ctx.scheme == "anonymous" and ctx.access_key == ""
    form_ctx, policy = authenticate_post({"key": "k", "file": "x"}, SECRETS)
    assert form_ctx.scheme == "anonymous" and policy.anonymous
    policy.check({"key": "k", "anything": "goes"}, bucket="b", content_length=10)


def test_only_one_auth_mechanism() -> None:
    req = with_header(
        make_request("GET", EX_PRESIGNED, [("Host", EX_HOST)]), "Authorization", "AWS a:b"
    )
    err = raises(
        InvalidArgument,
        lambda: authenticate(req, EX_SECRETS, now=EX_NOW),
        match="^Only one auth mechanism",
    )
    assert err.fields == {"ArgumentName": "Authorization", "ArgumentValue": "AWS a:b"}
    req = make_request(
        "GET", "/k?AWSAccessKeyId=a&Signature=b&Expires=1", [("Authorization", "AWS a:b")]
    )
    raises(InvalidArgument, lambda: authenticate(req, SECRETS), match="^Only one auth mechanism")
    req = make_request("GET", EX_PRESIGNED + "&Signature=b", [("Host", EX_HOST)])
    raises(InvalidArgument, lambda: authenticate(req, SECRETS), match="^Only one auth mechanism")


@pytest.mark.parametrize(
    ("authorization", "error", "message"),
    [
        (
            f"AWS4-HMAC-SHA256 Credential={EX_KEY}/{EX_SCOPE}",
            AuthorizationHeaderMalformed,
            "requires three components: Credential, SignedHeaders, and Signature",
        ),
        (
            f"AWS4-HMAC-SHA256 Credential={EX_KEY}/20130524/us-east-1/s3, SignedHeaders=host, Signature=00",
            AuthorizationHeaderMalformed,
            'the Credential is mal-formed; expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request"',
        ),
        (
            f"AWS4-HMAC-SHA256 Credential={EX_KEY}/20130524/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=00",
            AuthorizationHeaderMalformed,
            'incorrect service "ec2". This endpoint belongs to "s3".',
        ),
        (
            f"AWS4-HMAC-SHA256 Credential={EX_KEY}/20130524/us-east-1/s3/aws5_request, SignedHeaders=host, Signature=00",
            AuthorizationHeaderMalformed,
            'incorrect terminal "aws5_request"',
        ),
        (
            f"AWS4-HMAC-SHA256 Credential={EX_KEY}/2013-05-24/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
            AuthorizationHeaderMalformed,
            'incorrect date format "2013-05-24"',
        ),
        (
            f"AWS4-HMAC-SHA256 Credential={EX_KEY}/20130523/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
            AuthorizationHeaderMalformed,
            "Invalid credential date. Date is not the same as X-Amz-Date.",
        ),
        (
            "AWS AKIDONLY",
            InvalidArgument,
            "AWS authorization header is invalid.  Expected AwsAccessKeyId:signature",
        ),
        ("AWS :sig", InvalidArgument, "Expected AwsAccessKeyId:signature"),
        ("Bearer abc", InvalidArgument, "^Unsupported Authorization Type$"),
        ("", InvalidArgument, "^Unsupported Authorization Type$"),
        (
            f"AWS4-ECDSA-P256-SHA256 Credential={EX_KEY}/20130524/s3/aws4_request, SignedHeaders=host, Signature=00",
            S3NotImplemented,
            "not implemented",
        ),
    ],
)
def test_malformed_authorization(authorization: str, error: type[S3Error], message: str) -> None:
    err = raises(
        error,
        lambda: authenticate(v4_request(authorization), EX_SECRETS, now=EX_NOW),
        match=message,
    )
    if error is AuthorizationHeaderMalformed:
        assert err.text.startswith("The authorization header is malformed; ")


def test_any_region_is_accepted() -> None:
    for region in ("us-east-1", "eu-west-3", "garage", "my-local-dc"):
        s3 = boto3.client(
            "s3",
            endpoint_url=ENDPOINT,
            aws_access_key_id=AK,
            aws_secret_access_key=SK,
            region_name=region,
        )
        ctx = authenticate(capture(s3, "list_buckets"), SECRETS)
        assert ctx.scope is not None and ctx.scope.split("/")[1] == region


def test_v4_header_needs_the_payload_hash() -> None:
    req = signed_with(S3SigV4Auth(CREDS, "s3", "us-east-1"), "GET", f"{ENDPOINT}/bkt/k")
    headers: CIMultiDict[str] = CIMultiDict(req.headers)
    del headers["x-amz-content-sha256"]
    err = raises(InvalidRequest, lambda: authenticate(replace(req, headers=headers), SECRETS))
    assert err.text == "Missing required header for this request: x-amz-content-sha256"
    err = raises(
        InvalidArgument,
        lambda: authenticate(with_header(req, "x-amz-content-sha256", "sha"), SECRETS),
    )
    assert err.fields["ArgumentName"] == "x-amz-content-sha256"


@pytest.mark.parametrize("token", sorted(auth.PAYLOAD_TOKENS))
def test_v4_payload_tokens_are_passed_through(token: str) -> None:
    class TokenSigner(S3SigV4Auth):
        def payload(self, request: Any) -> str:
            return token

    req = signed_with(TokenSigner(CREDS, "s3", "us-east-1"), "PUT", f"{ENDPOINT}/bkt/k")
    ctx = authenticate(req, SECRETS)
    assert ctx.content_sha256 == token
    assert ctx.seed_signature == req.headers["Authorization"].rsplit("Signature=", 1)[1]


def test_v4_header_needs_a_date() -> None:
    req = signed_with(S3SigV4Auth(CREDS, "s3", "us-east-1"), "GET", f"{ENDPOINT}/bkt/k")
    headers: CIMultiDict[str] = CIMultiDict(req.headers)
    del headers["x-amz-date"]
    raises(
        AccessDenied,
        lambda: authenticate(replace(req, headers=headers), SECRETS),
        match="requires a valid Date",
    )
    raises(
        AccessDenied,
        lambda: authenticate(with_header(req, "x-amz-date", "yesterday"), SECRETS),
        match="requires a valid Date or x-amz-date header",
    )


def test_v2_header_needs_a_date() -> None:
    req = signed_with(HmacV1Auth(CREDS), "GET", f"{ENDPOINT}/bkt/k")
    headers: CIMultiDict[str] = CIMultiDict(req.headers)
    del headers["Date"]
    raises(
        AccessDenied,
        lambda: authenticate(replace(req, headers=headers), SECRETS),
        match="requires a valid Date",
    )


def presigned(**overrides: str) -> SignedRequest:
    params = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{EX_KEY}%2F20130524%2Fus-east-1%2Fs3%2Faws4_request",
        "X-Amz-Date": EX_DATE,
        "X-Amz-Expires": "86400",
        "X-Amz-SignedHeaders": "host",
        "X-Amz-Signature": "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404",
    }
    params.update(overrides)
    query = "&".join(f"{k}={v}" for k, v in params.items() if v != "<absent>")
    return make_request("GET", f"/test.txt?{query}", [("Host", EX_HOST)])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"X-Amz-Signature": "<absent>"},
            "requires the X-Amz-Algorithm, X-Amz-Credential, X-Amz-Signature",
        ),
        ({"X-Amz-Expires": "<absent>"}, "requires the X-Amz-Algorithm"),
        ({"X-Amz-Algorithm": "AWS4-HMAC-SHA1"}, 'X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"'),
        (
            {"X-Amz-Credential": f"{EX_KEY}%2F20130524%2Fus-east-1"},
            "^Error parsing the X-Amz-Credential parameter; the Credential is mal-formed",
        ),
        ({"X-Amz-Date": "2013-05-24T00:00:00Z"}, "X-Amz-Date must be in the ISO8601 Long Format"),
        (
            {"X-Amz-Date": "20130525T000000Z"},
            "Invalid credential date. Date is not the same as X-Amz-Date.",
        ),
        ({"X-Amz-Expires": "604801"}, "X-Amz-Expires must be less than a week"),
        ({"X-Amz-Expires": "-1"}, "X-Amz-Expires must be non-negative"),
        ({"X-Amz-Expires": "1e3"}, "X-Amz-Expires should be a number"),
    ],
)
def test_malformed_presigned_v4(overrides: dict[str, str], message: str) -> None:
    raises(
        AuthorizationQueryParametersError,
        lambda: authenticate(presigned(**overrides), EX_SECRETS, now=EX_NOW),
        match=message,
    )


def test_presigned_v4_limits() -> None:
    # A week is allowed (and then the signature decides).
    raises(
        SignatureDoesNotMatch,
        lambda: authenticate(presigned(**{"X-Amz-Expires": "604800"}), EX_SECRETS, now=EX_NOW),
    )
    raises(
        S3NotImplemented,
        lambda: authenticate(
            presigned(**{"X-Amz-Algorithm": "AWS4-ECDSA-P256-SHA256"}), EX_SECRETS, now=EX_NOW
        ),
    )
    raises(InvalidAccessKeyId, lambda: authenticate(presigned(), {}, now=EX_NOW))


@pytest.mark.parametrize(
    ("query", "error", "message"),
    [
        (
            "AWSAccessKeyId=AK&Signature=x",
            AuthorizationQueryParametersError,
            "requires the Signature, Expires and AWSAccessKeyId",
        ),
        (
            "Signature=x&Expires=1",
            AuthorizationQueryParametersError,
            "requires the Signature, Expires and AWSAccessKeyId",
        ),
        (
            "AWSAccessKeyId=AK&Expires=1",
            AuthorizationQueryParametersError,
            "requires the Signature",
        ),
        (
            f"AWSAccessKeyId={AK}&Signature=x&Expires=soon",
            AccessDenied,
            r"^Invalid date \(should be seconds since epoch\): soon$",
        ),
    ],
)
def test_malformed_presigned_v2(query: str, error: type[S3Error], message: str) -> None:
    raises(
        error, lambda: authenticate(make_request("GET", f"/bkt/k?{query}"), SECRETS), match=message
    )


# --- POST policies ------------------------------------------------------------------------------

POST_CONDITIONS: list[Any] = [
    {"acl": "public-read"},
    ["starts-with", "$Content-Type", "text/"],
    ["content-length-range", 1, 100],
    {"x-amz-meta-color": "blue"},
    ["starts-with", "$success_action_status", ""],
]


def presigned_post(
    signature_version: str, *, key: str = AK, secret: str = SK, expires: int = 600
) -> dict[str, str]:
    s3 = client(signature_version, key=key, secret=secret)
    post = s3.generate_presigned_post(
        "bkt",
        "uploads/${filename}",
        Fields={"acl": "public-read", "Content-Type": "text/plain", "x-amz-meta-color": "blue"},
        Conditions=POST_CONDITIONS,
        ExpiresIn=expires,
    )
    fields: dict[str, str] = dict(post["fields"])
    fields["success_action_status"] = "201"
    return fields


POST_SCHEMES = [("s3v4", "post-v4"), ("s3", "post-v2")]


@pytest.mark.parametrize(("signature_version", "scheme"), POST_SCHEMES)
def test_presigned_post_round_trip(signature_version: str, scheme: str) -> None:
    fields = presigned_post(signature_version)
    ctx, policy = authenticate_post(fields, SECRETS)
    assert (ctx.access_key, ctx.scheme) == (AK, scheme)
    if scheme == "post-v4":
        assert ctx.signing_key == derive_signing_key(SK, fields["x-amz-date"][:8], "eu-west-3")
        assert ctx.scope is not None and ctx.scope.endswith("/eu-west-3/s3/aws4_request")
    assert policy.content_length_range == (1, 100)
    assert policy.expiration > datetime.now(UTC)
    form = {**fields, "file": "(the file part)", "x-ignore-tracking": "1"}
    policy.check(form, bucket="bkt", content_length=None)
    policy.check(form, bucket="bkt", content_length=100)
    policy.check({k.upper(): v for k, v in form.items()}, bucket="bkt", content_length=1)


@pytest.mark.parametrize(("signature_version", "_scheme"), POST_SCHEMES)
def test_post_policy_conditions(signature_version: str, _scheme: str) -> None:
    fields = presigned_post(signature_version)
    _, policy = authenticate_post(fields, SECRETS)

    def check(changes: dict[str, str] | None = None, bucket: str = "bkt", size: int = 10) -> None:
        policy.check({**fields, **(changes or {})}, bucket=bucket, content_length=size)

    err = raises(AccessDenied, lambda: check({"acl": "private"}))
    assert (
        err.text
        == 'Invalid according to Policy: Policy Condition failed: ["eq", "$acl", "public-read"]'
    )
    err = raises(AccessDenied, lambda: check(bucket="other"))
    assert err.text.endswith('["eq", "$bucket", "bkt"]')
    err = raises(AccessDenied, lambda: check({"key": "elsewhere/x"}))
    assert err.text.endswith('["starts-with", "$key", "uploads/"]')
    err = raises(AccessDenied, lambda: check({"Content-Type": "image/png"}))
    assert err.text.endswith('["starts-with", "$Content-Type", "text/"]')
    err = raises(AccessDenied, lambda: check({"x-amz-meta-size": "big"}))
    assert err.text == "Invalid according to Policy: Extra input fields: x-amz-meta-size"
    err = raises(EntityTooLarge, lambda: check(size=101))
    assert err.fields == {"ProposedSize": "101", "MaxSizeAllowed": "100"}
    err = raises(EntityTooSmall, lambda: check(size=0))
    assert err.fields == {"ProposedSize": "0", "MinSizeAllowed": "1"}


@pytest.mark.parametrize(("signature_version", "_scheme"), POST_SCHEMES)
def test_post_refusals(signature_version: str, _scheme: str) -> None:
    fields = presigned_post(signature_version)
    later = datetime.now(UTC) + timedelta(hours=1)
    raises(
        AccessDenied,
        lambda: authenticate_post(fields, SECRETS, now=later),
        match=r"^Invalid according to Policy: Policy expired\.$",
    )
    raises(SignatureDoesNotMatch, lambda: authenticate_post(fields, {AK: "wrong"}))
    other = presigned_post(signature_version, key="AKIDUNKNOWN")
    raises(InvalidAccessKeyId, lambda: authenticate_post(other, SECRETS))
    # A policy re-encoded (so: a different policy) no longer matches its signature.
    document = json.loads(base64.b64decode(fields["policy"]))
    document["conditions"].append(["starts-with", "$x-amz-meta-extra", ""])
    forged = {**fields, "policy": base64.b64encode(json.dumps(document).encode()).decode()}
    raises(SignatureDoesNotMatch, lambda: authenticate_post(forged, SECRETS))
    without_policy = {k: v for k, v in fields.items() if k != "policy"}
    raises(
        InvalidArgument,
        lambda: authenticate_post(without_policy, SECRETS),
        match="must contain a field named 'policy'",
    )


def test_post_missing_fields_and_anonymous() -> None:
    raises(
        InvalidArgument,
        lambda: authenticate_post({"key": "k", "policy": "e30="}, SECRETS),
        match="'AWSAccessKeyId'",
    )
    v4 = presigned_post("s3v4")
    for name in ("x-amz-credential", "x-amz-date", "x-amz-signature"):
        fields = {k: v for k, v in v4.items() if k != name}
        err = raises(InvalidArgument, partial(authenticate_post, fields, SECRETS))
        assert err.fields == {"ArgumentName": name, "ArgumentValue": ""}
    bad_date = {**v4, "x-amz-date": "20000101T000000Z"}
    raises(
        InvalidArgument,
        lambda: authenticate_post(bad_date, SECRETS),
        match="Invalid credential date",
    )
    raises(
        S3NotImplemented,
        lambda: authenticate_post({**v4, "x-amz-algorithm": "AWS4-ECDSA-P256-SHA256"}, SECRETS),
    )


def sign_policy_v2(document: object) -> dict[str, str]:
    text = base64.b64encode(json.dumps(document).encode()).decode()
    signature = base64.b64encode(
        hmac.new(SK.encode(), text.encode(), hashlib.sha1).digest()
    ).decode()
    return {"AWSAccessKeyId": AK, "policy": text, "signature": signature}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not an object", "Invalid JSON"),
        ({"conditions": []}, "missing expiration"),
        ({"expiration": "tomorrow", "conditions": []}, "Invalid 'expiration' value: 'tomorrow'"),
        ({"expiration": "2099-01-01T00:00:00.000Z"}, "missing conditions"),
        (
            {"expiration": "2099-01-01T00:00:00.000Z", "conditions": [["in", "$key", "x"]]},
            "Invalid condition",
        ),
        (
            {"expiration": "2099-01-01T00:00:00.000Z", "conditions": [["eq", "key", "x"]]},
            "Invalid condition",
        ),
        (
            {"expiration": "2099-01-01T00:00:00.000Z", "conditions": [{"key": 3}]},
            "Invalid condition",
        ),
        (
            {
                "expiration": "2099-01-01T00:00:00.000Z",
                "conditions": [["content-length-range", 9, 1]],
            },
            "Invalid condition",
        ),
    ],
)
def test_invalid_policy_documents(document: object, message: str) -> None:
    err = raises(
        InvalidPolicyDocument,
        lambda: authenticate_post(sign_policy_v2(document), SECRETS),
        match=message,
    )
    assert err.status == 400


def test_policy_parse() -> None:
    document = {
        "expiration": "2099-12-01T12:00:00.000Z",
        "conditions": [
            {"bucket": "b", "acl": "private"},
            ["EQ", "$Key", "k"],
            ["content-length-range", "0", "10"],
        ],
    }
    policy = PostPolicy.parse(base64.b64encode(json.dumps(document).encode()).decode())
    assert policy.expiration == datetime(2099, 12, 1, 12, tzinfo=UTC)
    assert [(c.op, c.field, c.value) for c in policy.conditions] == [
        ("eq", "bucket", "b"),
        ("eq", "acl", "private"),
        ("eq", "key", "k"),
        ("content-length-range", "", ""),
    ]
    assert policy.content_length_range == (0, 10)
    policy.check({"key": "k", "acl": "private", "bucket": "b"}, bucket="b", content_length=10)
    raises(
        AccessDenied, lambda: policy.check({"key": "k"}, bucket="b", content_length=1), match="acl"
    )


def test_a_naive_now_is_utc() -> None:
    req = make_request("GET", EX_PRESIGNED, [("Host", EX_HOST)])
    assert authenticate(req, EX_SECRETS, now=datetime(2013, 5, 24, 12)).scheme == "v4-query"
    raises(AccessDenied, lambda: authenticate(req, EX_SECRETS, now=datetime(2013, 5, 25, 0, 0, 1)))


def test_canonical_encoding_shortcut_agrees_with_decode_and_reencode() -> None:
    # The shortcut returns already-canonical text as it is; it must never
    # differ from decoding and re-encoding, for any escape or character.
    import random
    from urllib.parse import quote, unquote_to_bytes

    from nearstore.gateway.auth import _canonical_part, _canonical_uri

    pieces = [f"%{b:02X}" for b in range(256)] + [f"%{b:02x}" for b in range(256)]
    pieces += [chr(c) for c in range(32, 127)] + ["é", "%", "%2", "%G0"]
    rng = random.Random(7)
    samples = pieces + ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))) for _ in range(20000)]
    for text in samples:
        # A query part is form-decoded ('+' a space, as the router reads it).
        assert _canonical_part(text) == quote(unquote_to_bytes(text.replace("+", " ")), safe=""), text
        assert _canonical_uri("/b/" + text) == quote(unquote_to_bytes("/b/" + text), safe="/"), text


def test_v2_signs_sub_resources_by_the_name_the_router_reads() -> None:
    """Security review: "?%75ploads" is ?uploads to the router; a signature
    that did not cover it must not pass."""
    req = signed_with(HmacV1QueryAuth(CREDS, expires=60), "GET", f"{ENDPOINT}/bkt/k")
    authenticate(req, SECRETS)
    for extra in ("%75ploads", "upl%6Fads=", "t%61gging"):
        smuggled = replace(req, raw_query=req.raw_query + "&" + extra)
        raises(SignatureDoesNotMatch, lambda r=smuggled: authenticate(r, SECRETS))  # type: ignore[misc]
    header_signed = signed_with(HmacV1Auth(CREDS), "GET", f"{ENDPOINT}/bkt/k")
    raises(SignatureDoesNotMatch, lambda: authenticate(replace(header_signed, raw_query="%61cl"), SECRETS))


def test_v2_presigned_urls_live_at_most_a_week() -> None:
    now = datetime.now(UTC)
    ok = signed_with(HmacV1QueryAuth(CREDS, expires=7 * 86400 - 60), "GET", f"{ENDPOINT}/bkt/k")
    authenticate(ok, SECRETS, now=now)
    forever = signed_with(HmacV1QueryAuth(CREDS, expires=10 * 365 * 86400), "GET", f"{ENDPOINT}/bkt/k")
    raises(AccessDenied, lambda: authenticate(forever, SECRETS, now=now), match="less than a week")


@pytest.mark.parametrize("raw", ["prefix=a+b", "prefix=a%2Bb", "prefix=a%20b+c", "versionId=x+y%2Bz", "a+b=c+d"])
def test_auth_and_routing_read_a_query_alike(raw: str) -> None:
    """Security review: '+' was a space to the router and a plus to auth."""
    from nearstore.gateway.auth import _query_pairs, _query_params
    from nearstore.gateway.request import parse_query

    assert _query_params(_query_pairs(raw)) == dict(parse_query(raw))

"""gateway.payload: every body form S3 accepts, fed through real aiohttp streams.

Vectors: the AWS sigv4-streaming and sigv4-streaming-trailers examples (66560
bytes of 'a' in 64 KiB + 1 KiB chunks), bodies botocore itself builds for
PutObject, and chunk chains signed here for the cases the examples lack.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import boto3
import pytest
from aiohttp import web
from aiohttp.http_exceptions import ContentLengthError
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from nearstore.gateway import checksums, errors, payload
from nearstore.gateway.payload import Payload

# --- fixtures and helpers ------------------------------------------------------------

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DATE = "20130524T000000Z"
SCOPE = "20130524/us-east-1/s3/aws4_request"
EMPTY = hashlib.sha256(b"").hexdigest()


def signing_key(secret: str = SECRET) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in SCOPE.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


KEY = signing_key()


@dataclass(frozen=True)
class Auth:
    """The shape of gateway.auth.AuthContext."""

    access_key: str = "AKIAIOSFODNN7EXAMPLE"
    scheme: Literal["v4", "v4-query", "v2", "v2-query", "post-v4", "post-v2"] = "v4"
    content_sha256: str | None = None
    signing_key: bytes | None = None
    seed_signature: str | None = None
    amz_date: str | None = None
    scope: str | None = None


def v4(content_sha256: str | None, seed: str = "0" * 64, key: bytes = KEY) -> Auth:
    return Auth(
        content_sha256=content_sha256,
        signing_key=key,
        seed_signature=seed,
        amz_date=DATE,
        scope=SCOPE,
    )


V2 = Auth(scheme="v2")


class _Protocol:
    """What aiohttp.StreamReader asks of its protocol."""

    connected = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def reader() -> aiohttp.StreamReader:
    return aiohttp.StreamReader(_Protocol(), 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]


def split(data: bytes, size: int | None) -> list[bytes]:
    if size is None:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


async def run(
    body: bytes | Iterable[bytes],
    headers: Mapping[str, str],
    auth: Auth = V2,
    *,
    eof: bool = True,
    max_size: int = 5 * 1024**3,
) -> tuple[Payload, bytes]:
    """Feed ``body`` (one block or several, the stream waiting in between)
    into a real StreamReader and iterate a Payload over it to the end.

    A guard timeout turns any hang into a failure.
    """
    pieces = [body] if isinstance(body, bytes) else list(body)
    stream = reader()
    p = Payload(stream, headers, auth, max_size=max_size)

    async def feed() -> None:
        for piece in pieces:
            stream.feed_data(piece)
            for _ in range(3):
                await asyncio.sleep(0)
        if eof:
            stream.feed_eof()

    async def consume() -> bytes:
        out = bytearray()
        async for chunk in p.chunks():
            assert isinstance(chunk, bytes | memoryview)
            out += chunk
        return bytes(out)

    feeder = asyncio.create_task(feed())
    try:
        data = await asyncio.wait_for(consume(), timeout=10)
    finally:
        await feeder
    return p, data


async def fails(
    error: type[errors.S3Error],
    body: bytes | Iterable[bytes],
    headers: Mapping[str, str],
    auth: Auth = V2,
    **kwargs: Any,
) -> errors.S3Error:
    with pytest.raises(error) as info:
        await run(body, headers, auth, **kwargs)
    assert type(info.value) is error
    return info.value


def b64(algorithm: str, data: bytes) -> str:
    h = checksums.new_checksum(algorithm)
    h.update(data)
    return h.b64()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def cl(data: bytes, **more: str) -> dict[str, str]:
    return {"Content-Length": str(len(data)), **more}


# --- signed chains built here -------------------------------------------------------


def chunk_signature(previous: str, data: bytes, key: bytes = KEY) -> str:
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256-PAYLOAD", DATE, SCOPE, previous, EMPTY, hashlib.sha256(data).hexdigest()]
    )
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def trailer_signature(previous: str, trailers: list[tuple[str, str]], key: bytes = KEY) -> str:
    canonical = "".join(f"{n}:{v}\n" for n, v in trailers).encode()
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256-TRAILER", DATE, SCOPE, previous, hashlib.sha256(canonical).hexdigest()]
    )
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def signed_body(
    chunks: list[bytes],
    seed: str = "0" * 64,
    trailers: list[tuple[str, str]] | None = None,
) -> bytes:
    """aws-chunked with chunk signatures, the final chunk and (if given) a
    signed trailer, framed as the SDKs do."""
    out = bytearray()
    previous = seed
    for data in [*chunks, b""]:
        previous = chunk_signature(previous, data)
        out += b"%x;chunk-signature=%s\r\n" % (len(data), previous.encode())
        if data:
            out += data + b"\r\n"
    if trailers is None:
        return bytes(out + b"\r\n")
    for name, value in trailers:
        out += f"{name}:{value}\r\n".encode()
    out += f"x-amz-trailer-signature:{trailer_signature(previous, trailers)}\r\n\r\n".encode()
    return bytes(out)


def unsigned_body(chunks: list[bytes], trailers: list[tuple[str, str]] | None = None) -> bytes:
    out = bytearray()
    for data in chunks:
        out += b"%x\r\n" % len(data) + data + b"\r\n"
    out += b"0\r\n"
    for name, value in trailers or []:
        out += f"{name}:{value}\r\n".encode()
    return bytes(out + b"\r\n")


def streaming(mode: str, decoded: int | None, **more: str) -> dict[str, str]:
    headers = {
        "Transfer-Encoding": "chunked",
        "Content-Encoding": "aws-chunked",
        "x-amz-content-sha256": mode,
        **more,
    }
    if decoded is not None:
        headers["x-amz-decoded-content-length"] = str(decoded)
    return headers


SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"

# --- the AWS documentation examples -------------------------------------------------

# sigv4-streaming, "Example: PUT Object": seed signature and chunk signatures
# as the page lists them.
DOC_SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
DOC_SIGNATURES = (
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
)
DOC_DATA = b"a" * 66560
DOC_BODY = (
    b"10000;chunk-signature=" + DOC_SIGNATURES[0].encode() + b"\r\n" + b"a" * 65536 + b"\r\n"
    b"400;chunk-signature=" + DOC_SIGNATURES[1].encode() + b"\r\n" + b"a" * 1024 + b"\r\n"
    b"0;chunk-signature=" + DOC_SIGNATURES[2].encode() + b"\r\n\r\n"
)
DOC_HEADERS = {
    "Content-Encoding": "aws-chunked",
    "Content-Length": "66824",
    "x-amz-content-sha256": SIGNED,
    "x-amz-date": DATE,
    "x-amz-decoded-content-length": "66560",
    "x-amz-storage-class": "REDUCED_REDUNDANCY",
}

# sigv4-streaming-trailers: the same object with a CRC32C trailer.
DOC_TRAILER_SEED = "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e"
DOC_TRAILER_SIGNATURES = (
    "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
    "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
    "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
)
DOC_TRAILER_SIGNATURE = "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435"
DOC_CRC32C = "sOO8/Q=="


def doc_trailer_body(
    *, sdk_form: bool, value: str = DOC_CRC32C, signature: str = DOC_TRAILER_SIGNATURE
) -> bytes:
    """The trailer example; ``sdk_form`` frames it as the SDKs do, otherwise
    as the page does (a blank line before the trailer, none after)."""
    sigs = DOC_TRAILER_SIGNATURES
    body = (
        b"10000;chunk-signature=" + sigs[0].encode() + b"\r\n" + b"a" * 65536 + b"\r\n"
        b"400;chunk-signature=" + sigs[1].encode() + b"\r\n" + b"a" * 1024 + b"\r\n"
        b"0;chunk-signature=" + sigs[2].encode() + b"\r\n"
    )
    if not sdk_form:
        body += b"\r\n"
    body += f"x-amz-checksum-crc32c:{value}\r\nx-amz-trailer-signature:{signature}\r\n".encode()
    return body + b"\r\n" if sdk_form else body


DOC_TRAILER_HEADERS = {
    "Content-Encoding": "aws-chunked",
    "x-amz-content-sha256": SIGNED_TRAILER,
    "x-amz-decoded-content-length": "66560",
    "x-amz-trailer": "x-amz-checksum-crc32c",
    "Transfer-Encoding": "chunked",
}


def test_doc_signing_key_and_first_chunk_signature() -> None:
    # The example's own arithmetic, before any framing.
    assert chunk_signature(DOC_SEED, b"a" * 65536) == DOC_SIGNATURES[0]
    assert chunk_signature(DOC_SIGNATURES[0], b"a" * 1024) == DOC_SIGNATURES[1]
    assert chunk_signature(DOC_SIGNATURES[1], b"") == DOC_SIGNATURES[2]


@pytest.mark.parametrize("block", [None, 3, 97, 4096, 65537])
async def test_doc_signed_chunks(block: int | None) -> None:
    p, data = await run(split(DOC_BODY, block), DOC_HEADERS, v4(SIGNED, DOC_SEED))
    assert len(DOC_BODY) == 66824  # the example's Content-Length
    assert data == DOC_DATA
    assert p.size == 66560
    assert p.md5_hex == hashlib.md5(DOC_DATA).hexdigest()
    assert p.checksum is None
    assert p.content_encoding is None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda b: b.replace(b"a" * 10, b"a" * 9 + b"b", 1),  # first chunk's data
        lambda b: b[:-1100] + b"b" + b[-1099:],  # second chunk's data
        lambda b: b.replace(DOC_SIGNATURES[1].encode(), b"1" * 64),
        lambda b: b.replace(DOC_SIGNATURES[2].encode(), b"2" * 64),
        lambda b: b.replace(DOC_SIGNATURES[0].encode(), DOC_SIGNATURES[0].upper().encode()),
    ],
    ids=["data-1", "data-2", "signature-2", "final-signature", "upper-case-hex"],
)
async def test_doc_signed_chunks_tampered(tamper: Any) -> None:
    await fails(errors.SignatureDoesNotMatch, tamper(DOC_BODY), DOC_HEADERS, v4(SIGNED, DOC_SEED))


async def test_doc_signed_chunks_wrong_seed_or_key() -> None:
    await fails(errors.SignatureDoesNotMatch, DOC_BODY, DOC_HEADERS, v4(SIGNED, "0" * 64))
    wrong_key = v4(SIGNED, DOC_SEED, key=signing_key("not the secret"))
    await fails(errors.SignatureDoesNotMatch, DOC_BODY, DOC_HEADERS, wrong_key)


@pytest.mark.parametrize("decoded", ["66559", "66561", "0"])
async def test_doc_decoded_length_must_match(decoded: str) -> None:
    headers = {**DOC_HEADERS, "x-amz-decoded-content-length": decoded}
    error = await fails(errors.IncompleteBody, DOC_BODY, headers, v4(SIGNED, DOC_SEED))
    assert error.fields["NumberBytesExpected"] == decoded


@pytest.mark.parametrize("decoded", [None, "abc", "-1", ""])
async def test_signed_stream_needs_a_decoded_length(decoded: str | None) -> None:
    headers = {k: v for k, v in DOC_HEADERS.items() if k != "x-amz-decoded-content-length"}
    if decoded is not None:
        headers["x-amz-decoded-content-length"] = decoded
    with pytest.raises(errors.MissingContentLength) as info:
        Payload(reader(), headers, v4(SIGNED, DOC_SEED))
    assert info.value.status == 411


@pytest.mark.parametrize("cut", [1, 2, 50, 86, 88, 40000, 65624, 65626, 66800, 66822, 66823])
async def test_doc_truncated(cut: int) -> None:
    await fails(errors.IncompleteBody, DOC_BODY[:cut], DOC_HEADERS, v4(SIGNED, DOC_SEED))


@pytest.mark.parametrize("sdk_form", [True, False], ids=["sdk-framing", "doc-framing"])
@pytest.mark.parametrize("block", [None, 7, 4096])
async def test_doc_signed_trailer(sdk_form: bool, block: int | None) -> None:
    body = doc_trailer_body(sdk_form=sdk_form)
    p, data = await run(
        split(body, block), DOC_TRAILER_HEADERS, v4(SIGNED_TRAILER, DOC_TRAILER_SEED)
    )
    assert data == DOC_DATA
    assert p.checksum == ("CRC32C", DOC_CRC32C)
    assert b64("CRC32C", DOC_DATA) == DOC_CRC32C


async def test_doc_signed_trailer_tampered() -> None:
    auth = v4(SIGNED_TRAILER, DOC_TRAILER_SEED)
    # Another valid CRC32C: the trailer signature covers the value.
    other = doc_trailer_body(sdk_form=True, value=b64("CRC32C", b"b"))
    await fails(errors.SignatureDoesNotMatch, other, DOC_TRAILER_HEADERS, auth)
    bad_sig = doc_trailer_body(sdk_form=True, signature="3" * 64)
    await fails(errors.SignatureDoesNotMatch, bad_sig, DOC_TRAILER_HEADERS, auth)
    no_sig = doc_trailer_body(sdk_form=True).replace(
        f"x-amz-trailer-signature:{DOC_TRAILER_SIGNATURE}\r\n".encode(), b""
    )
    await fails(errors.SignatureDoesNotMatch, no_sig, DOC_TRAILER_HEADERS, auth)
    data_changed = doc_trailer_body(sdk_form=True).replace(b"aaaa\r\n", b"aaab\r\n", 1)
    await fails(errors.SignatureDoesNotMatch, data_changed, DOC_TRAILER_HEADERS, auth)


async def test_doc_signed_trailer_must_be_the_declared_one() -> None:
    headers = {**DOC_TRAILER_HEADERS, "x-amz-trailer": "x-amz-checksum-crc32"}
    error = await fails(
        errors.MalformedTrailerError,
        doc_trailer_body(sdk_form=True),
        headers,
        v4(SIGNED_TRAILER, DOC_TRAILER_SEED),
    )
    assert "trailing data" in error.text


# --- botocore's own bodies -----------------------------------------------------------


def botocore_put(
    body: bytes, *, https: bool = True, algorithm: str | None = None, **params: str
) -> tuple[dict[str, str], bytes]:
    """The headers and wire body of a PutObject that boto3 really sends."""
    captured: dict[str, Any] = {}

    def before_send(request: Any, **_: Any) -> AWSResponse:
        sent = request.body
        captured["body"] = sent.read() if hasattr(sent, "read") else (sent or b"")
        captured["headers"] = {
            k: v.decode() if isinstance(v, bytes) else str(v) for k, v in request.headers.items()
        }

        class Raw:
            def stream(self, **_: Any) -> Iterable[bytes]:
                return iter([b""])

        return AWSResponse(request.url, 200, {"ETag": '"x"'}, Raw())

    client = boto3.client(
        "s3",
        endpoint_url=("https" if https else "http") + "://s3.example.com",
        region_name="us-east-1",
        aws_access_key_id="AKID",
        aws_secret_access_key="SECRET",
        config=Config(s3={"addressing_style": "path"}),
    )
    client.meta.events.register("before-send.s3.PutObject", before_send)
    if algorithm is not None:
        params["ChecksumAlgorithm"] = algorithm
    client.put_object(Bucket="b", Key="k", Body=body, **params)
    return captured["headers"], captured["body"]


def auth_for(headers: Mapping[str, str]) -> Auth:
    return Auth(content_sha256=headers["x-amz-content-sha256"])


BOTO_SIZES = [0, 1, 33, 1024 * 1024, 2 * 1024 * 1024 + 17]


@pytest.mark.parametrize("size", BOTO_SIZES)
@pytest.mark.parametrize("algorithm", [None, *checksums.ALGORITHMS])
async def test_botocore_https_trailer_body(size: int, algorithm: str | None) -> None:
    data = os.urandom(size)
    headers, wire = botocore_put(data, algorithm=algorithm)
    alg = algorithm or "CRC32"  # boto3's default when_supported checksum
    assert headers["x-amz-content-sha256"] == UNSIGNED_TRAILER
    assert headers["X-Amz-Trailer"] == checksums.header_name(alg)
    assert "Content-Length" not in headers
    p, out = await run(split(wire, 65536), headers, auth_for(headers))
    assert out == data
    assert p.size == size
    assert p.md5_hex == hashlib.md5(data).hexdigest()
    assert p.checksum == (alg, b64(alg, data))
    assert p.content_encoding is None


async def test_botocore_keeps_the_callers_content_encoding() -> None:
    headers, wire = botocore_put(b"zipped", ContentEncoding="gzip")
    assert headers["Content-Encoding"] == "gzip,aws-chunked"
    p, out = await run(wire, headers, auth_for(headers))
    assert out == b"zipped"
    assert p.content_encoding == "gzip"


@pytest.mark.parametrize("block", [1, 5])
async def test_botocore_body_fed_byte_by_byte(block: int) -> None:
    headers, wire = botocore_put(b"hello world" * 3)
    p, out = await run(split(wire, block), headers, auth_for(headers))
    assert out == b"hello world" * 3
    assert p.checksum == ("CRC32", "lrVJrA==")


async def test_botocore_body_tampered() -> None:
    data = b"x" * 5000
    headers, wire = botocore_put(data)
    flipped = wire.replace(b"xxxx", b"xxxy", 1)
    error = await fails(errors.BadDigest, flipped, headers, auth_for(headers))
    assert error.text == "The CRC32 you specified did not match the calculated checksum."
    wrong = wire.replace(b64("CRC32", data).encode(), b64("CRC32", b"other").encode())
    await fails(errors.BadDigest, wrong, headers, auth_for(headers))


async def test_botocore_truncated_everywhere() -> None:
    headers, wire = botocore_put(b"hello world" * 3)
    end_of_trailer = wire.index(b"==\r\n") + 4
    for cut in range(len(wire)):
        if cut == end_of_trailer:
            # Only the closing blank line missing: accepted, as the AWS
            # trailer example ends this way.
            p, _ = await run(wire[:cut], headers, auth_for(headers))
            assert p.checksum == ("CRC32", "lrVJrA==")
            continue
        with pytest.raises((errors.IncompleteBody, errors.MalformedTrailerError)):
            await run(wire[:cut], headers, auth_for(headers))


@pytest.mark.parametrize("algorithm", [None, *checksums.ALGORITHMS])
async def test_botocore_http_header_body(algorithm: str | None) -> None:
    data = os.urandom(70000)
    headers, wire = botocore_put(data, https=False, algorithm=algorithm)
    alg = algorithm or "CRC32"
    assert headers["x-amz-content-sha256"] == hashlib.sha256(data).hexdigest()
    assert wire == data
    p, out = await run(split(wire, 8192), headers, auth_for(headers))
    assert out == data
    assert p.checksum == (alg, b64(alg, data))


async def test_botocore_http_body_tampered() -> None:
    data = os.urandom(1000)
    headers, _ = botocore_put(data, https=False)
    tampered = bytes([data[0] ^ 1]) + data[1:]
    error = await fails(errors.XAmzContentSHA256Mismatch, tampered, headers, auth_for(headers))
    assert error.fields["ClientComputedContentSHA256"] == hashlib.sha256(data).hexdigest()
    assert error.fields["S3ComputedContentSHA256"] == hashlib.sha256(tampered).hexdigest()


async def test_botocore_content_md5() -> None:
    data = b"with an md5"
    headers, wire = botocore_put(data, https=False, ContentMD5=md5_b64(data))
    p, _ = await run(wire, headers, auth_for(headers))
    assert p.md5_hex == hashlib.md5(data).hexdigest()


# --- plain bodies -------------------------------------------------------------------


async def test_plain_body() -> None:
    p, data = await run([b"hello ", b"world"], {"Content-Length": "11"})
    assert data == b"hello world"
    assert p.size == 11
    assert p.md5_hex == hashlib.md5(b"hello world").hexdigest()
    assert p.checksum is None


async def test_empty_body() -> None:
    p, data = await run([], {"Content-Length": "0"}, v4("UNSIGNED-PAYLOAD"))
    assert data == b""
    assert p.md5_hex == "d41d8cd98f00b204e9800998ecf8427e"


async def test_plain_body_ends_short() -> None:
    error = await fails(errors.IncompleteBody, b"hello", {"Content-Length": "11"})
    assert error.fields == {"NumberBytesExpected": "11", "NumberBytesProvided": "5"}


async def test_plain_body_longer_than_content_length() -> None:
    await fails(errors.IncompleteBody, b"hello world!", {"Content-Length": "11"})


async def test_no_content_length() -> None:
    for headers in ({}, {"Content-Type": "text/plain"}, {"Transfer-Encoding": "identity"}):
        with pytest.raises(errors.MissingContentLength):
            Payload(reader(), headers, V2)
    with pytest.raises(errors.MissingContentLength):
        Payload(reader(), {"Content-Encoding": "aws-chunked"}, v4(UNSIGNED_TRAILER))


async def test_transfer_encoding_chunked_needs_no_content_length() -> None:
    _, data = await run([b"a", b"b"], {"Transfer-Encoding": "chunked"})
    assert data == b"ab"


async def test_entity_too_large() -> None:
    with pytest.raises(errors.EntityTooLarge) as info:
        Payload(reader(), {"Content-Length": "11"}, V2, max_size=10)
    assert info.value.fields == {"ProposedSize": "11", "MaxSizeAllowed": "10"}
    with pytest.raises(errors.EntityTooLarge):
        Payload(reader(), streaming(UNSIGNED_TRAILER, 11), V2, max_size=10)
    # Unknown sizes are counted as they come.
    await fails(
        errors.EntityTooLarge, [b"123456", b"78901"], {"Transfer-Encoding": "chunked"}, max_size=10
    )
    body = unsigned_body([b"123456", b"78901"])
    await fails(errors.EntityTooLarge, body, streaming(UNSIGNED_TRAILER, None), max_size=10)
    # A chunk header alone is enough: the data is not waited for.
    await fails(
        errors.EntityTooLarge, b"b\r\n", streaming(UNSIGNED_TRAILER, None), eof=False, max_size=10
    )
    _, data = await run(b"1234567890", {"Content-Length": "10"}, max_size=10)
    assert data == b"1234567890"


@pytest.mark.parametrize("upper", [False, True])
async def test_hex_content_sha256(upper: bool) -> None:
    digest = hashlib.sha256(b"payload").hexdigest()
    auth = v4(digest.upper() if upper else digest)
    _, data = await run(b"payload", cl(b"payload"), auth)
    assert data == b"payload"
    await fails(errors.XAmzContentSHA256Mismatch, b"Payload", cl(b"payload"), auth)


async def test_hex_content_sha256_from_the_header_when_auth_has_none() -> None:
    headers = cl(b"x", **{"x-amz-content-sha256": hashlib.sha256(b"y").hexdigest()})
    await fails(errors.XAmzContentSHA256Mismatch, b"x", headers, V2)


async def test_unsigned_payload_and_v2() -> None:
    _, data = await run(b"abc", cl(b"abc"), v4("UNSIGNED-PAYLOAD"))
    assert data == b"abc"
    _, data = await run(b"abc", cl(b"abc"), V2)
    assert data == b"abc"


async def test_content_sha256_values() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        Payload(reader(), {"Content-Length": "0"}, v4("STREAMING-SOMETHING-ELSE"))
    assert info.value.fields["ArgumentName"] == "x-amz-content-sha256"
    with pytest.raises(errors.InvalidArgument):
        Payload(reader(), {"Content-Length": "0"}, v4("abc123"))
    for sigv4a in (
        "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD",
        "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER",
    ):
        with pytest.raises(errors.NotImplemented) as not_implemented:
            Payload(reader(), streaming(sigv4a, 0), v4(sigv4a))
        assert not_implemented.value.status == 501


async def test_signed_stream_needs_sigv4_material() -> None:
    # A SigV2 request claiming signed chunks has no key to check them with.
    with pytest.raises(errors.InvalidRequest):
        Payload(reader(), streaming(SIGNED, 0, **{"x-amz-content-sha256": SIGNED}), V2)


# --- Content-MD5 --------------------------------------------------------------------


async def test_content_md5() -> None:
    data = b"some bytes"
    p, _ = await run(data, cl(data, **{"Content-MD5": md5_b64(data)}))
    assert p.md5_hex == hashlib.md5(data).hexdigest()
    error = await fails(errors.BadDigest, b"other byte", cl(data, **{"Content-MD5": md5_b64(data)}))
    assert error.text == errors.BadDigest.message
    assert error.fields == {
        "ExpectedDigest": md5_b64(data),
        "CalculatedDigest": md5_b64(b"other byte"),
    }


@pytest.mark.parametrize("value", ["", "not base64!", base64.b64encode(b"x" * 15).decode(), "AAAA"])
async def test_content_md5_malformed(value: str) -> None:
    with pytest.raises(errors.InvalidDigest):
        Payload(reader(), {"Content-Length": "1", "Content-MD5": value}, V2)


# --- x-amz-checksum-* ---------------------------------------------------------------


@pytest.mark.parametrize("algorithm", checksums.ALGORITHMS)
async def test_checksum_header(algorithm: str) -> None:
    data = os.urandom(3000)
    name = checksums.header_name(algorithm)
    p, _ = await run(data, cl(data, **{name: b64(algorithm, data)}))
    assert p.checksum == (algorithm, b64(algorithm, data))
    error = await fails(errors.BadDigest, data, cl(data, **{name: b64(algorithm, b"other")}))
    assert error.text == f"The {algorithm} you specified did not match the calculated checksum."


async def test_checksum_header_name_in_any_case() -> None:
    p, _ = await run(b"abc", cl(b"abc", **{"X-Amz-Checksum-CRC32C": b64("CRC32C", b"abc")}))
    assert p.checksum == ("CRC32C", b64("CRC32C", b"abc"))


@pytest.mark.parametrize("value", ["", "AAAA", "!!!!!!!!"])
async def test_checksum_header_malformed(value: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        Payload(reader(), {"Content-Length": "1", "x-amz-checksum-sha256": value}, V2)
    assert info.value.text == "Value for x-amz-checksum-sha256 header is invalid."


async def test_two_checksums() -> None:
    for second in (b64("CRC32C", b"a"), ""):
        headers = {
            "Content-Length": "1",
            "x-amz-checksum-crc32": "",
            "x-amz-checksum-crc32c": second,
        }
        with pytest.raises(errors.InvalidRequest) as info:
            Payload(reader(), headers, V2)
        assert info.value.text == (
            "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."
        )
    # A header and a trailer are two as well.
    headers = streaming(
        UNSIGNED_TRAILER,
        1,
        **{"x-amz-trailer": "x-amz-checksum-crc32", "x-amz-checksum-sha1": b64("SHA1", b"a")},
    )
    with pytest.raises(errors.InvalidRequest, match="Expecting a single"):
        Payload(reader(), headers, v4(UNSIGNED_TRAILER))


async def test_unknown_checksum_header() -> None:
    with pytest.raises(errors.InvalidRequest, match="algorithm type"):
        Payload(reader(), {"Content-Length": "1", "x-amz-checksum-foo": "AAAAAA=="}, V2)


async def test_other_checksum_headers_are_not_values() -> None:
    headers = cl(
        b"abc",
        **{
            "x-amz-checksum-type": "FULL_OBJECT",
            "x-amz-checksum-algorithm": "CRC32",
            "x-amz-checksum-mode": "ENABLED",
        },
    )
    p, _ = await run(b"abc", headers)
    assert p.checksum is None


async def test_sdk_checksum_algorithm() -> None:
    data = b"abc"
    ok = cl(
        data,
        **{"x-amz-sdk-checksum-algorithm": "crc32", "x-amz-checksum-crc32": b64("CRC32", data)},
    )
    p, _ = await run(data, ok)
    assert p.checksum == ("CRC32", b64("CRC32", data))
    with pytest.raises(errors.InvalidRequest) as info:
        Payload(reader(), cl(data, **{"x-amz-sdk-checksum-algorithm": "CRC32"}), V2)
    assert info.value.text == (
        "x-amz-sdk-checksum-algorithm specified, but no corresponding x-amz-checksum-* "
        "or x-amz-trailer headers were found."
    )
    for sdk in ("CRC32C", "MD4"):
        bad = cl(
            data,
            **{"x-amz-sdk-checksum-algorithm": sdk, "x-amz-checksum-crc32": b64("CRC32", data)},
        )
        with pytest.raises(errors.InvalidRequest) as info:
            Payload(reader(), bad, V2)
        assert info.value.text == "Value for x-amz-sdk-checksum-algorithm header is invalid."
    trailer = streaming(
        UNSIGNED_TRAILER,
        1,
        **{"x-amz-trailer": "x-amz-checksum-sha256", "x-amz-sdk-checksum-algorithm": "CRC32"},
    )
    with pytest.raises(
        errors.InvalidRequest, match="x-amz-sdk-checksum-algorithm header is invalid"
    ):
        Payload(reader(), trailer, v4(UNSIGNED_TRAILER))


# --- aws-chunked framing ------------------------------------------------------------


def unsigned(decoded: int | None, trailer: str | None = "x-amz-checksum-crc32") -> dict[str, str]:
    return streaming(UNSIGNED_TRAILER, decoded, **({"x-amz-trailer": trailer} if trailer else {}))


UNSIGNED_AUTH = v4(UNSIGNED_TRAILER)


def crc_trailer(data: bytes) -> list[tuple[str, str]]:
    return [("x-amz-checksum-crc32", b64("CRC32", data))]


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # not hex
        b"+3\r\nabc\r\n0\r\n\r\n",
        b"0x3\r\nabc\r\n0\r\n\r\n",
        b" 3\r\nabc\r\n0\r\n\r\n",
        b"\r\nabc\r\n0\r\n\r\n",  # no size at all
        b"10000000000000000\r\n",  # 17 hex digits
        b"3\nabc\r\n0\r\n\r\n",  # bare LF
        b"3\r\nabcd\r\n0\r\n\r\n",  # chunk longer than its size line
        b"5\r\nabc\r\n0\r\n\r\n",  # shorter
        b"3\r\nabc0\r\n\r\n",  # no CRLF after the data
        b"3\r\nabc\r\n0\r\n\r\nXYZ",  # bytes after the end
        b"3\r\nabc\r\n0\r\n\r\n\r\n",
        b"3\r\nabc\r\n0\r\n",  # no closing blank line
        b"3\r\nabc\r\n",  # no final chunk
        b"3;ext=1\r\nabc\r\n0\r\n\r\n",  # extensions on unsigned chunks
    ],
)
async def test_bad_framing_unsigned(body: bytes) -> None:
    headers = unsigned(None, trailer=None)
    for block in (None, 1):
        await fails(errors.IncompleteBody, split(body, block), headers, UNSIGNED_AUTH)


async def test_unsigned_without_trailer_and_without_decoded_length() -> None:
    p, data = await run(unsigned_body([b"abc", b"de"]), unsigned(None, trailer=None), UNSIGNED_AUTH)
    assert data == b"abcde"
    assert p.checksum is None


async def test_aws_chunked_with_unsigned_payload() -> None:
    # Content-Encoding: aws-chunked alone (UNSIGNED-PAYLOAD or no value)
    # frames the body as unsigned chunks.
    headers = {
        "Transfer-Encoding": "chunked",
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "3",
    }
    body = unsigned_body([b"abc"], crc_trailer(b"abc"))
    p, data = await run(
        body, {**headers, "x-amz-trailer": "x-amz-checksum-crc32"}, v4("UNSIGNED-PAYLOAD")
    )
    assert (data, p.checksum) == (b"abc", ("CRC32", b64("CRC32", b"abc")))
    _, data = await run(unsigned_body([b"abc"]), headers, V2)
    assert data == b"abc"


async def test_aws_chunked_with_hex_sha256_covers_the_wire() -> None:
    wire = unsigned_body([b"abc"])
    headers = {"Content-Length": str(len(wire)), "Content-Encoding": "aws-chunked"}
    _, data = await run(wire, headers, v4(hashlib.sha256(wire).hexdigest()))
    assert data == b"abc"
    await fails(
        errors.XAmzContentSHA256Mismatch, wire, headers, v4(hashlib.sha256(b"abc").hexdigest())
    )


async def test_trailers() -> None:
    data = b"hello"
    body = unsigned_body([data], crc_trailer(data))
    p, _ = await run(body, unsigned(5), UNSIGNED_AUTH)
    assert p.checksum == ("CRC32", b64("CRC32", data))
    # Upper case and spaces around the value are tolerated.
    spaced = body.replace(b"x-amz-checksum-crc32:", b"X-Amz-Checksum-CRC32: ")
    p, _ = await run(spaced, unsigned(5), UNSIGNED_AUTH)
    assert p.checksum == ("CRC32", b64("CRC32", data))


@pytest.mark.parametrize(
    ("trailers", "declared"),
    [
        ([], "x-amz-checksum-crc32"),  # declared, not sent
        ([("x-amz-checksum-crc32c", "AAAAAA==")], "x-amz-checksum-crc32"),  # another one
        ([("x-amz-checksum-crc32", "AAAAAA==")], None),  # sent, not declared
        (
            [("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-checksum-crc32", "AAAAAA==")],
            "x-amz-checksum-crc32",
        ),
        ([("x-amz-trailer-signature", "0" * 64)], None),  # a signature on an unsigned stream
    ],
)
async def test_trailer_not_as_declared(
    trailers: list[tuple[str, str]], declared: str | None
) -> None:
    body = unsigned_body([b"hello"], trailers)
    error = await fails(errors.MalformedTrailerError, body, unsigned(5, declared), UNSIGNED_AUTH)
    assert error.text.startswith("The request contained trailing data that was not well-formed")


@pytest.mark.parametrize(
    "line", [b"no colon here", b":AAAAAA==", b"x-amz-checksum-crc32\xff:AAAAAA=="]
)
async def test_trailer_line_malformed(line: bytes) -> None:
    body = b"5\r\nhello\r\n0\r\n" + line + b"\r\n\r\n"
    await fails(errors.MalformedTrailerError, body, unsigned(5), UNSIGNED_AUTH)


async def test_trailer_value_malformed() -> None:
    body = unsigned_body([b"hello"], [("x-amz-checksum-crc32", "not-base64")])
    error = await fails(errors.InvalidRequest, body, unsigned(5), UNSIGNED_AUTH)
    assert error.text == "Value for x-amz-checksum-crc32 header is invalid."


async def test_trailer_declarations() -> None:
    with pytest.raises(errors.MalformedTrailerError, match="trailing data"):
        Payload(reader(), unsigned(5, "x-amz-checksum-foo"), UNSIGNED_AUTH)
    with pytest.raises(errors.MalformedTrailerError, match="trailing data"):
        Payload(reader(), unsigned(5, "content-md5"), UNSIGNED_AUTH)
    # A stream that cannot carry a trailer must not declare one.
    signed_only = {**DOC_HEADERS, "x-amz-trailer": "x-amz-checksum-crc32"}
    with pytest.raises(errors.MalformedTrailerError, match="trailing data"):
        Payload(reader(), signed_only, v4(SIGNED, DOC_SEED))
    with pytest.raises(errors.MalformedTrailerError, match="trailing data"):
        Payload(reader(), cl(b"x", **{"x-amz-trailer": "x-amz-checksum-crc32"}), V2)


async def test_declared_length_is_checked_before_the_data_arrives() -> None:
    # 0x100 bytes announced against a declared 10: refused on the size line.
    await fails(errors.IncompleteBody, b"100\r\n", unsigned(10), UNSIGNED_AUTH, eof=False)


async def test_garbage_cannot_make_it_buffer() -> None:
    # No CRLF in sight and the stream never ends: refused after MAX_LINE.
    for block in (None, 100, 1):
        garbage = b"f" * (payload.MAX_LINE + 2)
        await fails(
            errors.IncompleteBody, split(garbage, block), unsigned(None), UNSIGNED_AUTH, eof=False
        )
        trailer = b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:" + b"A" * payload.MAX_LINE
        await fails(
            errors.IncompleteBody, split(trailer, block), unsigned(5), UNSIGNED_AUTH, eof=False
        )


async def test_a_line_of_max_length_is_fine() -> None:
    # The trailer value is trimmed, so padding makes a valid line of any length.
    prefix = b"x-amz-checksum-crc32:"
    line = prefix + b" " * (payload.MAX_LINE - len(prefix) - 8) + b"AAAAAA=="
    assert len(line) == payload.MAX_LINE
    p, data = await run(split(b"0\r\n" + line + b"\r\n\r\n", 1000), unsigned(0), UNSIGNED_AUTH)
    assert (data, p.checksum) == (b"", ("CRC32", "AAAAAA=="))
    # One byte more is one too many.
    longer = b"0\r\n" + line.replace(b" ", b"  ", 1) + b"\r\n\r\n"
    await fails(errors.IncompleteBody, split(longer, 1000), unsigned(0), UNSIGNED_AUTH)
    await fails(errors.IncompleteBody, longer, unsigned(0), UNSIGNED_AUTH)


# --- signed chains ------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[8192, 8192, 1], [70000], [8192] * 5 + [100], [1]])
async def test_signed_chains(sizes: list[int]) -> None:
    chunks = [os.urandom(n) for n in sizes]
    data = b"".join(chunks)
    p, out = await run(split(signed_body(chunks), 5000), streaming(SIGNED, len(data)), v4(SIGNED))
    assert out == data
    assert p.md5_hex == hashlib.md5(data).hexdigest()


async def test_signed_empty_body() -> None:
    p, out = await run(signed_body([]), streaming(SIGNED, 0), v4(SIGNED))
    assert out == b""
    assert p.md5_hex == hashlib.md5(b"").hexdigest()


async def test_signed_chunk_under_8_kib_must_be_last() -> None:
    chunks = [b"a" * 8192, b"b" * 8191, b"c" * 8192]
    error = await fails(
        errors.InvalidChunkSizeError, signed_body(chunks), streaming(SIGNED, 24575), v4(SIGNED)
    )
    assert error.status == 403


async def test_signed_chunks_reordered() -> None:
    chunks = [b"a" * 8192, b"b" * 8192, b"c"]
    body = signed_body(chunks)
    first = body.index(b"a" * 8192) - 87
    second = body.index(b"b" * 8192) - 87
    third = body.index(b"1;chunk-signature")
    swapped = body[second:third] + body[first:second] + body[third:]
    await fails(errors.SignatureDoesNotMatch, swapped, streaming(SIGNED, 16385), v4(SIGNED))


@pytest.mark.parametrize(
    "line",
    [
        b"3",
        b"3;chunk-signature=",
        b"3;chunk-signature=abc",
        b"3;sig=" + b"0" * 64,
        b"3;chunk-signature=" + b"g" * 64,
    ],
)
async def test_signed_chunk_without_a_usable_signature(line: bytes) -> None:
    await fails(
        errors.SignatureDoesNotMatch, line + b"\r\nabc\r\n", streaming(SIGNED, 3), v4(SIGNED)
    )


async def test_signed_trailer_built_here() -> None:
    data = os.urandom(20000)
    for algorithm in checksums.ALGORITHMS:
        name = checksums.header_name(algorithm)
        trailers = [(name, b64(algorithm, data))]
        body = signed_body([data[:10000], data[10000:]], trailers=trailers)
        headers = streaming(SIGNED_TRAILER, len(data), **{"x-amz-trailer": name})
        p, out = await run(split(body, 3000), headers, v4(SIGNED_TRAILER))
        assert out == data
        assert p.checksum == (algorithm, b64(algorithm, data))


async def test_signed_trailer_with_a_wrong_checksum() -> None:
    data = b"d" * 9000
    trailers = [("x-amz-checksum-sha1", b64("SHA1", b"not the data"))]
    body = signed_body([data], trailers=trailers)
    headers = streaming(SIGNED_TRAILER, len(data), **{"x-amz-trailer": "x-amz-checksum-sha1"})
    error = await fails(errors.BadDigest, body, headers, v4(SIGNED_TRAILER))
    assert error.text == "The SHA1 you specified did not match the calculated checksum."


# --- transport failures -------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("Connection lost"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        ContentLengthError("Not enough data to satisfy content length header."),
    ],
)
async def test_transport_errors_are_incomplete_body(exc: BaseException) -> None:
    stream = reader()
    p = Payload(stream, {"Content-Length": "100"}, V2)
    stream.feed_data(b"x" * 10)
    got = bytearray()

    async def consume() -> None:
        async for chunk in p.chunks():
            got.extend(chunk)
            stream.set_exception(exc)

    with pytest.raises(errors.IncompleteBody) as info:
        await asyncio.wait_for(consume(), 5)
    assert info.value.__cause__ is exc
    assert bytes(got) == b"x" * 10


async def test_a_payload_is_read_once() -> None:
    p, _ = await run(b"abc", cl(b"abc"))
    with pytest.raises(RuntimeError):
        async for _ in p.chunks():
            pass


async def test_results_only_after_completion() -> None:
    stream = reader()
    data = b"q" * 100
    p = Payload(stream, cl(data, **{"x-amz-checksum-crc32": b64("CRC32", data)}), V2)
    stream.feed_data(data)
    iterator = p.chunks().__aiter__()
    assert await iterator.__anext__() == data
    assert (p.md5_hex, p.checksum) == ("", None)
    stream.feed_eof()
    with pytest.raises(StopAsyncIteration):
        await iterator.__anext__()
    assert p.checksum == ("CRC32", b64("CRC32", data))


async def test_content_encoding_to_store() -> None:
    cases = {
        "aws-chunked": None,
        "gzip,aws-chunked": "gzip",
        "aws-chunked, gzip": "gzip",
        " AWS-CHUNKED , gzip, br ": "gzip,br",
        "gzip": "gzip",
    }
    for sent, stored in cases.items():
        p = Payload(reader(), {"Content-Encoding": sent, "Transfer-Encoding": "chunked"}, V2)
        assert p.content_encoding == stored
    assert Payload(reader(), {"Content-Length": "0"}, V2).content_encoding is None


# --- large bodies: the hashing lane -------------------------------------------------


async def test_large_plain_body_hashes_on_the_lane() -> None:
    data = os.urandom(9 * 1024 * 1024 + 3)  # past MAX_IN_FLIGHT_BYTES too
    sha = hashlib.sha256(data).hexdigest()
    headers = cl(
        data, **{"Content-MD5": md5_b64(data), "x-amz-checksum-crc64nvme": b64("CRC64NVME", data)}
    )
    p, out = await run(split(data, 512 * 1024), headers, v4(sha))
    assert out == data
    assert p._lane is not None
    assert p.checksum == ("CRC64NVME", b64("CRC64NVME", data))
    wrong = {**headers, "x-amz-checksum-crc64nvme": b64("CRC64NVME", b"")}
    await fails(errors.BadDigest, split(data, 512 * 1024), wrong, v4(sha))


async def test_large_signed_body_on_the_lane() -> None:
    chunks = [os.urandom(64 * 1024) for _ in range(80)]
    data = b"".join(chunks)
    body = signed_body(chunks)
    p, out = await run(split(body, 300 * 1024), streaming(SIGNED, len(data)), v4(SIGNED))
    assert out == data
    assert p._lane is not None
    assert p.md5_hex == hashlib.md5(data).hexdigest()
    # A flipped byte deep in the stream: the lane's verdict still arrives.
    i = body.index(chunks[70][:16]) + 5
    tampered = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
    await fails(
        errors.SignatureDoesNotMatch,
        split(tampered, 300 * 1024),
        streaming(SIGNED, len(data)),
        v4(SIGNED),
    )


async def test_large_botocore_body() -> None:
    data = os.urandom(5 * 1024 * 1024 + 1)
    headers, wire = botocore_put(data, algorithm="CRC32C")
    p, out = await run(split(wire, 256 * 1024), headers, auth_for(headers))
    assert out == data
    assert p.checksum == ("CRC32C", b64("CRC32C", data))


# --- through a real aiohttp server --------------------------------------------------


class Server:
    """An aiohttp app whose handler reads the request body through Payload."""

    def __init__(self) -> None:
        self.outcomes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        auth = Auth(content_sha256=request.headers.get("x-amz-content-sha256"))
        outcome: dict[str, Any]
        try:
            p = Payload(request.content, request.headers, auth)
            size = 0
            async for chunk in p.chunks():
                size += len(chunk)
            outcome = {"size": size, "md5": p.md5_hex, "checksum": p.checksum}
        except errors.S3Error as exc:
            outcome = {"error": exc.code}
        self.outcomes.put_nowait(outcome)
        return web.json_response(outcome, status=400 if "error" in outcome else 200)

    async def __aenter__(self) -> Server:
        app = web.Application()
        app.router.add_put("/{key}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def send(self, head: bytes, body: bytes, *, close: bool = False) -> bytes:
        """Raw HTTP: ``close`` drops the connection right after the body."""
        reader_, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(head + body)
        await writer.drain()
        if close:
            writer.transport.abort()
            return b""
        response = await reader_.read()
        writer.close()
        await writer.wait_closed()
        return response


def http_chunked(body: bytes, size: int) -> bytes:
    """``body`` framed with HTTP/1.1 chunked transfer coding."""
    out = bytearray()
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


def request_head(headers: Mapping[str, str]) -> bytes:
    lines = ["PUT /k HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "expect")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_server_botocore_body_over_http_chunked() -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    headers, wire = botocore_put(data)
    async with Server() as server:
        response = await server.send(request_head(headers), http_chunked(wire, 100_000))
        assert b"200 OK" in response.split(b"\r\n")[0]
        outcome = await asyncio.wait_for(server.outcomes.get(), 10)
    assert outcome == {
        "size": len(data),
        "md5": hashlib.md5(data).hexdigest(),
        "checksum": ("CRC32", b64("CRC32", data)),
    }


async def test_server_tampered_body_is_refused() -> None:
    headers, wire = botocore_put(b"z" * 10000)
    wire = wire.replace(b"zzzz", b"zzzZ", 1)
    async with Server() as server:
        response = await server.send(request_head(headers), http_chunked(wire, 4096))
        assert response.split(b"\r\n")[0].endswith(b"400 Bad Request")
        assert json.loads(response.split(b"\r\n\r\n", 1)[1]) == {"error": "BadDigest"}


@pytest.mark.parametrize("chunked", [False, True])
async def test_server_dropped_connection_is_incomplete_body(chunked: bool) -> None:
    if chunked:
        headers, wire = botocore_put(os.urandom(300_000))
        head, body = request_head(headers), http_chunked(wire, 50_000)[:120_000]
    else:
        head, body = request_head({"Content-Length": "1000000"}), os.urandom(200_000)
    async with Server() as server:
        await server.send(head, body, close=True)
        outcome = await asyncio.wait_for(server.outcomes.get(), 10)
    assert outcome == {"error": "IncompleteBody"}

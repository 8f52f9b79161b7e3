"""Small helpers for boto3-level tests: error capture, digests, chunk encodings."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from botocore import httpchecksum
from botocore.exceptions import ClientError

_CHECKSUMS: dict[str, Callable[[], Any]] = {
    "CRC32": httpchecksum.Crc32Checksum,
    "CRC32C": httpchecksum.CrtCrc32cChecksum,
    "CRC64NVME": httpchecksum.CrtCrc64NvmeChecksum,
    "SHA1": httpchecksum.Sha1Checksum,
    "SHA256": httpchecksum.Sha256Checksum,
}
CHECKSUM_ALGORITHMS = list(_CHECKSUMS)


def checksum_b64(algorithm: str, data: bytes) -> str:
    c = _CHECKSUMS[algorithm.upper()]()
    c.update(data)
    return str(c.b64digest())


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def multipart_etag(parts: list[bytes]) -> str:
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    return f'"{digest}-{len(parts)}"'


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (fast for tens of MiB)."""
    block = hashlib.sha256(f"seed-{seed}".encode()).digest() * 128  # 4 KiB
    block = bytes((b + i) & 0xFF for i, b in enumerate(block))
    reps, rest = divmod(size, len(block))
    out = bytearray()
    for i in range(reps):
        out += block[i % 251:] + block[: i % 251]
    out += block[:rest]
    return bytes(out)


def error_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, str]:
    """Call a boto3 method that must fail; (HTTP status, error code)."""
    try:
        fn(*args, **kwargs)
    except ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"]
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded but should have failed")


def status_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    try:
        return int(fn(*args, **kwargs)["ResponseMetadata"]["HTTPStatusCode"])
    except ClientError as e:
        return int(e.response["ResponseMetadata"]["HTTPStatusCode"])


# -- aws-chunked bodies ---------------------------------------------------------


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    k = _hmac(("AWS4" + secret).encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def signed_chunks(data: bytes, chunk_size: int, *, seed_signature: str, amz_date: str,
                  scope: str, key: bytes, trailer: tuple[str, str] | None = None,
                  tamper_chunk: int | None = None) -> bytes:
    """STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER] body: each chunk signed with
    the previous signature; optional signed trailer (name, value)."""
    out = bytearray()
    prev = seed_signature
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] + [b""]
    for n, chunk in enumerate(chunks):
        sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, prev, EMPTY_SHA256,
                         hashlib.sha256(chunk).hexdigest()])
        sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        prev = sig
        if tamper_chunk == n:
            sig = "0" * 64
        out += f"{len(chunk):x};chunk-signature={sig}\r\n".encode() + chunk
        if chunk or trailer is None:
            out += b"\r\n"
    if trailer is not None:
        trailer_bytes = f"{trailer[0]}:{trailer[1]}\n".encode()
        sts = "\n".join(["AWS4-HMAC-SHA256-TRAILER", amz_date, scope, prev,
                         hashlib.sha256(trailer_bytes).hexdigest()])
        tsig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        out += f"{trailer[0]}:{trailer[1]}\r\n".encode()
        out += f"x-amz-trailer-signature:{tsig}\r\n\r\n".encode()
    return bytes(out)


def unsigned_trailer_chunks(data: bytes, chunk_size: int, trailer: tuple[str, str]) -> bytes:
    """STREAMING-UNSIGNED-PAYLOAD-TRAILER body."""
    out = bytearray()
    for i in range(0, len(data), chunk_size):
        chunk = data[i:i + chunk_size]
        out += f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    out += b"0\r\n"
    out += f"{trailer[0]}:{trailer[1]}\r\n\r\n".encode()
    return bytes(out)


def post_form(fields: Iterable[tuple[str, str]], file_data: bytes) -> tuple[bytes, str]:
    """A browser POST form (its fields in order, repeats allowed, then the
    file part): the body and its Content-Type."""
    boundary = "----nearstore" + uuid.uuid4().hex
    out = bytearray()
    for k, v in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    out += file_data + f"\r\n--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"

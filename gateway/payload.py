"""The verified body of an upload request (PutObject, UploadPart).

``Payload(stream, headers, auth)`` decides everything the headers can decide
at construction (``_plan``, a pure function), so a malformed request fails
before a byte is read or a file opened. ``chunks()`` then yields the decoded
object bytes in order.

Invariants:

- Iterating ``chunks()`` to the end means every check passed: length, chunk
  signatures, trailer signature, ``x-amz-content-sha256``, ``Content-MD5``
  and the ``x-amz-checksum-*`` value. Bytes are yielded *before* the checks
  that cover them finish (a signature covers a whole chunk, a checksum the
  whole body), so a consumer writes to a temporary place and publishes only
  once the iteration has ended; on any exception it discards what it wrote.
- Every wait for data is one the framing promises: the decoder never asks
  for bytes beyond what a chunk header, Content-Length or the stream's end
  allow, and a chunk-size or trailer line longer than ``MAX_LINE`` is an
  error, so garbage cannot make it buffer without bound. Beyond the block
  aiohttp last handed over (aiohttp bounds those), the decoder holds at most
  one partial line, and the hashing lane at most ``MAX_IN_FLIGHT_BYTES``.
- ``md5_hex`` and ``checksum`` are set only once the iteration completes.
- A transport failure (connection reset, aiohttp payload errors) surfaces as
  ``IncompleteBody``, never as an aiohttp exception.

Body forms, chosen by ``x-amz-content-sha256`` (AWS "Authenticating Requests:
Using the Authorization Header (AWS Signature Version 4)") and by
``Content-Encoding: aws-chunked``:

    hex SHA-256 / UNSIGNED-PAYLOAD / none     plain body (Content-Length or
                                              Transfer-Encoding: chunked)
    STREAMING-AWS4-HMAC-SHA256-PAYLOAD        ``hex;chunk-signature=SIG`` chunks
    STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER  the same, plus a signed trailer
    STREAMING-UNSIGNED-PAYLOAD-TRAILER        ``hex`` chunks, plus a trailer
    STREAMING-AWS4-ECDSA-P256-SHA256-*        SigV4a: NotImplemented

The framing is specified in "Signature Calculations for the Authorization
Header: Transferring Payload in Multiple Chunks" (sigv4-streaming) and "...
Including Trailing Headers" (sigv4-streaming-trailers). What boto3 sends over
HTTPS by default is ``botocore.httpchecksum.AwsChunkedWrapper``'s
``hex\\r\\n<data>\\r\\n ... 0\\r\\nx-amz-checksum-crc32:B64\\r\\n\\r\\n``.

Errors are the ones S3 gives (AWS "Error responses"; where the reference is
silent, as observed against S3 and recorded in versitygw's and
scality/cloudserver's issue trackers):

    no Content-Length and not chunked         MissingContentLength (411)
    x-amz-decoded-content-length unparsable,
      or missing on a signed stream           MissingContentLength
    declared or actual size over max_size     EntityTooLarge
    body ends short, bad framing, bytes after
      the end, decoded length != declared     IncompleteBody
    non-final signed chunk under 8 KiB        InvalidChunkSizeError
    wrong chunk or trailer signature          SignatureDoesNotMatch
    hex x-amz-content-sha256 differs          XAmzContentSHA256Mismatch
    Content-MD5 not base64 of 16 bytes        InvalidDigest
    Content-MD5 differs                       BadDigest
    x-amz-checksum-* value differs            BadDigest ("The CRC32 you specified
                                              did not match the calculated checksum.")
    malformed checksum value, two checksums,
      x-amz-sdk-checksum-algorithm without
      or contradicting one                    InvalidRequest
    trailer malformed or not as declared      S3 says MalformedTrailerError, which
                                              gateway.errors lacks: InvalidRequest
                                              with S3's message for now
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

import aiohttp
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.streams import EofStream

from nearstore.gateway import checksums, errors
from nearstore.gateway.errors import (
    BadDigest,
    EntityTooLarge,
    IncompleteBody,
    InvalidArgument,
    InvalidChunkSizeError,
    InvalidDigest,
    InvalidRequest,
    MalformedTrailerError,
    MissingContentLength,
    S3Error,
    SignatureDoesNotMatch,
    XAmzContentSHA256Mismatch,
)

MAX_LINE: Final = 4096
"""Longest chunk-size or trailer line accepted, CRLF excluded. A signed chunk
header is at most 97 bytes (16 hex digits, ``;chunk-signature=``, 64 hex)."""

MIN_SIGNED_CHUNK: Final = 8192
"""sigv4-streaming: "Chunk size must be at least 8 KB", except the last."""

EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()

# Hashing inline on the event loop, or on a worker thread per upload (its
# "lane")? Measured on this 2-core machine (AMD EPYC with SHA-NI: MD5 runs at
# 840 MB/s per core and bounds every upload; SHA-256 1.9 GB/s, zlib CRC32
# 6.6 GB/s, awscrt CRC32C/CRC64NVME 60 GB/s) with a real aiohttp + uvloop
# server, clients in other processes sending 1 GiB over loopback, and the
# consumer writing every chunk to a file in a thread. Best of 4 interleaved
# runs, MB/s (the machine was shared; single runs varied by +-30%):
#
#                                        1 upload         4 uploads at once
#                                     inline  thread      inline  thread
#   plain body, CRC32 header             575     753         515     478
#   aws-chunked, unsigned, CRC32 trailer 374     406         409     511
#   signed 64 KiB chunks                 385     551         417     390
#
# A thread wins a single stream by 10-45% (MD5 on one core while the loop
# reads and the consumer writes on the other) and draws under concurrency,
# where the loop is busy anyway; on larger machines per-upload threads also
# use more than one core, which inline hashing never can. Rejected: one job
# in flight per upload on the default executor (the hash then waits on the
# next read: 330-490 MB/s single stream), and one hashing thread shared by
# all uploads (caps them all together at one core, and was no faster).
THREAD_MIN_BYTES: Final = 256 * 1024
"""Smaller batches hash inline: MD5 of 256 KiB takes 0.3 ms, the order of a
thread hand-off, and an upload this small never starts a thread."""

BATCH_BYTES: Final = 1 << 20
"""Already-buffered small aws-chunked pieces are coalesced up to this size."""

MAX_IN_FLIGHT_BYTES: Final = 4 << 20
"""Bytes queued on an upload's lane before reading waits for it."""

_DECIMAL: Final = re.compile(r"[0-9]{1,19}")
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")
_HEX_SIZE: Final = re.compile(rb"[0-9a-fA-F]{1,16}")
_SIGNATURE: Final = re.compile(rb"[0-9a-f]{64}")

_UNSIGNED: Final = "UNSIGNED-PAYLOAD"
_STREAMING_SIGNED: Final = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
_STREAMING_SIGNED_TRAILER: Final = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
_STREAMING_UNSIGNED_TRAILER: Final = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
_STREAMING_SIGV4A: Final = (
    "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD",
    "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER",
)
_TRAILER_SIGNATURE: Final = "x-amz-trailer-signature"

_TERMINATED: Final = "The request body terminated unexpectedly"
_MALFORMED_TRAILER: Final = (
    "The request contained trailing data that was not well-formed or did not conform "
    "to our published schema."
)

# What reading an aiohttp request body raises when the connection drops or
# its HTTP framing breaks: the server sets ConnectionResetError on the payload
# when the connection is lost, its parser a PayloadEncodingError
# (ContentLengthError, TransferEncodingError); client-side streams raise
# ClientPayloadError.
_TRANSPORT_ERRORS: Final = (
    aiohttp.ClientPayloadError,
    PayloadEncodingError,
    ConnectionError,
    asyncio.IncompleteReadError,
    EofStream,
)


class AuthContextLike(Protocol):
    """What ``gateway.auth.AuthContext`` provides that a body needs.

    ``content_sha256`` is the x-amz-content-sha256 value the request was
    signed with (None for SigV2). The others are SigV4's and None elsewhere:
    the derived signing key, the request's signature (the "previous
    signature" of the first chunk), the request time and the credential scope.
    """

    @property
    def scheme(self) -> str: ...

    @property
    def content_sha256(self) -> str | None: ...

    @property
    def signing_key(self) -> bytes | None: ...

    @property
    def seed_signature(self) -> str | None: ...

    @property
    def amz_date(self) -> str | None: ...

    @property
    def scope(self) -> str | None: ...


def _malformed_trailer() -> S3Error:
    return MalformedTrailerError(_MALFORMED_TRAILER)


def _terminated() -> IncompleteBody:
    return IncompleteBody(_TERMINATED)


# --- what the headers decide -----------------------------------------------


@dataclass(frozen=True)
class _Signer:
    """SigV4 material for chunk and trailer signatures."""

    key: bytes
    amz_date: str
    scope: str
    seed: str

    def sign(self, kind: str, previous: str, *hashes: str) -> str:
        string_to_sign = "\n".join((kind, self.amz_date, self.scope, previous, *hashes))
        return hmac.new(self.key, string_to_sign.encode("ascii"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class _Plan:
    framed: bool  # aws-chunked framing
    signer: _Signer | None  # chunk signatures to verify
    signed_trailer: bool  # x-amz-trailer-signature due
    trailer_capable: bool  # the framing may carry a trailer
    content_sha256: str | None  # lower-case hex to verify
    content_length: int | None
    decoded_length: int | None
    content_encoding: str | None
    trailers: tuple[str, ...]  # declared x-amz-trailer names
    checksum_algorithm: str | None
    checksum_value: bytes | None  # from a header; a trailer's comes later
    content_md5: str | None  # the header as sent, validated


def _plan(headers: Mapping[str, str], auth: AuthContextLike, max_size: int, unsized_is_empty: bool = False) -> _Plan:
    h = {k.lower(): v for k, v in headers.items()}
    tokens = [t.strip() for t in h.get("content-encoding", "").split(",") if t.strip()]
    aws_chunked = any(t.lower() == "aws-chunked" for t in tokens)
    kept = ",".join(t for t in tokens if t.lower() != "aws-chunked") or None
    declared = auth.content_sha256 or h.get("x-amz-content-sha256") or None
    mode = _payload_mode(declared, aws_chunked)
    signer = _signer(auth, declared) if mode.signed else None
    content_length, decoded_length = _lengths(h, mode.framed, mode.signed, max_size, unsized_is_empty)
    trailers = _declared_trailers(h.get("x-amz-trailer"), mode.trailer_capable)
    algorithm, value = _checksum(h, trailers)
    return _Plan(
        framed=mode.framed,
        signer=signer,
        signed_trailer=mode.signed_trailer,
        trailer_capable=mode.trailer_capable,
        content_sha256=mode.content_sha256,
        content_length=content_length,
        decoded_length=decoded_length,
        content_encoding=kept,
        trailers=trailers,
        checksum_algorithm=algorithm,
        checksum_value=value,
        content_md5=_content_md5(h.get("content-md5")),
    )


class _Mode(NamedTuple):
    framed: bool  # aws-chunked framing
    signed: bool  # chunk signatures
    signed_trailer: bool  # x-amz-trailer-signature due
    trailer_capable: bool  # the framing may carry a trailer
    content_sha256: str | None  # lower-case hex to verify


def _payload_mode(declared: str | None, aws_chunked: bool) -> _Mode:
    if declared is None or declared == _UNSIGNED:
        # Content-Encoding: aws-chunked without a STREAMING- value: unsigned
        # chunks, as some SDKs send with UNSIGNED-PAYLOAD.
        return _Mode(aws_chunked, False, False, aws_chunked, None)
    if _HEX64.fullmatch(declared):
        # Over an aws-chunked body the hash covers the bytes on the wire.
        return _Mode(aws_chunked, False, False, aws_chunked, declared.lower())
    if declared == _STREAMING_SIGNED:
        return _Mode(True, True, False, False, None)
    if declared == _STREAMING_SIGNED_TRAILER:
        return _Mode(True, True, True, True, None)
    if declared == _STREAMING_UNSIGNED_TRAILER:
        return _Mode(True, False, False, True, None)
    if declared in _STREAMING_SIGV4A:
        raise errors.NotImplemented(
            "SigV4a (ECDSA) streaming payloads are not supported.",
            Header="x-amz-content-sha256",
        )
    raise InvalidArgument(
        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER "
        "or a valid sha256 value.",
        ArgumentName="x-amz-content-sha256",
        ArgumentValue=declared,
    )


def _signer(auth: AuthContextLike, declared: str | None) -> _Signer:
    if not (auth.signing_key and auth.seed_signature and auth.amz_date and auth.scope):
        # Chunk signatures chain on the Authorization header's signature.
        raise InvalidRequest(f"{declared} requires a request signed in the Authorization header.")
    return _Signer(auth.signing_key, auth.amz_date, auth.scope, auth.seed_signature)


def _lengths(
    h: Mapping[str, str], framed: bool, signed: bool, max_size: int, unsized_is_empty: bool = False
) -> tuple[int | None, int | None]:
    """(Content-Length, x-amz-decoded-content-length), checked against
    max_size. With ``unsized_is_empty``, a request with neither length nor
    chunked framing has an empty body, as HTTP/1.1 says (RFC 9112 6.3): what
    S3 does for a bucket's own requests (``curl -X PUT`` creates a bucket),
    while PutObject answers MissingContentLength."""
    content_length: int | None = None
    raw = h.get("content-length")
    if raw is not None:
        if not _DECIMAL.fullmatch(raw.strip()):
            raise MissingContentLength()
        content_length = int(raw)
    elif "chunked" not in h.get("transfer-encoding", "").lower():
        if not unsized_is_empty:
            raise MissingContentLength()
        content_length = 0
    decoded_length: int | None = None
    if framed:
        raw = h.get("x-amz-decoded-content-length")
        if raw is not None:
            # S3 answers an unparsable value with MissingContentLength.
            if not _DECIMAL.fullmatch(raw.strip()):
                raise MissingContentLength()
            decoded_length = int(raw)
        elif signed:
            # sigv4-streaming: "For all requests, you must include the
            # x-amz-decoded-content-length header". Unsigned aws-chunked
            # bodies are taken without it, bounded by max_size as they come.
            raise MissingContentLength()
    proposed = decoded_length if framed else content_length
    if proposed is not None and proposed > max_size:
        raise EntityTooLarge(ProposedSize=str(proposed), MaxSizeAllowed=str(max_size))
    return content_length, decoded_length


def _declared_trailers(value: str | None, trailer_capable: bool) -> tuple[str, ...]:
    if value is None or not value.strip():
        return ()
    if not trailer_capable:
        # A trailer declared on a body that cannot carry one would never be
        # checked; refuse rather than store an unverified claim.
        raise _malformed_trailer()
    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    if len(set(names)) != len(names) or any(
        checksums.algorithm_of_header(n) is None for n in names
    ):
        raise _malformed_trailer()
    return names


def _checksum(h: Mapping[str, str], trailers: tuple[str, ...]) -> tuple[str | None, bytes | None]:
    """The one x-amz-checksum-* algorithm (header or trailer) and a header's value."""
    in_headers: list[tuple[str, str]] = []
    for name, text in h.items():
        if not name.startswith(checksums.HEADER_PREFIX) or name in checksums.NOT_VALUE_HEADERS:
            continue
        named = checksums.algorithm_of_header(name)
        if named is None:
            raise InvalidRequest(
                "The algorithm type you specified in x-amz-checksum- header is invalid."
            )
        in_headers.append((named, text))
    # Counted before any value is parsed: S3 refuses two even when empty.
    if len(in_headers) + len(trailers) > 1:
        raise InvalidRequest(
            "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."
        )
    algorithm: str | None = None
    value: bytes | None = None
    if in_headers:
        algorithm = in_headers[0][0]
        value = checksums.decode_value(algorithm, in_headers[0][1])
    elif trailers:
        algorithm = checksums.algorithm_of_header(trailers[0])
    sdk = h.get("x-amz-sdk-checksum-algorithm")
    if sdk is not None:
        sdk_algorithm = checksums.normalize(sdk)
        if sdk_algorithm is not None and algorithm is None:
            raise InvalidRequest(
                "x-amz-sdk-checksum-algorithm specified, but no corresponding "
                "x-amz-checksum-* or x-amz-trailer headers were found."
            )
        if sdk_algorithm != algorithm:
            raise InvalidRequest("Value for x-amz-sdk-checksum-algorithm header is invalid.")
    return algorithm, value


def _content_md5(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise InvalidDigest()
    return value.strip()


# --- reading the wire ---------------------------------------------------------


class _Wire:
    """Bounded reads of the request stream: lines, exact byte counts, the end.

    Holds the block aiohttp last handed over and how far it is consumed; a
    line that straddles blocks is joined from a tail of at most MAX_LINE + 1
    bytes and the head of the next block, never by copying whole blocks.
    """

    def __init__(self, stream: aiohttp.StreamReader, wire_sha: hashlib._Hash | None) -> None:
        self._stream = stream
        self._sha = wire_sha
        self._buf = b""
        self._pos = 0

    @property
    def buffered(self) -> bool:
        """Whether unconsumed bytes are on hand (the next step may not wait)."""
        return self._pos < len(self._buf)

    async def read(self) -> bytes:
        """The next block from the stream, b"" at its end."""
        try:
            block = await self._stream.readany()
        except _TRANSPORT_ERRORS as exc:
            raise _terminated() from exc
        if self._sha is not None:
            self._sha.update(block)
        return block

    async def line(self) -> bytes:
        """The next CRLF-terminated line without its CRLF."""
        line = await self.line_or_end()
        if line is None:
            raise _terminated()
        return line

    async def line_or_end(self) -> bytes | None:
        """The next line, or None if the stream ends cleanly before one starts."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n", pos, pos + MAX_LINE + 2)
        if end >= 0:
            self._pos = end + 2
            return buf[pos:end]
        if len(buf) - pos > MAX_LINE + 1:
            raise _terminated()
        tail = buf[pos:]
        while True:
            block = await self.read()
            if not block:
                if tail:
                    raise _terminated()
                self._buf, self._pos = b"", 0
                return None
            # Only the head of the new block can finish the line.
            joined = tail + block[: MAX_LINE + 2]
            end = joined.find(b"\r\n")
            if 0 <= end <= MAX_LINE:
                self._buf, self._pos = block, end + 2 - len(tail)
                return joined[:end]
            if end >= 0 or len(joined) > MAX_LINE + 1:
                raise _terminated()
            tail = joined

    async def piece(self, limit: int) -> memoryview:
        """Up to ``limit`` (> 0) bytes, a view of the current block (no copy)."""
        if self._pos >= len(self._buf):
            block = await self.read()
            if not block:
                raise _terminated()
            self._buf, self._pos = block, 0
        start = self._pos
        self._pos = min(len(self._buf), start + limit)
        return memoryview(self._buf)[start : self._pos]

    async def end(self) -> None:
        """The stream must end here."""
        if self.buffered or await self.read():
            raise _terminated()


@dataclass(frozen=True)
class _ChunkEnd:
    """Decoder event: a signed chunk ended, claiming ``signature``."""

    signature: str


_Event = bytes | memoryview | _ChunkEnd


# --- the body -------------------------------------------------------------------


class Payload:
    """One upload body: construct (checks headers), then iterate ``chunks()`` once.

    ``size`` counts decoded bytes as they come; ``md5_hex`` (the S3 ETag of a
    simple PUT) and ``checksum`` ((algorithm, base64) the client supplied and
    we verified, or None) are set when the iteration completes;
    ``content_encoding`` is the Content-Encoding to store, aws-chunked removed.
    """

    size: int
    md5_hex: str
    checksum: tuple[str, str] | None
    content_encoding: str | None

    def __init__(
        self,
        stream: aiohttp.StreamReader,
        headers: Mapping[str, str],
        auth: AuthContextLike,
        *,
        max_size: int = 5 * 1024**3,
        unsized_is_empty: bool = False,
    ) -> None:
        plan = _plan(headers, auth, max_size, unsized_is_empty)
        self._plan = plan
        self._max_size = max_size
        self.size = 0
        self.md5_hex = ""
        self.checksum = None
        self.content_encoding = plan.content_encoding
        self._started = False

        # MD5 always (the ETag); the client's checksum if any; SHA-256 of the
        # current chunk for signed chunks, of the body for a hex
        # x-amz-content-sha256 (over an aws-chunked body: of the wire bytes).
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._hasher = (
            checksums.new_checksum(plan.checksum_algorithm) if plan.checksum_algorithm else None
        )
        self._expected_checksum: bytes | None = plan.checksum_value
        self._sha: hashlib._Hash | None = None
        wire_sha: hashlib._Hash | None = None
        if plan.signer is not None or (plan.content_sha256 and not plan.framed):
            self._sha = hashlib.sha256()
        elif plan.content_sha256:
            wire_sha = hashlib.sha256()
        self._wire_sha = wire_sha
        self._wire = _Wire(stream, wire_sha)
        self._previous = plan.signer.seed if plan.signer else ""
        self._trailer_to_verify: tuple[tuple[tuple[str, str], ...], str] | None = None

        # The hashing lane: one thread for this upload, started on the first
        # large batch; futures queued there, and their byte count.
        self._lane: ThreadPoolExecutor | None = None
        self._md5_lane: ThreadPoolExecutor | None = None
        self._in_flight: deque[tuple[Future[None], int]] = deque()
        self._in_flight_bytes = 0

    # --- iteration ------------------------------------------------------------

    @property
    def declared_size(self) -> int | None:
        """The decoded body size the client announced (Content-Length, or
        x-amz-decoded-content-length for aws-chunked), if it did."""
        plan = self._plan
        return plan.decoded_length if plan.framed else plan.content_length

    @property
    def client_checksum(self) -> tuple[str, str] | None:
        """(algorithm, base64) from a checksum header, known before the body
        (a trailer's value is not): lets a proxied upload be verified by the
        store it goes to as well."""
        plan = self._plan
        if plan.checksum_algorithm and plan.checksum_value is not None:
            return plan.checksum_algorithm, base64.b64encode(plan.checksum_value).decode()
        return None

    @property
    def client_md5(self) -> str | None:
        """The Content-MD5 header as sent (validated), if any."""
        return self._plan.content_md5

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        """The decoded body in order; raises an S3 error if any check fails."""
        if self._started:
            raise RuntimeError("a Payload can be iterated only once")
        self._started = True
        source = self._decode_framed() if self._plan.framed else self._decode_plain()
        batch: list[_Event] = []
        pieces: list[bytes | memoryview] = []
        size = 0
        try:
            async with aclosing(source) as events:
                async for event in events:
                    batch.append(event)
                    if not isinstance(event, _ChunkEnd):
                        pieces.append(event)
                        size += len(event)
                    # Pieces of small aws-chunked chunks already on hand are
                    # coalesced (one copy), so a block of 64 KiB chunks costs
                    # one hashing job and one consumer write, not one each.
                    if size < BATCH_BYTES and self._wire.buffered:
                        continue
                    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    await self._hash(data, batch)
                    if data:
                        yield data
                    batch, pieces, size = [], [], 0
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            await self._hash(data, batch)
            if data:
                yield data
            while self._in_flight:
                await asyncio.wrap_future(self._in_flight.popleft()[0])
        finally:
            if self._lane is not None:
                self._lane.shutdown(wait=False, cancel_futures=True)
            if self._md5_lane is not None:
                self._md5_lane.shutdown(wait=False, cancel_futures=True)
        self._finish()

    async def _decode_plain(self) -> AsyncGenerator[_Event, None]:
        expected = self._plan.content_length
        while block := await self._wire.read():
            self.size += len(block)
            if expected is not None and self.size > expected:
                raise IncompleteBody(
                    NumberBytesExpected=str(expected), NumberBytesProvided=str(self.size)
                )
            if self.size > self._max_size:
                raise EntityTooLarge(
                    ProposedSize=str(self.size), MaxSizeAllowed=str(self._max_size)
                )
            yield block
        if expected is not None and self.size != expected:
            raise IncompleteBody(
                NumberBytesExpected=str(expected), NumberBytesProvided=str(self.size)
            )

    async def _decode_framed(self) -> AsyncGenerator[_Event, None]:
        signed = self._plan.signer is not None
        declared = self._plan.decoded_length
        previous_short = False
        while True:
            size, signature = self._parse_size_line(await self._wire.line())
            if size == 0:
                if signature is not None:
                    yield _ChunkEnd(signature)
                break
            if signed and previous_short:
                raise InvalidChunkSizeError()
            previous_short = size < MIN_SIGNED_CHUNK
            total = self.size + size
            if declared is not None and total > declared:
                raise IncompleteBody(
                    NumberBytesExpected=str(declared), NumberBytesProvided=str(total)
                )
            if total > self._max_size:
                raise EntityTooLarge(ProposedSize=str(total), MaxSizeAllowed=str(self._max_size))
            while self.size < total:
                piece = await self._wire.piece(total - self.size)
                self.size += len(piece)
                yield piece
            if await self._wire.line() != b"":
                # The chunk held more bytes than its size line said.
                raise _terminated()
            if signature is not None:
                yield _ChunkEnd(signature)
        await self._read_trailers()
        await self._wire.end()
        if declared is not None and self.size != declared:
            raise IncompleteBody(
                NumberBytesExpected=str(declared), NumberBytesProvided=str(self.size)
            )

    def _parse_size_line(self, line: bytes) -> tuple[int, str | None]:
        size_field, sep, extension = line.partition(b";")
        if not _HEX_SIZE.fullmatch(size_field):
            raise _terminated()
        size = int(size_field, 16)
        if self._plan.signer is None:
            if sep:
                raise _terminated()
            return size, None
        name, eq, signature = extension.partition(b"=")
        if name != b"chunk-signature" or not eq or not _SIGNATURE.fullmatch(signature):
            raise SignatureDoesNotMatch()
        return size, signature.decode("ascii")

    async def _read_trailers(self) -> None:
        """Everything after the final chunk's line, through the closing blank line.

        The SDKs send ``name:value`` lines right after ``0...\\r\\n`` and end
        with a blank line; the AWS sigv4-streaming-trailers example puts a
        blank line first and ends after the signature line. Both pass: a
        blank line before any trailer is skipped when trailers are due, and
        the stream may end in place of the closing blank line.
        """
        due = list(self._plan.trailers)
        with_signature = self._plan.signed_trailer
        if not due and not with_signature:
            last = await self._wire.line()
            if last:
                capable = self._plan.trailer_capable
                raise _malformed_trailer() if capable and b":" in last else _terminated()
            return
        received: list[tuple[str, str]] = []
        signature: str | None = None
        first = True
        while (line := await self._wire.line_or_end()) is not None:
            if not line:
                if first:
                    first = False
                    continue
                break
            first = False
            name, value = _trailer_line(line)
            if name == _TRAILER_SIGNATURE and with_signature and signature is None:
                signature = value
            elif name in due and signature is None:
                due.remove(name)
                received.append((name, value))
            else:
                raise _malformed_trailer()
        if due:
            raise _malformed_trailer()
        if with_signature:
            if signature is None or not _SIGNATURE.fullmatch(signature.encode("ascii")):
                raise SignatureDoesNotMatch()
            # Verified in _finish: it chains on the final chunk's signature,
            # which the hashing lane may not have reached yet.
            self._trailer_to_verify = (tuple(received), signature)
        if received and self._plan.checksum_algorithm is not None:
            self._expected_checksum = checksums.decode_value(
                self._plan.checksum_algorithm, received[0][1]
            )

    # --- hashing and verification ---------------------------------------------

    async def _hash(self, data: bytes | memoryview, batch: list[_Event]) -> None:
        """Hash a batch: on the lane if it is large or the lane already exists.

        The lane is one thread per upload, so its jobs run in body order
        without the caller waiting for each; once it exists every batch goes
        through it, which keeps the order.
        """
        if not batch:
            return
        size = len(data)
        if self._lane is None and size < THREAD_MIN_BYTES:
            self._digest(data, batch)
            return
        if self._lane is None:
            self._lane = ThreadPoolExecutor(1, thread_name_prefix="payload-hash")
            # MD5 (the ETag) on a lane of its own: it is the slowest of the
            # hashes here (1.5 CPU-s per GB against SHA-256's 0.9), and
            # hashlib lets both run at once on two cores.
            self._md5_lane = ThreadPoolExecutor(1, thread_name_prefix="payload-md5")
        if data:
            assert self._md5_lane is not None
            self._in_flight.append((self._md5_lane.submit(self._md5.update, data), 0))
        self._in_flight.append((self._lane.submit(self._digest, data, batch), size))
        self._in_flight_bytes += size
        while self._in_flight_bytes > MAX_IN_FLIGHT_BYTES:
            future, done = self._in_flight.popleft()
            await asyncio.wrap_future(future)
            self._in_flight_bytes -= done

    def _digest(self, data: bytes | memoryview, batch: list[_Event]) -> None:
        """Hash one batch in body order; ``data`` is its pieces joined.

        Whole-body hashes take ``data`` in one call: every call releases and
        retakes the GIL, and with a busy event loop each retake can wait a
        switch interval (5 ms). Only signed chunks need the pieces one by
        one, for their per-chunk SHA-256 and signature.
        """
        if data:
            if self._md5_lane is None:
                self._md5.update(data)
            if self._hasher is not None:
                self._hasher.update(data)
        if self._plan.signer is None:
            if self._sha is not None and data:
                self._sha.update(data)
            return
        for event in batch:
            if isinstance(event, _ChunkEnd):
                self._verify_chunk(event.signature)
            else:
                assert self._sha is not None
                self._sha.update(event)

    def _verify_chunk(self, claimed: str) -> None:
        signer, sha = self._plan.signer, self._sha
        assert signer is not None and sha is not None
        expected = signer.sign(
            "AWS4-HMAC-SHA256-PAYLOAD", self._previous, EMPTY_SHA256, sha.hexdigest()
        )
        if not hmac.compare_digest(expected, claimed):
            raise SignatureDoesNotMatch()
        self._previous = claimed
        self._sha = hashlib.sha256()

    def _verify_trailer(self, trailers: tuple[tuple[str, str], ...], claimed: str) -> None:
        signer = self._plan.signer
        assert signer is not None
        canonical = "".join(f"{name}:{value}\n" for name, value in trailers).encode("ascii")
        expected = signer.sign(
            "AWS4-HMAC-SHA256-TRAILER", self._previous, hashlib.sha256(canonical).hexdigest()
        )
        if not hmac.compare_digest(expected, claimed):
            raise SignatureDoesNotMatch()

    def _finish(self) -> None:
        plan = self._plan
        if self._trailer_to_verify is not None:
            self._verify_trailer(*self._trailer_to_verify)
        body_sha = self._wire_sha if self._wire_sha is not None else self._sha
        if plan.content_sha256 is not None and body_sha is not None:
            computed = body_sha.hexdigest()
            if computed != plan.content_sha256:
                raise XAmzContentSHA256Mismatch(
                    ClientComputedContentSHA256=plan.content_sha256,
                    S3ComputedContentSHA256=computed,
                )
        md5 = self._md5.digest()
        md5_b64 = base64.b64encode(md5).decode("ascii")
        if plan.content_md5 is not None and base64.b64decode(plan.content_md5) != md5:
            raise BadDigest(ExpectedDigest=plan.content_md5, CalculatedDigest=md5_b64)
        if self._hasher is not None and plan.checksum_algorithm is not None:
            # A header's value was parsed with the plan, a trailer's by
            # _read_trailers, which fails if a declared trailer is missing.
            assert self._expected_checksum is not None
            digest = self._hasher.digest()
            if digest != self._expected_checksum:
                raise checksums.mismatch(plan.checksum_algorithm)
            self.checksum = (plan.checksum_algorithm, base64.b64encode(digest).decode("ascii"))
        self.md5_hex = md5.hex()


def _trailer_line(line: bytes) -> tuple[str, str]:
    """A trailer line's lower-case name and trimmed value."""
    name, sep, value = line.partition(b":")
    try:
        text_name = name.strip().lower().decode("ascii")
        text_value = value.strip().decode("ascii")
    except UnicodeDecodeError:
        raise _malformed_trailer() from None
    if not sep or not text_name:
        raise _malformed_trailer()
    return text_name, text_value

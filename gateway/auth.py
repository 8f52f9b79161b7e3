"""S3 request authentication: SigV4, SigV2 and browser POST policies, pure.

A request comes in as a :class:`SignedRequest` (method, path and query exactly
as received, headers); either an :class:`AuthContext` comes out or an
``S3Error`` from ``gateway.errors`` is raised. No I/O, no aiohttp types, no
clock except ``now``. POST form uploads go through :func:`authenticate_post`,
which returns the :class:`PostPolicy` the handler checks the form (and, once
streamed, the file size) against.

What the request carries picks the mechanism (AWS "Authenticating Requests"):

    Authorization: AWS4-HMAC-SHA256 ...     -> "v4"        SigV4, header
    ?X-Amz-Algorithm=...                    -> "v4-query"  SigV4, presigned URL
    Authorization: AWS AKID:sig             -> "v2"        SigV2, header
    ?AWSAccessKeyId=..&Signature=..         -> "v2-query"  SigV2, presigned URL
    form: x-amz-credential / AWSAccessKeyId -> "post-v4" / "post-v2"
    none of these                           -> "anonymous" (access decides)

Invariants:

- What is signed is rebuilt from the request as received, never from the
  router's decoded view: SigV4 decodes the raw path and query and re-encodes
  them with S3's rule (so any client's escaping of one key signs the same);
  SigV2 signs the path exactly as sent, as S3 and botocore do.
- Every signature comparison is ``hmac.compare_digest``.
- At most one mechanism per request; a second one is InvalidArgument, as S3.
- SigV4 requests must sign ``host`` and every ``x-amz-*`` header they carry
  (``x-amz-content-sha256`` excepted: it enters the canonical request as the
  payload hash anyway), else AccessDenied with ``HeadersNotSigned``; an
  unsigned ``x-amz-copy-source`` added to a presigned PUT must not pass.
- Header auth is refused beyond 15 minutes of clock skew; presigned URLs are
  refused once expired or when dated more than 15 minutes in the future.
- Derived SigV4 keys are cached per (secret, date, region, service) in a
  bounded LRU: four HMACs per request are measurable at 20k req/s.

Choices where S3's behaviour is unclear or does not apply (see the comments
at each site): any region is accepted in the credential scope (clients are
configured with all sorts of regions); ``X-Amz-Security-Token`` is ignored
(there is no STS here; a signed token is still covered by the signature, and
the secret alone authenticates); SigV4a (``AWS4-ECDSA-P256-SHA256``) is
NotImplemented; the SigV2 sub-resource list is botocore's ``HmacV1Auth`` list,
since boto3 is the main client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Literal
from urllib.parse import quote, unquote, unquote_to_bytes

from nearstore.gateway.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    AuthorizationQueryParametersError,
    EntityTooLarge,
    EntityTooSmall,
    InvalidAccessKeyId,
    InvalidArgument,
    InvalidPolicyDocument,
    InvalidRequest,
    RequestTimeTooSkewed,
    S3Error,
    SignatureDoesNotMatch,
)
from nearstore.gateway.errors import NotImplemented as S3NotImplemented  # not the builtin

__all__ = [
    "ALGORITHM",
    "UNSIGNED_PAYLOAD",
    "AuthContext",
    "InvalidPolicyDocument",
    "PolicyCondition",
    "PostPolicy",
    "Scheme",
    "SignedRequest",
    "authenticate",
    "authenticate_post",
    "derive_signing_key",
    "uri_encode",
]

ALGORITHM = "AWS4-HMAC-SHA256"
SIGV4A_ALGORITHM = "AWS4-ECDSA-P256-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
# Payload hashes other than a hex SHA-256 that an HMAC-signed request may
# declare (AWS "Authenticating Requests: Using the Authorization Header",
# x-amz-content-sha256). The ECDSA variants belong to SigV4a, refused earlier.
PAYLOAD_TOKENS = frozenset(
    {
        UNSIGNED_PAYLOAD,
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
    }
)
MAX_SKEW = timedelta(minutes=15)
MAX_PRESIGNED_EXPIRES = 604800  # one week, S3's limit for X-Amz-Expires

# botocore HmacV1Auth.QSAOfInterest: the query parameters a SigV2
# CanonicalizedResource includes. S3's documented list (acl, delete,
# lifecycle, location, logging, notification, partNumber, policy,
# requestPayment, tagging, torrent, uploadId, uploads, versionId, versioning,
# versions, website, cors, restore, response-*) is a subset; matching the
# signer boto3 actually runs is what makes its v2 requests verify.
V2_SUBRESOURCES = frozenset(
    {
        "accelerate", "acl", "analytics", "cors", "defaultObjectAcl", "delete",
        "inventory", "lifecycle", "location", "logging", "metrics", "notification",
        "object-lock", "partNumber", "policy", "replication", "requestPayment",
        "response-cache-control", "response-content-disposition",
        "response-content-encoding", "response-content-language",
        "response-content-type", "response-expires", "restore", "select",
        "select-type", "storageClass", "tagging", "torrent", "uploadId", "uploads",
        "versionId", "versioning", "versions", "website",
    }
)  # fmt: skip

_V4_QUERY_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Signature",
    "X-Amz-Date",
    "X-Amz-SignedHeaders",
    "X-Amz-Expires",
)
# Form fields that no policy condition has to cover (AWS "Creating a POST
# policy", conditions: every field "except x-amz-signature, file, policy, and
# field names that have an x-ignore- prefix"; the SigV2 variant of the page
# exempts AWSAccessKeyId and signature instead).
_POST_EXEMPT = frozenset({"policy", "x-amz-signature", "signature", "awsaccesskeyid", "file"})

_AMZ_DATE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})T([0-9]{2})([0-9]{2})([0-9]{2})Z")
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_INTEGER = re.compile(r"-?[0-9]+")

_MALFORMED = "The authorization header is malformed; "
_CREDENTIAL_FORMAT = (
    'the Credential is mal-formed; expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".'
)
_ONE_MECHANISM = (
    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
    "Signature query string parameter or the Authorization header should be specified"
)
_NEEDS_DATE = "AWS authentication requires a valid Date or x-amz-date header"
_NOT_SIGNED = "There were headers present in the request which were not signed"

Scheme = Literal["v4", "v4-query", "v2", "v2-query", "post-v4", "post-v2", "anonymous"]


# --- data --------------------------------------------------------------------


@dataclass(frozen=True)
class SignedRequest:
    method: str
    raw_path: str  # as received, percent-encoded, without '?query'
    raw_query: str  # as received, without '?' ('' if none)
    headers: Mapping[str, str]  # case-insensitive; repeated headers seen through .items()
    vhost_bucket: str | None = None  # the bucket came from the Host header


@dataclass(frozen=True)
class AuthContext:
    access_key: str
    scheme: Scheme
    # v4: x-amz-content-sha256 as sent (hex digest, in either case, or a token
    # from PAYLOAD_TOKENS); v4-query: the header if sent, else the
    # X-Amz-Content-Sha256 parameter, else UNSIGNED-PAYLOAD; None otherwise.
    content_sha256: str | None
    signing_key: bytes | None  # v4: the derived key, for aws-chunked chunk signatures
    seed_signature: str | None  # v4: the request's signature, "previous" of chunk 1
    amz_date: str | None  # v4: ISO 8601 basic, e.g. 20130524T000000Z
    scope: str | None  # v4: e.g. 20130524/us-east-1/s3/aws4_request


# A request that carries no signature at all: who it is from is nobody's
# business here; gateway.access decides what anonymous requests may do.
ANONYMOUS = AuthContext(access_key="", scheme="anonymous", content_sha256=None, signing_key=None,
                        seed_signature=None, amz_date=None, scope=None)


@dataclass(frozen=True)
class PolicyCondition:
    """One POST policy condition; ``field`` is lower-case, without ``$``."""

    op: Literal["eq", "starts-with", "content-length-range"]
    field: str = ""
    value: str = ""
    low: int = 0
    high: int = 0
    source: str = ""  # the condition as S3 quotes it in "Policy Condition failed"


@dataclass(frozen=True)
class PostPolicy:
    """A decoded POST policy document (AWS "Creating a POST policy")."""

    expiration: datetime
    conditions: tuple[PolicyCondition, ...]
    # An anonymous form (no signature, no policy): nothing to check it
    # against; whether anyone may write is the bucket's to say.
    anonymous: bool = False

    @classmethod
    def parse(cls, policy_b64: str) -> PostPolicy:
        return _parse_policy(policy_b64)

    @property
    def content_length_range(self) -> tuple[int, int] | None:
        """The allowed file size, to stop a streamed upload early."""
        for cond in self.conditions:
            if cond.op == "content-length-range":
                return cond.low, cond.high
        return None

    def check(self, fields: Mapping[str, str], *, bucket: str, content_length: int | None) -> None:
        """Check the form against every condition; ``content_length`` is the
        file's size, or None while it is not known yet (call again after the
        file is streamed). Expiration is checked by :func:`authenticate_post`,
        when the request starts."""
        if self.anonymous:
            return
        form = _lower_keys(fields)
        for cond in self.conditions:
            if cond.op == "content-length-range":
                if content_length is None:
                    continue
                # S3 answers a size outside the range with the size errors,
                # not AccessDenied.
                if content_length > cond.high:
                    raise EntityTooLarge(
                        "Your proposed upload exceeds the maximum allowed size",
                        ProposedSize=str(content_length),
                        MaxSizeAllowed=str(cond.high),
                    )
                if content_length < cond.low:
                    raise EntityTooSmall(
                        "Your proposed upload is smaller than the minimum allowed size",
                        ProposedSize=str(content_length),
                        MinSizeAllowed=str(cond.low),
                    )
                continue
            # The bucket condition is about the bucket posted to, whether or
            # not the form repeats it in a field.
            actual = bucket if cond.field == "bucket" else form.get(cond.field, "")
            ok = actual == cond.value if cond.op == "eq" else actual.startswith(cond.value)
            if not ok:
                raise AccessDenied(
                    "Invalid according to Policy: Policy Condition failed: " + cond.source
                )
        covered = {cond.field for cond in self.conditions}
        extra = [
            name
            for name in form
            if name not in covered and name not in _POST_EXEMPT and not name.startswith("x-ignore-")
        ]
        if extra:
            raise AccessDenied(
                "Invalid according to Policy: Extra input fields: " + ", ".join(extra)
            )


# --- encoding ------------------------------------------------------------------


def uri_encode(s: str, *, encode_slash: bool) -> str:
    """S3's UriEncode: every UTF-8 byte except A-Za-z0-9-._~ (and '/' unless
    ``encode_slash``) becomes %XX, upper-case (AWS "Signature Calculations for
    the Authorization Header", canonical request)."""
    return quote(s.encode("utf-8"), safe="" if encode_slash else "/")


# Text that canonical encoding leaves as it is: unreserved characters, and
# upper-case escapes of bytes that are not unreserved (an escaped 'A' or a
# lower-case '%2f' would be re-encoded). SDKs send exactly this, so the
# decode-and-re-encode below is skipped for nearly every request (it was
# ~10 % of a small presigned GET).
# In a path, '/' stays literal, so an escaped one is re-encoded too.
_ESCAPE = r"%(?:[01][0-9A-F]|2[0-9A-C{slash}]|3[A-F]|40|5[B-E]|60|7[B-DF]|[89A-F][0-9A-F])"
_CANONICAL_PART = re.compile(rf"(?:[A-Za-z0-9\-._~]|{_ESCAPE.format(slash='F')})*")
_CANONICAL_PATH = re.compile(rf"(?:[A-Za-z0-9\-._~/]|{_ESCAPE.format(slash='')})*")


def _canonical_uri(raw_path: str) -> str:
    # Decoded to bytes and re-encoded, so any client's escaping of the same
    # key signs the same; S3 does not normalise '.', '..' or '//'.
    if raw_path and _CANONICAL_PATH.fullmatch(raw_path):
        return raw_path
    return quote(unquote_to_bytes(raw_path or "/"), safe="/")


def form_unquote(raw: str) -> str:
    """A query name or value as S3 reads it: '+' is a space (SDKs send %20
    for a space and %2B for a plus anyway). The router reads the query the
    same way (``request.parse_query``), so what is signed is what acts."""
    return unquote(raw.replace("+", " "))


def _canonical_part(raw: str) -> str:
    if _CANONICAL_PART.fullmatch(raw):
        return raw
    return quote(unquote_to_bytes(raw.replace("+", "%20")), safe="")


def _query_pairs(raw_query: str) -> list[tuple[str, str | None]]:
    """Raw (still encoded) pairs; None for a parameter without '='."""
    pairs: list[tuple[str, str | None]] = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        pairs.append((key, value if sep else None))
    return pairs


def _query_params(pairs: list[tuple[str, str | None]]) -> dict[str, str]:
    """Decoded names to decoded values (``form_unquote``), the first
    occurrence winning."""
    params: dict[str, str] = {}
    for key, value in pairs:
        params.setdefault(form_unquote(key), form_unquote(value or ""))
    return params


def _canonical_query(pairs: list[tuple[str, str | None]], *, skip: str | None = None) -> str:
    items: list[tuple[str, str]] = []
    for key, value in pairs:
        name = _canonical_part(key)
        if name == skip:
            continue
        items.append((name, _canonical_part(value or "")))
    items.sort()
    return "&".join(f"{k}={v}" for k, v in items)


def _index_headers(headers: Mapping[str, str]) -> dict[str, list[str]]:
    # .items() of a CIMultiDictProxy yields every repeated header.
    index: dict[str, list[str]] = {}
    for name, value in headers.items():
        index.setdefault(name.lower(), []).append(value)
    return index


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def _lower_keys(fields: Mapping[str, str]) -> dict[str, str]:
    # Field names are case-insensitive; one that repeats in another case
    # would let the signature read one value and the write another.
    form: dict[str, str] = {}
    for name, value in fields.items():
        if name.lower() in form:
            raise InvalidArgument(f"POST form field {name!r} appears more than once.", ArgumentName=name)
        form[name.lower()] = value
    return form


def _with_fields(error: S3Error, fields: dict[str, str]) -> S3Error:
    # For field names that are not identifiers (X-Amz-Expires).
    error.fields.update(fields)
    return error


def _raw(text: str) -> bytes:
    """Request text back to the bytes the client sent: the servers decode
    what is not UTF-8 with surrogateescape (a header byte 0xff), and a
    strict encode of that raised, answering any client 500."""
    return text.encode("utf-8", "surrogateescape")


def _hex_bytes(s: str) -> str:
    # S3's StringToSignBytes / CanonicalRequestBytes: space-separated hex.
    return " ".join(f"{b:02x}" for b in _raw(s))


# --- time ------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


@lru_cache(maxsize=1024)  # a presigned URL, or a second's requests, repeat it
def _parse_amz_date(value: str) -> datetime | None:
    match = _AMZ_DATE.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    try:
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        return None


def _parse_http_date(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_skew(when: datetime, raw: str, now: datetime) -> None:
    if abs(when - now) > MAX_SKEW:
        raise RequestTimeTooSkewed(
            RequestTime=raw,
            ServerTime=_iso(now),
            MaxAllowedSkewMilliseconds=str(int(MAX_SKEW.total_seconds() * 1000)),
        )


# --- keys ----------------------------------------------------------------------


def _hmac_sha256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


@lru_cache(maxsize=1024)
def _cached_signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    # Bounded, because the region is the client's to choose: one that knows
    # an access key id (not the secret) can vary it to evict other entries,
    # and then pays what an uncached request costs, four HMACs, no more.
    k_date = _hmac_sha256(("AWS4" + secret).encode("utf-8"), date)
    k_region = _hmac_sha256(k_date, region)
    k_service = _hmac_sha256(k_region, service)
    return _hmac_sha256(k_service, "aws4_request")


def derive_signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    """kSigning = HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date), region), service), "aws4_request")."""
    return _cached_signing_key(secret, date, region, service)


def _secret_for(secrets: Mapping[str, str], access_key: str) -> str:
    secret = secrets.get(access_key)
    if secret is None:
        raise InvalidAccessKeyId(AWSAccessKeyId=access_key)
    return secret


# --- dispatch --------------------------------------------------------------------


def authenticate(
    req: SignedRequest, secrets: Mapping[str, str], *, now: datetime | None = None
) -> AuthContext:
    """Authenticate ``req`` against ``secrets`` (access key id -> secret key)."""
    clock = _now(now)
    headers = _index_headers(req.headers)
    pairs = _query_pairs(req.raw_query)
    params = _query_params(pairs)
    authorization = _first(headers, "authorization")
    v4_query = "X-Amz-Algorithm" in params
    v2_query = "Signature" in params or "AWSAccessKeyId" in params

    if authorization is not None and (v4_query or v2_query):
        raise InvalidArgument(
            _ONE_MECHANISM, ArgumentName="Authorization", ArgumentValue=authorization
        )
    if v4_query and v2_query:
        raise InvalidArgument(
            _ONE_MECHANISM, ArgumentName="X-Amz-Algorithm", ArgumentValue=params["X-Amz-Algorithm"]
        )
    if authorization is not None:
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme == ALGORITHM:
            return _v4_header(req, headers, pairs, rest, secrets, clock)
        if scheme == "AWS":
            return _v2_header(req, headers, pairs, authorization, rest, secrets, clock)
        if scheme == SIGV4A_ALGORITHM:
            # S3 accepts SigV4a; it needs ECDSA key derivation we do not have.
            raise S3NotImplemented(Header="Authorization")
        raise InvalidArgument(
            "Unsupported Authorization Type",
            ArgumentName="Authorization",
            ArgumentValue=authorization,
        )
    if v4_query:
        return _v4_query(req, headers, pairs, params, secrets, clock)
    if v2_query:
        return _v2_query(req, headers, pairs, params, secrets, clock)
    return ANONYMOUS


# --- SigV4 -----------------------------------------------------------------------


class _CredentialError(ValueError):
    """A malformed credential; each caller words it as its own error."""


@dataclass(frozen=True, slots=True)
class _Credential:
    access_key: str
    date: str
    region: str
    service: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


@lru_cache(maxsize=1024)  # pure, and the same few credentials sign every request
def _parse_credential(value: str) -> _Credential:
    parts = value.split("/")
    if len(parts) != 5 or not all(parts):
        raise _CredentialError(_CREDENTIAL_FORMAT)
    access_key, date, region, service, terminal = parts
    if len(date) != 8 or not (date.isascii() and date.isdigit()):
        raise _CredentialError(
            f'incorrect date format "{date}". This date in the credential must be in the format "yyyyMMdd".'
        )
    # Any region: this is a local product and clients are configured with
    # all sorts; S3 itself would answer a wrong one with
    # "the region 'x' is wrong; expecting 'y'".
    if service != "s3":
        raise _CredentialError(f'incorrect service "{service}". This endpoint belongs to "s3".')
    if terminal != "aws4_request":
        raise _CredentialError(
            f'incorrect terminal "{terminal}". This endpoint uses "aws4_request".'
        )
    return _Credential(access_key, date, region, service)


def _check_payload_hash(value: str) -> None:
    if value in PAYLOAD_TOKENS or _HEX_SHA256.fullmatch(value):
        return
    raise InvalidArgument(
        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER "
        "or a valid sha256 value.",
        ArgumentName="x-amz-content-sha256",
        ArgumentValue=value,
    )


def _signed_header_names(value: str) -> list[str]:
    # Kept in the order the client declared: it is what it signed.
    return [name.strip().lower() for name in value.split(";")]


def _require_signed(headers: dict[str, list[str]], signed: list[str]) -> None:
    signed_set = set(signed)
    missing = {
        name
        for name in headers
        if name.startswith("x-amz-") and name != "x-amz-content-sha256" and name not in signed_set
    }
    if "host" not in signed_set:
        missing.add("host")
    if missing:
        raise AccessDenied(_NOT_SIGNED, HeadersNotSigned=", ".join(sorted(missing)))


def _canonical_request(
    method: str,
    raw_path: str,
    canonical_query: str,
    headers: dict[str, list[str]],
    signed: list[str],
    payload_hash: str,
) -> str:
    lines = [method, _canonical_uri(raw_path), canonical_query]
    for name in signed:
        # Trimall: outer whitespace dropped, inner runs collapsed to one space.
        values = (" ".join(v.split()) for v in headers.get(name, ()))
        lines.append(f"{name}:{','.join(values)}")
    lines.append("")
    lines.append(";".join(signed))
    lines.append(payload_hash)
    return "\n".join(lines)


def _verify_v4(
    *,
    secret: str,
    credential: _Credential,
    amz_date: str,
    canonical_request: str,
    signature: str,
    scheme: Scheme,
    payload_hash: str,
) -> AuthContext:
    """Check ``signature``; return the request's authentication context
    (with the signing key, for aws-chunked chunk signatures)."""
    access_key = credential.access_key
    string_to_sign = "\n".join(
        (
            ALGORITHM,
            amz_date,
            credential.scope,
            hashlib.sha256(_raw(canonical_request)).hexdigest(),
        )
    )
    key = derive_signing_key(secret, credential.date, credential.region, credential.service)
    expected = hmac.new(key, _raw(string_to_sign), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), _raw(signature)):
        raise SignatureDoesNotMatch(
            AWSAccessKeyId=access_key,
            StringToSign=string_to_sign,
            SignatureProvided=signature,
            StringToSignBytes=_hex_bytes(string_to_sign),
            CanonicalRequest=canonical_request,
            CanonicalRequestBytes=_hex_bytes(canonical_request),
        )
    return AuthContext(
        access_key=access_key,
        scheme=scheme,
        content_sha256=payload_hash,
        signing_key=key,
        seed_signature=signature,
        amz_date=amz_date,
        scope=credential.scope,
    )


def _v4_header(
    req: SignedRequest,
    headers: dict[str, list[str]],
    pairs: list[tuple[str, str | None]],
    rest: str,
    secrets: Mapping[str, str],
    now: datetime,
) -> AuthContext:
    components: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            components[name.strip()] = value.strip()
    try:
        credential_text = components["Credential"]
        signed_text = components["SignedHeaders"]
        signature = components["Signature"]
    except KeyError:
        raise AuthorizationHeaderMalformed(
            _MALFORMED
            + "the authorization header requires three components: "
            + "Credential, SignedHeaders, and Signature."
        ) from None
    try:
        credential = _parse_credential(credential_text)
    except _CredentialError as exc:
        raise AuthorizationHeaderMalformed(_MALFORMED + str(exc)) from None

    # x-amz-date wins over Date; a Date header is signed in ISO 8601 basic
    # form, as botocore does when it signs a request that carries one.
    raw_date = _first(headers, "x-amz-date")
    if raw_date is not None:
        when = _parse_amz_date(raw_date)
        amz_date = raw_date
    else:
        raw_date = _first(headers, "date")
        when = _parse_http_date(raw_date) if raw_date is not None else None
        amz_date = when.strftime("%Y%m%dT%H%M%SZ") if when is not None else ""
    if when is None or raw_date is None:
        raise AccessDenied(_NEEDS_DATE)
    if credential.date != amz_date[:8]:
        raise AuthorizationHeaderMalformed(
            _MALFORMED + "Invalid credential date. Date is not the same as X-Amz-Date."
        )

    payload_hash = _first(headers, "x-amz-content-sha256")
    if payload_hash is None:
        # S3 requires it with header auth, unlike other services.
        raise InvalidRequest("Missing required header for this request: x-amz-content-sha256")
    _check_payload_hash(payload_hash)

    secret = _secret_for(secrets, credential.access_key)
    _check_skew(when, raw_date, now)
    signed = _signed_header_names(signed_text)
    _require_signed(headers, signed)
    canonical = _canonical_request(
        req.method, req.raw_path, _canonical_query(pairs), headers, signed, payload_hash
    )
    return _verify_v4(
        secret=secret,
        credential=credential,
        amz_date=amz_date,
        canonical_request=canonical,
        signature=signature,
        scheme="v4",
        payload_hash=payload_hash,
    )


def _v4_query(
    req: SignedRequest,
    headers: dict[str, list[str]],
    pairs: list[tuple[str, str | None]],
    params: dict[str, str],
    secrets: Mapping[str, str],
    now: datetime,
) -> AuthContext:
    # AWS "Authenticating Requests: Using Query Parameters (AWS Signature
    # Version 4)"; the error texts are S3's own.
    if any(name not in params for name in _V4_QUERY_PARAMS):
        raise AuthorizationQueryParametersError(
            "Query-string authentication version 4 requires the X-Amz-Algorithm, "
            "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
            "and X-Amz-Expires parameters."
        )
    algorithm = params["X-Amz-Algorithm"]
    if algorithm == SIGV4A_ALGORITHM:
        raise S3NotImplemented("SigV4a presigned URLs are not implemented")
    if algorithm != ALGORITHM:
        raise AuthorizationQueryParametersError('X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"')
    try:
        credential = _parse_credential(params["X-Amz-Credential"])
    except _CredentialError as exc:
        raise AuthorizationQueryParametersError(
            "Error parsing the X-Amz-Credential parameter; " + str(exc)
        ) from None
    amz_date = params["X-Amz-Date"]
    when = _parse_amz_date(amz_date)
    if when is None:
        raise AuthorizationQueryParametersError(
            "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""
        )
    if credential.date != amz_date[:8]:
        raise AuthorizationQueryParametersError(
            "Invalid credential date. Date is not the same as X-Amz-Date."
        )
    raw_expires = params["X-Amz-Expires"]
    if not _INTEGER.fullmatch(raw_expires):
        raise AuthorizationQueryParametersError("X-Amz-Expires should be a number")
    expires = int(raw_expires)
    if expires < 0:
        raise AuthorizationQueryParametersError("X-Amz-Expires must be non-negative")
    if expires > MAX_PRESIGNED_EXPIRES:
        raise AuthorizationQueryParametersError(
            "X-Amz-Expires must be less than a week (in seconds); that is, the given "
            "X-Amz-Expires must be less than 604800 seconds"
        )

    secret = _secret_for(secrets, credential.access_key)
    expires_at = when + timedelta(seconds=expires)
    if when - now > MAX_SKEW:
        # S3 reports X-Amz-Date here in epoch milliseconds, oddly; so do we.
        raise _with_fields(
            AccessDenied("Request is not yet valid"),
            {
                "X-Amz-Date": str(int(when.timestamp() * 1000)),
                "Expires": _iso(expires_at),
                "ServerTime": _iso(now),
            },
        )
    if now > expires_at:
        raise _with_fields(
            AccessDenied("Request has expired"),
            {"X-Amz-Expires": raw_expires, "Expires": _iso(expires_at), "ServerTime": _iso(now)},
        )

    # A presigned URL knows nothing of the payload: UNSIGNED-PAYLOAD, unless
    # the client declared a hash (botocore: a header; the JS SDK: a parameter).
    payload_hash = _first(headers, "x-amz-content-sha256") or params.get(
        "X-Amz-Content-Sha256", UNSIGNED_PAYLOAD
    )
    _check_payload_hash(payload_hash)
    signed = _signed_header_names(params["X-Amz-SignedHeaders"])
    _require_signed(headers, signed)
    canonical = _canonical_request(
        req.method,
        req.raw_path,
        _canonical_query(pairs, skip="X-Amz-Signature"),
        headers,
        signed,
        payload_hash,
    )
    signature = params["X-Amz-Signature"]
    return _verify_v4(
        secret=secret,
        credential=credential,
        amz_date=amz_date,
        canonical_request=canonical,
        signature=signature,
        scheme="v4-query",
        payload_hash=payload_hash,
    )


# --- SigV2 -----------------------------------------------------------------------


def _v2_resource(
    req: SignedRequest, pairs: list[tuple[str, str | None]], *, bucket_slash: bool = True
) -> str:
    """CanonicalizedResource (AWS "Signing and authenticating REST requests"),
    built as botocore's HmacV1Auth.canonical_resource builds it; with
    ``bucket_slash`` False, as other clients (and S3's documentation) build
    it, from the path exactly as sent."""
    path = req.raw_path or "/"
    if req.vhost_bucket:
        path = "/" + req.vhost_bucket + path
    elif bucket_slash and path.count("/") == 1 and len(path) > 1:
        # A bucket-level request, path style: botocore sends "/bucket" and
        # signs its authPath "/bucket/".
        path += "/"
    # By their decoded names, as the router reads them: "?%75ploads" is
    # ?uploads to the router, so it is signed as ?uploads (or not at all,
    # and the signature does not match).
    decoded = [(form_unquote(key), value) for key, value in pairs]
    subresources = [
        (name, name if value is None else f"{name}={form_unquote(value)}")
        for name, value in decoded
        if name in V2_SUBRESOURCES
    ]
    if not subresources:
        return path
    subresources.sort(key=lambda item: item[0])  # by name only, stable: as botocore
    return path + "?" + "&".join(text for _, text in subresources)


def _v2_string_to_sign(
    method: str,
    content_md5: str,
    content_type: str,
    date: str,
    amz_headers: dict[str, list[str]],
    resource: str,
) -> str:
    amz = "".join(
        f"{name}:{','.join(v.strip() for v in amz_headers[name])}\n" for name in sorted(amz_headers)
    )
    return f"{method}\n{content_md5}\n{content_type}\n{date}\n{amz}{resource}"


def _v2_digest(secret: str, string_to_sign: str) -> bytes:
    digest = hmac.new(secret.encode("utf-8"), _raw(string_to_sign), hashlib.sha1)
    return base64.b64encode(digest.digest())


def _verify_v2(
    access_key: str, secret: str, string_to_sign: str, signature: str, alternative: str | None = None
) -> None:
    """Check a V2 signature; ``alternative`` is a second string to sign
    that a client may equally have used (a bucket path with or without its
    trailing slash)."""
    ok = hmac.compare_digest(_v2_digest(secret, string_to_sign), _raw(signature))
    if not ok and alternative is not None:
        ok = hmac.compare_digest(_v2_digest(secret, alternative), _raw(signature))
    if not ok:
        raise SignatureDoesNotMatch(
            AWSAccessKeyId=access_key,
            StringToSign=string_to_sign,
            SignatureProvided=signature,
            StringToSignBytes=_hex_bytes(string_to_sign),
        )


def _amz_headers(headers: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: list(values) for name, values in headers.items() if name.startswith("x-amz-")}


def _v2_header(
    req: SignedRequest,
    headers: dict[str, list[str]],
    pairs: list[tuple[str, str | None]],
    authorization: str,
    rest: str,
    secrets: Mapping[str, str],
    now: datetime,
) -> AuthContext:
    access_key, sep, signature = rest.strip().partition(":")
    if not sep or not access_key or not signature:
        raise InvalidArgument(
            "AWS authorization header is invalid.  Expected AwsAccessKeyId:signature",
            ArgumentName="Authorization",
            ArgumentValue=authorization,
        )
    amz_date = _first(headers, "x-amz-date")
    raw_date = amz_date if amz_date is not None else _first(headers, "date")
    when: datetime | None = None
    if raw_date is not None:
        when = _parse_http_date(raw_date) or _parse_amz_date(raw_date)
    if when is None or raw_date is None:
        raise AccessDenied(_NEEDS_DATE)
    secret = _secret_for(secrets, access_key)
    _check_skew(when, raw_date, now)
    # With x-amz-date the Date line is empty; x-amz-date is signed among the
    # x-amz- headers instead.
    date_line = "" if amz_date is not None else raw_date.strip()
    def sts(bucket_slash: bool) -> str:
        return _v2_string_to_sign(
            req.method,
            (_first(headers, "content-md5") or "").strip(),
            (_first(headers, "content-type") or "").strip(),
            date_line,
            _amz_headers(headers),
            _v2_resource(req, pairs, bucket_slash=bucket_slash),
        )

    string_to_sign, alternative = sts(True), sts(False)
    _verify_v2(access_key, secret, string_to_sign, signature,
               alternative if alternative != string_to_sign else None)
    return AuthContext(access_key, "v2", None, None, None, None, None)


def _v2_query(
    req: SignedRequest,
    headers: dict[str, list[str]],
    pairs: list[tuple[str, str | None]],
    params: dict[str, str],
    secrets: Mapping[str, str],
    now: datetime,
) -> AuthContext:
    access_key = params.get("AWSAccessKeyId")
    signature = params.get("Signature")
    raw_expires = params.get("Expires")
    if not access_key or not signature or raw_expires is None:
        raise AuthorizationQueryParametersError()
    if not _INTEGER.fullmatch(raw_expires):
        raise AccessDenied(f"Invalid date (should be seconds since epoch): {raw_expires}")
    secret = _secret_for(secrets, access_key)
    expires = int(raw_expires)
    if now.timestamp() > expires:
        raise AccessDenied(
            "Request has expired",
            Expires=_iso(datetime.fromtimestamp(expires, UTC)),
            ServerTime=_iso(now),
        )
    if expires - now.timestamp() > MAX_PRESIGNED_EXPIRES:
        # SigV4's bound (a week) for SigV2 too: a leaked URL that works
        # for years is a key that cannot be revoked but by rotating it.
        raise AccessDenied("Expires must be less than a week (604800 seconds) from now",
                           Expires=_iso(datetime.fromtimestamp(expires, UTC)), ServerTime=_iso(now))
    # botocore's HmacV1QueryAuth signs the request's x-amz-*, Content-Type
    # and Content-MD5 headers, then moves them into the query string, so the
    # URL alone must verify: the query stands in for headers not sent (a
    # header that is sent wins).
    query_headers: dict[str, list[str]] = {}
    for key, value in pairs:
        name = form_unquote(key).lower()
        if name.startswith("x-amz-") or name in ("content-type", "content-md5"):
            query_headers.setdefault(name, []).append(form_unquote(value or ""))
    merged = {**query_headers, **headers}
    content_md5 = _first(merged, "content-md5") or ""
    content_type = _first(merged, "content-type") or ""
    def sts(bucket_slash: bool) -> str:
        return _v2_string_to_sign(
            req.method,
            content_md5.strip(),
            content_type.strip(),
            raw_expires,
            _amz_headers(merged),
            _v2_resource(req, pairs, bucket_slash=bucket_slash),
        )

    string_to_sign, alternative = sts(True), sts(False)
    _verify_v2(access_key, secret, string_to_sign, signature,
               alternative if alternative != string_to_sign else None)
    return AuthContext(access_key, "v2-query", None, None, None, None, None)


# --- POST (browser form uploads) -----------------------------------------------------


def _missing_field(name: str) -> InvalidArgument:
    return InvalidArgument(
        f"Bucket POST must contain a field named '{name}'.  "
        "If it is specified, please check the order of the fields.",
        ArgumentName=name,
        ArgumentValue="",
    )


def authenticate_post(
    fields: Mapping[str, str], secrets: Mapping[str, str], *, now: datetime | None = None
) -> tuple[AuthContext, PostPolicy]:
    """Authenticate a POST Object form (field names case-insensitive, as S3)
    and decode its policy; expiry is checked here, conditions by
    :meth:`PostPolicy.check`. The signature covers the base64 policy text as
    sent (AWS "Browser-Based Uploads Using POST")."""
    clock = _now(now)
    form = _lower_keys(fields)
    if any(name in form for name in ("x-amz-algorithm", "x-amz-credential", "x-amz-signature")):
        context = _post_v4(form, secrets)
    elif "awsaccesskeyid" in form or "signature" in form:
        context = _post_v2(form, secrets)
    elif "policy" in form:
        raise _missing_field("AWSAccessKeyId")
    else:
        return ANONYMOUS, PostPolicy(datetime.max.replace(tzinfo=UTC), (), anonymous=True)
    policy = _parse_policy(form["policy"])
    if clock > policy.expiration:
        raise AccessDenied("Invalid according to Policy: Policy expired.")
    return context, policy


def _post_v4(form: dict[str, str], secrets: Mapping[str, str]) -> AuthContext:
    for name in ("x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-signature", "policy"):
        if name not in form:
            raise _missing_field(name)
    algorithm = form["x-amz-algorithm"]
    if algorithm == SIGV4A_ALGORITHM:
        raise S3NotImplemented("SigV4a POST uploads are not implemented")
    if algorithm != ALGORITHM:
        raise InvalidArgument(
            'x-amz-algorithm only supports "AWS4-HMAC-SHA256"',
            ArgumentName="x-amz-algorithm",
            ArgumentValue=algorithm,
        )
    try:
        credential = _parse_credential(form["x-amz-credential"])
    except _CredentialError as exc:
        raise InvalidArgument(
            "Error parsing the X-Amz-Credential parameter; " + str(exc),
            ArgumentName="x-amz-credential",
            ArgumentValue=form["x-amz-credential"],
        ) from None
    amz_date = form["x-amz-date"]
    if _parse_amz_date(amz_date) is None or amz_date[:8] != credential.date:
        # The signing key is derived for the credential's date; the form's
        # date must be that same day (POST policy docs, x-amz-date).
        raise InvalidArgument(
            "Invalid credential date. Date is not the same as X-Amz-Date.",
            ArgumentName="x-amz-date",
            ArgumentValue=amz_date,
        )
    secret = _secret_for(secrets, credential.access_key)
    policy_b64 = form["policy"]
    signature = form["x-amz-signature"]
    key = derive_signing_key(secret, credential.date, credential.region, credential.service)
    expected = hmac.new(key, _raw(policy_b64), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), _raw(signature)):
        raise SignatureDoesNotMatch(
            AWSAccessKeyId=credential.access_key,
            StringToSign=policy_b64,
            SignatureProvided=signature,
            StringToSignBytes=_hex_bytes(policy_b64),
        )
    return AuthContext(
        access_key=credential.access_key,
        scheme="post-v4",
        content_sha256=None,
        signing_key=key,
        seed_signature=signature,
        amz_date=amz_date,
        scope=credential.scope,
    )


def _post_v2(form: dict[str, str], secrets: Mapping[str, str]) -> AuthContext:
    for name, shown in (
        ("awsaccesskeyid", "AWSAccessKeyId"),
        ("signature", "signature"),
        ("policy", "policy"),
    ):
        if name not in form:
            raise _missing_field(shown)
    access_key = form["awsaccesskeyid"]
    secret = _secret_for(secrets, access_key)
    _verify_v2(access_key, secret, form["policy"], form["signature"])
    return AuthContext(access_key, "post-v2", None, None, None, None, None)


def _parse_policy(policy_b64: str) -> PostPolicy:
    try:
        # Not validate=True: some SDKs wrap base64 lines; the signature was
        # over the text as sent, the document is what it decodes to.
        document = json.loads(base64.b64decode(policy_b64))
    except (binascii.Error, ValueError):
        raise InvalidPolicyDocument("Invalid Policy: Invalid JSON.") from None
    if not isinstance(document, dict):
        raise InvalidPolicyDocument("Invalid Policy: Invalid JSON.")
    expiration_text = document.get("expiration")
    if expiration_text is None:
        raise InvalidPolicyDocument("Invalid Policy: Policy missing expiration.")
    expiration = _parse_expiration(expiration_text)
    raw_conditions = document.get("conditions")
    if not isinstance(raw_conditions, list):
        raise InvalidPolicyDocument("Invalid Policy: Policy missing conditions.")
    conditions: list[PolicyCondition] = []
    for item in raw_conditions:
        conditions.extend(_parse_condition(item))
    return PostPolicy(expiration=expiration, conditions=tuple(conditions))


def _parse_expiration(value: object) -> datetime:
    # ISO 8601 with a zone, e.g. 2007-12-01T12:00:00.000Z (botocore omits
    # the milliseconds).
    when: datetime | None = None
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            when = None
    if when is None:
        raise InvalidPolicyDocument(f"Invalid Policy: Invalid 'expiration' value: '{value}'")
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _policy_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _parse_condition(item: object) -> list[PolicyCondition]:
    invalid = InvalidPolicyDocument(f"Invalid Policy: Invalid condition: {json.dumps(item)}")
    if isinstance(item, dict):
        # {"acl": "public-read"}: an exact match.
        out: list[PolicyCondition] = []
        for name, value in item.items():
            if not isinstance(value, str):
                raise invalid
            source = json.dumps(["eq", "$" + name, value])
            out.append(PolicyCondition("eq", name.lower(), value, source=source))
        return out
    if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str):
        raise invalid
    op = item[0].lower()
    if op == "content-length-range":
        low, high = _policy_int(item[1]), _policy_int(item[2])
        if low is None or high is None or low < 0 or high < low:
            raise invalid
        return [
            PolicyCondition("content-length-range", low=low, high=high, source=json.dumps(item))
        ]
    name, value = item[1], item[2]
    if op not in ("eq", "starts-with") or not isinstance(name, str) or not isinstance(value, str):
        raise invalid
    if not name.startswith("$"):
        raise invalid
    kind: Literal["eq", "starts-with"] = "eq" if op == "eq" else "starts-with"
    return [PolicyCondition(kind, name[1:].lower(), value, source=json.dumps(item))]

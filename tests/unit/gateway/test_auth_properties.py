"""Property tests (hypothesis) of the request front door: SigV4 and SigV2
canonicalization against botocore's own signers, for any key and query a
client may send, the signed aws-chunked decoder for any chunking and any
flipped bit, and byte ranges against a reference model (issue 16,
fuzzing). Bounded: a few hundred examples each, the same every run, no
deadline (the box is shared). More, and fresh ones:

    NEARSTORE_FUZZ_EXAMPLES=5000 pytest tests/unit/gateway/test_auth_properties.py
"""

from __future__ import annotations

import os
from urllib.parse import quote

from botocore.auth import HmacV1Auth, HmacV1QueryAuth, S3SigV4Auth, S3SigV4QueryAuth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nearstore.gateway.auth import authenticate
from nearstore.gateway.errors import AccessDenied, SignatureDoesNotMatch
from nearstore.metadata.backing import RangeNotSatisfiable, parse_range
from tests.unit.gateway.test_auth import CREDS, ENDPOINT, SECRETS, signed_with

# Derandomized: the same examples on every run (CI must not find a new one
# at random); NEARSTORE_FUZZ_EXAMPLES=N explores N fresh ones instead.
_EXAMPLES = int(os.environ.get("NEARSTORE_FUZZ_EXAMPLES", "0"))
BOUNDED = settings(max_examples=_EXAMPLES or 150, derandomize=not _EXAMPLES, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

# What S3 keys may hold: any Unicode but the surrogates and NUL (S3 refuses
# those; our check_key too), up to a few path segments.
KEY_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
keys = st.text(KEY_CHARS, min_size=1, max_size=40)
# Query parameters a client adds (never the signing parameters themselves,
# nor the headers a SigV2 presigned URL carries in its query: x-amz-*,
# Content-MD5, Content-Type; values anything).
names = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="-_.~"),
                min_size=1, max_size=12).filter(
    lambda n: not n.lower().startswith("x-amz-") and n not in ("Signature", "Expires", "AWSAccessKeyId")
    and n.lower() not in ("content-md5", "content-type"))
values = st.text(KEY_CHARS, max_size=20)
queries = st.dictionaries(names, values, max_size=4)


def url_for(key: str, query: dict[str, str]) -> str:
    url = f"{ENDPOINT}/bkt/{quote(key, safe='/~')}"
    if query:
        url += "?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in query.items())
    return url


@BOUNDED
@given(key=keys, query=queries, method=st.sampled_from(["GET", "PUT", "DELETE", "HEAD"]))
def test_sigv4_header_signatures_verify_for_any_key_and_query(key: str, query: dict[str, str], method: str) -> None:
    req = signed_with(S3SigV4Auth(CREDS, "s3", "us-east-1"), method, url_for(key, query),
                      [("x-amz-content-sha256", "UNSIGNED-PAYLOAD")])
    assert authenticate(req, SECRETS).scheme == "v4"
    # Any other path is another request: refused.
    other = type(req)(**{**req.__dict__, "raw_path": req.raw_path + "x"})
    try:
        authenticate(other, SECRETS)
    except SignatureDoesNotMatch:
        pass
    else:
        raise AssertionError("a changed path verified")


@BOUNDED
@given(key=keys, query=queries)
def test_sigv4_presigned_urls_verify_for_any_key_and_query(key: str, query: dict[str, str]) -> None:
    req = signed_with(S3SigV4QueryAuth(CREDS, "s3", "us-east-1", expires=300), "GET", url_for(key, query))
    assert authenticate(req, SECRETS).scheme == "v4-query"


@BOUNDED
@given(key=keys, query=queries, presigned=st.booleans())
def test_sigv2_signatures_verify_for_any_key_and_query(key: str, query: dict[str, str], presigned: bool) -> None:
    signer = HmacV1QueryAuth(CREDS, expires=300) if presigned else HmacV1Auth(CREDS)
    req = signed_with(signer, "GET", url_for(key, query))
    assert authenticate(req, SECRETS).scheme == ("v2-query" if presigned else "v2")


@BOUNDED
@given(key=keys, tampered=st.text(st.sampled_from("abcXYZ019+/="), min_size=1, max_size=4))
def test_a_tampered_signature_never_verifies(key: str, tampered: str) -> None:
    req = signed_with(S3SigV4QueryAuth(CREDS, "s3", "us-east-1", expires=300), "GET", url_for(key, {}))
    bad = type(req)(**{**req.__dict__, "raw_query": req.raw_query + tampered})
    try:
        authenticate(bad, SECRETS)
    except (SignatureDoesNotMatch, AccessDenied):
        pass
    except Exception as e:  # another S3 error is fine; a crash is not
        assert getattr(e, "status", 500) < 500, e
    else:
        # Only an added "&" (no parameter) or an empty name may leave the
        # signed request unchanged.
        assert set(tampered) <= set("&")


def reference_range(header: str, size: int) -> tuple[int, int] | str | None:
    """RFC 9110 byte ranges as S3 reads them (one range; else the whole
    object); "416" where S3 answers InvalidRange."""
    value = header.strip()
    if not value.lower().startswith("bytes="):
        return None
    spec = value[6:].strip()
    if "," in spec or "-" not in spec:
        return None
    first_s, last_s = (p.strip() for p in spec.split("-", 1))
    if not first_s and not last_s:
        return None
    if not all(p.isdigit() or p == "" for p in (first_s, last_s)):
        return None
    if not first_s:
        n = int(last_s)
        if n == 0 or size == 0:
            return "416"
        return max(0, size - n), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else None
    if last is not None and last < first:
        return None
    if first >= size:
        return "416"
    return first, size - 1 if last is None else min(last, size - 1)


@settings(max_examples=_EXAMPLES or 400, derandomize=not _EXAMPLES, deadline=None)
@given(first=st.one_of(st.none(), st.integers(0, 300)), last=st.one_of(st.none(), st.integers(0, 300)),
       size=st.integers(0, 200), spaces=st.booleans())
def test_ranges_match_a_reference_model(first: int | None, last: int | None, size: int, spaces: bool) -> None:
    sep = " " if spaces else ""
    header = f"bytes={sep}{'' if first is None else first}{sep}-{sep}{'' if last is None else last}"
    want = reference_range(header, size)
    try:
        got: tuple[int, int] | str | None = parse_range(header, size)
    except RangeNotSatisfiable:
        got = "416"
    assert got == want, header


# --- the aws-chunked decoder ----------------------------------------------------------


@BOUNDED
@given(data=st.binary(max_size=40_000), cuts=st.lists(st.integers(8192, 20_000), min_size=1, max_size=4),
       block=st.integers(512, 20_000), flip=st.one_of(st.none(), st.integers(0, 10**6)))
def test_signed_aws_chunked_decodes_exactly_or_refuses(data: bytes, cuts: list[int], block: int,
                                                       flip: int | None) -> None:
    """Any chunking of any body (every chunk but the last at least 8 KiB, as
    S3 requires), fed in any blocks, decodes to the body; a bit changed
    anywhere in the framed body is refused (an S3 error, never other bytes
    and never a crash)."""
    import asyncio

    from nearstore.gateway import errors
    from tests.unit.gateway.test_payload import SIGNED, run, signed_body, split, streaming, v4

    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = cuts[i % len(cuts)]
        chunks.append(data[pos:pos + size])
        pos, i = pos + size, i + 1
    body = bytearray(signed_body(chunks))
    if flip is not None:
        body[flip % len(body)] ^= 0x01
    headers = streaming(SIGNED, len(data), **{"Content-Length": str(len(body))})
    try:
        _, got = asyncio.run(run(split(bytes(body), block), headers, v4(SIGNED)))
    except errors.S3Error as e:
        assert flip is not None and e.status < 500, e
        return
    # Decoded without complaint: only ever the body itself (a flipped bit in
    # framing the decoder tolerates, say the last CRLF, changes no byte).
    assert got == data

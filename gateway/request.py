"""Requests become a frozen, typed ``S3Request`` by pure functions.

We parse the path and the query ourselves from the raw request line rather
than trusting the HTTP framework's decoded view: S3 keys may contain '..',
'//', '%2F', '+' and anything else, and a framework that normalises paths
(dot segments, duplicate slashes) would silently address another key.

Bucket names follow the S3 rules for new buckets (3-63 characters of
lower-case letters, digits, '.', '-'; starts and ends with a letter or digit;
no IP addresses; no "..", "xn--" prefix, "-s3alias" suffix). Keys are at most
1024 bytes of UTF-8 (AWS "Creating object key names").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from aiohttp import web

from nearstore.gateway import errors

MAX_KEY_BYTES = 1024

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def validate_bucket_name(name: str) -> None:
    if (
        not _BUCKET_RE.match(name)
        or ".." in name
        or ".-" in name
        or "-." in name
        or _IP_RE.match(name)
        or name.startswith(("xn--", "sthree-"))
        or name.endswith(("-s3alias", "--ol-s3", "--x-s3"))
    ):
        raise errors.InvalidBucketName(BucketName=name)


def _decode(raw: str, what: str) -> str:
    if "%" not in raw and raw.isascii():
        return raw  # nothing to decode (most keys and query values)
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidURI(URI=raw) from None


def parse_query(raw_query: str) -> dict[str, str]:
    """Decode a query string S3's way: '+' is a space only in values the
    client encoded as form data, but SDKs always percent-encode, and S3
    treats '+' as a space (as URL form decoding does). The first value of a
    repeated parameter wins."""
    out: dict[str, str] = {}
    if not raw_query:
        return out
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = _decode(name.replace("+", " "), "query")
        if name not in out:
            out[name] = _decode(value.replace("+", " "), "query")
    return out


@dataclass(frozen=True)
class S3Request:
    # The aiohttp request behind this one; None on the hot path
    # (gateway.hotpath), which serves only requests without a body.
    http: web.Request | None
    headers: Mapping[str, str]  # case-insensitive (a CIMultiDict or its proxy)
    method: str
    bucket: str | None
    key: str | None
    query: Mapping[str, str]
    raw_path: str
    raw_query: str
    request_id: str
    vhost: bool = False

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def body(self) -> web.Request:
        """The aiohttp request, for the handlers that read a body."""
        if self.http is None:
            raise RuntimeError("a hot-path request has no body")
        return self.http


def split_target(raw_path: str, host: str | None, domain: str | None) -> tuple[str | None, str | None, bool]:
    """(bucket, key, virtual-hosted?) from the raw path and Host header.

    Path style: /bucket/key. Virtual-hosted style when ``domain`` is set and
    Host is <bucket>.<domain>[:port]: the whole path is the key.
    """
    if not raw_path.startswith("/"):
        raise errors.InvalidURI(URI=raw_path)
    if domain and host:
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        hostname = hostname.lower()
        suffix = "." + domain.lower()
        if hostname.endswith(suffix) and len(hostname) > len(suffix):
            bucket = hostname[: -len(suffix)]
            raw_key = raw_path[1:]
            return bucket, (_decode(raw_key, "key") if raw_key else None), True
    rest = raw_path[1:]
    if not rest:
        return None, None, False
    raw_bucket, slash, raw_key = rest.partition("/")
    bucket = _decode(raw_bucket, "bucket")
    key = _decode(raw_key, "key") if slash and raw_key else None
    return bucket, key, False


def check_key(key: str) -> None:
    if len(key.encode()) > MAX_KEY_BYTES:
        raise errors.KeyTooLongError(Size=str(len(key.encode())), MaxSizeAllowed=str(MAX_KEY_BYTES))

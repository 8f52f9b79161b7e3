"""Pure HTTP semantics for reads: dates and conditional requests.

(Byte ranges are read by ``metadata.backing.parse_range``: the backing
stores and the cache's read path need them too. S3 applies RFC 9110 §14
its way: one ``bytes=`` range; a multi-range or invalid one gets the whole
object (200); one that starts past the end, or a zero-length suffix, 416.)

Conditionals (RFC 9110 §13.2.2 with S3's documented precedence):

1. If-Match false -> 412. If-Match true makes If-Unmodified-Since irrelevant.
2. Otherwise If-Unmodified-Since false -> 412.
3. If-None-Match matches -> 304 (GET/HEAD). If-None-Match present makes
   If-Modified-Since irrelevant.
4. Otherwise If-Modified-Since not modified -> 304.

Dates that do not parse are ignored, as HTTP requires. Last-Modified has
one-second resolution on the wire, so comparisons use whole seconds.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from multidict import CIMultiDict, CIMultiDictProxy

from nearstore.gateway import errors


def http_date(ts: float) -> str:
    return email.utils.formatdate(int(ts), usegmt=True)


def iso8601(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _etag_matches(header: str, etag: str) -> bool:
    bare = etag.strip('"')
    for candidate in header.split(","):
        c = candidate.strip()
        if c == "*":
            return True
        if c.startswith("W/"):
            c = c[2:]
        if c.strip('"') == bare:
            return True
    return False


def _evaluate(
    headers: Mapping[str, str],
    etag: str,
    last_modified: float,
    prefix: str,
    not_modified: Callable[[str], errors.S3Error],
) -> None:
    """The precedence both families share (module docstring); ``prefix`` is
    "" for GET/HEAD and "x-amz-copy-source-" for a copy's source, and
    ``not_modified`` builds the error for the two "not modified" cases."""
    lm = int(last_modified)
    if not isinstance(headers, (CIMultiDict, CIMultiDictProxy)):
        headers = CIMultiDict(headers)  # header names are case-insensitive
    if_match = headers.get(prefix + "If-Match")
    if if_match is not None:
        if not _etag_matches(if_match, etag):
            raise errors.PreconditionFailed(Condition=prefix + "If-Match")
    else:
        ius = parse_http_date(headers.get(prefix + "If-Unmodified-Since"))
        if ius is not None and lm > ius:
            raise errors.PreconditionFailed(Condition=prefix + "If-Unmodified-Since")
    if_none_match = headers.get(prefix + "If-None-Match")
    if if_none_match is not None:
        if _etag_matches(if_none_match, etag):
            raise not_modified(prefix + "If-None-Match")
    else:
        ims = parse_http_date(headers.get(prefix + "If-Modified-Since"))
        # A date in the future is ignored (RFC 9110 13.1.3).
        if ims is not None and lm <= ims and (prefix or ims <= time.time()):
            raise not_modified(prefix + "If-Modified-Since")


def check_read_conditions(headers: Mapping[str, str], etag: str, last_modified: float) -> None:
    """Raise PreconditionFailed (412) or NotModified (304), or return."""

    def not_modified(_: str) -> errors.S3Error:
        return errors.NotModified(headers={"ETag": etag, "Last-Modified": http_date(last_modified)})

    _evaluate(headers, etag, last_modified, "", not_modified)


def check_copy_source_conditions(headers: Mapping[str, str], etag: str, last_modified: float) -> None:
    """x-amz-copy-source-if-*: every failure is 412 (a copy never answers
    304). S3 documents that if-match true + if-unmodified-since false, and
    if-none-match false + if-modified-since true, proceed."""
    _evaluate(headers, etag, last_modified, "x-amz-copy-source-",
              lambda condition: errors.PreconditionFailed(Condition=condition))

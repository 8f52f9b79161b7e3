"""Property tests (hypothesis) of conditional requests (issue 16, fuzzing):
If-Match, If-None-Match, If-Modified-Since and If-Unmodified-Since, and
their x-amz-copy-source-* twins, against a small model of RFC 9110 §13
(formerly RFC 7232) with S3's precedence, written here apart from
``gateway.conditions``:

- an entity-tag list is ``*`` or comma-separated tags, each quoted or not
  (S3 takes both), ``W/`` ignored (S3's ETags are never weak, and S3
  compares If-Match weakly too);
- a date is an HTTP-date in any of its three forms (IMF-fixdate, RFC 850,
  asctime); anything else is no date at all and its header is ignored;
  Last-Modified counts in whole seconds;
- If-Match decides before If-Unmodified-Since, which it makes irrelevant;
  If-None-Match before If-Modified-Since, likewise; the first pair's 412
  comes before the second pair's 304;
- a GET's If-Modified-Since later than now is ignored (RFC 9110 §13.1.3); a
  copy's failures are all 412, never 304.

The functions are checked for any headers; a whole node in this process
(``tests.fuzz.front_door.FuzzNode``) for GET and HEAD on the hot path
(httptools) and on aiohttp's (a browser's request, with an Origin), and
for CopyObject, so that both servers and the copy agree with the model.

Bounded and derandomized like test_auth_properties.py; more, fresh:

    NEARSTORE_FUZZ_EXAMPLES=5000 pytest tests/unit/gateway/test_conditions_properties.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nearstore.gateway import errors
from nearstore.gateway.conditions import check_copy_source_conditions, check_read_conditions
from tests.fuzz.front_door import WARNINGS, FuzzNode, signed

pytestmark = [pytest.mark.filterwarnings(f"ignore::{w.__module__}.{w.__qualname__}") for w in WARNINGS]

_EXAMPLES = int(os.environ.get("NEARSTORE_FUZZ_EXAMPLES", "0"))
_SETTINGS: dict[str, Any] = {"derandomize": not _EXAMPLES, "deadline": None,
                             "suppress_health_check": [HealthCheck.too_slow]}
MANY = settings(max_examples=_EXAMPLES or 300, **_SETTINGS)
BOUNDED = settings(max_examples=_EXAMPLES or 100, **_SETTINGS)

# --- the model ---------------------------------------------------------------------------

Outcome = tuple[int, str] | None  # (304 or 412, the header that decided), None: served


def model(headers: dict[str, str], etag: str, last_modified: float, now: float, copy: bool) -> Outcome:
    prefix = "x-amz-copy-source-" if copy else ""
    lower = {k.lower(): v for k, v in headers.items()}

    def get(name: str) -> str | None:
        return lower.get((prefix + name).lower())

    def matches(value: str) -> bool:
        bare = etag.strip('"')
        for tag in value.split(","):
            tag = tag.strip()
            if tag == "*" or tag.removeprefix("W/").strip('"') == bare:
                return True
        return False

    def date(value: str | None) -> int | None:
        return DATES.get(value) if value is not None else None

    lm = int(last_modified)
    not_modified = 412 if copy else 304
    if (m := get("If-Match")) is not None:
        if not matches(m):
            return 412, prefix + "If-Match"
    elif (d := date(get("If-Unmodified-Since"))) is not None and lm > d:
        return 412, prefix + "If-Unmodified-Since"
    if (n := get("If-None-Match")) is not None:
        if matches(n):
            return not_modified, prefix + "If-None-Match"
    elif (d := date(get("If-Modified-Since"))) is not None and lm <= d and (copy or d <= now):
        return not_modified, prefix + "If-Modified-Since"
    return None


# Every HTTP-date the strategies below write, and the second it names:
# the model reads dates only through this table (what it wrote), never
# through a date parser of its own that could share the node's mistakes.
DATES: dict[str, int] = {}


def http_date(ts: int, form: str) -> str:
    """``ts`` in one of RFC 9110's three date forms."""
    dt = datetime.fromtimestamp(ts, UTC)
    if form == "imf":
        text = formatdate(ts, usegmt=True)
    elif form == "rfc850":
        text = dt.strftime("%A, %d-%b-%y %H:%M:%S GMT")
    else:  # asctime: the day space-padded
        text = dt.strftime("%a %b ") + f"{dt.day:2d}" + dt.strftime(" %H:%M:%S %Y")
    DATES[text] = ts
    return text


LM = 1_700_000_000.6  # an object's Last-Modified (2023-11-14, fractional as stores keep it)
ETAG = '"9a0364b9e99bb480dd25e1f0284c8555"'
MP_ETAG = '"d41d8cd98f00b204e9800998ecf8427e-3"'

# Dates around Last-Modified (the seconds that decide), far in the past, and
# well in the future (> now: RFC 850's two digits stay within 1970-2049).
seconds = st.one_of(st.integers(-3, 3).map(lambda d: int(LM) + d), st.integers(0, 10**9),
                    st.integers(0, 10**6).map(lambda d: int(time.time()) + 86_400 + d))
dates = st.builds(http_date, seconds, st.sampled_from(["imf", "rfc850", "asctime"]))
not_dates = st.sampled_from(["", "yesterday", "2023-11-14T22:13:20Z", "Tue, 32 Nov 2023 22:13:20 GMT",
                             "Tue, 14 Nov 2023 25:13:20 GMT", "1700000000", "GMT"])
tags = st.sampled_from([ETAG, ETAG.strip('"'), "W/" + ETAG, '"other"', "*", '""', MP_ETAG, "x"])
tag_lists = st.lists(tags, min_size=1, max_size=3).flatmap(
    lambda ts: st.sampled_from([",", ", ", " ,\t"]).map(lambda sep: sep.join(ts)))


def header_names(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


@st.composite
def conditions(draw: st.DrawFn, prefix: str = "") -> dict[str, str]:
    """Any subset of the four headers, in any case, with any values."""
    out = {}
    for name, values in (("If-Match", tag_lists), ("If-None-Match", tag_lists),
                         ("If-Modified-Since", st.one_of(dates, not_dates)),
                         ("If-Unmodified-Since", st.one_of(dates, not_dates))):
        if draw(st.booleans()):
            out[draw(header_names(prefix + name))] = draw(values)
    return out


def outcome(fn: Callable[[dict[str, str], str, float], None], headers: dict[str, str], etag: str) -> Outcome:
    try:
        fn(headers, etag, LM)
    except errors.NotModified as e:
        assert e.headers["ETag"] == etag and e.headers["Last-Modified"] == formatdate(int(LM), usegmt=True)
        # A 304 names no condition: If-None-Match's when it is present
        # (it makes If-Modified-Since irrelevant), else If-Modified-Since's.
        return 304, "If-None-Match" if any(k.lower() == "if-none-match" for k in headers) else "If-Modified-Since"
    except errors.PreconditionFailed as e:
        return 412, e.fields["Condition"]
    return None


# --- the functions ------------------------------------------------------------------------


@MANY
@given(headers=conditions(), etag=st.sampled_from([ETAG, MP_ETAG]))
def test_read_conditions_match_the_model(headers: dict[str, str], etag: str) -> None:
    assert outcome(check_read_conditions, headers, etag) == model(headers, etag, LM, time.time(), copy=False), headers


@MANY
@given(headers=conditions("x-amz-copy-source-"), etag=st.sampled_from([ETAG, MP_ETAG]))
def test_copy_source_conditions_match_the_model(headers: dict[str, str], etag: str) -> None:
    assert outcome(check_copy_source_conditions, headers, etag) == model(headers, etag, LM, time.time(),
                                                                          copy=True), headers


@MANY
@given(headers=conditions(), copy_headers=conditions("x-amz-copy-source-"))
def test_each_family_ignores_the_other(headers: dict[str, str], copy_headers: dict[str, str]) -> None:
    """A copy's own If-* headers are about its destination (S3 ignores
    them for the source), and a GET's never name x-amz-copy-source-*."""
    both = {**headers, **copy_headers}
    assert outcome(check_read_conditions, both, ETAG) == outcome(check_read_conditions, headers, ETAG)
    assert outcome(check_copy_source_conditions, both, ETAG) == outcome(check_copy_source_conditions, copy_headers,
                                                                        ETAG)


@MANY
@given(ts=seconds, form=st.sampled_from(["imf", "rfc850", "asctime"]))
def test_every_http_date_form_names_its_second(ts: int, form: str) -> None:
    """The model's table against the standard library's reading: what the
    strategies write are HTTP-dates that name ``ts``."""
    assert parsedate_to_datetime(http_date(ts, form)).timestamp() == ts


# --- through a node: the hot path, aiohttp's path, CopyObject -------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[FuzzNode, str, float]]:
    """A node with one object: (node, its ETag, its Last-Modified second)."""
    n = FuzzNode()
    for req in (signed("PUT", "/cond"), signed("PUT", "/cond/o", b"conditional")):
        (resp,) = n.serve(req, one=True, head=False)
        assert resp.status == 200, resp
    (head,) = n.serve(signed("HEAD", "/cond/o"), one=True, head=True)
    etag, lm = head.headers["etag"], parsedate_to_datetime(head.headers["last-modified"]).timestamp()
    yield n, etag, lm
    n.close()


@BOUNDED
@given(data=st.data(), how=st.sampled_from(["GET hot", "HEAD hot", "GET aiohttp", "HEAD aiohttp", "copy"]))
def test_a_node_answers_conditions_as_the_model(node: tuple[FuzzNode, str, float], data: st.DataObject,
                                               how: str) -> None:
    """Tags and dates drawn as for the functions, moved onto the object's
    real ETag and Last-Modified."""
    n, etag, lm = node
    copy = how == "copy"
    headers = data.draw(conditions("x-amz-copy-source-" if copy else ""))
    headers = {k: _near(v, lm).replace(ETAG.strip('"'), etag.strip('"')) for k, v in headers.items()}
    want = model(headers, etag, lm, time.time(), copy=copy)
    method, head = how.split()[0] if not copy else "PUT", how.startswith("HEAD")
    extra = {"Origin": "https://app.example.com"} if how.endswith("aiohttp") else {}
    if copy:
        extra = {"x-amz-copy-source": "/cond/o"}
    (resp,) = n.serve(signed(method, "/cond/copy" if copy else "/cond/o", b"", {**extra, **headers}),
                      one=True, head=head)
    got = resp.status
    if want is None:
        assert got == 200, (how, headers, resp)
        return
    assert got == want[0], (how, headers, want, resp)
    if got == 412 and not head:
        assert f"<Condition>{want[1]}</Condition>".encode() in resp.body, resp.body
    if got == 304:
        assert resp.headers["etag"] == etag and not resp.body


def _near(value: str, lm: float) -> str:
    """A date drawn around LM moved to the same place around ``lm`` (the
    node's object is written now, not in 2023)."""
    ts = DATES.get(value)
    if ts is None or abs(ts - int(LM)) > 3:
        return value
    form = "imf" if value.endswith("GMT") and "," in value and "-" not in value else (
        "rfc850" if value.endswith("GMT") else "asctime")
    return http_date(int(lm) + ts - int(LM), form)

"""Ranges and conditional requests: pure functions, RFC 9110 + S3 precedence."""

from __future__ import annotations

import pytest

from nearstore.gateway import errors
from nearstore.gateway.conditions import (
    check_copy_source_conditions,
    check_read_conditions,
    http_date,
)
from nearstore.metadata.backing import RangeNotSatisfiable, parse_range

ETAG = '"abc"'
LM = 1_700_000_000.4


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=2-4", 10, (2, 4)),
        ("bytes=5-", 10, (5, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=8-100", 10, (8, 9)),
        ("bytes=0-1,3-4", 10, None),  # multi-range: S3 sends the whole object
        ("items=0-1", 10, None),
        ("bytes=4-2", 10, None),  # syntactically invalid: ignored
        ("bytes=a-b", 10, None),
        ("bytes=-", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0)])
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as e:
        parse_range(header, size)
    # ... which the gateway answers as S3 does: 416 InvalidRange.
    s3 = errors.to_s3(e.value)
    assert isinstance(s3, errors.InvalidRange) and s3.status == 416
    assert s3.fields == {"RangeRequested": header, "ActualObjectSize": str(size)}


def _check(**headers: str) -> None:
    check_read_conditions({k.replace("_", "-"): v for k, v in headers.items()}, ETAG, LM)


def test_if_match() -> None:
    _check(If_Match='"abc"')
    _check(If_Match="*")
    _check(If_Match='"x", "abc"')
    with pytest.raises(errors.PreconditionFailed):
        _check(If_Match='"other"')


def test_if_none_match_is_304() -> None:
    with pytest.raises(errors.NotModified):
        _check(If_None_Match='"abc"')
    _check(If_None_Match='"other"')


def test_precedence_if_match_true_overrides_unmodified_since() -> None:
    past = http_date(LM - 3600)
    _check(If_Match=ETAG, If_Unmodified_Since=past)
    with pytest.raises(errors.PreconditionFailed):
        _check(If_Unmodified_Since=past)


def test_precedence_if_none_match_false_overrides_modified_since() -> None:
    future = http_date(LM + 3600)
    _check(If_None_Match='"other"', If_Modified_Since=future)
    with pytest.raises(errors.NotModified):
        _check(If_Modified_Since=future)


def test_412_wins_over_304() -> None:
    with pytest.raises(errors.PreconditionFailed):
        _check(If_Match='"other"', If_None_Match=ETAG)


def test_modified_since_uses_whole_seconds_and_ignores_garbage() -> None:
    with pytest.raises(errors.NotModified):
        _check(If_Modified_Since=http_date(LM))
    _check(If_Modified_Since="not a date")
    _check(If_Unmodified_Since="not a date")


def test_copy_source_conditions_never_304() -> None:
    with pytest.raises(errors.PreconditionFailed):
        check_copy_source_conditions({"x-amz-copy-source-if-none-match": ETAG}, ETAG, LM)
    with pytest.raises(errors.PreconditionFailed):
        check_copy_source_conditions({"x-amz-copy-source-if-match": '"zz"'}, ETAG, LM)
    check_copy_source_conditions(
        {"x-amz-copy-source-if-match": ETAG, "x-amz-copy-source-if-unmodified-since": http_date(LM - 10)}, ETAG, LM
    )

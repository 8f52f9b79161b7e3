"""Request-line parsing: keys are never normalised, names are validated."""

from __future__ import annotations

import pytest

from nearstore.gateway import errors
from nearstore.gateway.request import check_key, parse_query, split_target, validate_bucket_name


@pytest.mark.parametrize(
    ("raw", "bucket", "key"),
    [
        ("/", None, None),
        ("/bkt", "bkt", None),
        ("/bkt/", "bkt", None),
        ("/bkt/a/b.txt", "bkt", "a/b.txt"),
        ("/bkt/../../etc/passwd", "bkt", "../../etc/passwd"),
        ("/bkt//double//slash", "bkt", "/double//slash"),
        ("/bkt/sp%20ace%2Bplus+%25", "bkt", "sp ace+plus+%"),
        ("/bkt/%E2%82%AC", "bkt", "\u20ac"),
        ("/bkt/a%2Fb", "bkt", "a/b"),
    ],
)
def test_path_style(raw: str, bucket: str | None, key: str | None) -> None:
    assert split_target(raw, "127.0.0.1:9000", None) == (bucket, key, False)


def test_virtual_hosted_style() -> None:
    assert split_target("/a/b", "data.s3.local:9000", "s3.local") == ("data", "a/b", True)
    assert split_target("/", "data.s3.local", "s3.local") == ("data", None, True)
    # The bare domain is path style.
    assert split_target("/data/k", "s3.local:9000", "s3.local") == ("data", "k", False)


def test_invalid_utf8_is_invalid_uri() -> None:
    with pytest.raises(errors.InvalidURI):
        split_target("/bkt/%FF", None, None)


@pytest.mark.parametrize("name", ["abc", "my-bucket.data", "a" * 63, "0bucket9"])
def test_valid_bucket_names(name: str) -> None:
    validate_bucket_name(name)


@pytest.mark.parametrize(
    "name", ["ab", "a" * 64, "Upper", "under_score", "-start", "end-", "a..b", "192.168.1.1", "xn--abc", "a.-b", "x-s3alias"[0:0] + "abc-s3alias"]
)
def test_invalid_bucket_names(name: str) -> None:
    with pytest.raises(errors.InvalidBucketName):
        validate_bucket_name(name)


def test_key_length_limit_counts_utf8_bytes() -> None:
    check_key("a" * 1024)
    with pytest.raises(errors.KeyTooLongError):
        check_key("a" * 1025)
    with pytest.raises(errors.KeyTooLongError):
        check_key("\u20ac" * 342)  # 1026 bytes


def test_parse_query() -> None:
    assert parse_query("uploads&prefix=a%2Fb&x=1&x=2&sp=a+b") == {"uploads": "", "prefix": "a/b", "x": "1", "sp": "a b"}
    assert parse_query("") == {}

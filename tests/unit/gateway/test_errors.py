"""The one table from internal failures to S3 errors (gateway.errors.to_s3)."""

from __future__ import annotations

import inspect

import pytest

from nearstore.cache import errors as cache_errors
from nearstore.gateway import errors
from nearstore.metadata.backing import ConditionFailed, RangeNotSatisfiable, StoreError


def _cache_failures() -> list[type[cache_errors.CacheError]]:
    return [c for _, c in inspect.getmembers(cache_errors, inspect.isclass)
            if issubclass(c, cache_errors.CacheError) and c is not cache_errors.CacheError]


def test_there_are_cache_failures() -> None:
    assert len(_cache_failures()) >= 8


@pytest.mark.parametrize("kind", _cache_failures(), ids=lambda c: c.__name__)
def test_every_cache_failure_has_its_s3_error(kind: type[Exception]) -> None:
    """A new failure type without a row here would reach clients as a 500."""
    err = errors.to_s3(kind("detail"))
    assert isinstance(err, errors.S3Error) and err.status != 500


@pytest.mark.parametrize(
    ("exc", "code", "status", "retry_after"),
    [
        (cache_errors.ObjectChanged("k"), "ServiceUnavailable", 503, "1"),
        (cache_errors.NotOwner("k"), "ServiceUnavailable", 503, "0"),
        (cache_errors.ChunkCorrupt("k"), "ServiceUnavailable", 503, "0"),
        (cache_errors.ChunkMissing("k"), "ServiceUnavailable", 503, "0"),
        (cache_errors.StaleVersion("k"), "PreconditionFailed", 412, None),
        (cache_errors.PeerDenied("k"), "AccessDenied", 403, None),
        (cache_errors.NotCached("k"), "InvalidRequest", 400, None),
        (cache_errors.BadRequest("k"), "InvalidRequest", 400, None),
        (cache_errors.NotFileBacked("k"), "NotImplemented", 501, None),
        (RangeNotSatisfiable(10), "InvalidRange", 416, None),
    ],
)
def test_translations(exc: Exception, code: str, status: int, retry_after: str | None) -> None:
    err = errors.to_s3(exc)
    assert err is not None
    assert (err.code, err.status, err.headers.get("Retry-After")) == (code, status, retry_after)


def test_s3_errors_pass_as_they_are_and_bugs_have_none() -> None:
    e = errors.NoSuchKey(Key="k")
    assert errors.to_s3(e) is e
    assert errors.to_s3(KeyError("a bug")) is None
    assert errors.to_s3(RangeNotSatisfiable(7)).fields == {"ActualObjectSize": "7"}  # type: ignore[union-attr]


def test_s3_errors_are_store_errors_of_their_kind() -> None:
    """The cache tells a store's refusal (passed on to the client) from a
    cache fault, and a failed If-Match from any other refusal, by these
    kinds: the backing stores raise the gateway's S3 errors."""
    assert isinstance(errors.NoSuchKey(), StoreError)
    assert isinstance(errors.PreconditionFailed(), ConditionFailed)
    assert not isinstance(errors.NoSuchKey(), ConditionFailed)

"""Fixtures shared by the integration modules that read through a cache node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.cachenode import Proc, start_moto


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A moto server as the backing store, one per module (a module that
    needs another kind defines its own ``moto``)."""
    proc = start_moto(tmp_path_factory.mktemp("moto"))
    yield proc
    proc.stop(timeout=5)

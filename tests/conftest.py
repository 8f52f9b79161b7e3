"""Fixtures shared by all tests.

Servers are real processes (see ``tests/helpers/servers.py``). They start
lazily, once per session and kind, on a free port with a temporary data dir:

    servers.get("nearstore")       plain HTTP nearstore
    servers.get("nearstore-tls")   the same over HTTPS (trustme CA)
    servers.get("moto")            moto's S3, the reference for differential tests

``server``/``s3``/``bucket`` run a test once per kind in ``API_SERVER_KINDS``
(default: nearstore over HTTP and HTTPS; set NEARSTORE_IT_SERVERS=moto to run
the same tests against moto). ``fresh_server`` starts private servers a test
may kill or restart. When a test fails, the output its servers logged during
the test is attached to the report.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.servers import S3Server, start_server

# Clients must see boto3's *default* settings: nothing from the developer's
# ~/.aws or AWS_* environment may change checksums, addressing or retries.
for _name in [n for n in os.environ if n.startswith("AWS_")]:
    del os.environ[_name]
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

API_SERVER_KINDS = [
    k.strip()
    for k in os.environ.get("NEARSTORE_IT_SERVERS", "nearstore,nearstore-tls").split(",")
    if k.strip()
]
# What the differential tests compare against moto.
DIFF_TARGET = os.environ.get("NEARSTORE_IT_DIFF_TARGET", "nearstore")

_RUNNING: list[S3Server] = []


class ServerPool:
    """Session-wide servers, one per kind, started on first use."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._servers: dict[str, S3Server] = {}
        self._clients: dict[str, Any] = {}

    def get(self, kind: str) -> S3Server:
        if kind not in self._servers:
            srv = start_server(kind, self.base / kind)
            self._servers[kind] = srv
            _RUNNING.append(srv)
        srv = self._servers[kind]
        if not srv.alive():
            raise RuntimeError(f"{kind} server died:\n{srv.log_text()}")
        return srv

    def client(self, kind: str) -> Any:
        if kind not in self._clients:
            self._clients[kind] = self.get(kind).client()
        return self._clients[kind]

    def stop_all(self) -> None:
        for srv in self._servers.values():
            srv.stop()
            if srv in _RUNNING:
                _RUNNING.remove(srv)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def moto_server(servers: ServerPool) -> S3Server:
    return servers.get("moto")


@pytest.fixture(scope="session")
def nearstore_server(servers: ServerPool) -> S3Server:
    return servers.get("nearstore")


@pytest.fixture(scope="session")
def nearstore_tls_server(servers: ServerPool) -> S3Server:
    return servers.get("nearstore-tls")


@pytest.fixture(params=API_SERVER_KINDS)
def server(request: pytest.FixtureRequest, servers: ServerPool) -> S3Server:
    return servers.get(request.param)


@pytest.fixture
def s3(server: S3Server, servers: ServerPool) -> Any:
    """A boto3 client with default settings for ``server``."""
    return servers.client(server.kind)


def unique_bucket_name(hint: str = "t") -> str:
    hint = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:36].strip("-") or "t"
    return f"{hint}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def bucket_name(request: pytest.FixtureRequest) -> str:
    return unique_bucket_name(request.node.originalname)


@pytest.fixture
def bucket(s3: Any, bucket_name: str) -> str:
    """A new empty bucket on ``server`` (left behind: data dirs are temporary)."""
    s3.create_bucket(Bucket=bucket_name)
    return bucket_name


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Callable[..., S3Server]]:
    """Start private servers (``fresh_server("nearstore", data_dir=...)``) that a
    test may kill, signal or restart; all are stopped at teardown."""
    started: list[S3Server] = []

    def start(kind: str = "nearstore", **kwargs: Any) -> S3Server:
        srv = start_server(kind, tmp_path / f"{kind}-{len(started)}", **kwargs)
        started.append(srv)
        _RUNNING.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop(timeout=5)
        _RUNNING.remove(srv)


# -- attach server logs to failing tests ---------------------------------------

_LOG_OFFSETS = pytest.StashKey[dict[int, int]]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_LOG_OFFSETS] = {id(s): s.log_size() for s in _RUNNING}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        offsets = item.stash.get(_LOG_OFFSETS, {})
        for srv in list(_RUNNING):
            if srv.kind == "moto":  # moto logs one line per request: noise
                continue
            text = srv.log_text(since=offsets.get(id(srv), 0), limit=8000)
            if text.strip():
                report.sections.append((f"{srv.kind} server log (port {srv.port})", text))


__all__ = ["API_SERVER_KINDS", "DIFF_TARGET", "ServerPool", "unique_bucket_name"]

"""Fixtures shared by all tests.

Servers are real processes (see ``tests/helpers/servers.py``). They start
lazily, once per session and kind, on a free port with a temporary data dir:

    servers.get("nearstore")       plain HTTP nearstore
    servers.get("nearstore-tls")   the same over HTTPS (trustme CA)
    servers.get("moto")            moto's S3, the reference for differential tests
    servers.get("seaweed")         SeaweedFS (`weed server -s3`), checks signatures
    servers.get("nearstore-moto")  nearstore with every bucket on the moto above
    servers.get("nearstore-seaweed")  the same in front of SeaweedFS

``server``/``s3``/``bucket`` run a test once per kind in ``API_SERVER_KINDS``
(default: nearstore over HTTP and HTTPS; set NEARSTORE_IT_SERVERS=moto to run
the same tests against moto). Tests marked ``@pytest.mark.backend`` (they
exercise the backend interface: put/get/range/list/copy/multipart ...) also
run once per kind in ``UPSTREAM_API_KINDS`` (default: nearstore-moto and
nearstore-seaweed; NEARSTORE_IT_UPSTREAM_SERVERS= turns them off). ``fresh_server`` starts private servers a test
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

from tests.helpers.servers import SERVER_DEPENDS, UPSTREAM_KINDS, S3Server, start_server

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
UPSTREAM_API_KINDS = [
    k.strip()
    for k in os.environ.get("NEARSTORE_IT_UPSTREAM_SERVERS", ",".join(UPSTREAM_KINDS)).split(",")
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
            deps = {arg: self.get(dep) for arg, dep in SERVER_DEPENDS.get(kind, {}).items()}
            srv = start_server(kind, self.base / kind, **deps)
            self._servers[kind] = srv
            _RUNNING.append(srv)
        srv = self._servers[kind]
        if not srv.alive():
            raise RuntimeError(f"{kind} server died:\n{srv.log_text()}")
        return srv

    def private(self, name: str, factory: str, /, **kwargs: Any) -> S3Server:
        """A session-wide server built by ``SERVER_KINDS[factory]`` with its own
        settings (``kwargs``: ``buckets=`` mappings ...), known by ``name``;
        started on first use."""
        if name not in self._servers:
            for arg, dep in SERVER_DEPENDS.get(factory, {}).items():
                kwargs.setdefault(arg, self.get(dep))
            srv = start_server(factory, self.base / name, **kwargs)
            self._servers[name] = srv
            _RUNNING.append(srv)
        srv = self._servers[name]
        if not srv.alive():
            raise RuntimeError(f"{name} server died:\n{srv.log_text()}")
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backend: exercises the backend interface; also runs against nearstore "
        "in front of each upstream kind (UPSTREAM_API_KINDS)")
    config.addinivalue_line(
        "markers", "gateway_only: answered by the gateway alone; not repeated per upstream "
        "kind even where the module is marked backend")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames:
        kinds = list(API_SERVER_KINDS)
        node = metafunc.definition
        if node.get_closest_marker("backend") and not node.get_closest_marker("gateway_only"):
            kinds += [k for k in UPSTREAM_API_KINDS if k not in kinds]
        metafunc.parametrize("server", kinds, indirect=True)


@pytest.fixture
def server(request: pytest.FixtureRequest, servers: ServerPool) -> S3Server:
    """One server per kind (parametrized in ``pytest_generate_tests``)."""
    return servers.get(request.param)


@pytest.fixture
def backing(server: S3Server, servers: ServerPool) -> Any:
    """For nearstore in front of an upstream: a boto3 client straight to the
    upstream (to see what really landed there); None for other kinds."""
    upstream = server.extra.get("upstream")
    return servers.client(upstream.kind) if upstream is not None else None


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
def fresh_server(tmp_path: Path, servers: ServerPool) -> Iterator[Callable[..., S3Server]]:
    """Start private servers (``fresh_server("nearstore", data_dir=...)``) that a
    test may kill, signal or restart; all are stopped at teardown."""
    started: list[S3Server] = []

    def start(kind: str = "nearstore", **kwargs: Any) -> S3Server:
        for arg, dep in SERVER_DEPENDS.get(kind, {}).items():
            if arg not in kwargs:
                kwargs[arg] = servers.get(dep)
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
            if srv.kind in ("moto", "seaweed"):  # one line per request / chatty: noise
                continue
            text = srv.log_text(since=offsets.get(id(srv), 0), limit=8000)
            if text.strip():
                report.sections.append((f"{srv.kind} server log (port {srv.port})", text))


__all__ = ["API_SERVER_KINDS", "DIFF_TARGET", "UPSTREAM_API_KINDS", "ServerPool",
           "unique_bucket_name"]

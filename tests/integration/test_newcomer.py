"""A newcomer's mistakes are loud and name the guilty party: a backing store
that refuses the node's keys, one that cannot be reached, a cache directory
that cannot be used, a warm over nothing; the README's warm command works
with the README's own mapping."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.helpers.servers import (
    ACCESS_KEY,
    SECRET_KEY,
    VENV_BIN,
    S3Server,
    free_port,
    start_server,
    upstream_mapping,
)

ROOT = Path(__file__).resolve().parents[2]
NEARSTORE = str(VENV_BIN / "nearstore") if (VENV_BIN / "nearstore").exists() else None


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [NEARSTORE] if NEARSTORE else [sys.executable, "-m", "nearstore.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NEARSTORE_ACCESS_KEY": ACCESS_KEY, "NEARSTORE_SECRET_KEY": SECRET_KEY,
                               **(env or {})})


def _health(srv: S3Server, timeout: float = 60.0) -> dict[str, Any]:
    """The node's health once its start-up checks have answered (they run
    while it already serves; a store that cannot be reached is retried
    until the mapping's deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(srv.url + "/_nearstore/health", timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
        if not doc["checking"] or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


@pytest.fixture(scope="module")
def backing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A backing store that checks signatures (nearstore's own local store),
    holding the README's bucket layout: my-team-datasets/imagenet/train/."""
    srv = start_server("nearstore", tmp_path_factory.mktemp("backing"))
    s3 = srv.client()
    s3.create_bucket(Bucket="my-team-datasets")
    for n in range(2):
        s3.put_object(Bucket="my-team-datasets", Key=f"imagenet/train/{n:06d}.tar", Body=os.urandom(300_000))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def front(backing: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A cache node with the README's mapping ("datasets" is
    my-team-datasets/imagenet/), one with a wrong secret, one without keys
    and one at an address nothing listens on."""
    dead = f"http://127.0.0.1:{free_port()}"
    buckets = [
        upstream_mapping(backing, "datasets", bucket="my-team-datasets", prefix="imagenet/"),
        upstream_mapping(backing, "badkeys", bucket="my-team-datasets", secret_key="not-the-secret"),
        {k: v for k, v in upstream_mapping(backing, "nokeys", bucket="my-team-datasets").items()
         if k not in ("access_key", "secret_key")},
        upstream_mapping(backing, "nowhere", endpoint=dead, deadline=1.0, connect_timeout=0.5),
    ]
    srv = start_server("nearstore", tmp_path_factory.mktemp("front"), buckets=buckets,
                       config_text='[cache]\nchunk_size = "64KiB"\nsize = "16MiB"\n')
    srv.extra["dead"] = dead
    try:
        yield srv
    finally:
        srv.stop()


def test_health_names_each_backing_store_that_fails(front: S3Server, backing: S3Server) -> None:
    doc = _health(front)
    assert doc["status"] == "degraded", doc
    problems = "\n".join(doc["problems"])
    assert f"[[buckets]] 'badkeys' at {backing.url}: AccessDenied" in problems
    assert "refused this node's credentials (SignatureDoesNotMatch)" in problems
    assert f"[[buckets]] 'nokeys' at {backing.url}: AccessDenied" in problems
    assert f"[[buckets]] 'nowhere' at {front.extra['dead']}: ServiceUnavailable" in problems
    assert "'datasets'" not in problems  # the mapping that works is not blamed
    log = front.log_path.read_text()
    assert re.search(r"ERROR .*refused the node's credentials of \[\[buckets\]\] 'badkeys': SignatureDoesNotMatch", log)


def test_a_refusal_by_the_backing_store_does_not_blame_the_client(front: S3Server, backing: S3Server) -> None:
    s3 = front.client()
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="badkeys", Key="imagenet/train/000000.tar")
    err = e.value.response["Error"]
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert err["Code"] == "AccessDenied"  # not SignatureDoesNotMatch: the client's keys were right
    assert f"backing store at {backing.url} refused this node's credentials" in err["Message"]
    assert "'badkeys'" in err["Message"]
    # Each refusal is logged with the mapping's name, and the other mappings serve.
    assert front.log_path.read_text().count("[[buckets]] 'badkeys'") >= 2
    assert len(s3.get_object(Bucket="datasets", Key="train/000001.tar")["Body"].read()) == 300_000


def test_an_unreachable_backing_store_is_named(front: S3Server) -> None:
    with pytest.raises(ClientError) as e:
        front.client().head_bucket(Bucket="nowhere")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    with pytest.raises(ClientError) as e:
        front.client().get_object(Bucket="nowhere", Key="k")
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert f"backing store at {front.extra['dead']} is unreachable" in e.value.response["Error"]["Message"]


def test_mapped_buckets_are_not_from_1970(front: S3Server) -> None:
    created = {b["Name"]: b["CreationDate"] for b in front.client().list_buckets()["Buckets"]}
    assert created["datasets"].year >= 2026, created


def test_the_readmes_warm_command_with_the_readmes_mapping(front: S3Server) -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^nearstore warm (s3://\S+) .*--endpoint http", readme, re.M)
    assert command is not None
    target = command.group(1)
    done = _cli("warm", target, "--pin", "--endpoint", front.url)
    assert done.returncode == 0, done.stderr
    assert "warmed 2 objects" in done.stdout and "0 errors" in done.stdout
    nothing = _cli("warm", "s3://datasets/no-such-prefix/", "--endpoint", front.url)
    assert nothing.returncode == 1
    assert "nothing to warm: no objects under s3://datasets/no-such-prefix/" in nothing.stderr


def test_an_unusable_cache_directory_makes_health_say_so(backing: S3Server, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    srv = start_server("nearstore", tmp_path / "node", buckets=[upstream_mapping(backing, "*")],
                       config_text=f'[cache]\ndir = "{blocker}"\n')
    try:
        doc = _health(srv)
        assert doc["status"] == "degraded", doc
        assert any(f"chunk cache at {blocker} unusable" in p for p in doc["problems"]), doc
        # ... and reads still work, from the backing store.
        body = srv.client().get_object(Bucket="my-team-datasets", Key="imagenet/train/000000.tar")["Body"].read()
        assert len(body) == 300_000
    finally:
        srv.stop()


def test_a_mapping_with_half_its_keys_is_refused(backing: S3Server, tmp_path: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[[buckets]]\nname = "d"\nendpoint = "{backing.url}"\naccess_key = "only-this"\n')
    done = _cli("serve", "--config", str(cfg), "--port", str(free_port()), "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 2
    assert "[[buckets]] d: set both access_key and secret_key, or neither" in done.stderr


def test_print_config_and_strict_config_on_the_command_line(tmp_path: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text('[server]\nport = 9123\n[[credentials]]\naccess_key = "me"\nsecret_key = "very-secret"\n')
    shown = _cli("serve", "--config", str(cfg), "--print-config", "--cache-size", "2GiB")
    assert shown.returncode == 0, shown.stderr
    assert "port = 9123" in shown.stdout and "size = 2147483648" in shown.stdout
    assert "very-secret" not in shown.stdout and ACCESS_KEY in shown.stdout
    cfg.write_text("[server]\nprot = 5630\n")
    typo = _cli("serve", "--config", str(cfg))
    assert typo.returncode == 2
    assert f"{cfg}:2: [server] unknown setting 'prot'; did you mean 'port'?" in typo.stderr


def test_cluster_help_says_where_the_backing_node_listens() -> None:
    done = _cli("cluster", "--help")
    assert done.returncode == 0
    assert "PORT+100" in " ".join(done.stdout.split())

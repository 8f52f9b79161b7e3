"""Every Python snippet in the README and docs/ runs, as written, against a
real node: a user who copies one gets what it says.

Each snippet runs in its own interpreter with the README's setting (a node
on loopback with the development keys, NEARSTORE_ENDPOINT, the AWS key
variables); only its endpoint is pointed at the test's node, and the names a
snippet leaves to its reader (``data``, ``table``, ``model``, ``decode``,
``torch``, ``boto3``) are defined before it. The data they read is put
first: tar shards and a large object under ``datasets/train/``.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.helpers.servers import S3Server, start_server

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEV = {"access": "nearstore-dev", "secret": "nearstore-dev-secret-key"}

# What a snippet's reader is expected to have at hand.
PRELUDE = """
import boto3, os
import numpy as np
data = os.urandom(6 * 2**20)
def decode(obj):
    return obj.read() if hasattr(obj, "read") else obj
try:
    import torch
    model = torch.nn.Linear(4, 2)
except ImportError:
    pass
try:
    import pyarrow as pa
    table = pa.table({"name": ["a", "b", "c"], "value": [1, 2, 3]})
except ImportError:
    pass
"""


def snippets() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)
        for i, code in enumerate(blocks, 1):
            out.append((f"{path.relative_to(ROOT)}#{i}", code))
    return out


def _shard(first: int, n: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(first, first + n):
            for ext, payload in (("bin", os.urandom(1024)), ("cls", str(i % 10).encode())):
                info = tarfile.TarInfo(f"train/{i:06d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def _dev_node(workdir: Path) -> S3Server:
    """A node as `make run` starts it: loopback, the development keys."""
    srv = start_server("nearstore", workdir)
    srv.stop()
    srv.env.pop("NEARSTORE_ACCESS_KEY", None)
    srv.env.pop("NEARSTORE_SECRET_KEY", None)
    srv.access_key, srv.secret_key = DEV["access"], DEV["secret"]
    srv.start()
    return srv


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A node with the data the snippets read."""
    srv = _dev_node(tmp_path_factory.mktemp("docs"))
    s3 = boto3.client("s3", endpoint_url=srv.url, aws_access_key_id=DEV["access"],
                      aws_secret_access_key=DEV["secret"], region_name="us-east-1")
    for bucket in ("datasets", "checkpoints"):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket="datasets", Key="train/shard-000.bin", Body=os.urandom(1_100_000))
    for n in range(2):
        s3.put_object(Bucket="datasets", Key=f"train/{n:06d}.tar", Body=_shard(n * 8, 8))
    s3.put_object(Bucket="datasets", Key="big/blob.bin", Body=os.urandom(3 * 2**20))
    try:
        yield srv
    finally:
        srv.stop()


def test_the_docs_have_snippets() -> None:
    assert len(snippets()) >= 8


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("where", "code"), snippets(), ids=[w for w, _ in snippets()])
def test_snippet_runs(node: S3Server, tmp_path: Path, where: str, code: str) -> None:
    fresh = None
    if "create_bucket(" in code:  # a first-steps snippet: on a new, empty node
        node = fresh = _dev_node(tmp_path / "node")
    try:
        _run(node, tmp_path, where, code)
    finally:
        if fresh is not None:
            fresh.stop()


def _run(node: S3Server, tmp_path: Path, where: str, code: str) -> None:
    host = f"127.0.0.1:{node.port}"
    code = (code.replace("http://127.0.0.1:9000", node.url).replace("http://localhost:9000", node.url)
            .replace('"localhost:9000"', f'"{host}"'))
    script = tmp_path / "snippet.py"
    script.write_text(PRELUDE + "\n" + code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NEARSTORE_"))}
    env.update(NEARSTORE_ENDPOINT=node.url, AWS_ACCESS_KEY_ID=DEV["access"],
               AWS_SECRET_ACCESS_KEY=DEV["secret"], AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, f"{where} failed:\n{code}\n{done.stderr[-3000:]}"

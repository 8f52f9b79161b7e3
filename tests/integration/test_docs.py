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


def _blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in the document's order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_the_readme_in_order_on_a_fresh_node(tmp_path: Path) -> None:
    """A new user's first steps, one after another on one fresh node (as
    `make run` starts it), from a directory holding what the README says
    (train.tar, shards/): the quickstart makes the bucket, the AWS CLI
    block fills it, the training loop reads what the CLI put there. Each
    step sees what the one before made; an empty dataset fails the test."""
    blocks = _blocks(ROOT / "README.md")
    quickstart = next(code for lang, code in blocks if lang == "python" and "create_bucket(" in code)
    cli = next(code for lang, code in blocks if lang == "sh" and "aws --endpoint-url" in code)
    loop = next(code for lang, code in blocks if lang == "python" and "TarDataset(" in code)
    assert blocks.index(("python", quickstart)) < blocks.index(("sh", cli)) < blocks.index(("python", loop))
    work = tmp_path / "work"
    (work / "shards").mkdir(parents=True)
    (work / "train.tar").write_bytes(_shard(1000, 4))
    for n in range(2):
        (work / "shards" / f"{n:06d}.tar").write_bytes(_shard(n * 8, 8))
    node = _dev_node(tmp_path / "node")
    try:
        _run(node, work, "README quickstart", quickstart)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NEARSTORE_"))}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_EC2_METADATA_DISABLED="true")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", cli.replace("http://127.0.0.1:9000", node.url)],
                              cwd=work, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, f"the README's AWS CLI block failed:\n{done.stderr[-3000:]}"
        assert (work / "head.bin").stat().st_size == 1024
        # The loop, then a count of what it read: every sample the CLI synced.
        _run(node, work, "README training loop",
             loop + "\nassert sum(1 for _ in shards) == 16, 'the loop read nothing'\n", warnings_are_errors=True)
    finally:
        node.stop()


def _run(node: S3Server, tmp_path: Path, where: str, code: str, *, warnings_are_errors: bool = False) -> None:
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
    # An empty dataset fails the run.
    flags = ["-W", "error::nearstore.clients.datasets.EmptyDataset"] if warnings_are_errors else []
    done = subprocess.run([sys.executable, *flags, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, f"{where} failed:\n{code}\n{done.stderr[-3000:]}"

"""Processes for the chunk-cache tests: a moto S3 server (the backing store)
and nearstore nodes in front of it with a ``[cache]`` section.

Outside the session's server pool on purpose: the cache tests stop, kill -9
and restart nodes on the same directories and look inside the cache
directory, so they own their processes outright (each an ``S3Server``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import boto3
import xxhash

from nearstore.bench.procs import node_metrics
from tests.helpers.servers import S3Server, free_port

ACCESS_KEY = "CACHETESTACCESSKEY01"
SECRET_KEY = "cache/test/secret+key/0123456789abcdef"
UPSTREAM_KEY = "upstream"  # moto accepts any keys
REGION = "us-east-1"
MiB = 1024 * 1024

VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 30.0


def s3_client(url: str, access_key: str, secret_key: str) -> Any:
    """boto3 with default settings: endpoint, keys and region only."""
    session = boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=REGION
    )
    return session.client("s3", endpoint_url=url)


# A server process with its output in a log file: the suite's one kind.
Proc = S3Server


def start_moto(workdir: Path) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    p = Proc(
        kind="moto", host="127.0.0.1", port=port,
        argv=[sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, log_path=workdir / "moto.log", health_path="/moto-api/", health_any_status=True,
    )
    p.start()
    return p


def moto_client(moto: Proc) -> Any:
    return s3_client(moto.url, UPSTREAM_KEY, UPSTREAM_KEY)


@dataclass
class CacheNode:
    """nearstore with every bucket ("*") on ``backing_url`` and a chunk cache.

    ``cache`` holds the [cache] settings (size, chunk_size, meta_ttl,
    prefetch, dir ...). Stop/kill/restart keep the port and directories."""

    workdir: Path
    backing_url: str
    cache: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    proc: Proc | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.cache = {"dir": str(self.workdir / "cache"), "size": "64MiB", "chunk_size": "1MiB",
                      "meta_ttl": 5.0, "prefetch": 4, **self.cache}
        self.cache_dir = Path(self.cache["dir"])
        self.port = self.port or free_port()
        self.config_path = self.workdir / "nearstore.toml"
        lines = [
            "[[buckets]]",
            'name = "*"',
            f'endpoint = "{self.backing_url}"',
            f'access_key = "{UPSTREAM_KEY}"',
            f'secret_key = "{UPSTREAM_KEY}"',
            "",
            "[cache]",
        ]
        for k, v in self.cache.items():
            lines.append(f"{k} = {json.dumps(v)}")
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def chunk_size(self) -> int:
        from nearstore.gateway.config import parse_size

        return parse_size(self.cache["chunk_size"])

    @property
    def budget(self) -> int:
        from nearstore.gateway.config import parse_size

        return parse_size(self.cache["size"])

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(NEARSTORE_ACCESS_KEY=ACCESS_KEY, NEARSTORE_SECRET_KEY=SECRET_KEY,
                   PYTHONUNBUFFERED="1")
        env.pop("PYTHONWARNINGS", None)
        return env

    def start(self) -> CacheNode:
        exe = VENV_BIN / "nearstore"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "nearstore.cli"]
        argv += ["serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), "--config", str(self.config_path)]
        self.proc = Proc(kind="nearstore-cache", host="127.0.0.1", argv=argv, env=self.env(),
                         log_path=self.workdir / "node.log",
                         port=self.port, health_path="/_nearstore/health")
        self.proc.start()
        return self

    def stop(self) -> int | None:
        return self.proc.stop() if self.proc else None

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()

    def restart(self) -> None:
        if self.proc and self.proc.alive():
            self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def log_text(self, limit: int = 20000) -> str:
        return self.proc.log_text(limit=limit) if self.proc else ""

    def client(self) -> Any:
        return s3_client(self.url, ACCESS_KEY, SECRET_KEY)

    # -- observation ------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /_nearstore/metrics (name -> value)."""
        return node_metrics(self.url, timeout=10)

    def chunk_files(self) -> list[Path]:
        root = self.cache_dir / "chunks"
        found: list[Path] = []
        for dirpath, _dirs, files in os.walk(root):
            found += [Path(dirpath) / f for f in files]
        return found

    def temp_files(self) -> list[Path]:
        tmp = self.cache_dir / "tmp"
        try:
            return [tmp / n for n in os.listdir(tmp)]
        except OSError:
            return []

    def disk_bytes(self) -> tuple[int, int]:
        """(bytes of chunk files, bytes of temp files), tolerating files that
        vanish while scanned."""
        def total(paths: list[Path]) -> int:
            n = 0
            for p in paths:
                with contextlib.suppress(OSError):
                    n += p.stat().st_size
            return n

        return total(self.chunk_files()), total(self.temp_files())

    # -- warming ----------------------------------------------------------------
    def warm_cli(self, target: str, pin: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        exe = VENV_BIN / "nearstore"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "nearstore.cli"]
        argv += ["warm", target, "--endpoint", self.url] + (["--pin"] if pin else [])
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout,
                              check=False)

    def warm_http(self, bucket: str, prefix: str, pin: bool = False) -> list[dict[str, Any]]:
        """Signed POST /_nearstore/warm; the JSON lines it answered."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        query = urlencode({"bucket": bucket, "prefix": prefix, "pin": "true" if pin else "false"})
        url = f"{self.url}/_nearstore/warm?{query}"
        req = AWSRequest(method="POST", url=url, data=b"",
                         headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
        S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(req)
        http_req = urllib.request.Request(url, data=b"", method="POST",
                                          headers=dict(req.headers.items()))
        with urllib.request.urlopen(http_req, timeout=60) as resp:
            return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def chunk_file_ok(path: Path) -> bool:
    """The file's XXH3-64 equals the checksum in its name."""
    name = path.name
    _cid, _, checksum = name.partition(".")
    return xxhash.xxh3_64(path.read_bytes()).hexdigest() == checksum


def flip_byte(path: Path, offset: int) -> None:
    """Flip the bits of one byte of a file in place (page cache included)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))

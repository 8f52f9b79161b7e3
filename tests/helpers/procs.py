"""Small helpers for tests that start their own processes (workers,
clusters): wait for a URL to answer, and a moto server of their own."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.servers import free_port

BIN = Path(sys.executable).parent


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20,
               context: ssl.SSLContext | None = None) -> None:
    """Until ``url`` answers (https: checked with ``context``); fails at
    once if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1, context=context).read()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto server process on a free loopback port; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/moto-api/", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)

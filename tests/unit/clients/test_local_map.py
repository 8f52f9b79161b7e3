"""LocalNode.map against a scripted node socket: bytes sent inline ("data")
and pieces that do not line up with pages are copied into the mapping, the
rest mapped; the region outlives the files and the LocalMapping object."""

from __future__ import annotations

import gc
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nearstore.clients.local import PAGE, LocalNode

MiB = 1024 * 1024


class _Presigner:
    def generate_presigned_url(self, *a: Any, **kw: Any) -> str:
        return "http://node/b/k"


def _serve(listener: socket.socket, script: list[tuple[dict[str, Any], Any]]) -> None:
    conn, _ = listener.accept()
    with conn:
        json.loads(conn.recv(65536))
        for msg, extra in script:
            raw = json.dumps(msg).encode()
            if isinstance(extra, int):
                socket.send_fds(conn, [raw], [extra])
            else:
                conn.send(raw)
                if extra:
                    for i in range(0, len(extra), 65536):
                        conn.send(extra[i : i + 65536])
        conn.recv(65536)  # until the client hangs up


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="lm-")
    yield f"{d}/s"
    if os.path.exists(f"{d}/s"):
        os.unlink(f"{d}/s")
    os.rmdir(d)


def test_inline_and_unaligned_pieces_are_copied(sock_path: str, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 100)
    inline = 5000  # the first bytes inline (a chunk from a peer)
    f1, f2 = tmp_path / "c1", tmp_path / "c2"
    # the file holding data[inline : 2 MiB] at offset 7: it does not line up
    f1.write_bytes(b"x" * 7 + data[inline : 2 * MiB])
    f2.write_bytes(data[2 * MiB :])  # lines up (offset 0 at 2 MiB): mapped
    fd1, fd2 = os.open(f1, os.O_RDONLY), os.open(f2, os.O_RDONLY)
    script: list[tuple[dict[str, Any], Any]] = [
        ({"status": 200, "size": len(data), "etag": '"e"', "start": 0, "length": len(data)}, None),
        ({"data": [0, inline]}, data[:inline]),
        ({"fd": [inline, 2 * MiB - inline, 7]}, fd1),
        ({"fd": [2 * MiB, len(data) - 2 * MiB, 0]}, fd2),
        ({"end": True}, None),
    ]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(sock_path)
    listener.listen(1)
    server = threading.Thread(target=_serve, args=(listener, script))
    server.start()
    node = LocalNode(sock_path, _Presigner())
    try:
        m = node.map("b", "k", chunk=64 * MiB)
        assert bytes(m.view) == data and m.size == len(data) and m.etag == '"e"'
        assert m.copied == 2 * MiB and m.mapped == len(data) - 2 * MiB
        assert (2 * MiB) % PAGE == 0
    finally:
        node.close()
        server.join(10)
        listener.close()
        os.close(fd1)
        os.close(fd2)
    arr = np.frombuffer(m.view, dtype=np.uint8)
    del m
    f1.unlink()
    f2.unlink()
    gc.collect()
    assert arr.tobytes() == data

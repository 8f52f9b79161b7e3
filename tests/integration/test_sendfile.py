"""The zero-copy send path under abuse: clients that vanish mid-body must
never cause bytes to reach another client's connection."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.helpers import rawhttp
from tests.helpers.rawhttp import key_path
from tests.helpers.s3util import pattern
from tests.helpers.servers import S3Server

MiB = 1024 * 1024


@pytest.mark.timeout(120)
def test_abandoned_downloads_never_leak_into_other_connections(nearstore_server: S3Server) -> None:
    server = nearstore_server
    s3 = server.client()
    s3.create_bucket(Bucket="leak-check")
    big = pattern(64 * MiB, seed=5)
    small = pattern(1000, seed=6)
    s3.put_object(Bucket="leak-check", Key="big", Body=big)
    s3.put_object(Bucket="leak-check", Key="small", Body=small)
    big_url = rawhttp.presign(server, "GET", key_path("leak-check", "big"))
    small_url = rawhttp.presign(server, "GET", key_path("leak-check", "small"))

    def abandon() -> None:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET {big_url} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n\r\n".encode())
            sock.recv(65536)
        # Closed with most of the body unsent: the server's sender must stop.

    def fetch_small() -> tuple[int, bytes]:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(f"GET {small_url} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nConnection: close\r\n\r\n".encode())
            status, _, body = rawhttp.parse_raw_response(rawhttp.read_http_response(sock))
            return status, body

    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            abandoned = [pool.submit(abandon) for _ in range(4)]
            fetched = [pool.submit(fetch_small) for _ in range(12)]
            for f in abandoned:
                f.result()
            for f in fetched:
                assert f.result() == (200, small)
    # The server is still healthy and serves the large object whole.
    assert s3.get_object(Bucket="leak-check", Key="big")["Body"].read() == big


def test_tls_copy_path_serves_ranges(nearstore_tls_server: S3Server) -> None:
    s3: Any = nearstore_tls_server.client()
    s3.create_bucket(Bucket="tls-ranges")
    data = pattern(3 * MiB + 17, seed=9)
    s3.put_object(Bucket="tls-ranges", Key="k", Body=data)
    got = s3.get_object(Bucket="tls-ranges", Key="k", Range="bytes=1048570-2097160")["Body"].read()
    assert got == data[1048570:2097161]

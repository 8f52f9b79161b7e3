"""The fault proxy's modes that the fault table added (stall, partition, a
rule that fires while it holds a request), over real loopback sockets with
a small HTTP server behind. The other modes are exercised by the
integration tests (tests/integration/test_faults.py)."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from nearstore.bench.faultproxy import FaultProxy

BODY = bytes(range(256)) * 1024  # 256 KiB


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    p = FaultProxy("127.0.0.1", server.server_address[1]).start()
    try:
        yield p
    finally:
        p.stop()
        server.shutdown()
        server.server_close()


def _get(p: FaultProxy, timeout: float = 10) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=timeout)
    try:
        conn.request("GET", "/x")
        return conn.getresponse().read()
    finally:
        conn.close()


def _in_background(p: FaultProxy) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(_get(p)), daemon=True)
    t.start()
    return t, got


def test_stall_holds_a_body_midway_until_cleared(proxy: FaultProxy) -> None:
    proxy.stall_response(after=64 * 1024, seconds=60)
    t, got = _in_background(proxy)
    deadline = time.monotonic() + 10
    while not any(e.error and "stalled" in e.error for e in proxy.events()):
        assert time.monotonic() < deadline, proxy.events()
        time.sleep(0.01)
    t.join(0.3)
    assert t.is_alive() and not got  # held
    proxy.clear()
    t.join(10)
    assert got == [BODY]  # the rest followed, unchanged


def test_partition_carries_nothing_until_healed(proxy: FaultProxy) -> None:
    proxy.partition()
    t, got = _in_background(proxy)
    deadline = time.monotonic() + 10
    while not proxy.connections:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t.join(0.3)
    assert t.is_alive() and not got and not proxy.events()  # accepted, then silence
    proxy.heal()
    t.join(10)
    assert got == [BODY]


def test_a_delay_rule_fires_while_it_holds_the_request(proxy: FaultProxy) -> None:
    fired = threading.Event()
    rule = proxy.delay(0.2, times=1, on_fire=fired.set)
    assert _get(proxy) == BODY
    assert fired.is_set() and rule.fired == 1
    assert _get(proxy) == BODY and rule.fired == 1  # once


def test_clear_releases_a_long_delay(proxy: FaultProxy) -> None:
    """A request held by a delay is let go at clear(): a stalled store that
    heals answers what it held."""
    proxy.delay(60)
    t, got = _in_background(proxy)
    deadline = time.monotonic() + 10
    while not proxy.events():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proxy.clear()
    t.join(10)
    assert got == [BODY]

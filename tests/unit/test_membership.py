"""Membership state changes: down after two failed probes, up after one
good one, a new ring each time that routes around the down peers."""

from __future__ import annotations

from metadata.membership import Membership
from metadata.ring import Node


def cluster() -> Membership:
    nodes = [Node(f"n{i}", f"http://n{i}") for i in range(3)]
    return Membership.static("n0", nodes)


def test_down_after_two_failures_and_back_after_one_success() -> None:
    m = cluster()
    assert set(m.peers) == {"n1", "n2"}  # never probes itself
    first = m.current
    m.mark("n1", ok=False, error="refused")
    assert m.down == [] and m.current is first
    m.mark("n1", ok=False, error="refused")
    assert m.down == ["n1"] and m.version == 1
    assert m.current is not None and "n1" in m.current.down
    keys = [f"chunk{i}" for i in range(2000)]
    assert all(m.current.owner(k).id != "n1" for k in keys)
    # Only n1's keys moved.
    assert all(m.current.owner(k).id == first.owner(k).id for k in keys if first.owner(k).id != "n1")
    m.mark("n1", ok=True)
    assert m.down == [] and m.version == 2
    assert all(m.current.owner(k).id == first.owner(k).id for k in keys)


def test_describe_lists_peers() -> None:
    m = cluster()
    m.mark("n2", ok=False, error="timeout")
    m.mark("n2", ok=False, error="timeout")
    d = m.describe()
    assert d["self"] == "n0"
    peers = {p["id"]: p for p in d["peers"]}  # type: ignore[attr-defined]
    assert peers["n2"]["up"] is False and peers["n2"]["last_error"] == "timeout"
    assert peers["n1"]["up"] is True

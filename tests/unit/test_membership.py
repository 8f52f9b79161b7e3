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


def test_set_nodes_keeps_peer_state_and_moves_little() -> None:
    m = cluster()
    m.mark("n1", ok=False)
    m.mark("n1", ok=False)
    before = m.current
    assert before is not None
    grown = [*m.base.nodes, Node("n3", "http://n3")]
    assert m.set_nodes(grown) is True
    assert m.set_nodes(list(reversed(grown))) is False  # same members, no new ring
    assert not m.peers["n1"].up and "n3" in m.peers
    assert m.current is not None and "n1" in m.current.down
    keys = [f"c{i}" for i in range(3000)]
    moved = sum(before.owner(k).id != m.current.owner(k).id for k in keys)
    # The newcomer takes about a third of the live nodes' keys, nothing else moves.
    assert all(m.current.owner(k).id in (before.owner(k).id, "n3") for k in keys)
    assert 0.15 < moved / len(keys) < 0.5


async def test_members_from_dns() -> None:
    import asyncio

    # Starts with a member DNS does not know; the lookup replaces it.
    m = Membership.static("me", [Node("192.0.2.7:9999", "http://192.0.2.7:9999")])
    task = asyncio.ensure_future(m.run_dns("localhost", 9999, interval=0.05))
    try:
        for _ in range(100):
            if m.version:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
    ids = {n.id for n in m.base.nodes}
    assert "127.0.0.1:9999" in ids and "192.0.2.7:9999" not in ids
    assert m.current is not None and m.current.owner("k").id in ids

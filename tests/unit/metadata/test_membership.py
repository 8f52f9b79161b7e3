"""Membership state changes: down after two failed probes, up after one
good one, a new ring each time that routes around the down peers."""

from __future__ import annotations

import pytest

from nearstore.metadata import membership
from nearstore.metadata.membership import Membership
from nearstore.metadata.ring import Node, Ring


def cluster(heard: bool = True) -> Membership:
    """Three nodes seen from n0; its peers have answered once (``heard``)."""
    nodes = [Node(f"n{i}", f"http://n{i}") for i in range(3)]
    m = Membership.static("n0", nodes)
    if heard:
        for peer in ("n1", "n2"):
            m.mark(peer, ok=True)
    assert m.version == 0
    return m


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


def test_a_peer_never_heard_from_is_not_down_until_the_grace_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes start one after another: a node must not take peers that have
    not started yet for dead (it would cache their chunks itself)."""
    now = [1000.0]
    monkeypatch.setattr(membership.time, "time", lambda: now[0])
    m = cluster(heard=False)
    rings: list[Ring] = []
    m.on_change.append(rings.append)
    for _ in range(10):
        m.mark("n1", ok=False, error="refused")
        now[0] += 1.0
    assert m.down == [] and m.version == 0 and rings == []
    assert m.describe()["peers"][0]["heard"] is False  # type: ignore[index]
    now[0] += membership.NEVER_HEARD_GRACE
    m.mark("n1", ok=False, error="refused")
    assert m.down == ["n1"] and rings == [m.current]
    # Once heard, the usual rule: down after two failed probes.
    m.mark("n2", ok=True)
    m.mark("n2", ok=False)
    m.mark("n2", ok=False)
    assert m.down == ["n1", "n2"] and len(rings) == 2


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


def test_a_slow_peer_is_down_only_once_silent_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed-out probes mean a loaded peer (or a loaded prober): down only
    after SILENT_TO_DOWN seconds of them; refused ones, two in a row."""
    now = [1000.0]
    monkeypatch.setattr(membership.time, "time", lambda: now[0])
    m = cluster()
    for _ in range(4):
        m.mark("n1", ok=False, error="timeout", slow=True)
        now[0] += 1.0
    assert m.down == []  # four seconds late: loaded, not dead
    m.mark("n1", ok=True)  # and it answered after all
    for _ in range(6):
        m.mark("n1", ok=False, error="timeout", slow=True)
        now[0] += 1.0
    assert m.down == ["n1"]  # silent past the limit
    m.mark("n2", ok=False, error="refused")
    m.mark("n2", ok=False, error="refused")
    assert m.down == ["n1", "n2"]  # a refused connection is a dead process

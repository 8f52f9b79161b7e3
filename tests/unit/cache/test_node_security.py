"""Security review findings on the node itself: the workers' socket
directory in a shared /tmp (a directory another user made, or opened to
others, or a link, is refused), and peer signatures (bound to their node,
good once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nearstore.cache.control import run_dir


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = tmp_path / "run"
    base.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    return base


def test_made_private_and_kept_private(runtime: Path) -> None:
    made = run_dir("/data/a")
    assert made.parent == runtime and (made.stat().st_mode & 0o777) == 0o700
    assert run_dir("/data/a") == made  # found again as it was left
    os.chmod(made, 0o755)  # an older node's: nobody else could write into it
    assert run_dir("/data/a") == made and (made.stat().st_mode & 0o777) == 0o700


def test_a_directory_someone_else_could_use_is_refused(runtime: Path, tmp_path: Path) -> None:
    path = run_dir("/data/b")
    os.chmod(path, 0o777)  # pre-created open to all, as another user would
    with pytest.raises(PermissionError, match="mode 0700"):
        run_dir("/data/b")
    path.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    path.symlink_to(elsewhere)  # a link to a directory its maker controls
    with pytest.raises(PermissionError):
        run_dir("/data/b")
    path.unlink()
    if os.geteuid() == 0:  # only root can hand a directory to another user
        path.mkdir(mode=0o700)
        os.chown(path, 65534, 65534)
        with pytest.raises(PermissionError):
            run_dir("/data/b")


def test_peer_signatures_name_their_node_and_are_good_once() -> None:
    from nearstore.cache.peers import MAX_SKEW, Nonces, sign, verify

    now = 1_000_000.0
    header = sign("s3cret", "GET", "/_nearstore/peer/chunk?x=1", "10.0.0.2:9000", now=now)
    nonces = Nonces()
    assert not verify("s3cret", "GET", "/_nearstore/peer/chunk?x=1", header, "10.0.0.3:9000", nonces, now=now)
    assert not verify("other", "GET", "/_nearstore/peer/chunk?x=1", header, "10.0.0.2:9000", nonces, now=now)
    assert not verify("s3cret", "GET", "/_nearstore/peer/chunk?x=2", header, "10.0.0.2:9000", nonces, now=now)
    assert verify("s3cret", "GET", "/_nearstore/peer/chunk?x=1", header, "10.0.0.2:9000", nonces, now=now)
    assert not verify("s3cret", "GET", "/_nearstore/peer/chunk?x=1", header, "10.0.0.2:9000", nonces, now=now + 1)
    late = sign("s3cret", "GET", "/p", "n", now=now)
    assert not verify("s3cret", "GET", "/p", late, "n", Nonces(), now=now + MAX_SKEW + 1)
    # Nonces are forgotten only once their requests would be refused as old.
    for t in range(0, 600, 5):
        assert verify("s3cret", "GET", "/p", sign("s3cret", "GET", "/p", "n", now=now + t), "n", nonces, now=now + t)
    assert len(nonces._bins) <= MAX_SKEW // Nonces.BIN_S + 4

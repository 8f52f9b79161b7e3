"""The workers' socket directory in a shared /tmp (security review): a
directory another user made, or opened to others, or a link, is refused."""

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

"""The packages' dependencies point one way: gateway -> cache -> metadata;
clients import metadata only (a training job installs no server); bench is
imported by the `nearstore bench` command alone. Read from the source, so a
new import against the direction fails here before anyone runs it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "cache", "metadata", "clients", "bench")

# What each package may import of the others.
ALLOWED: dict[str, set[str]] = {
    "metadata": set(),
    "cache": {"metadata"},
    "clients": {"metadata"},
    "gateway": {"cache", "metadata"},
    "bench": {"gateway", "cache", "metadata", "clients"},
}
# (module, package it may import besides): the composition root's commands.
EXCEPTIONS = {("gateway/cli.py", "bench")}


def _imports(path: Path) -> set[str]:
    """The nearstore packages a module imports (at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "nearstore" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add(parts[1])
            elif parts[0] in PACKAGES:
                found.add(f"top-level {parts[0]}")  # not through the namespace: a second copy
    return found


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_there_are_modules_to_check() -> None:
    assert len(_modules()) > 50


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_dependency_direction(path: Path) -> None:
    rel = path.relative_to(ROOT)
    package = rel.parts[0]
    allowed = ALLOWED[package] | {package} | {extra for mod, extra in EXCEPTIONS if mod == rel.as_posix()}
    assert _imports(path) <= allowed, f"{rel} imports {sorted(_imports(path) - allowed)}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from nearstore.gateway import errors\n    import cache.store\n")
    assert _imports(bad) == {"gateway", "top-level cache"}


def test_one_installed_name(tmp_path: Path) -> None:
    """Installed, nearstore puts one name at the top level: an environment
    that holds PyPI's unrelated `cache` or `clients` keeps working."""
    import subprocess
    import sys

    code = (
        "import importlib.util, nearstore.gateway.app, nearstore.clients.datasets\n"
        "print(sorted(m for m in ('gateway', 'cache', 'metadata', 'clients', 'bench')"
        " if importlib.util.find_spec(m)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_nearstore_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    import nearstore

    monkeypatch.setenv("NEARSTORE_ENDPOINT", "http://127.0.0.1:9123")
    s3 = nearstore.connect()
    assert s3.meta.endpoint_url == "http://127.0.0.1:9123"
    assert s3.meta.config.s3 == {"addressing_style": "path"}
    with pytest.raises(AttributeError):
        nearstore.no_such_thing  # noqa: B018

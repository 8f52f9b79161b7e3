"""The packages' dependencies point one way: gateway -> cache -> metadata;
the backing stores (gateway/backends) know nothing of the cache; clients
import metadata only (a training job installs no server); bench is imported
by the `nearstore bench` command alone; the composition root (the modules
directly in nearstore/: the command, the node, the local cluster) is the one
place that knows every package, and nothing imports it. Read from the
source, so a new import against the direction fails here before anyone
runs it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "cache", "metadata", "clients", "bench")
ROOT_MODULES = ("cli", "node", "localcluster")

# What each package may import of the others.
ALLOWED: dict[str, set[str]] = {
    "metadata": set(),
    "cache": {"metadata"},
    "clients": {"metadata"},
    "gateway": {"cache", "metadata"},
    "bench": {"gateway", "cache", "metadata", "clients"},
    "nearstore": {"gateway", "cache", "metadata"},  # the composition root
}
# (module, package it may import besides): the command runs the benchmarks.
EXCEPTIONS = {("nearstore/cli.py", "bench")}
# Folders held to less than their package: the backing stores.
NARROWER = {"gateway/backends": {"metadata"}}


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
            elif parts[0] == "nearstore" and len(parts) > 1 and parts[1] in ROOT_MODULES:
                found.add("nearstore")
            elif parts[0] in PACKAGES:
                found.add(f"top-level {parts[0]}")  # not through the namespace: a second copy
    return found


def _modules() -> list[Path]:
    root = [ROOT / "nearstore" / f"{m}.py" for m in ROOT_MODULES]
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")) + root


def test_there_are_modules_to_check() -> None:
    assert len(_modules()) > 50


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_dependency_direction(path: Path) -> None:
    rel = path.relative_to(ROOT)
    package = rel.parts[0]
    allowed = ALLOWED[package] | {package} | {extra for mod, extra in EXCEPTIONS if mod == rel.as_posix()}
    for folder, narrower in NARROWER.items():
        if rel.as_posix().startswith(folder + "/"):
            allowed = narrower | {package}
    if package != "nearstore":
        allowed -= {"nearstore"}  # nothing imports the composition root
    assert _imports(path) <= allowed, f"{rel} imports {sorted(_imports(path) - allowed)}"


def test_no_isinstance_on_store_types_outside_the_root() -> None:
    """Which kind of store serves a bucket is decided where the node is
    built; elsewhere a store is used through its interface."""
    kinds = {"CachedBackend", "Router", "LocalStore", "S3Upstream"}
    for path in _modules():
        if path.parent.name == "nearstore":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                assert not named & kinds, f"{path.relative_to(ROOT)}:{node.lineno} isinstance on {named & kinds}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from nearstore.gateway import errors\n    import cache.store\n"
                   "from nearstore.node import build_node\n")
    assert _imports(bad) == {"gateway", "top-level cache", "nearstore"}


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

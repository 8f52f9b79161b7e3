"""The setup step: install missing Debian tools (nginx, wrk) with apt-get.

Only as root (or with password-less sudo), only when apt-get exists; the
outcome is a line of text for the report, never an exception: a tool that
could not be installed makes its peer "skipped", with this reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from nearstore.bench.peers import find_tool

DEBIAN_TOOLS = {"nginx": "nginx", "wrk": "wrk"}  # tool -> package


def missing_tools(bin_dir: Path) -> list[str]:
    return [tool for tool in DEBIAN_TOOLS if find_tool(tool, bin_dir) is None]


def install(tools: list[str], timeout_s: float = 600.0) -> str:
    """apt-get install the packages of `tools`; a line saying what happened."""
    if not tools:
        return "setup: nothing to install"
    apt = shutil.which("apt-get")
    if apt is None:
        return f"setup: apt-get not found; install {', '.join(tools)} by hand"
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            return f"setup: not root and no sudo; install {', '.join(tools)} by hand"
        prefix = [sudo, "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    pkgs = [DEBIAN_TOOLS[t] for t in tools]
    steps = [
        [*prefix, apt, "update", "-qq"],
        [*prefix, apt, "install", "-y", "-qq", "--no-install-recommends", *pkgs],
    ]
    for cmd in steps:
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"setup: {' '.join(cmd)} failed: {exc}"
        if p.returncode != 0:
            err = (p.stderr or p.stdout).decode(errors="replace").strip()[-300:]
            return f"setup: {' '.join(cmd)} failed ({p.returncode}): {err}"
    return f"setup: installed {', '.join(pkgs)}"

"""Server processes: start, stop, and watch their memory and CPU.

Peers run in their own session (process group) so that stopping one ends all
of its children (nginx workers, nearstore workers) and nothing else. Memory
is each process's VmHWM (peak resident set) from /proc, summed over the
process tree: for multi-process servers this is an upper bound of what was
resident at one time. Processes are sampled a few times a second so that
children that exit before the end are still counted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while chosen)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after it.
        fields = stat[stat.rfind(b")") + 2 :].split()
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU seconds of one process alone (-1 if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return -1.0
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


class TreeMonitor:
    """Samples a process tree: peak memory and CPU seconds used."""

    def __init__(self, root: int, interval_s: float = 0.25) -> None:
        self.root = root
        self._interval = interval_s
        self._hwm: dict[int, int] = {}
        self._cpu: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        pids = process_tree(self.root)
        with self._lock:
            for pid in pids:
                self._hwm[pid] = max(self._hwm.get(pid, 0), _hwm_kib(pid))
                cpu = cpu_seconds_of(pid)
                if cpu >= 0:
                    self._cpu[pid] = max(self._cpu.get(pid, 0.0), cpu)

    def peak_rss_bytes(self) -> int:
        self.sample()
        with self._lock:
            return 1024 * sum(self._hwm.values())

    def cpu_seconds(self) -> float:
        """CPU seconds used by the tree so far (exited children included)."""
        self.sample()
        with self._lock:
            return sum(self._cpu.values())

    def processes(self) -> int:
        with self._lock:
            return len(self._hwm)


def spawn(
    cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,  # its own process group: see stop()
        )


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after grace_s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Children may outlive the leader: clean the whole group either way.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def tail(path: Path, n: int = 800) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode(errors="replace").strip()


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0


def node_metrics(endpoint: str, timeout: float = 5.0) -> dict[str, float]:
    """A nearstore node's unlabelled samples of ``/_nearstore/metrics``
    (name -> value): the one reader of it the benches and tests share.
    Raises OSError when the node does not answer."""
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/_nearstore/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError, IndexError):
            out[name] = float(value.split()[0])
    return out

"""Real server processes for the integration tests.

Every kind of server the tests talk to is an :class:`S3Server`: a process we
started, an endpoint URL, credentials, optionally a CA file (TLS) and a log
file holding the process's stdout+stderr. New kinds (an upstream-backed
nearstore, another reference implementation) register a start function in
``SERVER_KINDS``; the fixtures in ``tests/conftest.py`` only go through
``start_server(kind, ...)``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

ACCESS_KEY = "NEARSTORETESTKEY0001"
SECRET_KEY = "nearstore/test/secret+key/0123456789abcdef"
REGION = "us-east-1"

VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TLSFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    cert.private_key_pem.write_to_path(str(files.key_file))
    with open(files.cert_file, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return files


@dataclass
class S3Server:
    kind: str
    host: str
    port: int
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    health_path: str
    data_dir: Path | None = None
    tls: TLSFiles | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    verifies_auth: bool = True
    # Any status below 500 on ``health_path`` means "up" (servers without a
    # health route answer it with an S3 error).
    health_any_status: bool = False
    # Polled after the health probe passes, until it returns True: the
    # server is really ready (SeaweedFS answers before its filer is).
    ready_check: Callable[[S3Server], bool] | None = None
    # Seconds between SIGTERM and SIGKILL in stop() (None: the caller's
    # timeout). SeaweedFS takes >10 s to exit and its data dir is temporary.
    stop_grace: float | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _log_file: Any = None

    # -- addresses ---------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ca_file(self) -> str | None:
        return str(self.tls.ca_file) if self.tls else None

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.tls.ca_file))

    # -- clients -----------------------------------------------------------
    def client(self, *, access_key: str | None = None, secret_key: str | None = None,
               **config: Any) -> Any:
        """A boto3 S3 client with default settings: only the endpoint, the keys
        and the region are set (plus whatever ``config`` a test asks for)."""
        session = boto3.session.Session(
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
        )
        return session.client(
            "s3",
            endpoint_url=self.url,
            verify=self.ca_file if self.tls else None,
            config=Config(**config) if config else None,
        )

    def cli_env(self) -> dict[str, str]:
        """Environment for the AWS CLI pointed at this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION=self.region,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_PAGER="",
        )
        if self.tls:
            env["AWS_CA_BUNDLE"] = str(self.tls.ca_file)
        return env

    # -- process control ---------------------------------------------------
    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self, since: int = 0, limit: int = 20000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except OSError:
            return ""
        text = data.decode("utf-8", "replace")
        return text[-limit:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise RuntimeError(
                    f"{self.kind} server exited with {self.proc.returncode} during startup:\n"
                    f"{' '.join(self.argv)}\n{self.log_text()}"
                )
            try:
                status = self._probe()
                if status == 200 or (self.health_any_status and status < 500):
                    if self.ready_check is None or self.ready_check(self):
                        return
            except OSError as e:
                last_err = e
            except Exception as e:  # a ready_check's client error: not ready yet
                last_err = e
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.kind} server not healthy after {timeout}s ({last_err!r}):\n{self.log_text()}"
        )

    def _probe(self) -> int:
        conn: http.client.HTTPConnection
        if self.tls:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=2, context=self.ssl_context()
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", self.health_path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        self._close_log()
        return rc

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                grace = timeout if self.stop_grace is None else min(timeout, self.stop_grace)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._close_log()
        self._cleanup()
        return self.proc.returncode

    def _cleanup(self) -> None:
        for path in self.extra.get("cleanup_files", ()):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self._close_log()
        self._cleanup()

    def restart(self) -> None:
        """Start again on the same port and data dir (after stop or kill)."""
        if self.alive():
            self.stop()
        self.start()

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    def proc_status(self, field_name: str) -> int:
        """A kB value from /proc/PID/status (VmRSS, VmHWM ...), in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field_name)


# -- config files ------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, int or float (JSON strings are TOML
    basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def toml_tables(name: str, tables: list[dict[str, Any]]) -> str:
    """``[[name]]`` array-of-tables text."""
    out = []
    for table in tables:
        out.append(f"[[{name}]]")
        out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def upstream_mapping(upstream: S3Server, name: str = "*", **settings: Any) -> dict[str, Any]:
    """A ``[[buckets]]`` entry mapping ``name`` onto ``upstream`` (path-style,
    the upstream's own keys). ``settings`` override or add (bucket, prefix,
    endpoint, timeouts ...)."""
    entry: dict[str, Any] = {
        "name": name,
        "endpoint": upstream.url,
        "region": upstream.region,
        "addressing": "path",
        "access_key": upstream.access_key,
        "secret_key": upstream.secret_key,
    }
    entry.update(settings)
    return entry


def _nearstore(workdir: Path, *, tls: bool = False, data_dir: Path | None = None,
               port: int | None = None, extra_args: list[str] | None = None,
               buckets: list[dict[str, Any]] | None = None, config_text: str = "",
               label: str | None = None, extra: dict[str, Any] | None = None) -> S3Server:
    """nearstore on a free port. ``buckets`` (``[[buckets]]`` entries, see
    :func:`upstream_mapping`) and ``config_text`` go into a TOML file passed
    with ``--config``; flags still set host, port and data dir. ``label`` is
    the server's ``kind`` as tests and logs see it."""
    port = port or free_port()
    data_dir = data_dir or workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    exe = VENV_BIN / "nearstore"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "nearstore.cli"]
    argv += ["serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
    if buckets or config_text:
        config = workdir / "nearstore.toml"
        config.write_text(config_text + "\n" + toml_tables("buckets", buckets or []))
        argv += ["--config", str(config)]
    tls_files = None
    if tls:
        tls_files = make_tls_files(workdir / "tls")
        argv += ["--tls-cert", str(tls_files.cert_file), "--tls-key", str(tls_files.key_file)]
    argv += extra_args or []
    env = dict(os.environ)
    env.update(NEARSTORE_ACCESS_KEY=ACCESS_KEY, NEARSTORE_SECRET_KEY=SECRET_KEY,
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONWARNINGS", None)
    return S3Server(
        kind=label or ("nearstore-tls" if tls else "nearstore"),
        host="127.0.0.1",
        port=port,
        argv=argv,
        env=env,
        log_path=workdir / "server.log",
        health_path="/_nearstore/health",
        data_dir=data_dir,
        tls=tls_files,
        extra=dict(extra or {}),
    )


def _nearstore_upstream(kind: str) -> Callable[..., S3Server]:
    """nearstore whose every bucket lives on ``upstream`` (a ``"*"`` mapping).
    The upstream server is in ``extra["upstream"]``."""

    def start(workdir: Path, *, upstream: S3Server, mapping: dict[str, Any] | None = None,
              **kw: Any) -> S3Server:
        entry = upstream_mapping(upstream, "*", **(mapping or {}))
        return _nearstore(workdir, buckets=[entry], label=kind,
                          extra={"upstream": upstream, **kw.pop("extra", {})}, **kw)

    return start


MOTO_ACCESS_KEY = "MOTOUPSTREAMKEY00001"
MOTO_SECRET_KEY = "moto/upstream/secret+key/0123456789"


def _moto(workdir: Path, *, tls: bool = False, port: int | None = None, **_: Any) -> S3Server:
    port = port or free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    tls_files = None
    if tls:
        tls_files = make_tls_files(workdir / "tls")
        argv += ["-c", str(tls_files.cert_file), "-k", str(tls_files.key_file)]
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return S3Server(
        kind="moto",
        host="127.0.0.1",
        port=port,
        argv=argv,
        env=env,
        log_path=workdir / "server.log",
        health_path="/moto-api/",
        tls=tls_files,
        access_key=MOTO_ACCESS_KEY,
        secret_key=MOTO_SECRET_KEY,
        verifies_auth=False,
        health_any_status=True,
    )


# -- SeaweedFS ------------------------------------------------------------------------

SEAWEED_ACCESS_KEY = "SEAWEEDUPSTREAMKEY01"
SEAWEED_SECRET_KEY = "seaweed/upstream/secret+key/abcdef"
# A second identity that may only read and list (for AccessDenied).
SEAWEED_READONLY_ACCESS_KEY = "SEAWEEDREADONLYKEY01"
SEAWEED_READONLY_SECRET_KEY = "seaweed/readonly/secret+key/abcdef"


def _seaweed_ready(server: S3Server) -> bool:
    """Signed ListBuckets succeeds: master, volume, filer and S3 all up."""
    client = server.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
    client.list_buckets()
    client.close()
    return True


def _seaweed(workdir: Path, *, port: int | None = None, **_: Any) -> S3Server:
    """``weed server`` with master, volume, filer and S3 in one process, every
    port a free loopback port, an S3 identity config so that it checks SigV4
    signatures (unknown keys: InvalidAccessKeyId, wrong secret:
    SignatureDoesNotMatch, read-only identity writing: AccessDenied)."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    s3_config = workdir / "s3.json"
    s3_config.write_text(json.dumps({"identities": [
        {"name": "upstream",
         "credentials": [{"accessKey": SEAWEED_ACCESS_KEY, "secretKey": SEAWEED_SECRET_KEY}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader",
         "credentials": [{"accessKey": SEAWEED_READONLY_ACCESS_KEY,
                          "secretKey": SEAWEED_READONLY_SECRET_KEY}],
         "actions": ["Read", "List"]},
    ]}))
    # weed reads master.toml from its working directory: one volume per
    # collection (each bucket is a collection; the default, 7, runs out of
    # volume slots after a few dozen test buckets).
    (workdir / "master.toml").write_text(
        "[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n")
    port = port or free_port()
    ports = {name: free_port() for name in (
        "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")}
    argv = [
        str(VENV_BIN / "weed"), "server",
        f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        "-volume.preStopSeconds=0", "-volume.max=1000",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3", f"-s3.port={port}", f"-s3.port.grpc={ports['s3.grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # S3 semantics: no bucket appears on a PUT, a non-empty one stays.
        "-s3.autoCreateBucket=false", "-s3.allowDeleteBucketNotEmpty=false",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-s3.config={s3_config}",
    ]
    # gRPC servers also listen on unix sockets in /tmp named by port.
    cleanup = [f"/tmp/seaweedfs-{name}-grpc-{ports[name + '.grpc']}.sock"
               for name in ("master", "volume", "filer")]
    cleanup.append(f"/tmp/seaweedfs-s3-grpc-{ports['s3.grpc']}.sock")
    return S3Server(
        kind="seaweed",
        host="127.0.0.1",
        port=port,
        argv=argv,
        env=dict(os.environ),
        log_path=workdir / "server.log",
        health_path="/",  # 403 AccessDenied once the S3 port is up
        data_dir=data,
        cwd=workdir,
        access_key=SEAWEED_ACCESS_KEY,
        secret_key=SEAWEED_SECRET_KEY,
        health_any_status=True,
        ready_check=_seaweed_ready,
        stop_grace=1.0,
        extra={"cleanup_files": cleanup, "ports": ports},
    )


SERVER_KINDS: dict[str, Callable[..., S3Server]] = {
    "nearstore": _nearstore,
    "nearstore-tls": lambda workdir, **kw: _nearstore(workdir, tls=True, **kw),
    "moto": _moto,
    "seaweed": _seaweed,
    "nearstore-moto": _nearstore_upstream("nearstore-moto"),
    "nearstore-seaweed": _nearstore_upstream("nearstore-seaweed"),
}

# Kinds built on other kinds: {kind: {keyword argument: kind it needs}}. The
# session pool starts the dependencies first and passes them in.
SERVER_DEPENDS: dict[str, dict[str, str]] = {
    "nearstore-moto": {"upstream": "moto"},
    "nearstore-seaweed": {"upstream": "seaweed"},
}

# nearstore in front of a backing store: what the upstream-marked API tests
# also run against.
UPSTREAM_KINDS = ["nearstore-moto", "nearstore-seaweed"]


def start_server(kind: str, workdir: Path, **kwargs: Any) -> S3Server:
    """Build and start a server of ``kind``; retried on a port race."""
    last: Exception | None = None
    for _ in range(3):
        workdir.mkdir(parents=True, exist_ok=True)
        server = SERVER_KINDS[kind](workdir, **kwargs)
        try:
            t0 = time.monotonic()
            server.start()
            server.extra["start_seconds"] = time.monotonic() - t0
            return server
        except RuntimeError as e:
            last = e
            if ("Address already in use" not in str(e) and "address already in use" not in str(e)) \
                    or "port" in kwargs:
                raise
    assert last is not None
    raise last

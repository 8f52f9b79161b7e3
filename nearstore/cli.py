"""The ``nearstore`` command.

    nearstore serve [--host H] [--port P] [--data-dir DIR] [--config FILE]
                    [--tls-cert FILE --tls-key FILE]
    nearstore bench ...          (see ``nearstore bench --help``)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from nearstore.gateway import config as config_mod


def _serve(args: argparse.Namespace) -> int:
    overrides = {s.id: getattr(args, s.id) for s in config_mod.SETTINGS if s.flag}
    overrides["worker"] = True if args.worker else None
    try:
        cfg = config_mod.load(args.config, overrides=overrides)
    except (config_mod.ConfigError, ValueError) as e:
        print(f"nearstore: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_mod.render(cfg), end="")
        return 0
    for warning in cfg.warnings:
        print(f"nearstore: warning: {warning}", file=sys.stderr)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if cfg.workers > 1:
        # Before prometheus_client is first imported (cache.metrics).
        from nearstore.cache.control import run_dir

        mdir = run_dir(cfg.data_dir) / "metrics"
        if not cfg.worker:
            import shutil

            shutil.rmtree(mdir, ignore_errors=True)
            mdir.mkdir(parents=True, mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)
    from nearstore.node import serve

    try:
        serve(cfg)
    except config_mod.ConfigError as e:
        print(f"nearstore: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{cfg.host}:{cfg.port}" if e.errno in (98, 99, 13) else cfg.data_dir
        print(f"nearstore: cannot serve ({where}): {e}", file=sys.stderr)
        return 1
    return 0


def _warm(args: argparse.Namespace) -> int:
    """Ask a running node to warm s3://bucket/prefix, showing progress."""
    import json
    import os
    import urllib.error
    import urllib.request
    from urllib.parse import urlencode

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    if not args.target.startswith("s3://"):
        print("nearstore warm: the target is s3://bucket/prefix", file=sys.stderr)
        return 2
    bucket, _, prefix = args.target[5:].partition("/")
    query = urlencode({"bucket": bucket, "prefix": prefix, "pin": "true" if args.pin else "false"})
    url = f"{args.endpoint.rstrip('/')}/_nearstore/warm?{query}"
    creds = Credentials(
        os.environ.get("NEARSTORE_ACCESS_KEY", config_mod.DEV_ACCESS_KEY),
        os.environ.get("NEARSTORE_SECRET_KEY", config_mod.DEV_SECRET_KEY),
    )
    req = AWSRequest(method="POST", url=url, data=b"", headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
    http_req = urllib.request.Request(url, data=b"", method="POST", headers=dict(req.headers.items()))
    try:
        resp = urllib.request.urlopen(http_req, timeout=3600)
    except urllib.error.HTTPError as e:
        print(f"nearstore warm: {e.code} {e.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"nearstore warm: cannot reach {args.endpoint}: {e}", file=sys.stderr)
        return 1
    bar = None
    last: dict[str, Any] = {}
    try:
        from tqdm import tqdm
    except ImportError:  # plain progress lines without tqdm
        tqdm = None
    for raw in resp:
        last = json.loads(raw)
        total, done = int(last.get("bytes_total", 0) or 0), int(last.get("bytes", 0) or 0)
        if tqdm is not None:
            if bar is None:
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"warming {args.target}")
            bar.update(done - bar.n)
        else:
            print(f"{done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", file=sys.stderr)
    if bar is not None:
        bar.close()
    if not last.get("done"):
        print(f"nearstore warm: the node stopped answering before the end ({args.endpoint})", file=sys.stderr)
        return 1
    if not last.get("objects_total"):
        print(f"nearstore warm: nothing to warm: no objects under {args.target}", file=sys.stderr)
        return 1
    for failure in last.get("failures", []):
        print(f"nearstore warm: failed: {failure}", file=sys.stderr)
    if int(last.get("errors", 0) or 0) > len(last.get("failures", [])):
        print(f"nearstore warm: ... and {int(last['errors']) - len(last['failures'])} more", file=sys.stderr)
    print(
        f"warmed {last.get('objects')} objects, {int(last.get('bytes', 0) or 0) / 1e9:.2f} GB "
        f"in {last.get('seconds', 0):.1f} s ({last.get('gbps')} GB/s), {last.get('errors')} errors"
        + (f", pinned (chunks not pinned: {last.get('not_pinned_chunks')})" if args.pin else "")
    )
    return 0 if not last.get("errors") else 1


def _cluster(args: argparse.Namespace) -> int:
    from nearstore.localcluster import run

    return run(args.nodes, args.port, args.dir, args.backing, args.cache_size, args.restart)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        # The benchmark harness has its own flags and heavier imports.
        from nearstore.bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="nearstore", description="S3-compatible object store with a node-local cache")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a node: the S3 endpoint on the local store")
    s.add_argument("--config", help="TOML configuration file (docs/CONFIG.md)")
    config_mod.add_flags(s)
    s.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (secrets masked) and exit")
    s.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)
    w = sub.add_parser("warm", help="load s3://bucket/prefix into a running node's cache")
    w.add_argument("target", help="s3://bucket/prefix")
    w.add_argument("--pin", action="store_true", help="protect the chunks from eviction")
    w.add_argument("--endpoint", default=os.environ.get("NEARSTORE_ENDPOINT", "http://127.0.0.1:9000"))
    w.set_defaults(func=_warm)
    c = sub.add_parser("cluster", help="a local cluster: a backing store and N cache nodes on this machine")
    c.add_argument("--nodes", type=int, default=3)
    c.add_argument("--port", type=int, default=9000,
                   help="first cache node's port (default 9000): the nodes listen on PORT..PORT+N-1 and, "
                        "without --backing, the local backing node on PORT+100")
    c.add_argument("--dir", default="./nearstore-cluster", help="where the nodes keep their data")
    c.add_argument("--backing", help="an S3 endpoint to front instead of a local backing node (on PORT+100)")
    c.add_argument("--cache-size", default="4GiB")
    c.add_argument("--restart", action="store_true",
                   help="restart a node that dies (without it: reported, and SIGHUP restarts the dead ones)")
    c.set_defaults(func=_cluster)
    sub.add_parser("bench", help="throughput benchmarks (nearstore bench --help)")
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

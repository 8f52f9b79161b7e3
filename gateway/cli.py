"""The ``nearstore`` command.

    nearstore serve [--host H] [--port P] [--data-dir DIR] [--config FILE]
                    [--tls-cert FILE --tls-key FILE]
    nearstore bench ...          (see ``nearstore bench --help``)
"""

from __future__ import annotations

import argparse
import logging
import sys

from gateway import config as config_mod


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(
            args.config,
            overrides={
                "host": args.host,
                "port": args.port,
                "data_dir": args.data_dir,
                "tls_cert": args.tls_cert,
                "tls_key": args.tls_key,
                "domain": args.domain,
                "cache_dir": args.cache_dir,
                "cache_size": args.cache_size,
            },
        )
    except (config_mod.ConfigError, ValueError) as e:
        print(f"nearstore: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from gateway.app import serve

    try:
        serve(cfg)
    except OSError as e:
        print(f"nearstore: cannot serve on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        # The benchmark harness has its own flags and heavier imports.
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="nearstore", description="S3-compatible object store with a node-local cache")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a node: the S3 endpoint on the local store")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 9000)")
    s.add_argument("--data-dir", help="where objects live (default ./nearstore-data)")
    s.add_argument("--config", help="TOML configuration file")
    s.add_argument("--domain", help="serve virtual-hosted-style requests for <bucket>.DOMAIN")
    s.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--cache-dir", help="chunk cache directory (default DATA_DIR/cache)")
    s.add_argument("--cache-size", help="chunk cache byte budget, e.g. 100GiB (default 10GiB)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)
    sub.add_parser("bench", help="throughput benchmarks (nearstore bench --help)")
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

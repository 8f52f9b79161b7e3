"""``nearstore.connect()`` (this module's ``connect``): a boto3 S3 client set up for nearstore.

The endpoint comes from NEARSTORE_ENDPOINT (default: this node,
http://127.0.0.1:9000), credentials from NEARSTORE_ACCESS_KEY /
NEARSTORE_SECRET_KEY (default: the development keys), path-style
addressing, adaptive retries, and a connection pool large enough for the
parallel ranged reads of ``clients.ranged``.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from botocore.config import Config

from nearstore.metadata.defaults import DEFAULT_ENDPOINT, DEV_ACCESS_KEY, DEV_SECRET_KEY


def connect(
    endpoint: str | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    max_pool_connections: int = 64,
    **config: Any,
) -> Any:
    """A boto3 S3 client for a nearstore node (see the module docstring);
    extra keyword arguments go to botocore's Config."""
    cfg = Config(
        s3={"addressing_style": "path"},
        retries={"mode": "adaptive", "max_attempts": 8},
        max_pool_connections=max_pool_connections,
        tcp_keepalive=True,
        **config,
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint or os.environ.get("NEARSTORE_ENDPOINT", DEFAULT_ENDPOINT),
        aws_access_key_id=access_key or os.environ.get("NEARSTORE_ACCESS_KEY", DEV_ACCESS_KEY),
        aws_secret_access_key=secret_key or os.environ.get("NEARSTORE_SECRET_KEY", DEV_SECRET_KEY),
        region_name=os.environ.get("NEARSTORE_REGION", "us-east-1"),
        config=cfg,
    )

"""nearstore: an S3-compatible object store with a node-local cache for GPU
clusters.

Everything installs under this one name, so that nothing else lands at the
top level of a training environment::

    import nearstore
    s3 = nearstore.connect()                      # boto3, set up for the node
    from nearstore.clients.datasets import TarDataset

The packages: ``nearstore.gateway`` (the S3 front), ``nearstore.cache`` (the
node-local chunk cache), ``nearstore.metadata`` (identities, the ring,
membership), ``nearstore.clients`` (what training jobs import) and
``nearstore.bench`` (benchmarks). In the repository they are the top-level
folders of those names; ``nearstore/`` holds links to them.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING, Any

__version__ = version("nearstore")  # pyproject.toml's, not a second copy
__all__ = ["__version__", "connect"]

if TYPE_CHECKING:
    from nearstore.clients.connect import connect


def __getattr__(name: str) -> Any:
    # Lazily: a server process importing nearstore.gateway must not pay for
    # boto3 here.
    if name == "connect":
        from nearstore.clients.connect import connect

        return connect
    raise AttributeError(f"module 'nearstore' has no attribute {name!r}")

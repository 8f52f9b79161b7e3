"""What a node and its clients agree on without asking each other.

- The development keys: a node without credentials of its own uses them, on
  loopback only (gateway/config.py), and clients.connect() signs with them
  when the environment names no keys.
- The default chunk size: the unit of the cache (a chunk's identity includes
  it) and so the alignment that ranged readers cut large reads at. 16 MiB by
  measurement (gateway/config.py, CacheConfig.chunk_size).
- Where a node listens by default.
"""

from __future__ import annotations

DEV_ACCESS_KEY = "nearstore-dev"
DEV_SECRET_KEY = "nearstore-dev-secret-key"
DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_PORT = 9000
DEFAULT_ENDPOINT = f"http://127.0.0.1:{DEFAULT_PORT}"

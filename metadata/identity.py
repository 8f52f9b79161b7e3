"""What names a piece of data everywhere in a cluster.

A chunk's id is a hash of (backing store, bucket, key, ETag, chunk size,
index). Every node, and a client reading straight from owners
(``nearstore.clients.direct``), computes the same id for the same bytes:
the ring (``metadata.ring``) places ids on nodes, and the chunk store names
its files by them. Because the ETag is part of the id, an overwritten object
can never be served from its old chunks; they age out. The size of the
object is not part of it: whoever fills a chunk checks its length against
the backing store's answer.
"""

from __future__ import annotations

import xxhash


def chunk_id(store: str, bucket: str, key: str, etag: str, chunk_size: int, index: int) -> str:
    h = xxhash.xxh3_128()
    for part in (store, bucket, key, etag, str(chunk_size), str(index)):
        data = part.encode()
        # Length-prefixed, so ("ab","c") and ("a","bc") differ.
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.hexdigest()

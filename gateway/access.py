"""Who may do what: each bucket belongs to one user, and only its owner
may read, list or write it.

Decided once per request, after the signature and before the operation
touches a store, by every front that serves S3 (aiohttp's, the hot path,
the short-circuit socket, browser POSTs, the source of a copy). So no
byte of another tenant's bucket is served, whether it would come from
the local store, the backing store or the chunk cache; peers are asked for
chunks only by a node that has already decided.

The owner comes from ``Backend.bucket_owner`` without a wait: the local
store's row memo (dropped on any index write), or the config for buckets
that front a backing store. Ownership is recorded as a canonical user id,
"" for the node's first user (the keys of the environment and
``[[credentials]]``), so a node whose first key changes keeps its buckets.

Not yet: ACLs, bucket policies and anonymous access (every request is
signed by a known key before it gets here).
"""

from __future__ import annotations

from nearstore.gateway import errors
from nearstore.gateway.config import Config, User
from nearstore.metadata.backing import Backend


def recorded(cfg: Config, user: User) -> str:
    """``user`` as bucket ownership records it."""
    return "" if user.id == cfg.first_user.id else user.id


def owner_of(cfg: Config, backend: Backend, bucket: str) -> str:
    """The canonical id of ``bucket``'s owner; NoSuchBucket where the store
    knows there is none."""
    return backend.bucket_owner(bucket) or cfg.first_user.id


def authorize(cfg: Config, backend: Backend, access_key: str, bucket: str) -> None:
    """AccessDenied unless the user of ``access_key`` owns ``bucket`` (and
    for a key no user holds: there is no such request once authenticated,
    but a slip elsewhere must fail closed)."""
    try:
        user = cfg.user_of(access_key)
    except KeyError:
        raise errors.AccessDenied() from None
    if owner_of(cfg, backend, bucket) != user.id:
        raise errors.AccessDenied()

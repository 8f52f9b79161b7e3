"""Read-ahead hints: a loader tells the node which objects it reads next.

A dataset knows each epoch's order before it reads a byte (``epoch_order``
and ``split`` in ``clients.datasets``); the node does not, so without help
every first epoch reads cold. A `Hinter` holds one stream's planned keys
and, as the loader advances, sends the node the next window of them:

    POST /_nearstore/hint?bucket=B          (signed like any S3 request)
    {"stream": "<job>/<rank>/<worker>", "keys": ["k1", "k2", ...]}
    -> 200 {"accepted": n, "queued": q}

The first key is the one the stream reads next; a call replaces the
stream's earlier window (the node drops what is no longer in it), and the
node deduplicates across streams, so every rank and worker sends its own
window without coordinating (docs/CLIENTS.md has the full contract).

The window rule: keep about ``ahead_s`` (30) seconds of consumption ahead
of the reader. The rate is what the reader consumed between the last two
sends (smoothed, half the old rate and half the new); the window is
``rate x ahead_s`` keys, clamped to ``[min_keys, max_keys]`` (4 and 1000)
and to the body limit (256 KiB); the first window, before any rate is
known, is ``initial`` (16) keys. A new window is sent when the reader has
consumed half of the last one: one call per half window, never one per
sample, so a loader of N items makes about ``2 N / window`` calls. Why
time, not a count: a loader of 100 MiB shards at 2 a second and one of
100 KiB images at 2,000 a second both want the node a few tens of seconds
ahead of them, which is a long way in bytes for the first and a short one
in keys for neither.

Sends run on one background thread per hinter, latest window wins (a
window computed while the previous one is still in flight replaces the
queued one), so ``at()`` never blocks the loader. Hints are an
optimisation, never a dependency: any failure (a plain S3 endpoint's
404/405/501, a 403, a refused connection, an answer that is not the
node's) turns hints off for that source in this process, logged once at
info level, and the loader reads on as before. ``NEARSTORE_HINTS=0`` or a
dataset's ``hints=False`` turns them off; a local directory source has no
node to tell.

Stream ids: ``<job>/<rank>/<worker>``. The job part is made once per
dataset object: from ``NEARSTORE_JOB``, ``TORCHELASTIC_RUN_ID`` or
``SLURM_JOB_ID`` when one is set (every rank of the job then shares it),
joined with a digest of the dataset's source and prefix (a job's train and
validation sets are separate streams); else a random token (ranks then
differ in the job part too, which costs nothing: the rank and worker make
the stream unique, the node deduplicates the keys).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from nearstore.clients.ranged import _ssl_context

__all__ = ["ENV", "Hinter", "HintsUnavailable", "enabled", "encode", "fit", "for_source", "job_token", "post",
           "stream_id"]

log = logging.getLogger(__name__)

ENV = "NEARSTORE_HINTS"
ROUTE = "/_nearstore/hint"
MAX_KEYS = 1000  # keys per call, the node's limit
MAX_BODY = 256 * 1024  # bytes per call, the node's limit
MAX_STREAM = 200  # characters of a stream id, the node's limit
MIN_KEYS = 4
INITIAL_KEYS = 16
AHEAD_S = 30.0
TIMEOUT = 5.0  # seconds per call; the loader never waits on it
JOB_VARS = ("NEARSTORE_JOB", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


class HintsUnavailable(Exception):
    """The endpoint does not take hints (or not now): hints stop for it."""


def enabled(flag: bool | None = None) -> bool:
    """Whether to hint: ``flag`` when given, and never under NEARSTORE_HINTS=0."""
    if flag is False:
        return False
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def job_token(what: str) -> str:
    """The job part of a stream id for a dataset over ``what`` (its source
    URL and prefix): shared by all ranks when the launcher names the job."""
    for var in JOB_VARS:
        job = os.environ.get(var, "").strip()
        if job:
            digest = hashlib.sha256(what.encode()).hexdigest()[:8]
            return f"{job[:120]}:{digest}"
    return secrets.token_hex(6)


def stream_id(job: str, rank: int, worker: int) -> str:
    """``job/rank/worker``, cut to the node's 200 characters from the job's end."""
    tail = f"/{rank}/{worker}"
    return job[: MAX_STREAM - len(tail)] + tail


def fit(stream: str, keys: Sequence[str]) -> int:
    """How many of ``keys``, from the first (the nearest matter most), fit
    in one call: MAX_KEYS, and a body of at most MAX_BODY bytes."""
    room = MAX_BODY - len(json.dumps({"stream": stream[:MAX_STREAM], "keys": []}).encode())
    n = 0
    for key in keys[:MAX_KEYS]:
        room -= len(json.dumps(key).encode()) + 2  # the key quoted, and ", " before the next
        if room < 0:
            break
        n += 1
    return n


def encode(stream: str, keys: Sequence[str]) -> bytes:
    """The body of one call (keys past what `fit` allows are left out)."""
    taken = list(keys[: fit(stream, keys)])
    return json.dumps({"stream": stream[:MAX_STREAM], "keys": taken}).encode()


def for_source(source: Any, flag: bool | None, stream: str, plan: Sequence[str], **kw: Any) -> Hinter | None:
    """A hinter over ``plan`` for a dataset's source, or None where there
    is nothing to tell: hints off (``flag``, NEARSTORE_HINTS), an empty
    plan, a source without ``send_hint`` (a local directory), or one whose
    endpoint already refused a hint in this process."""
    if not plan or not enabled(flag):
        return None
    send = getattr(source, "send_hint", None)
    if send is None or getattr(source, "hints_off", False):
        return None

    def failed(error: BaseException) -> None:
        if not getattr(source, "hints_off", False):
            source.hints_off = True
            log.info("no read-ahead hints to %s (%s): reading without them", getattr(source, "url", source), error)

    return Hinter(send, stream, plan, on_fail=failed, **kw)


def post(s3: Any, bucket: str, stream: str, keys: Sequence[str], *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """One hint call to the node behind boto3 client ``s3``, signed with its
    credentials (SigV4 over the body's SHA-256). The node's answer, or
    HintsUnavailable for anything else (another status, an answer that
    is not the node's JSON, no connection)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    endpoint = str(s3.meta.endpoint_url).rstrip("/")
    url = f"{endpoint}{ROUTE}?bucket={quote(bucket, safe='')}"
    body = encode(stream, keys)
    headers = {"Content-Type": "application/json", "x-amz-content-sha256": hashlib.sha256(body).hexdigest()}
    credentials = getattr(getattr(s3, "_request_signer", None), "_credentials", None)
    if credentials is not None:
        signed = AWSRequest(method="POST", url=url, data=body, headers=headers)
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", s3.meta.region_name or "us-east-1").add_auth(signed)
        headers = dict(signed.headers.items())
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    ssl_ctx = _ssl_context(s3) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ssl_ctx) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        e.close()
        raise HintsUnavailable(f"HTTP {e.code}") from None
    except OSError as e:
        raise HintsUnavailable(str(e)) from None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if status != 200 or not isinstance(doc, dict) or "accepted" not in doc:
        raise HintsUnavailable(f"HTTP {status}, not a hint answer")
    return doc


class Hinter:
    """One stream's hints over one planned order of keys (one epoch of one
    rank and worker). ``at(i)`` says the reader is fetching ``plan[i]``;
    the window after it is sent in the background when due (see the
    module docstring for the rule). ``send(stream, keys)`` raises on
    failure; ``on_fail`` is told once, and the hinter stops.

    ``close()`` stops it; a stream that stopped before the end of its plan
    sends an empty window, so the node drops what it queued for it."""

    def __init__(
        self,
        send: Callable[[str, list[str]], object],
        stream: str,
        plan: Sequence[str],
        *,
        ahead_s: float = AHEAD_S,
        min_keys: int = MIN_KEYS,
        max_keys: int = MAX_KEYS,
        initial: int = INITIAL_KEYS,
        on_fail: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send_fn, self.stream, self.plan = send, stream, plan
        self.ahead_s, self.on_fail, self.clock = ahead_s, on_fail, clock
        self.max_keys = max(1, min(max_keys, MAX_KEYS))
        self.min_keys = max(1, min(min_keys, self.max_keys))
        self.initial = max(self.min_keys, min(initial, self.max_keys))
        self.rate: float | None = None  # keys a second, smoothed
        self.sent: tuple[int, int] | None = None  # (start, length) of the last window asked for
        self.last: tuple[int, float] | None = None  # (position, time) of that ask
        self.position = -1
        self.calls = 0  # windows handed to the sender (tests and the bench read it)
        self.dead = False
        self._closed = False
        self._pending: list[str] | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def window(self) -> int:
        """Keys to send ahead now: ``rate x ahead_s`` clamped, or ``initial``."""
        if self.rate is None:
            return self.initial
        return max(self.min_keys, min(self.max_keys, math.ceil(self.rate * self.ahead_s)))

    def at(self, position: int) -> None:
        """The reader is fetching ``plan[position]``: send the window after
        it if half of the last one has been consumed. Never blocks on I/O."""
        with self._cond:
            if self.dead or self._closed or position <= self.position:
                return
            self.position = position
            start = position + 1
            if start >= len(self.plan):
                return
            if self.sent is not None:
                sent_start, sent_len = self.sent
                if sent_start + sent_len >= len(self.plan) or start - sent_start < max(1, sent_len // 2):
                    return  # the node has the rest of the plan, or half the window is still ahead
            now = self.clock()
            if self.last is not None and position > self.last[0] and now > self.last[1]:
                fresh = (position - self.last[0]) / (now - self.last[1])
                self.rate = fresh if self.rate is None else (self.rate + fresh) / 2
            keys = list(self.plan[start : start + self.window()])
            keys = keys[: fit(self.stream, keys)]
            self.sent, self.last = (start, len(keys)), (position, now)
            self._queue(keys)

    def _queue(self, keys: list[str]) -> None:
        """Hand a window to the sending thread (called with the lock held)."""
        self._pending = keys
        self.calls += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nearstore-hints", daemon=True)
            self._thread.start()
        self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                keys, self._pending = self._pending, None
                if keys is None:  # closed, nothing left to send
                    return
            try:
                self.send_fn(self.stream, keys)
            except Exception as e:  # any failure: no more hints from here
                with self._cond:
                    self.dead, self._pending = True, None
                if self.on_fail is not None:
                    self.on_fail(e)
                return

    def close(self, wait: float = 0.0) -> None:
        """No more hints; an early stop drops the node's queue for this
        stream (an empty window). ``wait``: seconds to let the sender finish."""
        with self._cond:
            if self._closed:
                return
            early = self.sent is not None and self.position < len(self.plan) - 1
            if early and not self.dead:
                self._queue([])
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and wait > 0:
            thread.join(wait)

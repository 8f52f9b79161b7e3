"""A coverage-guided fuzz target for the request front door (issue 16).

One input is the bytes a client writes on one connection. A real node
(``nearstore.node.build_node`` over a LocalStore in a temporary directory,
served by ``gateway.hotpath.listen`` exactly as ``nearstore serve`` serves
it: the httptools hot path first, aiohttp for everything else) runs in
this process on one event loop kept across inputs, and each input is
written to it over a fresh loopback connection. In-process, so that the
fuzzer sees the coverage of the node's code; over a socket, so that the
framing, the hand-off from the hot path to aiohttp and the connection
limits are the ones a client meets.

The first byte of an input chooses how the rest is sent:

- bit 0 set, **fix-up**: the rest is one request, made self-consistent
  again after mutation the way a real client would have sent it:
  Content-Length, Content-MD5, x-amz-checksum-*, a hex
  x-amz-content-sha256 recomputed over the body, the signature (SigV4
  header or query, SigV2 header or query, each aws-chunked chunk signature)
  made anew with the node's key at the current time. Without this, a
  mutation anywhere would stop at SignatureDoesNotMatch and the fuzzer
  would never reach a handler, a body decoder or an XML parser.
- bit 0 clear, **raw**: the rest is written as it is and the connection
  half-closed: the parsers (llhttp in the hot path, aiohttp's) and the
  limits against any bytes at all, pipelined requests included.

The oracle (``Crash`` when it fails): every response the node writes is
well-formed HTTP/1.1 with a status below 500, but for 501 NotImplemented
and 503 SlowDown, which S3 answers too; an error's
body (not HEAD's, not 304's) is an S3 ``<Error>`` document with a Code;
nothing is logged at ERROR (``as_s3_error`` logs every exception that is
not an S3 error there, aiohttp every exception that escapes a handler,
asyncio every task's exception nobody retrieved); the node closes or
answers within ``HANG_S`` seconds (its own head, idle and body timeouts are
set well below that).

Run it for as long as asked (``make fuzz SECONDS=600``)::

    .venv/bin/python -m tests.fuzz -max_total_time=600 -artifact_prefix=build/fuzz/ build/fuzz/corpus

``tests/fuzz/test_front_door.py`` runs it for ~20 s in the suite. Each
crash is written as ``crash-<sha1>`` (libFuzzer's artifact); replay one
with ``.venv/bin/python -m tests.fuzz build/fuzz/crash-<sha1>``, and make
it a regression test in ``tests/fuzz/test_front_door.py`` (``one_input``
on a ``FuzzNode``). Findings already reported and left are counted, not
stopped at (``KNOWN_EXCEPTIONS``; each is named when first met, and the
counts printed every 20,000 inputs);
``NEARSTORE_FUZZ_STRICT=1`` stops at them too.

The seed corpus is made at start from real botocore-signed requests
(``seeds()``), so that every seed is fresh (signed now) and names the
node's real multipart upload; ``-seed_inputs`` or a corpus directory adds
more.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import hmac
import logging
import os
import re
import shutil
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit
from xml.etree import ElementTree

import boto3
import httptools
import uvloop
from aiohttp import web
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam
from botocore.auth import HmacV1Auth, HmacV1QueryAuth, S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials

from nearstore.gateway import checksums
from nearstore.gateway.backends.local import LocalStore
from nearstore.gateway.config import Config
from nearstore.gateway.hotpath import listen
from nearstore.node import Stores, build_node

ACCESS_KEY = "FUZZACCESSKEY0000001"
SECRET_KEY = "fuzz/secret+key/0123456789abcdefghijklm"
REGION = "us-east-1"
BUCKET = "fuzz"
HOST = "fuzz.local:9000"  # what the seeds name; the connection goes to the node wherever it listens
HANG_S = 5.0  # an input the node neither answers nor closes within this long hangs
# The node's own timeouts, short, so that a request left waiting for bytes
# that never come (a body shorter than its Content-Length) ends on the
# node's side well within HANG_S. Its body stall check runs once a second.
NODE_TIMEOUT_S = 0.5
RESET_EVERY = 5000  # inputs; then a fresh data directory (the store only grows)

# Statuses at and above 500 a node over its local store may answer without
# a bug behind them: S3's own answers to what is not implemented and to too
# many uploads or connections at once.
LEGIT_5XX = {501: {"NotImplemented"}, 503: {"SlowDown"}}

FIXUP = 0x01

# Findings already reported, counted instead of stopping the run.
KNOWN: Counter[str] = Counter()
_NOT_XML = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


# Warnings that are no failure of the node's: aiohttp's of a client's odd
# form headers (a POST upload), and its advice to key requests' storage
# with web.RequestKey (gateway/app.py uses strings). A test that runs a
# FuzzNode under pytest's filterwarnings=error ignores these too.
WARNINGS = (BadContentDispositionHeader, BadContentDispositionParam)


class Crash(AssertionError):
    """The node broke the oracle (module docstring) for one input."""


# --- the node ----------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _ErrorLog(logging.Handler):
    """ERROR records from any logger while an input is served."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class FuzzNode:
    """A node over a LocalStore in a temporary directory, on one event loop
    (uvloop, as ``nearstore serve``), answering on 127.0.0.1. With
    ``reset_every`` (the fuzzer's), a fresh data directory after that many
    inputs; a test's node keeps what it was given. ``data_dir``: where its
    store lives, emptied at start (the fuzzer's: libFuzzer ends the process
    with exit(), past any clean-up, so the next run clears it instead)."""

    def __init__(self, reset_every: int = 0, data_dir: str | None = None) -> None:
        self.reset_every = reset_every
        self._given_dir = data_dir
        self.loop = uvloop.new_event_loop()
        self.errors = _ErrorLog()
        self.loop.set_exception_handler(self._loop_error)
        for category in WARNINGS:
            warnings.filterwarnings("ignore", category=category)
        self._loop_errors: list[str] = []
        self._known_errors = 0
        # Collect garbage after each input: slower, but a task that failed
        # unawaited is reported at once, not whenever the collector runs
        # (the regression tests; the fuzzer finds such a failure anyway).
        self.collect = False
        self.port = 0
        self.upload_id = ""
        self.served = 0
        self._dir = ""
        self._stop: Callable[[], Any] | None = None
        self.store: LocalStore | None = None
        logging.getLogger().addHandler(self.errors)
        self.loop.run_until_complete(self._start())

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, BaseException) and known(exc):
            self._known_errors += 1
            return
        trace = "".join(traceback.format_exception(exc)) if isinstance(exc, BaseException) else ""
        self._loop_errors.append(f"{context.get('message')}: {exc!r}\n{trace}")

    def config(self) -> Config:
        return Config(
            host="127.0.0.1", port=0, data_dir=self._dir, credentials={ACCESS_KEY: SECRET_KEY}, fsync=False,
            local_socket="off", head_timeout=NODE_TIMEOUT_S, idle_timeout=NODE_TIMEOUT_S,
            body_timeout=NODE_TIMEOUT_S, shutdown_timeout=1.0,
        )

    async def _start(self) -> None:
        if self._given_dir:
            shutil.rmtree(self._given_dir, ignore_errors=True)
            os.makedirs(self._given_dir)
            self._dir = self._given_dir
        else:
            self._dir = tempfile.mkdtemp(prefix="nearstore-fuzz-")
        cfg = self.config()
        stores = Stores(cfg)
        self.store = stores.local  # the node's backend (no [[buckets]]: the local store alone)
        app = build_node(cfg, stores)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        server, hot = await listen(runner, "127.0.0.1", 0, limits=cfg.limits)
        self.port = server.sockets[0].getsockname()[1]

        async def stop() -> None:
            server.close()
            if hot is not None:
                hot.shutdown()
            await runner.cleanup()

        self._stop = stop
        await self._populate()

    async def _populate(self) -> None:
        """What the seeds name: bucket ``fuzz`` with a small object, a
        larger one (sendfile, ranges), a key under a prefix, and an
        upload in progress."""
        for req in (
            signed("PUT", f"/{BUCKET}"),
            signed("PUT", f"/{BUCKET}/obj", b"hello, fuzzer\n"),
            signed("PUT", f"/{BUCKET}/big", bytes(range(256)) * 1024),
            signed("PUT", f"/{BUCKET}/dir/a%20b", b"x"),
            signed("PUT", f"/{BUCKET}/obj?tagging", b"<Tagging><TagSet><Tag><Key>k</Key><Value>v</Value></Tag>"
                   b"</TagSet></Tagging>"),
        ):
            (resp,) = await self.exchange(req, one=True)
            assert resp.status == 200, (req, resp)
        (resp,) = await self.exchange(signed("POST", f"/{BUCKET}/mp?uploads"), one=True)
        found = re.search(rb"<UploadId>([^<]+)</UploadId>", resp.body)
        assert found is not None, resp
        self.upload_id = found.group(1).decode()

    def close(self) -> None:
        if self._stop is not None:
            self.loop.run_until_complete(self._stop())
            self._stop = None
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()
        logging.getLogger().removeHandler(self.errors)
        shutil.rmtree(self._dir, ignore_errors=True)

    def reset(self) -> None:
        """A fresh data directory: the store grows with every PUT."""
        assert self._stop is not None
        self.loop.run_until_complete(self._stop())
        shutil.rmtree(self._dir, ignore_errors=True)
        self.loop.run_until_complete(self._start())

    # --- one exchange ------------------------------------------------------------

    async def exchange(self, wire: bytes, *, one: bool, head: bool = False) -> list[Response]:
        """Write ``wire`` on a new connection and read what the node
        answers: with ``one``, up to the first final response; otherwise
        (the connection half-closed after ``wire``) until the node closes.
        Crash if neither happens within HANG_S."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        got = bytearray()
        parser = _Responses(head)
        try:
            async with asyncio.timeout(HANG_S):
                writer.write(wire)
                if not one:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                while not (one and parser.final):
                    try:
                        data = await reader.read(65536)
                    except ConnectionError:
                        break
                    if not data:
                        break
                    got += data
                    parser.feed(data)
        except TimeoutError:
            raise Crash(f"no answer and no close within {HANG_S:.0f} s; read {bytes(got[:300])!r}") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return parser.done

    def serve(self, wire: bytes, *, one: bool, head: bool) -> list[Response]:
        """One input, against the oracle."""
        self.served += 1
        if self.reset_every and self.served % self.reset_every == 0:
            self.reset()
        self.errors.records.clear()
        self._loop_errors.clear()
        self._known_errors = 0
        responses = self.loop.run_until_complete(self.exchange(wire, one=one, head=head))
        # Let what the connection started settle (a handler still running
        # after the client left logs its failure now).
        self.loop.run_until_complete(asyncio.sleep(0))
        if self.collect:
            gc.collect()  # a failed task nobody awaited is reported when it is collected
        logged = [r for r in self.errors.records if not known(r.exc_info[1] if r.exc_info else None)]
        if logged or self._loop_errors:
            text = "\n".join(_format(r) for r in logged) + "\n".join(self._loop_errors)
            raise Crash(f"logged at ERROR while serving:\n{text}")
        # A known finding's InternalError is that finding's.
        known_here = self._known_errors or len(logged) < len(self.errors.records)
        for resp in responses:
            check_response(resp, head, internal_error_ok=bool(known_here))
        return responses


# Findings reported and left (tests/fuzz/test_front_door.py holds an xfail
# test of each), by the exception and where it is raised (the innermost
# frame of the node's code, else the innermost of all): counted, so that a
# long run explores past them. NEARSTORE_FUZZ_STRICT=1 counts none of them
# (to reproduce or minimize one).
# Findings reported and not fixed yet, counted rather than stopping the
# fuzzer: (exception type, file the innermost frame of ours is in) -> what.
# Empty: the nine found so far are fixed, each with its regression test in
# test_front_door.py.
KNOWN_EXCEPTIONS: dict[tuple[type[BaseException], str], str] = {}
STRICT = os.environ.get("NEARSTORE_FUZZ_STRICT") == "1"


def known(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a finding already reported (counted in KNOWN)."""
    if exc is None or STRICT:
        return False
    tb, ours, last = exc.__traceback__, "", ""
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        if "/nearstore/" in last:
            ours = last
        tb = tb.tb_next
    where = ours or last
    for (kind, path), what in KNOWN_EXCEPTIONS.items():
        if isinstance(exc, kind) and where.endswith(path):
            KNOWN[what] += 1
            return True
    return False


def _format(record: logging.LogRecord) -> str:
    text = f"{record.name}: {record.getMessage()}"
    if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
    return text


class _Responses:
    """The responses in what the node wrote (httptools' response parser)."""

    def __init__(self, head: bool) -> None:
        self.done: list[Response] = []
        self.final = False
        self._head = head
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._broken: str | None = None

    def feed(self, data: bytes) -> None:
        if self._broken is not None or (self.final and self._head):
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise Crash("the node answered with a protocol upgrade") from None
        except httptools.HttpParserError as e:
            raise Crash(f"the node wrote a malformed response: {e}; {data[:300]!r}") from None

    def on_message_begin(self) -> None:
        self._headers, self._body = {}, bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if self._head and status >= 200:
            # A HEAD's response has no body, whatever its Content-Length
            # says; httptools cannot be told, so it ends here.
            self._finish(status)

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        if not (self._head and self.final):
            self._finish(self._parser.get_status_code())

    def _finish(self, status: int) -> None:
        if status >= 200:
            self.final = True
        self.done.append(Response(status, self._headers, bytes(self._body)))


def check_response(resp: Response, head: bool, *, internal_error_ok: bool = False) -> None:
    """The oracle for one response (module docstring)."""
    code = None
    if resp.status >= 400 and resp.body:
        try:
            root = ElementTree.fromstring(resp.body)
        except ElementTree.ParseError:
            # Known, reported, not fixed here (test_front_door.py's xfail):
            # a client's control characters echoed into an error's fields
            # make it ill-formed XML. Anything else is a crash.
            try:
                if STRICT:
                    raise
                root = ElementTree.fromstring(_NOT_XML.sub(b"", resp.body))
            except ElementTree.ParseError:
                raise Crash(f"error {resp.status} with a body that is not XML: {resp.body[:300]!r}") from None
            KNOWN["control characters echoed into an error body"] += 1
        code = root.findtext("Code")
        if root.tag != "Error" or not code:
            raise Crash(f"error {resp.status} whose body is not an S3 Error: {resp.body[:300]!r}")
    elif resp.status >= 400 and not head and resp.status != 304:
        raise Crash(f"error {resp.status} without a body: {resp.headers}")
    code = code or resp.headers.get("x-amz-error-code")
    if internal_error_ok and resp.status == 500:
        return
    if resp.status >= 500 and (resp.status not in LEGIT_5XX or code not in LEGIT_5XX[resp.status]):
        raise Crash(f"the node answered {resp.status} {code}: {resp.body[:600]!r}")


# --- inputs ------------------------------------------------------------------------


def one_input(node: FuzzNode, data: bytes) -> list[Response]:
    """What the fuzzer calls: the first byte chooses raw or fix-up (module
    docstring), the rest is the request. The node's responses (for a
    regression test; the fuzzer ignores them), judged by the oracle."""
    if not data:
        return []
    flags, wire = data[0], data[1:]
    if flags & FIXUP and _parse(wire) is not None:
        fixed = fixup(wire)
        return node.serve(fixed, one=True, head=fixed.startswith(b"HEAD "))
    # raw, or a head the fix-up cannot read: sent as it is
    return node.serve(wire, one=False, head=wire.startswith(b"HEAD "))


def signed(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A request signed for the node (SigV4, signed payload); ``target``
    is sent as it is (percent-encode it)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "x-amz-content-sha256: 0", "Authorization: AWS4-HMAC-SHA256 x"]
    return fixup(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


# --- fix-up: the mutated request made consistent again -------------------------------

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def get(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    def set(self, name: str, value: str) -> None:
        lname = name.lower()
        for i, (k, _) in enumerate(self.headers):
            if k.lower() == lname:
                self.headers[i] = (k, value)
                return
        self.headers.append((name, value))

    def drop(self, name: str) -> None:
        self.headers = [(k, v) for k, v in self.headers if k.lower() != name.lower()]

    def wire(self) -> bytes:
        head = f"{self.method} {self.target} {self.version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        return (head + "\r\n").encode("utf-8", "surrogateescape") + self.body


def _parse(wire: bytes) -> _Request | None:
    head, sep, body = wire.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("utf-8", "surrogateescape").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    req = _Request(*parts, body=body)
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or "\n" in line:
            return None
        req.headers.append((name, value.strip(" \t")))
    return req


def fixup(wire: bytes) -> bytes:
    """``wire`` as a client would have sent it (module docstring): framing,
    digests and signatures recomputed. A head this cannot read is sent as
    it is."""
    req = _parse(wire)
    if req is None:
        return wire
    try:
        _fix(req)
        return req.wire()
    except Exception:  # a head botocore's signer refuses (odd bytes): sent as it came
        return wire


def _fix(req: _Request) -> None:
    chunked_te = "chunked" in (req.get("Transfer-Encoding") or "").lower()
    sha = req.get("x-amz-content-sha256") or ""
    aws_chunked = sha.startswith("STREAMING-")
    if not chunked_te and (req.body or req.get("Content-Length") is not None):
        req.set("Content-Length", str(len(req.body)))
    if not aws_chunked and not chunked_te:
        if req.get("Content-MD5") is not None:
            req.set("Content-MD5", base64.b64encode(hashlib.md5(req.body).digest()).decode())
        for name, value in list(req.headers):
            alg = name.lower().removeprefix("x-amz-checksum-")
            if alg != name.lower() and alg != "type" and alg != "algorithm":
                req.set(name, _checksum(alg, req.body) or value)
        if _HEX64.match(sha) or sha == "0":
            req.set("x-amz-content-sha256", hashlib.sha256(req.body).hexdigest())
    now = formatdate(usegmt=True)
    auth = req.get("Authorization") or ""
    query = req.target.partition("?")[2]
    if auth.startswith("AWS4-HMAC-SHA256"):
        _sign_v4(req)
        if sha.startswith(STREAMING_SIGNED):
            _sign_chunks(req)
    elif auth.startswith("AWS "):
        req.set("Date", now)
        req.drop("x-amz-date")
        _sign_v2(req)
    elif "X-Amz-Signature=" in query:
        _sign_v4_query(req)
    elif "Signature=" in query and "AWSAccessKeyId=" in query:
        _sign_v2_query(req)


def _checksum(alg: str, body: bytes) -> str | None:
    name = checksums.normalize(alg)
    if name is None:
        return None
    c = checksums.new_checksum(name)
    c.update(body)
    return base64.b64encode(c.digest()).decode()


def _aws_request(req: _Request, url: str | None = None) -> Any:
    out = AWSRequest(method=req.method, url=url or f"http://{req.get('Host') or HOST}{req.target}", data=req.body)
    for k, v in req.headers:
        out.headers[k] = v
    return out


def _credentials() -> Any:
    return Credentials(ACCESS_KEY, SECRET_KEY)


def _sign_v4(req: _Request) -> None:
    class Resign(S3SigV4Auth):
        """botocore's signer, but the request's own x-amz-content-sha256."""

        def _modify_request_before_signing(self, request: Any) -> None:
            SigV4Auth._modify_request_before_signing(self, request)

    if req.get("x-amz-content-sha256") is None:
        req.set("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
    signed = _aws_request(req)
    Resign(_credentials(), "s3", REGION).add_auth(signed)
    _signed_back(req, signed, ("Authorization", "X-Amz-Date", "Date"))


def _sign_v2(req: _Request) -> None:
    signed = _aws_request(req)
    HmacV1Auth(_credentials()).add_auth(signed)
    _signed_back(req, signed, ("Authorization",))


def _signed_back(req: _Request, signed: AWSRequest, names: tuple[str, ...]) -> None:
    """What the signer added or changed, into ``req``, whose other headers
    stay as they were (botocore's hold non-ASCII values as email Headers)."""
    for name in names:
        value = signed.headers.get(name)
        if value is not None:
            req.set(name, str(value))


def _strip_query(req: _Request, names: Callable[[str], bool]) -> str:
    path, _, query = req.target.partition("?")
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if not names(k)]
    return path + ("?" + urlencode(kept, quote_via=quote) if kept else "")


def _sign_v4_query(req: _Request) -> None:
    target = _strip_query(req, lambda k: k.lower().startswith("x-amz-"))
    signed = _aws_request(req, f"http://{req.get('Host') or HOST}{target}")
    signed.headers = type(signed.headers)()
    for k, v in req.headers:
        if k.lower() in ("host",):
            signed.headers[k] = v
    S3SigV4QueryAuth(_credentials(), "s3", REGION, expires=300).add_auth(signed)
    parts = urlsplit(signed.url)
    req.target = parts.path + ("?" + parts.query if parts.query else "")


def _sign_v2_query(req: _Request) -> None:
    target = _strip_query(req, lambda k: k in ("Signature", "Expires", "AWSAccessKeyId"))
    signed = _aws_request(req, f"http://{req.get('Host') or HOST}{target}")
    HmacV1QueryAuth(_credentials(), expires=300).add_auth(signed)
    parts = urlsplit(signed.url)
    req.target = parts.path + ("?" + parts.query if parts.query else "")


def _sign_chunks(req: _Request) -> None:
    """Each aws-chunked chunk's signature, chained from the head's: as far
    as the body still reads as chunks; the rest is left as it is."""
    auth = req.get("Authorization") or ""
    seed = auth.rpartition("Signature=")[2].strip()
    date = req.get("x-amz-date") or ""
    scope = re.search(r"Credential=[^/]+/([^,]+)", auth)
    if not scope:
        return
    scope_s = scope.group(1).strip()
    day, region, service, _ = scope_s.split("/")
    key = ("AWS4" + SECRET_KEY).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    empty = hashlib.sha256(b"").hexdigest()
    out, body, prev, pos = bytearray(), req.body, seed, 0
    while pos < len(body):
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            break
        size_s, semi, ext = body[pos:eol].partition(b";")
        try:
            size = int(size_s, 16)
        except ValueError:
            break
        if not semi or not ext.startswith(b"chunk-signature=") or eol + 2 + size > len(body):
            break
        data = body[eol + 2: eol + 2 + size]
        to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", date, scope_s, prev, empty, hashlib.sha256(data).hexdigest()])
        prev = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        out += size_s + b";chunk-signature=" + prev.encode() + b"\r\n" + data
        pos = eol + 2 + size
        if size == 0:
            break
    req.body = bytes(out) + body[pos:]


# --- the seed corpus: real botocore-signed requests ------------------------------------


def _capture(client: Any) -> list[bytes]:
    """Every request ``client`` would send, as bytes on the wire (botocore
    stops at before-send)."""
    captured: list[bytes] = []

    def before_send(request: Any, **_: Any) -> AWSResponse:
        body = request.body
        if hasattr(body, "read"):
            body = body.read()
        elif body is not None and not isinstance(body, bytes | bytearray):
            body = b"".join(body) if not isinstance(body, str) else body.encode()
        body = bytes(body or b"")
        parts = urlsplit(request.url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in request.headers.items()}
        headers.setdefault("Host", parts.netloc)
        if body and "Content-Length" not in headers:
            headers["Content-Length"] = str(len(body))
        head = f"{request.method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        captured.append((head + "\r\n").encode() + body)

        class Raw:
            def stream(self, **_: Any) -> Iterator[bytes]:
                return iter([b""])

        return AWSResponse(request.url, 200, {}, Raw())

    client.meta.events.register("before-send.s3", before_send)
    return captured


def _client(scheme: str = "http", signature: str = "s3v4") -> Any:
    return boto3.client(
        "s3", endpoint_url=f"{scheme}://{HOST}", region_name=REGION, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=BotoConfig(signature_version=signature, s3={"addressing_style": "path"},
                          retries={"max_attempts": 1}),
    )


ACL_DOC = (
    '<AccessControlPolicy xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Owner><ID>{owner}</ID></Owner>'
    '<AccessControlList><Grant><Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xsi:type="CanonicalUser"><ID>{owner}</ID></Grantee><Permission>FULL_CONTROL</Permission></Grant>'
    '<Grant><Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="Group">'
    "<URI>http://acs.amazonaws.com/groups/global/AllUsers</URI></Grantee><Permission>READ</Permission></Grant>"
    "</AccessControlList></AccessControlPolicy>"
)


def seeds(upload_id: str = "UPLOADID") -> list[bytes]:
    """A few dozen requests as botocore signs them (SigV4 over http: a
    signed payload; over https: aws-chunked with trailing checksums; SigV2;
    presigned URLs), a signed-chunk upload, a browser POST, a preflight and
    anonymous reads; each prefixed with its fix-up byte."""
    owner = Config(credentials={ACCESS_KEY: SECRET_KEY}).first_user.id  # the id the node gives ACCESS_KEY
    v4, tls, v2 = _client(), _client("https"), _client(signature="s3")
    out: list[bytes] = []
    for client in (v4, tls, v2):
        captured = _capture(client)
        calls: list[tuple[str, dict[str, Any]]] = [
            ("list_buckets", {}),
            ("head_bucket", {"Bucket": BUCKET}),
            ("create_bucket", {"Bucket": "fuzz2"}),
            ("create_bucket", {"Bucket": "fuzz3", "CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"}}),
            ("delete_bucket", {"Bucket": "fuzz2"}),
            ("list_objects", {"Bucket": BUCKET, "Prefix": "d", "Delimiter": "/", "MaxKeys": 2}),
            ("list_objects_v2", {"Bucket": BUCKET, "StartAfter": "a", "EncodingType": "url"}),
            ("list_object_versions", {"Bucket": BUCKET, "KeyMarker": "obj"}),
            ("list_multipart_uploads", {"Bucket": BUCKET}),
            ("get_bucket_location", {"Bucket": BUCKET}),
            ("put_object", {"Bucket": BUCKET, "Key": "new key+ü", "Body": b"some bytes", "Metadata": {"m": "v"},
                            "Tagging": "a=b&c=", "ACL": "public-read", "ContentType": "text/plain"}),
            ("put_object", {"Bucket": BUCKET, "Key": "sum", "Body": b"x" * 100, "ChecksumAlgorithm": "CRC32C",
                            "IfNoneMatch": "*"}),
            ("put_object", {"Bucket": BUCKET, "Key": "md5", "Body": b"y" * 10, "ContentMD5":
                            base64.b64encode(hashlib.md5(b"y" * 10).digest()).decode()}),
            ("get_object", {"Bucket": BUCKET, "Key": "big", "Range": "bytes=100-2000", "IfMatch": '"x"'}),
            ("get_object", {"Bucket": BUCKET, "Key": "obj", "IfNoneMatch": "*", "ResponseContentType": "a/b"}),
            ("get_object", {"Bucket": BUCKET, "Key": "obj", "IfModifiedSince": "2001-01-01", "PartNumber": 1}),
            ("head_object", {"Bucket": BUCKET, "Key": "big", "IfUnmodifiedSince": "2001-01-01",
                             "VersionId": "null"}),
            ("get_object_attributes", {"Bucket": BUCKET, "Key": "obj", "ObjectAttributes": ["ETag", "ObjectSize"]}),
            ("delete_object", {"Bucket": BUCKET, "Key": "md5"}),
            ("delete_objects", {"Bucket": BUCKET, "Delete": {"Objects": [{"Key": "a"}, {"Key": "b", "VersionId":
                                                                                       "null"}], "Quiet": True}}),
            ("copy_object", {"Bucket": BUCKET, "Key": "copy", "CopySource": f"{BUCKET}/obj",
                             "CopySourceIfMatch": '"e"', "MetadataDirective": "REPLACE", "Metadata": {"a": "b"}}),
            ("create_multipart_upload", {"Bucket": BUCKET, "Key": "mp2", "ChecksumAlgorithm": "SHA256"}),
            ("upload_part", {"Bucket": BUCKET, "Key": "mp", "UploadId": upload_id, "PartNumber": 1,
                             "Body": b"p" * 64}),
            ("upload_part_copy", {"Bucket": BUCKET, "Key": "mp", "UploadId": upload_id, "PartNumber": 2,
                                  "CopySource": f"{BUCKET}/big", "CopySourceRange": "bytes=0-99"}),
            ("list_parts", {"Bucket": BUCKET, "Key": "mp", "UploadId": upload_id, "MaxParts": 5}),
            ("complete_multipart_upload", {"Bucket": BUCKET, "Key": "mp", "UploadId": upload_id, "MultipartUpload":
                                           {"Parts": [{"PartNumber": 1, "ETag": '"e1"'},
                                                      {"PartNumber": 2, "ETag": "e2", "ChecksumCRC32": "AAAAAA=="}]}}),
            ("abort_multipart_upload", {"Bucket": BUCKET, "Key": "mp", "UploadId": "nope"}),
            ("put_object_tagging", {"Bucket": BUCKET, "Key": "obj", "Tagging": {"TagSet": [{"Key": "k", "Value":
                                                                                           "v"}]}}),
            ("get_object_tagging", {"Bucket": BUCKET, "Key": "obj"}),
            ("put_bucket_tagging", {"Bucket": BUCKET, "Tagging": {"TagSet": [{"Key": "t", "Value": ""}]}}),
            ("put_bucket_cors", {"Bucket": BUCKET, "CORSConfiguration": {"CORSRules": [
                {"AllowedOrigins": ["https://*.example.com"], "AllowedMethods": ["GET", "PUT"],
                 "AllowedHeaders": ["*"], "ExposeHeaders": ["ETag"], "MaxAgeSeconds": 60, "ID": "r"}]}}),
            ("put_bucket_versioning", {"Bucket": BUCKET, "VersioningConfiguration": {"Status": "Enabled"}}),
            ("put_public_access_block", {"Bucket": BUCKET, "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": True, "IgnorePublicAcls": False}}),
            ("put_bucket_policy", {"Bucket": BUCKET, "Policy": '{"Version":"2012-10-17","Statement":[{"Effect":'
                                   '"Allow","Principal":"*","Action":"s3:GetObject","Resource":'
                                   '"arn:aws:s3:::fuzz/pub/*","Condition":{"IpAddress":{"aws:SourceIp":'
                                   '"127.0.0.0/8"}}}]}'}),
            ("get_bucket_policy_status", {"Bucket": BUCKET}),
            ("get_bucket_acl", {"Bucket": BUCKET}),
            ("put_object_acl", {"Bucket": BUCKET, "Key": "obj", "GrantRead": f'id="{owner}"'}),
        ]
        if client is v4:
            calls += [("put_bucket_acl", {"Bucket": BUCKET, "AccessControlPolicy": {
                "Owner": {"ID": owner}, "Grants": [{"Grantee": {"Type": "CanonicalUser", "ID": owner},
                                                    "Permission": "FULL_CONTROL"}]}})]
        for name, params in calls:
            with contextlib.suppress(Exception):  # an empty answer some parsers refuse: the request is captured
                getattr(client, name)(**params)
        out += [bytes([FIXUP]) + w for w in captured]
    for client in (v4, v2):
        url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "big"}, ExpiresIn=60)
        parts = urlsplit(url)
        out.append(bytes([FIXUP]) + f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    out.append(bytes([FIXUP]) + _signed_chunks_put())
    out.append(bytes([FIXUP]) + _post_object(v4))
    out.append(bytes([FIXUP]) + _plain_acl_put(owner))
    out += [b"\x00" + w for w in (
        f"OPTIONS /{BUCKET}/obj HTTP/1.1\r\nHost: {HOST}\r\nOrigin: https://a.example.com\r\n"
        "Access-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: x-amz-date\r\n\r\n".encode(),
        f"GET /{BUCKET}/obj HTTP/1.1\r\nHost: {HOST}\r\n\r\nHEAD /{BUCKET}/big HTTP/1.1\r\nHost: {HOST}\r\n"
        "Range: bytes=-5\r\n\r\n".encode(),
        b"GET /_nearstore/health HTTP/1.1\r\nHost: x\r\n\r\n",
        f"PUT /{BUCKET}/chunked HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n"
        "Expect: 100-continue\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
    )]
    return out


def _plain_acl_put(owner: str) -> bytes:
    body = ACL_DOC.format(owner=owner).encode()
    return (f"PUT /{BUCKET}/obj?acl HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
            "x-amz-content-sha256: 0\r\nAuthorization: AWS4-HMAC-SHA256 x\r\n\r\n").encode() + body


def _signed_chunks_put() -> bytes:
    """A PutObject with signed aws-chunked chunks (what the Java and Go
    SDKs send; botocore never does): signatures placeholders, fix-up signs
    them."""
    data = [b"a" * 8192, b"b" * 100, b""]
    body = b"".join(f"{len(d):x};chunk-signature={'0' * 64}\r\n".encode() + d + b"\r\n"
                    for d in data)
    head = (f"PUT /{BUCKET}/chunks HTTP/1.1\r\nHost: {HOST}\r\nContent-Encoding: aws-chunked\r\n"
            f"x-amz-decoded-content-length: {sum(map(len, data))}\r\nContent-Length: {len(body)}\r\n"
            f"x-amz-content-sha256: {STREAMING_SIGNED}\r\nAuthorization: AWS4-HMAC-SHA256 x\r\n\r\n")
    return fixup(head.encode() + body)


def _post_object(client: Any) -> bytes:
    """A browser's POST upload, its form signed by botocore."""
    post = client.generate_presigned_post(BUCKET, "posted/${filename}", Conditions=[["content-length-range", 0, 100]],
                                          ExpiresIn=3600)
    boundary = "----fuzzboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             for k, v in post["fields"].items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.txt"\r\n'
                 "Content-Type: text/plain\r\n\r\nposted bytes\r\n")
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return (f"POST /{BUCKET} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def write_seeds(directory: str, upload_id: str) -> int:
    os.makedirs(directory, exist_ok=True)
    made = seeds(upload_id)
    for w in made:
        with open(os.path.join(directory, "seed-" + hashlib.sha1(w).hexdigest()), "wb") as f:
            f.write(w)
    return len(made)

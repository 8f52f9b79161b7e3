"""Hand-built HTTP requests against a server, signed with botocore's signers
where a valid signature is needed, so tests control every byte a client
library would otherwise normalise away."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import socket
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from unittest import mock
from urllib.parse import quote

from botocore.auth import HmacV1Auth, HmacV1QueryAuth, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .servers import S3Server

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def key_path(bucket: str, key: str = "") -> str:
    """The path-style request path for a bucket/key, percent-encoded as SDKs do."""
    path = "/" + quote(bucket, safe="")
    if key:
        path += "/" + quote(key, safe="/~")
    return path


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    elapsed: float = 0.0

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def xml(self) -> ET.Element:
        return ET.fromstring(self.body)

    @property
    def error_code(self) -> str | None:
        if not self.body:
            return None
        try:
            root = self.xml()
        except ET.ParseError:
            return None
        code = root.find("Code")
        return code.text if code is not None else None

    def error_field(self, name: str) -> str | None:
        try:
            el = self.xml().find(name)
        except ET.ParseError:
            return None
        return el.text if el is not None else None

    def __repr__(self) -> str:
        return f"<Response {self.status} {dict(self.headers)!r} {self.body[:600]!r}>"


@contextlib.contextmanager
def frozen_clock(at: datetime.datetime) -> Iterator[None]:
    """Make botocore's signers believe the time is ``at`` (UTC)."""
    naive = at.astimezone(datetime.UTC).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=naive), \
            mock.patch("botocore.auth.formatdate",
                       return_value=at.strftime("%a, %d %b %Y %H:%M:%S GMT")):
        yield


class _FixedPayloadSigV4(S3SigV4Auth):
    """SigV4 whose x-amz-content-sha256 is whatever the test says."""

    def __init__(self, credentials: Credentials, region: str, payload_hash: str) -> None:
        super().__init__(credentials, "s3", region)
        self._payload_hash = payload_hash

    def payload(self, request: Any) -> str:
        return self._payload_hash


def sign_headers(server: S3Server, method: str, path: str, query: str = "",
                 headers: Mapping[str, str] | None = None, body: bytes = b"", *,
                 sign: str = "v4", access_key: str | None = None,
                 secret_key: str | None = None, payload_hash: str | None = None,
                 region: str | None = None) -> dict[str, str]:
    """Headers (including Authorization) for the request, as botocore signs it."""
    url = f"{server.url}{path}" + (f"?{query}" if query else "")
    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    creds = Credentials(access_key or server.access_key, secret_key or server.secret_key)
    if sign == "v4":
        if payload_hash is None:
            payload_hash = hashlib.sha256(body).hexdigest()
        _FixedPayloadSigV4(creds, region or server.region, payload_hash).add_auth(req)
    elif sign == "v2":
        HmacV1Auth(creds).add_auth(req)
    elif sign is not None:
        raise ValueError(sign)
    return {k: v for k, v in req.headers.items()}


def presign(server: S3Server, method: str, path: str, query: str = "", *,
            version: str = "v4", expires: int = 3600,
            headers: Mapping[str, str] | None = None,
            access_key: str | None = None, secret_key: str | None = None) -> str:
    """A presigned path+query (V4 with X-Amz-Expires, or V2 with Expires)."""
    url = f"{server.url}{path}" + (f"?{query}" if query else "")
    req = AWSRequest(method=method, url=url, headers=dict(headers or {}))
    creds = Credentials(access_key or server.access_key, secret_key or server.secret_key)
    if version == "v4":
        S3SigV4QueryAuth(creds, "s3", server.region, expires=expires).add_auth(req)
    else:
        HmacV1QueryAuth(creds, expires=expires).add_auth(req)
    return req.url[len(server.url):]


def connection(server: S3Server, timeout: float = 30) -> http.client.HTTPConnection:
    if server.tls:
        return http.client.HTTPSConnection(server.host, server.port, timeout=timeout,
                                           context=server.ssl_context())
    return http.client.HTTPConnection(server.host, server.port, timeout=timeout)


def send(server: S3Server, method: str, path_and_query: str,
         headers: Mapping[str, str] | None = None, body: bytes | Any = b"",
         timeout: float = 30) -> Response:
    """Send exactly these headers and body; never raises on an HTTP status."""
    conn = connection(server, timeout)
    t0 = time.monotonic()
    try:
        conn.putrequest(method, path_and_query, skip_host=True, skip_accept_encoding=True)
        hdrs = dict(headers or {})
        if not any(k.lower() == "host" for k in hdrs):
            hdrs["Host"] = f"{server.host}:{server.port}"
        if isinstance(body, bytes) and not any(k.lower() == "content-length" for k in hdrs) \
                and (body or method in ("PUT", "POST")):
            hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        if isinstance(body, bytes):
            if body:
                conn.send(body)
        else:
            for chunk in body:
                conn.send(chunk)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.headers, data, time.monotonic() - t0)
    finally:
        conn.close()


def request(server: S3Server, method: str, path: str, query: str = "",
            headers: Mapping[str, str] | None = None, body: bytes = b"", *,
            sign: str | None = "v4", timeout: float = 30, **sign_kw: Any) -> Response:
    """Sign (unless ``sign`` is None) and send one request."""
    hdrs = dict(headers or {})
    if sign:
        hdrs = sign_headers(server, method, path, query, hdrs, body, sign=sign, **sign_kw)
    return send(server, method, path + (f"?{query}" if query else ""), hdrs, body, timeout)


def raw_socket(server: S3Server, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    if server.tls:
        ctx = ssl.create_default_context(cafile=server.ca_file)
        sock = ctx.wrap_socket(sock, server_hostname=server.host)
    return sock


def read_http_response(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read until the peer closes or a full response (by Content-Length) arrived."""
    buf = b""
    while len(buf) < limit:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        buf += chunk
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    if len(rest) >= int(value.strip()):
                        return buf
    return buf


def parse_raw_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, body

"""What a client observes, normalised so two servers can be compared.

A scenario is a function ``scenario(rec: Recorder, bucket: str)`` that drives a
server only through ``rec``; every call appends one observation (status,
error code and a whitelisted, normalised view of the response). Running the
same scenario against two servers and comparing ``rec.observations`` is a
differential test. Anything a server may legitimately choose on its own
(dates, request ids, upload ids, continuation tokens, owner names) is left out
or reduced to its shape.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from . import rawhttp
from .servers import S3Server

# Response fields worth comparing, per boto3 operation (others are ignored).
FIELDS: dict[str, tuple[str, ...]] = {
    "put_object": ("ETag",),
    "get_object": ("ETag", "ContentLength", "ContentRange", "ContentType", "Metadata",
                   "CacheControl", "ContentDisposition", "ContentLanguage", "ContentEncoding",
                   "TagCount", "PartsCount"),
    "head_object": ("ETag", "ContentLength", "ContentRange", "ContentType", "Metadata",
                    "CacheControl", "ContentDisposition", "ContentLanguage", "ContentEncoding",
                    "PartsCount"),
    "copy_object": ("CopyObjectResult.ETag",),
    # v1: moto omits empty <Prefix>/<Marker> (raw XML ignores Marker for that reason) and puts an ETag in NextMarker when no
    # delimiter is given (S3 omits NextMarker then); those are tested on nearstore only.
    "list_objects": ("Contents", "CommonPrefixes", "IsTruncated", "Delimiter", "MaxKeys",
                     "EncodingType", "Name"),
    "list_objects_v2": ("Contents", "CommonPrefixes", "IsTruncated", "KeyCount", "Prefix",
                        "Delimiter", "MaxKeys", "StartAfter", "EncodingType", "Name",
                        "NextContinuationToken?"),
    "delete_objects": ("Deleted", "Errors"),
    "get_object_tagging": ("TagSet",),
    "put_object_tagging": (),
    "delete_object_tagging": (),
    "delete_object": (),
    "upload_part": ("ETag",),
    "upload_part_copy": ("CopyPartResult.ETag",),
    "complete_multipart_upload": ("ETag", "Key", "Bucket"),
    "list_parts": ("Parts", "IsTruncated", "MaxParts", "NextPartNumberMarker",
                   "PartNumberMarker", "Key"),
    "abort_multipart_upload": (),
    "create_multipart_upload": ("Key", "Bucket"),
}

_ENTRY_FIELDS = ("Key", "Size", "ETag", "StorageClass", "Prefix", "PartNumber", "Code",
                 "Value")


def _entry(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: obj[k] for k in _ENTRY_FIELDS if k in obj}
    return obj


def _pick(resp: dict[str, Any], field: str) -> tuple[bool, Any]:
    shape_only = field.endswith("?")
    field = field.rstrip("?")
    cur: Any = resp
    for part in field.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    if shape_only:
        return True, "<present>"
    if isinstance(cur, list):
        cur = [_entry(x) for x in cur]
        if field in ("Deleted", "Errors", "TagSet"):
            cur = sorted(cur, key=lambda e: str(e.get("Key")))
    return True, cur


class Recorder:
    def __init__(self, server: S3Server, client: Any | None = None) -> None:
        self.server = server
        self.client = client or server.client()
        self.observations: list[tuple[str, Any]] = []
        self.last: dict[str, Any] = {}

    def note(self, label: str, value: Any) -> None:
        self.observations.append((label, value))

    def call(self, label: str, op: str, **kwargs: Any) -> dict[str, Any]:
        """Call ``client.<op>(**kwargs)``; record status, error code and fields."""
        obs: dict[str, Any] = {}
        try:
            resp = getattr(self.client, op)(**kwargs)
        except ClientError as e:
            meta = e.response.get("ResponseMetadata", {})
            obs["status"] = meta.get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code")
            # HEAD errors have no body: botocore puts the status in Code.
            obs["code"] = code
            self.observations.append((label, obs))
            self.last = {}
            return {}
        obs["status"] = resp["ResponseMetadata"]["HTTPStatusCode"]
        for field in FIELDS.get(op, ()):
            found, value = _pick(resp, field)
            if found:
                obs[field.rstrip("?")] = value
        if "Body" in resp:
            obs["body"] = resp["Body"].read()
        self.observations.append((label, obs))
        self.last = resp
        return resp

    def raw(self, label: str, method: str, path: str, query: str = "",
            headers: dict[str, str] | None = None, body: bytes = b"",
            xml_ignore: tuple[str, ...] = ("LastModified", "Owner", "RequestId", "HostId",
                                           "Initiated", "UploadId", "NextContinuationToken",
                                           "ContinuationToken", "Message", "Resource",
                                           "ChecksumAlgorithm", "ChecksumType", "Marker")
            ) -> rawhttp.Response:
        """A signed raw request; records status and the XML body as a tree."""
        resp = rawhttp.request(self.server, method, path, query, headers, body)
        obs: dict[str, Any] = {"status": resp.status}
        if resp.body.startswith(b"<?xml") or resp.body.startswith(b"<"):
            tree = xml_tree(resp.body, xml_ignore)
            if tree[0] == "Error":  # error bodies: only the code is comparable
                tree = [kid for kid in tree[2] if kid[0] == "Code"]
            obs["xml"] = tree
        else:
            obs["body"] = resp.body
        self.observations.append((label, obs))
        return resp


def xml_tree(body: bytes, ignore: tuple[str, ...] = ()) -> Any:
    """An XML document as nested (tag, text, children) with namespaces dropped.
    Children are ordered by tag (stable within one tag): S3 clients do not
    depend on the order of differently named elements."""

    def conv(el: ET.Element) -> Any:
        tag = el.tag.split("}", 1)[-1]
        kids = sorted((conv(c) for c in el if c.tag.split("}", 1)[-1] not in ignore),
                      key=lambda k: k[0])
        # moto omits an empty <Prefix/> in v1 listings; S3 sends it. Not comparable.
        kids = [k for k in kids if k != ("Prefix", "")]
        text = (el.text or "").strip() if not kids else ""
        return (tag, text, kids) if kids else (tag, text)

    return conv(ET.fromstring(body))


Scenario = Callable[[Recorder, str], None]


def _short(value: Any, limit: int = 700) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def first_difference(x: Any, y: Any, path: str = "") -> str:
    """Where two nested observations first differ, as 'path: x != y'."""
    if type(x) is type(y) and isinstance(x, dict):
        for k in list(x) + [k for k in y if k not in x]:
            if x.get(k, "<absent>") != y.get(k, "<absent>"):
                return first_difference(x.get(k, "<absent>"), y.get(k, "<absent>"),
                                        f"{path}.{k}")
    if type(x) is type(y) and isinstance(x, (list, tuple)):
        for i, (a, b) in enumerate(zip(x, y, strict=False)):
            if a != b:
                label = a[0] if isinstance(a, tuple) and a and isinstance(a[0], str) else i
                return first_difference(a, b, f"{path}[{label}]")
        if len(x) != len(y):
            return f"{path}: length {len(x)} != {len(y)}; extra: " + _short(
                x[len(y):] if len(x) > len(y) else y[len(x):], 300)
    return f"{path}: {_short(x, 300)} != {_short(y, 300)}"


def diff_observations(a: list[tuple[str, Any]], b: list[tuple[str, Any]],
                      max_reported: int = 3) -> str:
    """A readable report of the first differences (empty when equal)."""
    lines = []
    differing = 0
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else ("<missing>", None)
        y = b[i] if i < len(b) else ("<missing>", None)
        if x != y:
            differing += 1
            if differing <= max_reported:
                lines.append(f"step {i} {x[0]!r} / {y[0]!r}:\n   first difference "
                             f"(reference != candidate): {first_difference(x[1], y[1])}"
                             f"\n   reference: {_short(x[1])}\n   candidate: {_short(y[1])}")
    if differing > max_reported:
        lines.append(f"... {differing - max_reported} more differing steps")
    return "\n".join(lines)

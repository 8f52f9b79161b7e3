"""CORS: a bucket's rules, the preflight answer, and the headers of an
actual cross-origin response, as S3 evaluates them.

A bucket's configuration is stored by its store as the CORSConfiguration
document this module rendered (the local store's index, or the backing
store's own ``?cors`` for a fronted bucket). The gateway reads it through
``Rules``, a short-lived memo per bucket: a browser's requests each carry
an Origin, and none of them should cost a store round trip. A change made
through this process is seen at once; one made elsewhere (another worker
or node, the backing store directly) within ``TTL`` seconds.

The first rule whose origin, method and (for a preflight) requested
headers all match decides; origins and headers may hold one ``*``
wildcard, compared case-insensitively for headers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from nearstore.gateway import errors
from nearstore.gateway.xml import Node, child_text, document, parse
from nearstore.metadata.backing import Backend

METHODS = ("GET", "PUT", "POST", "DELETE", "HEAD")
MAX_RULES = 100
TTL = 5.0


@dataclass(frozen=True)
class Rule:
    origins: tuple[str, ...]
    methods: tuple[str, ...]
    headers: tuple[str, ...] = ()
    expose: tuple[str, ...] = ()
    max_age: int | None = None
    id: str | None = None

    def allows(self, origin: str, method: str, headers: Iterable[str] = ()) -> bool:
        return (method in self.methods and any(_matches(p, origin, False) for p in self.origins)
                and all(any(_matches(p, h, True) for p in self.headers) for h in headers))


def _matches(pattern: str, value: str, fold: bool) -> bool:
    if fold:
        pattern, value = pattern.lower(), value.lower()
    if "*" not in pattern:
        return pattern == value
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), value) is not None


def parse_configuration(body: bytes) -> list[Rule]:
    """A PutBucketCors body as rules; the errors S3 answers for a bad one."""
    root = parse(body)
    if root.tag != "CORSConfiguration":
        raise errors.MalformedXML()
    rules: list[Rule] = []
    for el in root.findall("CORSRule"):
        origins = _texts(el, "AllowedOrigin")
        methods = _texts(el, "AllowedMethod")
        if not origins or not methods:
            raise errors.MalformedXML()
        for m in methods:
            if m not in METHODS:
                raise errors.InvalidRequest(f"Found unsupported HTTP method in CORS config. Unsupported method is {m}")
        for o in origins:
            if o.count("*") > 1:
                raise errors.InvalidRequest(f'AllowedOrigin "{o}" can not have more than one wildcard.')
        raw_age = child_text(el, "MaxAgeSeconds")
        try:
            max_age = int(raw_age) if raw_age is not None else None
        except ValueError:
            raise errors.MalformedXML() from None
        rules.append(Rule(origins, methods, _texts(el, "AllowedHeader"), _texts(el, "ExposeHeader"), max_age,
                          child_text(el, "ID")))
    if not rules or len(rules) > MAX_RULES:
        raise errors.MalformedXML()
    return rules


def _texts(el: ET.Element, tag: str) -> tuple[str, ...]:
    return tuple((c.text or "").strip() for c in el.findall(tag))


def render(rules: Sequence[Rule]) -> bytes:
    """The CORSConfiguration document of ``rules`` (what GetBucketCors answers)."""
    out: list[Node | None] = []
    for r in rules:
        fields: list[Node | None] = [("ID", r.id) if r.id is not None else None]
        fields += [("AllowedHeader", h) for h in r.headers]
        fields += [("AllowedMethod", m) for m in r.methods]
        fields += [("AllowedOrigin", o) for o in r.origins]
        fields += [("ExposeHeader", h) for h in r.expose]
        fields.append(("MaxAgeSeconds", r.max_age) if r.max_age is not None else None)
        out.append(("CORSRule", fields))
    return document("CORSConfiguration", out)


def requested_headers(value: str | None) -> list[str]:
    return [h.strip() for h in (value or "").split(",") if h.strip()]


def preflight(rules: Sequence[Rule] | None, origin: str | None, method: str | None,
              headers: Sequence[str]) -> dict[str, str]:
    """The headers of a preflight's 200; the S3 error otherwise."""
    if not origin:
        raise errors.BadRequest("Insufficient information. Origin request header needed.")
    if not method or method not in METHODS:
        raise errors.BadRequest("Invalid Access-Control-Request-Method header")
    if rules is None:
        raise errors.AccessForbidden("CORSResponse: CORS is not enabled for this bucket.", Method=method,
                                     ResourceType="BUCKET")
    for rule in rules:
        if rule.allows(origin, method, headers):
            out = _allow(rule, origin)
            if headers:
                out["Access-Control-Allow-Headers"] = ", ".join(headers)
            return out
    raise errors.AccessForbidden("CORSResponse: This CORS request is not allowed. This is usually because the "
                                 "evalution of Origin, request method / Access-Control-Request-Method or "
                                 "Access-Control-Request-Headers are not whitelisted by the resource's CORS spec.",
                                 Method=method, ResourceType="OBJECT")


def actual(rules: Sequence[Rule] | None, origin: str, method: str) -> dict[str, str]:
    """The Access-Control-* headers of a response to a cross-origin request
    (none where no rule allows it)."""
    for rule in rules or ():
        if rule.allows(origin, method):
            return _allow(rule, origin)
    return {}


def _allow(rule: Rule, origin: str) -> dict[str, str]:
    any_origin = rule.origins == ("*",)
    out = {
        "Access-Control-Allow-Origin": "*" if any_origin else origin,
        "Access-Control-Allow-Methods": ", ".join(rule.methods),
        "Vary": "Origin, Access-Control-Request-Headers, Access-Control-Request-Method",
    }
    if not any_origin:
        out["Access-Control-Allow-Credentials"] = "true"
    if rule.expose:
        out["Access-Control-Expose-Headers"] = ", ".join(rule.expose)
    if rule.max_age is not None:
        out["Access-Control-Max-Age"] = str(rule.max_age)
    return out


class Rules:
    """Each bucket's rules, remembered for ``TTL`` seconds (None: no
    configuration, or no such bucket)."""

    def __init__(self, backend: Backend, ttl: float = TTL) -> None:
        self.backend, self.ttl = backend, ttl
        self._seen: dict[str, tuple[float, list[Rule] | None]] = {}

    async def of(self, bucket: str) -> list[Rule] | None:
        now = time.monotonic()
        seen = self._seen.get(bucket)
        if seen is not None and seen[0] > now:
            return seen[1]
        try:
            rules: list[Rule] | None = parse_configuration(await self.backend.get_bucket_cors(bucket))
        except (errors.NoSuchCORSConfiguration, errors.NoSuchBucket, errors.MalformedXML):
            rules = None
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[bucket] = (now + self.ttl, rules)
        return rules

    def forget(self, bucket: str) -> None:
        self._seen.pop(bucket, None)

"""CORS rules: parsing as S3 validates them, matching with wildcards, and
what a preflight and an actual response carry."""

from __future__ import annotations

import pytest

from nearstore.gateway import cors, errors

CONFIG = b"""<CORSConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <CORSRule><ID>app</ID><AllowedOrigin>https://*.example.com</AllowedOrigin>
    <AllowedMethod>GET</AllowedMethod><AllowedMethod>PUT</AllowedMethod>
    <AllowedHeader>x-amz-*</AllowedHeader><ExposeHeader>ETag</ExposeHeader><MaxAgeSeconds>60</MaxAgeSeconds>
  </CORSRule>
  <CORSRule><AllowedOrigin>*</AllowedOrigin><AllowedMethod>GET</AllowedMethod></CORSRule>
</CORSConfiguration>"""


def test_parse_render_round_trip() -> None:
    rules = cors.parse_configuration(CONFIG)
    assert rules[0] == cors.Rule(("https://*.example.com",), ("GET", "PUT"), ("x-amz-*",), ("ETag",), 60, "app")
    assert cors.parse_configuration(cors.render(rules)) == rules


@pytest.mark.parametrize(("body", "error"), [
    (b"<CORSConfiguration/>", errors.MalformedXML),
    (b"<CORSConfiguration><CORSRule><AllowedMethod>GET</AllowedMethod></CORSRule></CORSConfiguration>",
     errors.MalformedXML),
    (b"<CORSConfiguration><CORSRule><AllowedOrigin>*</AllowedOrigin><AllowedMethod>PATCH</AllowedMethod>"
     b"</CORSRule></CORSConfiguration>", errors.InvalidRequest),
    (b"<CORSConfiguration><CORSRule><AllowedOrigin>*.*</AllowedOrigin><AllowedMethod>GET</AllowedMethod>"
     b"</CORSRule></CORSConfiguration>", errors.InvalidRequest),
    (b"<Other/>", errors.MalformedXML),
])
def test_bad_configurations(body: bytes, error: type[errors.S3Error]) -> None:
    with pytest.raises(error):
        cors.parse_configuration(body)


def test_matching() -> None:
    rule = cors.parse_configuration(CONFIG)[0]
    assert rule.allows("https://a.example.com", "PUT", ["X-Amz-Meta-A"])  # headers fold case
    assert not rule.allows("https://example.com", "GET")  # the wildcard needs its dot
    assert not rule.allows("https://a.example.com.evil.test", "GET")  # whole-string match
    assert not rule.allows("https://a.example.com", "DELETE")
    assert not rule.allows("https://a.example.com", "PUT", ["Content-Type"])
    assert cors._matches("a*c", "a.b.c", False) and not cors._matches("a+c", "aac", False)  # no regex leaks


def test_preflight_and_actual() -> None:
    rules = cors.parse_configuration(CONFIG)
    h = cors.preflight(rules, "https://a.example.com", "PUT", ["x-amz-date"])
    assert h["Access-Control-Allow-Origin"] == "https://a.example.com" and h["Access-Control-Max-Age"] == "60"
    assert h["Access-Control-Allow-Headers"] == "x-amz-date" and h["Access-Control-Allow-Credentials"] == "true"
    assert cors.preflight(rules, "https://other.test", "GET", [])["Access-Control-Allow-Origin"] == "*"
    with pytest.raises(errors.AccessForbidden):
        cors.preflight(rules, "https://other.test", "PUT", [])
    with pytest.raises(errors.AccessForbidden):
        cors.preflight(None, "https://other.test", "GET", [])
    with pytest.raises(errors.BadRequest):
        cors.preflight(rules, None, "GET", [])
    assert cors.actual(rules, "https://other.test", "PUT") == {}
    assert cors.actual(rules, "https://b.example.com", "GET")["Access-Control-Expose-Headers"] == "ETag"

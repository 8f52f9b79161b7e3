"""XML in and out.

Out: responses are built as strings from nested tuples, which is several
times faster than ElementTree for the sizes S3 returns (a 1000-key listing)
and keeps the exact element order S3 documents.

In: request bodies are untrusted. They are parsed with defusedxml, which
refuses DTDs, entity declarations and external references (no "billion
laughs", no XXE), after a size check, and namespaces are stripped so that
clients that omit or vary the S3 namespace are all understood.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from nearstore.gateway import errors

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'

# A node is (tag, text-or-children). None children are skipped, which lets
# builders write optional elements inline.
Node = tuple[str, str | int | bool | Iterable["Node | None"] | None]

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\r": "&#13;"})


def escape(text: str) -> str:
    return text.translate(_ESCAPES)


# What XML 1.0 cannot carry at all, escaped or not: C0 controls but tab,
# newline and return, and the lone surrogates a non-UTF-8 request byte
# decodes to (surrogateescape).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def escape_echo(text: str) -> str:
    """Text echoed from a request into an error body: escaped, and what
    XML 1.0 cannot carry replaced with U+FFFD, so that the error parses
    (a key ``%01`` made a NoSuchKey no client could read)."""
    return _NOT_XML.sub("\ufffd", text).translate(_ESCAPES)


def _render(node: Node, out: list[str]) -> None:
    tag, value = node
    # A tag may carry attributes ('Grantee xsi:type="CanonicalUser"'); the
    # closing tag is the name alone.
    end = tag.split(" ", 1)[0]
    if value is None:
        out.append(f"<{tag}></{end}>")
    elif isinstance(value, bool):
        out.append(f"<{tag}>{'true' if value else 'false'}</{end}>")
    elif isinstance(value, (str, int)):
        out.append(f"<{tag}>{escape(str(value))}</{end}>")
    else:
        out.append(f"<{tag}>")
        for child in value:
            if child is not None:
                _render(child, out)
        out.append(f"</{end}>")


def document(root: str, children: Iterable[Node | None], *, ns: bool = True) -> bytes:
    out = [XML_DECL, f'<{root} xmlns="{S3_NS}">' if ns else f"<{root}>"]
    for child in children:
        if child is not None:
            _render(child, out)
    out.append(f"</{root}>")
    return "".join(out).encode()


def tagging(tags: Mapping[str, str]) -> bytes:
    """A Tagging document: what GetObjectTagging answers and PutObjectTagging
    sends (buckets alike)."""
    return document("Tagging", [("TagSet", [("Tag", [("Key", k), ("Value", v)]) for k, v in tags.items()])])


def tags_of(root: ET.Element) -> dict[str, str]:
    """The tag set of a parsed Tagging document."""
    return {child_text(t, "Key") or "": child_text(t, "Value") or "" for t in root.iter("Tag")}


MAX_XML_BODY = 1024 * 1024  # DeleteObjects with 1000 long keys fits well below


def parse(body: bytes, limit: int = MAX_XML_BODY) -> ET.Element:
    """Parse an untrusted body (a request's, or a backing store's answer
    with a larger ``limit``); any problem is MalformedXML."""
    if not body.strip():
        raise errors.MalformedXML()
    if len(body) > limit:
        raise errors.MalformedXML()
    try:
        root = SafeET.fromstring(body, forbid_dtd=True)
    except (ET.ParseError, DefusedXmlException, ValueError, LookupError):
        # LookupError: the declaration names an encoding expat does not
        # know, which it asks Python's codec registry for: an unknown name,
        # or a binary codec ("base64", "rot13").
        raise errors.MalformedXML() from None
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]
    return root


def child_text(el: ET.Element, tag: str) -> str | None:
    c = el.find(tag)
    if c is None:
        return None
    return c.text or ""

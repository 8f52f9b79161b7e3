"""Property tests (hypothesis) of every XML document the node parses (issue
16, fuzzing): the bodies clients send (Tagging of objects and buckets,
AccessControlPolicy of objects and buckets, CORSConfiguration,
VersioningConfiguration, PublicAccessBlockConfiguration,
CreateBucketConfiguration, Delete, CompleteMultipartUpload), ``xml.parse``
under them all, and what a backing S3 store answers (listings, results,
tag sets, errors).

For each one:

(a) any well-formed document of its schema, written in any of the ways a
    client may write XML (S3's namespace, none, or a prefix; a declaration
    or not; indentation; comments; character references; CDATA), is read
    as the model it was rendered from: seen back through the matching GET,
    or through what reaches the store;
(b) any bytes, and any mutation of a good document, get an S3 error that
    the client sees as a 4xx XML answer (a few operations answer 501 for
    what they do not implement), never an InternalError;
(c) entity expansion ("billion laughs"), external entities (XXE to a file),
    external DTDs and oversized documents are refused, one test per entry
    point; processing instructions are dropped by the parser, never acted on.

Client bodies are sent, signed, to a whole node in this process
(``tests.fuzz.front_door.FuzzNode``: the hot path, aiohttp, the local store),
so that (b) is judged where a client judges it: every answer is checked by
the fuzz target's oracle (status below 500, an ``<Error>`` document, nothing
logged at ERROR). A backing store's answers go through ``S3Upstream`` with
its HTTP exchange replaced by the document under test.

Bounded: the same examples on every run (derandomized), no deadline (the box
is shared). More, and fresh ones:

    NEARSTORE_FUZZ_EXAMPLES=5000 pytest tests/unit/gateway/test_xml_properties.py
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from encodings.aliases import aliases
from typing import Any
from urllib.parse import quote_plus
from xml.etree import ElementTree

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from nearstore.gateway import acl, errors, xml
from nearstore.gateway.backends.s3 import S3Upstream
from nearstore.gateway.config import Config, UpstreamConfig
from nearstore.metadata.backing import CompletedPart, ObjectMeta
from tests.fuzz.front_door import ACCESS_KEY, SECRET_KEY, WARNINGS, Crash, FuzzNode, signed

pytestmark = [pytest.mark.filterwarnings(f"ignore::{w.__module__}.{w.__qualname__}") for w in WARNINGS]

_EXAMPLES = int(os.environ.get("NEARSTORE_FUZZ_EXAMPLES", "0"))
_SETTINGS: dict[str, Any] = {"derandomize": not _EXAMPLES, "deadline": None,
                             "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
# Pure functions: cheap, many examples. Through the node: a loopback
# exchange each (~2 ms), fewer.
MANY = settings(max_examples=_EXAMPLES or 300, **_SETTINGS)
BOUNDED = settings(max_examples=_EXAMPLES or 60, **_SETTINGS)
STORE = settings(max_examples=_EXAMPLES or 100, **_SETTINGS)

OWNER = Config(credentials={ACCESS_KEY: SECRET_KEY}).first_user.id
XSI = 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'

# --- documents ------------------------------------------------------------------------
#
# A document is a tree of (tag, text or children); a tag may carry
# attributes after a space ('Grantee xsi:type="Group"'). ``rendered`` writes
# one in any of the ways XML allows; the parsers must not see a difference.

Tree = tuple[str, "str | list[Tree]"]

# What XML 1.0 can carry at all (no other C0 control, no surrogate, not
# U+FFFE/U+FFFF): anything else cannot be in a client's document.
_NOT_XML = [chr(c) for c in range(32) if chr(c) not in "\t\n\r"] + ["\ufffe", "\uffff"]
XML_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters=_NOT_XML)
texts = st.text(XML_CHARS, max_size=30)


@st.composite
def rendered(draw: st.DrawFn, tree: Tree) -> bytes:
    ns = draw(st.sampled_from(["s3", "none", "prefix", "other"]))
    indent = draw(st.booleans())
    comments = draw(st.booleans())
    decl = draw(st.sampled_from(["", '<?xml version="1.0" encoding="UTF-8"?>\n', "<?xml version='1.0'?>"]))

    def text(s: str) -> str:
        mode = draw(st.sampled_from(["plain", "refs", "cdata"]))
        if mode == "cdata" and "]]>" not in s and "\r" not in s and s:
            return f"<![CDATA[{s}]]>"
        if mode == "refs":
            return "".join(f"&#x{ord(c):x};" for c in s)
        # A CR is a line end XML normalises unless written as a reference.
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")

    def element(node: Tree, depth: int, root: bool) -> str:
        tag, value = node
        name, _, attrs = tag.partition(" ")
        qname = f"s3:{name}" if ns == "prefix" else name
        opening = qname + (" " + attrs if attrs else "")
        if root:
            opening += {"s3": f' xmlns="{xml.S3_NS}"', "none": "",
                        "prefix": f' xmlns:s3="{xml.S3_NS}"', "other": ' xmlns="urn:another"'}[ns]
        if isinstance(value, str):
            if not value and draw(st.booleans()):
                return f"<{opening}/>"
            return f"<{opening}>{text(value)}</{qname}>"
        pad = "\n" + "  " * (depth + 1) if indent else ""
        inner = "<!-- a comment -->" if comments else ""
        inner += "".join(pad + element(c, depth + 1, False) for c in value)
        return f"<{opening}>{inner}{chr(10) + '  ' * depth if indent else ''}</{qname}>"

    return (decl + element(tree, 0, True)).encode()


def mutations(good: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A good document changed the ways a fuzzer changes one: bytes flipped,
    cut short, spliced with others, or any bytes at all."""

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        doc = bytearray(draw(good))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
            pos = draw(st.integers(0, max(0, len(doc) - 1)))
            if op == "flip" and doc:
                doc[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "cut":
                del doc[pos:]
            elif op == "insert":
                doc[pos:pos] = draw(st.sampled_from([b"<", b">", b"&", b"&amp;", b"<X>", b"</Tag>", b"\x00", b"\xff",
                                                     b"]]>", b"<!--", b"&#0;", b"<?p?>", b"1_0", b"-1"]))
            elif doc:
                del doc[pos:pos + draw(st.integers(1, 8))]
        return bytes(doc)

    return st.one_of(mutated(), st.binary(max_size=200))


# --- the node ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[FuzzNode]:
    n = FuzzNode()
    for bucket in ("props", "acl-b", "ver-b", "pab-b", "del-b"):
        _ok(n, "PUT", f"/{bucket}")
    for bucket in ("props", "acl-b"):
        _ok(n, "PUT", f"/{bucket}/o", b"object")
    yield n
    n.close()


@dataclass
class Answer:
    status: int
    code: str | None
    root: ElementTree.Element | None


def send(node: FuzzNode, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
         ) -> Answer:
    """One signed request; the fuzz target's oracle checks the answer (a
    5xx but 501/503, an error without an S3 <Error> body, anything logged
    at ERROR: Crash)."""
    (resp,) = node.serve(signed(method, target, body, headers), one=True, head=False)
    try:
        root = ElementTree.fromstring(resp.body) if resp.body.strip() else None
    except ElementTree.ParseError as e:
        raise Crash(f"{method} {target} answered {resp.status} with a body that is not XML ({e}): "
                    f"{resp.body[:300]!r}") from None
    if root is not None:
        for el in root.iter():
            el.tag = el.tag.rpartition("}")[2]
    code = root.findtext("Code") if root is not None and root.tag == "Error" else None
    return Answer(resp.status, code, root)


def _ok(node: FuzzNode, method: str, target: str, body: bytes = b"") -> Answer:
    a = send(node, method, target, body)
    assert a.status in (200, 204), (method, target, a)
    return a


def _texts(el: ElementTree.Element | None, tag: str) -> list[str]:
    return [c.text or "" for c in el.findall(tag)] if el is not None else []


# --- xml.parse ------------------------------------------------------------------------------

NAMES = st.sampled_from(["A", "Bb", "c-d", "e.f", "g_h", "Key", "Value"])
trees: st.SearchStrategy[Tree] = st.recursive(
    st.tuples(NAMES, texts), lambda kids: st.tuples(NAMES, st.lists(kids, min_size=1, max_size=4)), max_leaves=12)


def as_tree(el: ElementTree.Element) -> Tree:
    kids = list(el)
    return (el.tag, [as_tree(k) for k in kids]) if kids else (el.tag, el.text or "")


@settings(max_examples=_EXAMPLES or 150, **_SETTINGS)
@given(data=st.data(), tree=trees)
def test_any_rendering_of_a_tree_parses_to_that_tree(data: st.DataObject, tree: Tree) -> None:
    """Namespaces (S3's, none, a prefix, another) are all stripped; CDATA,
    character references and comments are invisible."""
    assert as_tree(xml.parse(data.draw(rendered(tree)))) == tree


@MANY
@given(body=mutations(st.builds(lambda t: t, trees).flatmap(rendered)))
def test_any_bytes_parse_or_are_malformed_xml(body: bytes) -> None:
    try:
        xml.parse(body)
    except errors.MalformedXML as e:
        assert e.status == 400


# Encodings a declaration may name: Python's codec names (text and binary
# codecs alike: expat hands an unknown name to Python's codec registry),
# and names nothing knows.
ENCODINGS = st.sampled_from(sorted({*aliases.values(), "rot13", "base64",
                                    "hex", "zlib", "bz2", "uu", "quopri", "idna", "punycode", "mbcs",
                                    "oem", "tactis", "bogus", "utf-8", "utf-16", "latin-1"}))


@MANY
@given(encoding=ENCODINGS)
def test_any_declared_encoding_parses_or_is_malformed_xml(encoding: str) -> None:
    """A declaration may name any encoding; one the parser cannot use is
    MalformedXML, as S3 answers it (a LookupError before: InternalError)."""
    body = f'<?xml version="1.0" encoding="{encoding}"?><a>x</a>'.encode()
    try:
        xml.parse(body)
    except errors.MalformedXML:
        pass


def test_a_binary_codec_named_as_the_encoding_is_malformed_xml() -> None:
    """The fuzzer's find, minimized: expat asks Python's codec registry for
    an encoding it does not know, which raises LookupError for a binary
    codec ("base64", "rot13", ...) or an unknown name on some Pythons."""
    for name in ("base64", "rot13", "zlib", "mbcs"):
        with pytest.raises(errors.MalformedXML):
            xml.parse(f'<?xml version="1.0" encoding="{name}"?><a/>'.encode())


# --- attacks, for every entry point ----------------------------------------------------------

SECRET_FILE_TEXT = "nearstore-xxe-canary-4f1d"


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("xxe") / "secret.txt"
    path.write_text(SECRET_FILE_TEXT)
    return str(path)


def attacks(root: str, inner: str, secret: str) -> dict[str, bytes]:
    """Each attack on a document whose root is ``root``, with ``&e;`` where
    an entity is used inside ``inner`` (a valid body otherwise)."""
    lol = '<!ENTITY l0 "lol">' + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    used = inner.replace("&e;", "&l9;")
    return {
        "billion laughs": f"<?xml version=\"1.0\"?><!DOCTYPE {root} [{lol}]>{used}".encode(),
        "quadratic blowup": (f'<!DOCTYPE {root} [<!ENTITY e "{"x" * 50_000}">]>'
                             + inner.replace("&e;", "&e;" * 20)).encode(),
        "external entity (XXE)": f'<!DOCTYPE {root} [<!ENTITY e SYSTEM "file://{secret}">]>{inner}'.encode(),
        "external parameter entity": (f'<!DOCTYPE {root} [<!ENTITY % p SYSTEM "file://{secret}"> %p;]>'
                                      + inner.replace("&e;", "x")).encode(),
        "external DTD": f'<!DOCTYPE {root} SYSTEM "file://{secret}">{inner.replace("&e;", "x")}'.encode(),
        "internal DTD": f"<!DOCTYPE {root}>{inner.replace('&e;', 'x')}".encode(),
        "oversized": inner.replace("&e;", "x").replace(">", ">" + " " * (2 * 1024 * 1024), 1).encode(),
    }


@dataclass(frozen=True)
class Entry:
    """A client body the node parses: how to send it, a valid document of
    its root with ``&e;`` where an entity may go, and how to read back
    what it set (to see that nothing of an attack was stored)."""

    name: str
    method: str
    target: str
    root: str
    inner: str
    read_back: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


ENTRIES = [
    Entry("PutObjectTagging", "PUT", "/props/o?tagging", "Tagging",
          "<Tagging><TagSet><Tag><Key>k</Key><Value>&e;</Value></Tag></TagSet></Tagging>", "/props/o?tagging"),
    Entry("PutBucketTagging", "PUT", "/props?tagging", "Tagging",
          "<Tagging><TagSet><Tag><Key>k</Key><Value>&e;</Value></Tag></TagSet></Tagging>", "/props?tagging"),
    Entry("PutObjectAcl", "PUT", "/acl-b/o?acl", "AccessControlPolicy",
          f"<AccessControlPolicy><AccessControlList><Grant><Grantee {XSI} xsi:type=\"CanonicalUser\"><ID>{OWNER}</ID>"
          "</Grantee><Permission>FULL_CONTROL&e;</Permission></Grant></AccessControlList></AccessControlPolicy>",
          "/acl-b/o?acl"),
    Entry("PutBucketAcl", "PUT", "/acl-b?acl", "AccessControlPolicy",
          f"<AccessControlPolicy><AccessControlList><Grant><Grantee {XSI} xsi:type=\"CanonicalUser\"><ID>{OWNER}</ID>"
          "</Grantee><Permission>FULL_CONTROL&e;</Permission></Grant></AccessControlList></AccessControlPolicy>",
          "/acl-b?acl"),
    Entry("PutBucketCors", "PUT", "/props?cors", "CORSConfiguration",
          "<CORSConfiguration><CORSRule><AllowedOrigin>&e;</AllowedOrigin><AllowedMethod>GET</AllowedMethod>"
          "</CORSRule></CORSConfiguration>", "/props?cors"),
    Entry("PutBucketVersioning", "PUT", "/ver-b?versioning", "VersioningConfiguration",
          "<VersioningConfiguration><Status>Enabled&e;</Status></VersioningConfiguration>", "/ver-b?versioning"),
    Entry("PutPublicAccessBlock", "PUT", "/pab-b?publicAccessBlock", "PublicAccessBlockConfiguration",
          "<PublicAccessBlockConfiguration><BlockPublicAcls>false&e;</BlockPublicAcls>"
          "</PublicAccessBlockConfiguration>", "/pab-b?publicAccessBlock"),
    Entry("CreateBucket", "PUT", "/attack-b", "CreateBucketConfiguration",
          "<CreateBucketConfiguration><LocationConstraint>eu&e;</LocationConstraint></CreateBucketConfiguration>",
          "/attack-b?location"),
    Entry("DeleteObjects", "POST", "/del-b?delete", "Delete",
          "<Delete><Object><Key>&e;</Key></Object></Delete>", None, (("Content-MD5", "x"),)),
    Entry("CompleteMultipartUpload", "POST", "/props/mp?uploadId=nope", "CompleteMultipartUpload",
          "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&e;</ETag></Part>"
          "</CompleteMultipartUpload>"),
]
ATTACKS = list(attacks("R", "<R>&e;</R>", "/x"))


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_attacks_are_refused_at_every_entry_point(node: FuzzNode, secret_file: str, entry: Entry,
                                                  attack: str) -> None:
    """MalformedXML, the file's bytes nowhere, nothing expanded, nothing
    stored; and quickly (an expansion would take seconds and gigabytes)."""
    body = attacks(entry.root, entry.inner, secret_file)[attack]
    before = send(node, "GET", entry.read_back) if entry.read_back else None
    got = send(node, entry.method, entry.target, body, dict(entry.headers))
    assert (got.status, got.code) == (400, "MalformedXML"), (entry.name, attack, got)
    if entry.read_back:
        after = send(node, "GET", entry.read_back)
        for a in (after, before):
            assert a is not None and SECRET_FILE_TEXT not in ElementTree.tostring(a.root or ElementTree.Element("x"),
                                                                                  encoding="unicode")
        assert (after.status, after.code) == (before.status, before.code)  # type: ignore[union-attr]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_processing_instructions_are_dropped_never_acted_on(node: FuzzNode, entry: Entry) -> None:
    """ElementTree drops processing instructions (a stylesheet, anything):
    the document means what it means without them. (They are not refused:
    nothing reads them, and S3's own parser ignores them too.)"""
    plain = entry.inner.replace("&e;", "")
    with_pis = '<?xml version="1.0"?><?xml-stylesheet href="file:///etc/passwd"?>' + plain.replace(
        "><", "><?nearstore run?><", 1)
    if entry.name == "CreateBucket":
        plain_target, pi_target = "/pi-plain-b", "/pi-pis-b"
    else:
        plain_target = pi_target = entry.target
    first = send(node, entry.method, plain_target, plain.encode(), dict(entry.headers))
    second = send(node, entry.method, pi_target, with_pis.encode(), dict(entry.headers))
    assert (first.status, first.code) == (second.status, second.code), entry.name
    if entry.name == "CreateBucket":
        assert send(node, "GET", "/pi-pis-b?location").root.text == "eu"  # type: ignore[union-attr]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_are_refused_by_the_parser_itself(attack: str, secret_file: str) -> None:
    body = attacks("R", "<R>&e;</R>", secret_file)[attack]
    with pytest.raises(errors.MalformedXML):
        xml.parse(body)


# --- Tagging (objects, buckets) -------------------------------------------------------------

tag_keys = st.one_of(st.text(XML_CHARS, min_size=1, max_size=12), st.text(XML_CHARS, max_size=140),
                     st.builds(lambda s: "aws:" + s, texts))
tag_values = st.one_of(texts, st.text(XML_CHARS, min_size=250, max_size=270))
# (key, value), None where the element is left out.
tag_lists = st.lists(st.tuples(st.one_of(tag_keys, tag_keys, st.none()), st.one_of(tag_values, tag_values, st.none())),
                     max_size=12)


def tagging_model(tags: list[tuple[str | None, str | None]], bucket: bool) -> str | dict[str, str]:
    """The error code S3 answers, or the tag set it keeps."""
    kept: dict[str, str] = {}
    for k, v in tags:
        if k is None or v is None:
            return "MalformedXML"
        if k in kept:
            return "InvalidTag"
        kept[k] = v
    if len(kept) > (50 if bucket else 10):
        return "InvalidTag"
    if any(not k or len(k) > 128 or len(v) > 256 or k.startswith("aws:") for k, v in kept.items()):
        return "InvalidTag"
    return kept


def tagging_tree(tags: list[tuple[str | None, str | None]]) -> Tree:
    return ("Tagging", [("TagSet", [("Tag", [*([("Key", k)] if k is not None else []),
                                             *([("Value", v)] if v is not None else [])]) for k, v in tags])])


@BOUNDED
@given(data=st.data(), tags=tag_lists, bucket=st.booleans())
def test_tagging_documents_set_exactly_their_tags(node: FuzzNode, data: st.DataObject,
                                                  tags: list[tuple[str | None, str | None]], bucket: bool) -> None:
    target = "/props?tagging" if bucket else "/props/o?tagging"
    tree = tagging_tree(tags)
    want = tagging_model(tags, bucket)
    got = send(node, "PUT", target, data.draw(rendered(tree)))
    if isinstance(want, str):
        assert got.code == want, (tags, got)
        return
    assert got.status in (200, 204), (tags, got)
    back = send(node, "GET", target).root
    assert back is not None
    assert {t.findtext("Key"): t.findtext("Value") or "" for t in back.iter("Tag")} == want


# --- AccessControlPolicy (objects, buckets) ---------------------------------------------------

GROUP_URIS = sorted(acl.GROUPS)
grantees = st.one_of(
    st.tuples(st.just("ID"), st.sampled_from([OWNER, acl.ANONYMOUS_ID, "0" * 64])),
    st.tuples(st.just("URI"), st.sampled_from([*GROUP_URIS, "http://acs.amazonaws.com/groups/global/Nobody"])),
    st.tuples(st.just("EmailAddress"), st.just("someone@example.com")),
    st.tuples(st.just("DisplayName"), st.just("no id")),  # a grantee naming nobody
    st.none(),  # no Grantee element at all
)
permissions = st.one_of(st.sampled_from(acl.PERMISSIONS), st.sampled_from(["read", "ALL", ""]),
                        st.sampled_from(acl.PERMISSIONS).map(lambda p: f" {p}\n"))
grant_lists = st.lists(st.tuples(grantees, permissions), max_size=4)


def acl_model(owner: str | None, grants: list[tuple[tuple[str, str] | None, str]]
              ) -> str | list[tuple[str, str, str]]:
    if owner is not None and owner != OWNER:
        return "AccessDenied"
    kept = []
    for who, permission in grants:
        if who is None or permission.strip() not in acl.PERMISSIONS:
            return "MalformedACLError"
        kind, value = who
        if kind == "DisplayName":
            return "MalformedACLError"
        if kind == "EmailAddress":
            return "UnresolvableGrantByEmailAddress"
        if kind == "URI" and value not in acl.GROUPS:
            return "InvalidArgument"
        if kind == "ID" and value not in (OWNER, acl.ANONYMOUS_ID):
            return "InvalidArgument"
        kept.append(("Group" if kind == "URI" else "CanonicalUser", value, permission.strip()))
    return kept


@BOUNDED
@given(data=st.data(), owner=st.sampled_from([None, OWNER, "f" * 64]), grants=grant_lists,
       bucket=st.booleans())
def test_acl_documents_set_exactly_their_grants(node: FuzzNode, data: st.DataObject, owner: str | None,
                                                grants: list[tuple[tuple[str, str] | None, str]],
                                                bucket: bool) -> None:
    target = "/acl-b?acl" if bucket else "/acl-b/o?acl"
    listed: list[Tree] = []
    for who, permission in grants:
        kind = {"ID": "CanonicalUser", "URI": "Group", "EmailAddress": "AmazonCustomerByEmail"}.get(
            who[0] if who else "", "CanonicalUser")
        grantee: list[Tree] = [(f'Grantee {XSI} xsi:type="{kind}"', [who])] if who else []
        listed.append(("Grant", [*grantee, ("Permission", permission)]))
    tree: Tree = ("AccessControlPolicy", [*([("Owner", [("ID", owner)])] if owner else []),
                                          ("AccessControlList", listed or "")])
    want = acl_model(owner, grants)
    got = send(node, "PUT", target, data.draw(rendered(tree)))
    if isinstance(want, str):
        assert got.code == want, (grants, got)
        return
    assert got.status == 200, (grants, got)
    back = send(node, "GET", target).root
    assert back is not None
    seen = []
    for g in back.iter("Grant"):
        who_el = g.find("Grantee")
        assert who_el is not None
        uri = who_el.findtext("URI")
        seen.append(("Group", uri, g.findtext("Permission")) if uri else
                    ("CanonicalUser", who_el.findtext("ID"), g.findtext("Permission")))
    assert seen == want


def test_an_acl_document_under_another_root_is_malformed_acl(node: FuzzNode) -> None:
    assert send(node, "PUT", "/acl-b/o?acl", b"<Tagging/>").code == "MalformedACLError"


# --- CORSConfiguration --------------------------------------------------------------------------

origins = st.one_of(st.sampled_from(["https://a.example.com", "*", "http://*.example.com", "*.a.*"]), texts)
methods = st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "get", "PATCH"])
max_ages = st.one_of(st.none(), st.integers(0, 10**6).map(str), st.integers(0, 99).map(lambda n: f" {n}\n"),
                     st.sampled_from(["", "abc", "1.5", "0x10"]))


@dataclass(frozen=True)
class CorsRule:
    origins: list[str]
    methods: list[str]
    headers: list[str]
    expose: list[str]
    max_age: str | None
    id: str | None

    def tree(self) -> Tree:
        kids: list[Tree] = [*([("ID", self.id)] if self.id is not None else []),
                            *[("AllowedOrigin", o) for o in self.origins],
                            *[("AllowedMethod", m) for m in self.methods],
                            *[("AllowedHeader", h) for h in self.headers],
                            *[("ExposeHeader", h) for h in self.expose],
                            *([("MaxAgeSeconds", self.max_age)] if self.max_age is not None else [])]
        return ("CORSRule", kids or "")


cors_rules = st.builds(CorsRule, st.lists(origins, max_size=3), st.lists(methods, max_size=3),
                       st.lists(texts, max_size=2), st.lists(texts, max_size=2), max_ages,
                       st.one_of(st.none(), texts))


def cors_model(rules: list[CorsRule]) -> str | list[tuple[Any, ...]]:
    """The error code, or the rules as GetBucketCors answers them (values
    stripped, as S3 reads them)."""
    out = []
    for r in rules:
        os_, ms = [o.strip() for o in r.origins], [m.strip() for m in r.methods]
        if not os_ or not ms:
            return "MalformedXML"
        if any(m not in ("GET", "PUT", "POST", "DELETE", "HEAD") for m in ms):
            return "InvalidRequest"
        if any(o.count("*") > 1 for o in os_):
            return "InvalidRequest"
        try:
            age = int(r.max_age) if r.max_age is not None else None
        except ValueError:
            return "MalformedXML"
        out.append((r.id, [h.strip() for h in r.headers], ms, os_, [h.strip() for h in r.expose], age))
    if not out or len(out) > 100:
        return "MalformedXML"
    return out


@BOUNDED
@given(data=st.data(), rules=st.lists(cors_rules, max_size=3))
def test_cors_documents_set_exactly_their_rules(node: FuzzNode, data: st.DataObject, rules: list[CorsRule]) -> None:
    want = cors_model(rules)
    got = send(node, "PUT", "/props?cors", data.draw(rendered(("CORSConfiguration", [r.tree() for r in rules] or ""))))
    if isinstance(want, str):
        assert got.code == want, (rules, got)
        return
    assert got.status == 200, (rules, got)
    back = send(node, "GET", "/props?cors").root
    assert back is not None
    seen = [(r.findtext("ID"), _texts(r, "AllowedHeader"), _texts(r, "AllowedMethod"), _texts(r, "AllowedOrigin"),
             _texts(r, "ExposeHeader"), int(r.findtext("MaxAgeSeconds") or "0") if r.find("MaxAgeSeconds") is not None
             else None) for r in back.iter("CORSRule")]
    assert seen == want


# --- VersioningConfiguration, PublicAccessBlockConfiguration --------------------------------------

statuses = st.one_of(st.sampled_from(["Enabled", "Suspended", " Enabled\n", "enabled", "Off", ""]), texts)
mfa = st.sampled_from([None, "Disabled", "Enabled", " Enabled "])


@BOUNDED
@given(data=st.data(), status=st.one_of(statuses, st.none()), mfa_delete=mfa,
       root=st.sampled_from(["VersioningConfiguration"] * 5 + ["Versioning"]))
def test_versioning_documents_set_exactly_their_status(node: FuzzNode, data: st.DataObject, status: str | None,
                                                       mfa_delete: str | None, root: str) -> None:
    tree: Tree = (root, [*([("Status", status)] if status is not None else []),
                         *([("MfaDelete", mfa_delete)] if mfa_delete is not None else [])] or "")
    got = send(node, "PUT", "/ver-b?versioning", data.draw(rendered(tree)))
    if root != "VersioningConfiguration" or (status or "").strip() not in ("Enabled", "Suspended"):
        assert got.code == "MalformedXML", got
    elif (mfa_delete or "").strip() == "Enabled":
        assert (got.status, got.code) == (501, "NotImplemented"), got
    else:
        assert got.status == 200, got
        back = send(node, "GET", "/ver-b?versioning").root
        assert back is not None and back.findtext("Status") == (status or "").strip()


flags = st.one_of(st.none(), st.sampled_from(["true", "false", "TRUE", " False\n", "1", "yes", ""]))
PAB_FIELDS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")


@BOUNDED
@given(data=st.data(), values=st.tuples(flags, flags, flags, flags),
       root=st.sampled_from(["PublicAccessBlockConfiguration"] * 5 + ["PublicAccessBlock"]))
def test_public_access_block_documents_set_exactly_their_flags(node: FuzzNode, data: st.DataObject,
                                                               values: tuple[str | None, ...], root: str) -> None:
    tree: Tree = (root, [(n, v) for n, v in zip(PAB_FIELDS, values, strict=True) if v is not None] or "")
    got = send(node, "PUT", "/pab-b?publicAccessBlock", data.draw(rendered(tree)))
    words = [(v or "false").strip().lower() for v in values]
    if root != "PublicAccessBlockConfiguration" or any(w not in ("true", "false") for w in words):
        assert got.code == "MalformedXML", got
        return
    assert got.status == 200, got
    back = send(node, "GET", "/pab-b?publicAccessBlock").root
    assert back is not None and [back.findtext(n) for n in PAB_FIELDS] == words


# --- CreateBucketConfiguration ---------------------------------------------------------------------

_bucket_names = itertools.count()
regions = st.one_of(st.sampled_from(["eu-west-1", "us-west-2", "ap-southeast-2", "us-east-1", "", "EU"]),
                    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-"), max_size=20))


@BOUNDED
@given(data=st.data(), region=st.one_of(regions, st.none()),
       root=st.sampled_from(["CreateBucketConfiguration"] * 5 + ["BucketConfiguration"]))
def test_create_bucket_configuration_sets_exactly_its_region(node: FuzzNode, data: st.DataObject,
                                                             region: str | None, root: str) -> None:
    bucket = f"cb-{next(_bucket_names)}"
    tree: Tree = (root, [("LocationConstraint", region)] if region is not None else "")
    got = send(node, "PUT", f"/{bucket}", data.draw(rendered(tree)))
    if root != "CreateBucketConfiguration":
        assert got.code == "MalformedXML", got
        return
    if region == "us-east-1":
        assert got.code == "InvalidLocationConstraint", got
        return
    assert got.status == 200, got
    try:
        back = send(node, "GET", f"/{bucket}?location").root
        assert back is not None and (back.text or "") == (region or "")
    finally:
        _ok(node, "DELETE", f"/{bucket}")


def test_a_location_constraint_with_markup_comes_back_as_well_formed_xml(node: FuzzNode) -> None:
    """Found by test_create_bucket_configuration_sets_exactly_its_region
    with any text: "&lt;x" is stored as "<x" and GetBucketLocation answers
    ``<LocationConstraint ...><x</LocationConstraint>``."""
    body = b"<CreateBucketConfiguration><LocationConstraint>a&lt;b</LocationConstraint></CreateBucketConfiguration>"
    _ok(node, "PUT", "/markup-b", body)
    try:
        got = send(node, "GET", "/markup-b?location")  # the oracle: ill-formed XML is not an answer
        assert got.root is not None and got.root.text == "a<b"
    finally:
        _ok(node, "DELETE", "/markup-b")


# --- Delete (DeleteObjects) ------------------------------------------------------------------------

object_keys = st.one_of(st.text(XML_CHARS, min_size=1, max_size=20), st.just("k" * 1025))
delete_objects = st.lists(st.tuples(st.one_of(object_keys, object_keys, object_keys, st.none()),
                                    st.sampled_from([None, None, None, ""])), max_size=12)
quiets = st.sampled_from([None, "true", "false", " TRUE\n", "yes"])


def delete_model(objects: list[tuple[str | None, str | None]], quiet: str | None) -> str | list[tuple[str, str, str]]:
    if not objects or len(objects) > 1000 or any(k is None for k, _ in objects):
        return "MalformedXML"
    out = []
    for key, version in objects:
        assert key is not None
        if len(key.encode()) > 1024:
            out.append(("Error", key, "KeyTooLongError"))
        elif version == "":
            out.append(("Error", key, "InvalidArgument"))
        elif (quiet or "").strip().lower() != "true":
            out.append(("Deleted", key, ""))
    return out


@BOUNDED
@given(data=st.data(), objects=delete_objects, quiet=quiets,
       root=st.sampled_from(["Delete"] * 5 + ["DeleteObjects"]))
def test_delete_documents_delete_exactly_their_keys(node: FuzzNode, data: st.DataObject,
                                                    objects: list[tuple[str | None, str | None]], quiet: str | None,
                                                    root: str) -> None:
    listed: list[Tree] = [("Object", [*([("Key", k)] if k is not None else []),
                                      *([("VersionId", v)] if v is not None else [])] or "") for k, v in objects]
    tree: Tree = (root, [*([("Quiet", quiet)] if quiet is not None else []), *listed] or "")
    got = send(node, "POST", "/del-b?delete", data.draw(rendered(tree)), {"Content-MD5": "x"})
    want = "MalformedXML" if root != "Delete" else delete_model(objects, quiet)
    if isinstance(want, str):
        assert got.code == want, (objects, got)
        return
    assert got.status == 200 and got.root is not None, got
    seen = [(el.tag, el.findtext("Key"), el.findtext("Code") or "") for el in got.root]
    assert seen == want


# --- CompleteMultipartUpload -----------------------------------------------------------------------

part_numbers = st.one_of(st.integers(1, 10_000).map(str), st.integers(1, 99).map(lambda n: f"\n {n} "),
                         st.sampled_from(["", "x", "1.0", "one"]), st.none())
etags = st.one_of(st.text(st.sampled_from('0123456789abcdef"'), max_size=34), texts.map(lambda t: f" {t} "),
                  st.none())
part_checksums = st.one_of(st.none(), st.tuples(st.sampled_from(["CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"]),
                                                texts))
parts_lists = st.lists(st.tuples(part_numbers, etags, part_checksums), max_size=6)


@pytest.fixture
def completed(node: FuzzNode) -> Iterator[list[list[CompletedPart]]]:
    """The parts each CompleteMultipartUpload hands the store (which then
    answers NoSuchUpload: nothing is made)."""
    store = node.store
    assert store is not None
    seen: list[list[CompletedPart]] = []

    async def spy(bucket: str, key: str, upload_id: str, parts: list[CompletedPart], *_: Any, **__: Any) -> Any:
        seen.append(list(parts))
        raise errors.NoSuchUpload(UploadId=upload_id)

    store.complete_upload = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del store.complete_upload


@settings(max_examples=_EXAMPLES or 60, **{**_SETTINGS, "suppress_health_check": [
    *_SETTINGS["suppress_health_check"], HealthCheck.function_scoped_fixture]})
@given(data=st.data(), parts=parts_lists,
       root=st.sampled_from(["CompleteMultipartUpload"] * 5 + ["CompleteMultipart"]))
def test_complete_documents_hand_the_store_exactly_their_parts(
        node: FuzzNode, completed: list[list[CompletedPart]], data: st.DataObject,
        parts: list[tuple[str | None, str | None, tuple[str, str] | None]], root: str) -> None:
    listed: list[Tree] = [("Part", [*([("PartNumber", n)] if n is not None else []),
                                    *([("ETag", e)] if e is not None else []),
                                    *([(f"Checksum{c[0]}", c[1])] if c is not None else [])] or "")
                          for n, e, c in parts]
    completed.clear()
    got = send(node, "POST", "/props/mp?uploadId=u1", data.draw(rendered((root, listed or ""))))
    want: str | list[CompletedPart] = []
    for n, e, c in parts:
        if n is None or e is None or not _is_int(n):
            want = "MalformedXML"
            break
        assert isinstance(want, list)
        want.append(CompletedPart(int(n), e.strip(), c[1] if c else None, c[0] if c else None))
    if root != "CompleteMultipartUpload":
        want = "MalformedXML"
    if isinstance(want, str):
        assert got.code == want and not completed, (parts, got)
    else:
        assert got.code == "NoSuchUpload" and completed == [want], (parts, got)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# --- any bytes, any mutation, at every client entry point ---------------------------------------

GOOD = {e.name: e.inner.replace("&e;", "x") for e in ENTRIES}


@BOUNDED
@given(data=st.data(), entry=st.sampled_from(ENTRIES))
def test_any_body_gets_a_4xx_s3_error_or_is_accepted(node: FuzzNode, data: st.DataObject, entry: Entry) -> None:
    """The oracle of ``send`` is the property: whatever the body, a status
    below 500 (501 for what is not implemented) and, for an error, an S3
    <Error> document; nothing logged at ERROR."""
    body = data.draw(mutations(st.just(GOOD[entry.name].encode())))
    target = f"/mut-{next(_bucket_names)}" if entry.name == "CreateBucket" else entry.target
    got = send(node, entry.method, target, body, dict(entry.headers))
    if entry.name == "CreateBucket" and got.status == 200:
        _ok(node, "DELETE", target)
    assert got.status < 500 or got.code == "NotImplemented", got


# --- a backing store's answers ---------------------------------------------------------------------


class _Answer:
    """What ``S3Upstream._send_once`` returns, holding the document under test."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self._body = body
        self.headers = CIMultiDictProxy(CIMultiDict(headers or {}))

    async def body(self) -> bytes:
        return self._body

    def release(self) -> None:
        pass


@pytest.fixture(scope="module")
def run() -> Iterator[Callable[[Any], Any]]:
    """One event loop for every example (a new one each costs more than
    the parse under test)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


def upstream(status: int, body: bytes) -> S3Upstream:
    """An S3Upstream for bucket "b" whose every exchange answers ``body``."""
    up = S3Upstream(UpstreamConfig(name="b", endpoint="http://store.invalid", bucket="b", max_attempts=1))

    async def send_once(*_: Any) -> _Answer:
        return _Answer(status, body)

    up._send_once = send_once  # type: ignore[method-assign]
    return up


ISO = "2024-05-06T07:08:09.123Z"
ISO_TS = 1714979289.123
keys = st.text(XML_CHARS, min_size=1, max_size=20)


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    etag: str


listed = st.builds(Listed, keys, st.integers(0, 2**50), st.text(st.sampled_from('0123456789abcdef"-'), max_size=36))


def _enc(key: str, encoded: bool) -> str:
    return quote_plus(key, safe="/") if encoded else key


@STORE
@given(data=st.data(), objects=st.lists(listed, max_size=5), prefixes=st.lists(keys, max_size=3),
       truncated=st.booleans(), encoded=st.booleans())
def test_a_stores_listing_reads_as_its_model(run: Callable[[Any], Any], data: st.DataObject, objects: list[Listed], prefixes: list[str],
                                            truncated: bool, encoded: bool) -> None:
    tree: Tree = ("ListBucketResult", [
        ("Name", "b"), ("IsTruncated", "true" if truncated else "false"),
        *([("EncodingType", "url")] if encoded else []),
        *[("Contents", [("Key", _enc(o.key, encoded)), ("LastModified", ISO), ("ETag", o.etag),
                        ("Size", str(o.size)), ("StorageClass", "STANDARD")]) for o in objects],
        *[("CommonPrefixes", [("Prefix", _enc(p, encoded))]) for p in prefixes],
    ])
    page = run(upstream(200, data.draw(rendered(tree))).list_objects("b"))
    assert [(o.key, o.size, o.etag, o.last_modified) for o in page.objects] == [
        (o.key, o.size, o.etag, pytest.approx(ISO_TS)) for o in objects]
    assert page.common_prefixes == prefixes and page.is_truncated == truncated


@STORE
@given(data=st.data(), entries=st.lists(st.tuples(st.booleans(), listed, st.text(st.sampled_from("abcXYZ09._"),
                                                                                  min_size=1, max_size=12),
                                                  st.booleans()), max_size=5))
def test_a_stores_version_listing_reads_as_its_model(run: Callable[[Any], Any], data: st.DataObject,
                                                    entries: list[tuple[bool, Listed, str, bool]]) -> None:
    tree: Tree = ("ListVersionsResult", [("IsTruncated", "false"), *[
        ("DeleteMarker" if marker else "Version", [("Key", o.key), ("VersionId", vid),
                                                   ("IsLatest", "true" if latest else "false"),
                                                   ("LastModified", ISO), ("ETag", o.etag), ("Size", str(o.size))])
        for marker, o, vid, latest in entries]])
    page = run(upstream(200, data.draw(rendered(tree))).list_versions("b"))
    assert [(v.info.key, v.info.delete_marker, v.info.version_id, v.is_latest, v.info.size)
            for v in page.entries] == [(o.key, m, vid, latest, o.size) for m, o, vid, latest in entries]


@STORE
@given(data=st.data(), tags=st.dictionaries(keys, texts, max_size=5))
def test_a_stores_tag_set_reads_as_its_model(run: Callable[[Any], Any], data: st.DataObject, tags: dict[str, str]) -> None:
    tree = tagging_tree(list(tags.items()))
    assert run(upstream(200, data.draw(rendered(tree))).get_tags("b", "k")) == tags


@STORE
@given(data=st.data(), parts=st.lists(st.tuples(st.integers(1, 10_000), st.integers(0, 2**40), texts), max_size=5),
       alg=st.sampled_from([None, "CRC32", "SHA256"]))
def test_a_stores_part_listing_reads_as_its_model(run: Callable[[Any], Any], data: st.DataObject, parts: list[tuple[int, int, str]],
                                                 alg: str | None) -> None:
    tree: Tree = ("ListPartsResult", [*([("ChecksumAlgorithm", alg)] if alg else []), ("IsTruncated", "false"), *[
        ("Part", [("PartNumber", str(n)), ("LastModified", ISO), ("ETag", e), ("Size", str(s)),
                  *([(f"Checksum{alg}", "c" + str(n))] if alg else [])]) for n, s, e in parts]])
    _, got, _ = run(upstream(200, data.draw(rendered(tree))).list_parts("b", "k", "u"))
    assert [(p.part_number, p.size, p.etag, p.checksum) for p in got] == [
        (n, s, e, "c" + str(n) if alg else None) for n, s, e in parts]


@STORE
@given(data=st.data(), upload_id=st.text(XML_CHARS, max_size=30), etag=texts,
       checksum=st.one_of(st.none(), st.tuples(st.sampled_from(["CRC32", "CRC64NVME"]), st.text(
           st.sampled_from("ABCabc019+/="), min_size=1, max_size=12))))
def test_a_stores_multipart_results_read_as_their_model(run: Callable[[Any], Any], data: st.DataObject, upload_id: str, etag: str,
                                                       checksum: tuple[str, str] | None) -> None:
    initiated: Tree = ("InitiateMultipartUploadResult", [("Bucket", "b"), ("Key", "k"), ("UploadId", upload_id)])
    assert run(upstream(200, data.draw(rendered(initiated))).create_upload("b", "k", ObjectMeta())) == upload_id
    done: Tree = ("CompleteMultipartUploadResult", [("ETag", etag), *(
        [(f"Checksum{checksum[0]}", checksum[1]), ("ChecksumType", "FULL_OBJECT")] if checksum else [])])
    info = run(upstream(200, data.draw(rendered(done))).complete_upload(
        "b", "k", "u", [CompletedPart(1, '"e"')]))
    assert info.etag == etag
    assert info.checksum == ((checksum[0], checksum[1], "FULL_OBJECT") if checksum else None)


@STORE
@given(data=st.data(), code=st.sampled_from(["NoSuchKey", "InvalidArgument", "AccessDenied", "SlowDown", "Weird"]),
       message=texts, fields=st.dictionaries(st.sampled_from(["ArgumentName", "Key", "HostId", "StringToSign",
                                                              "AWSAccessKeyId", "Condition"]),
                                             st.text(XML_CHARS, min_size=1, max_size=10).filter(str.strip)),
       status=st.sampled_from([400, 403, 404, 409, 412]))
def test_a_stores_error_reads_as_its_code_message_and_documented_fields(run: Callable[[Any], Any], data: st.DataObject, code: str, message: str,
                                                                       fields: dict[str, str], status: int) -> None:
    tree: Tree = ("Error", [("Code", code), ("Message", message), *fields.items()])
    with pytest.raises(errors.S3Error) as e:
        run(upstream(status, data.draw(rendered(tree))).get_tags("b", "k"))
    assert e.value.code == code and e.value.status == status
    assert e.value.fields == {k: v for k, v in fields.items() if k in ("ArgumentName", "Key", "Condition")}
    if message:
        assert e.value.text == message


# Every way the node reads a store's document, with a valid answer to mutate.
UPSTREAM_CALLS: dict[str, tuple[Callable[[S3Upstream], Any], bytes]] = {
    "ListObjectsV2": (lambda up: up.list_objects("b"),
                      b"<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>k</Key><Size>1</Size>"
                      b"<LastModified>2024-05-06T07:08:09.123Z</LastModified><ETag>e</ETag></Contents>"
                      b"<CommonPrefixes><Prefix>p/</Prefix></CommonPrefixes></ListBucketResult>"),
    "ListObjectVersions": (lambda up: up.list_versions("b"),
                           b"<ListVersionsResult><Version><Key>k</Key><VersionId>v</VersionId><Size>1</Size>"
                           b"<IsLatest>true</IsLatest></Version><DeleteMarker><Key>k</Key></DeleteMarker>"
                           b"<NextKeyMarker>k</NextKeyMarker></ListVersionsResult>"),
    "ListBuckets": (lambda up: up.list_buckets(),
                    b"<ListAllMyBucketsResult><Buckets><Bucket><Name>b</Name><CreationDate>2024-05-06T07:08:09Z"
                    b"</CreationDate></Bucket></Buckets></ListAllMyBucketsResult>"),
    "GetObjectTagging": (lambda up: up.get_tags("b", "k"),
                         b"<Tagging><TagSet><Tag><Key>k</Key><Value>v</Value></Tag></TagSet></Tagging>"),
    "GetBucketTagging": (lambda up: up.get_bucket_tags("b"),
                         b"<Tagging><TagSet><Tag><Key>k</Key><Value>v</Value></Tag></TagSet></Tagging>"),
    "GetBucketVersioning": (lambda up: up.get_bucket_versioning("b"),
                            b"<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>"),
    "CopyObject": (lambda up: up.copy_object("b", "s", "b", "d", ObjectMeta()),
                   b"<CopyObjectResult><ETag>e</ETag><LastModified>2024-05-06T07:08:09Z</LastModified>"
                   b"</CopyObjectResult>"),
    "CreateMultipartUpload": (lambda up: up.create_upload("b", "k", ObjectMeta()),
                              b"<InitiateMultipartUploadResult><UploadId>u</UploadId></InitiateMultipartUploadResult>"),
    "UploadPartCopy": (lambda up: up.upload_part_copy("b", "k", "u", 1, "b", "s", (0, 9)),
                       b"<CopyPartResult><ETag>e</ETag><LastModified>2024-05-06T07:08:09Z</LastModified>"
                       b"</CopyPartResult>"),
    "CompleteMultipartUpload": (lambda up: up.complete_upload("b", "k", "u", [CompletedPart(1, "e")]),
                                b"<CompleteMultipartUploadResult><ETag>e</ETag><ChecksumCRC32>AAAAAA==</ChecksumCRC32>"
                                b"</CompleteMultipartUploadResult>"),
    "ListParts": (lambda up: up.list_parts("b", "k", "u"),
                  b"<ListPartsResult><ChecksumAlgorithm>CRC32</ChecksumAlgorithm><Part><PartNumber>1</PartNumber>"
                  b"<Size>5</Size><ETag>e</ETag><ChecksumCRC32>x</ChecksumCRC32></Part></ListPartsResult>"),
    "ListMultipartUploads": (lambda up: up.list_uploads("b"),
                             b"<ListMultipartUploadsResult><Upload><UploadId>u</UploadId><Key>k</Key>"
                             b"<Initiated>2024-05-06T07:08:09Z</Initiated></Upload></ListMultipartUploadsResult>"),
    "an error": (lambda up: up.get_tags("b", "k"),
                 b"<Error><Code>NoSuchKey</Code><Message>m</Message><Key>k</Key></Error>"),
}
# Listings with a Size or PartNumber: int() of a store's text raised
# ValueError (a 500) until test_a_stores_non_integer_size_is_an_s3_error.
_NUMBERED = {"ListObjectsV2", "ListObjectVersions", "ListParts"}


@pytest.mark.parametrize("name", list(UPSTREAM_CALLS))
@settings(max_examples=_EXAMPLES or 40, **_SETTINGS)  # x 13 entry points
@given(data=st.data())
def test_any_answer_from_a_store_reads_or_is_an_s3_error(run: Callable[[Any], Any], name: str, data: st.DataObject) -> None:
    """Whatever a store answers (bytes, a mutated document) the node reads
    it or raises an S3 error the client gets as such; never another
    exception (an InternalError to the client, a traceback in the log)."""
    call, good = UPSTREAM_CALLS[name]
    body = data.draw(mutations(st.just(good)))
    status = 404 if name == "an error" else data.draw(st.sampled_from([200, 200, 200, 400, 403, 500]))
    try:
        run(call(upstream(status, body)))
    except errors.S3Error:
        pass


@pytest.mark.parametrize("name", sorted(_NUMBERED))
def test_a_stores_non_integer_size_is_an_s3_error(run: Callable[[Any], Any], name: str) -> None:
    """Minimized from test_any_answer_from_a_store_reads_or_is_an_s3_error:
    a listing whose Size (or a part's PartNumber) is not an integer."""
    good = UPSTREAM_CALLS[name][1]
    body = good.replace(b"<Size>1</Size>", b"<Size>x</Size>").replace(b"<PartNumber>1</PartNumber>",
                                                                      b"<PartNumber>x</PartNumber>")
    with pytest.raises(errors.S3Error):
        run(UPSTREAM_CALLS[name][0](upstream(200, body)))


@pytest.mark.parametrize("attack", ATTACKS[:-1])  # a store's answers may be larger (16 MiB)
@pytest.mark.parametrize("name", sorted(UPSTREAM_CALLS))
def test_attacks_in_a_stores_answer_are_refused(run: Callable[[Any], Any], name: str, attack: str, secret_file: str) -> None:
    call, good = UPSTREAM_CALLS[name]
    root = ElementTree.fromstring(good).tag
    inner = good.decode().replace(">k<", ">&e;<", 1).replace(">e<", ">&e;<", 1)
    body = attacks(root, inner if "&e;" in inner else inner.replace("><", ">&e;<", 1), secret_file)[attack]
    with pytest.raises(errors.S3Error) as e:
        run(call(upstream(404 if name == "an error" else 200, body)))
    if name != "an error":
        assert e.value.code == "MalformedXML"
    assert SECRET_FILE_TEXT not in repr(e.value.__dict__)


def test_keys_in_a_url_encoded_listing_are_decoded_once(run: Callable[[Any], Any]) -> None:
    """'+' is a space in an encoded listing (S3's form encoding), '%2B' a
    plus; a listing without EncodingType keeps both as they are."""
    body = (b"<ListBucketResult><EncodingType>url</EncodingType><Contents><Key>a+b%2Bc</Key></Contents>"
            b"</ListBucketResult>")
    assert [o.key for o in run(upstream(200, body).list_objects("b")).objects] == ["a b+c"]
    plain = body.replace(b"<EncodingType>url</EncodingType>", b"")
    assert [o.key for o in run(upstream(200, plain).list_objects("b")).objects] == ["a+b%2Bc"]

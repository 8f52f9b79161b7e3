"""Bucket policies: the common subset of AWS's policy language, pure.

A policy is a list of statements, each an Effect (Allow or Deny) over
principals, actions and resources (wildcards ``*`` and ``?``; actions
compare case-insensitively, resources exactly), with NotPrincipal,
NotAction and NotResource as their complements and an optional Condition
block. ``evaluate`` answers "Deny" when any statement denies, else "Allow"
when any allows, else None (the caller falls back to ACLs): an explicit deny
beats an allow, which beats the default deny.

Principals name users of this node: ``"*"`` (everyone, anonymous requests
included), ``{"AWS": ...}`` with a user's name, canonical id, or an ARN that
ends in ``:user/<name>`` or is ``arn:aws:iam::<id>:root``, and
``{"CanonicalUser": <id>}``.

Condition operators: String{Not}Equals{IgnoreCase}, String{Not}Like,
Numeric*, Date*, Bool, {Not}IpAddress, Null, each with an ``IfExists``
form and the ``ForAnyValue:`` / ``ForAllValues:`` set prefixes. The keys a
request supplies are listed by ``gateway.access.context``; a key the
request lacks makes a positive operator false and a negated one true, as
AWS evaluates them.

Parsed policies are memoised by their text (``parsed``): access is decided
per request, the parsing once per policy version.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from nearstore.gateway import errors

MAX_POLICY_BYTES = 20 * 1024
ARN_PREFIX = "arn:aws:s3:::"

Context = Mapping[str, Sequence[str]]  # lower-case key -> the request's values


@dataclass(frozen=True)
class Principal:
    """Who sent a request: None for an anonymous one."""

    id: str | None = None
    name: str = ""


@functools.lru_cache(maxsize=4096)
def _wild(pattern: str, fold: bool) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if fold else 0))


def wild_match(pattern: str, value: str, *, fold: bool = False) -> bool:
    return _wild(pattern, fold).fullmatch(value) is not None


def _strings(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise errors.MalformedPolicy(f"Policy has an invalid {what}")


def _principals(value: object) -> tuple[str, ...]:
    """A Principal element as matchable strings: "*" for everyone,
    "aws:<x>" and "canonical:<id>" for the rest."""
    if value == "*":
        return ("*",)
    if not isinstance(value, dict) or not value:
        raise errors.MalformedPolicy("Invalid principal in policy")
    out: list[str] = []
    for kind, names in value.items():
        if kind not in ("AWS", "CanonicalUser"):
            raise errors.MalformedPolicy("Invalid principal in policy")
        for name in _strings(names, "principal"):
            if kind == "AWS" and name == "*":
                out.append("*")
            else:
                out.append(("aws:" if kind == "AWS" else "canonical:") + name)
    return tuple(out)


def _principal_matches(entries: tuple[str, ...], who: Principal) -> bool:
    for e in entries:
        if e == "*":
            return True
        if who.id is None:
            continue
        kind, _, name = e.partition(":")
        if kind == "canonical":
            if name == who.id:
                return True
        elif name in (who.id, who.name) or name.endswith(f":user/{who.name}") or name == f"arn:aws:iam::{who.id}:root":
            return True
    return False


@dataclass(frozen=True)
class Condition:
    operator: str  # without IfExists and the set prefix, e.g. "StringLike"
    key: str  # lower-case
    values: tuple[str, ...]
    if_exists: bool
    quantifier: str  # "" | "ForAnyValue" | "ForAllValues"

    @property
    def negated(self) -> bool:
        return "Not" in self.operator

    def holds(self, context: Context) -> bool:
        if self.operator == "Null":
            present = bool(context.get(self.key))
            return (self.values[0].lower() == "true") != present
        got = context.get(self.key)
        if not got:
            if self.quantifier == "ForAllValues":
                return True
            return self.if_exists or self.negated
        test = _OPERATORS[self.operator]
        if self.quantifier == "ForAllValues":
            return all(test(v, p) for v in got for p in self.values) if self.negated else \
                all(any(test(v, p) for p in self.values) for v in got)
        if self.negated:
            # "Not" operators: no value of the request matches any listed.
            return all(test(v, p) for v in got for p in self.values)
        return any(test(v, p) for v in got for p in self.values)


def _number(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return float("nan")


def _date(s: str) -> float:
    try:
        return float(s) if s.replace(".", "", 1).isdigit() else datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("nan")


def _in_network(addr: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(addr) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


# Each tests one request value against one policy value; the "Not" forms
# are the negations, applied by Condition.holds over all pairs.
_OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "StringEquals": lambda v, p: v == p,
    "StringNotEquals": lambda v, p: v != p,
    "StringEqualsIgnoreCase": lambda v, p: v.lower() == p.lower(),
    "StringNotEqualsIgnoreCase": lambda v, p: v.lower() != p.lower(),
    "StringLike": lambda v, p: wild_match(p, v),
    "StringNotLike": lambda v, p: not wild_match(p, v),
    "Bool": lambda v, p: v.lower() == p.lower(),
    "IpAddress": _in_network,
    "NotIpAddress": lambda v, p: not _in_network(v, p),
}
_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "Equals": operator.eq, "NotEquals": operator.ne, "LessThan": operator.lt, "LessThanEquals": operator.le,
    "GreaterThan": operator.gt, "GreaterThanEquals": operator.ge,
}
for _kind, _as in (("Numeric", _number), ("Date", _date)):
    for _name, _cmp in _COMPARISONS.items():
        _OPERATORS[_kind + _name] = functools.partial(lambda cmp, conv, v, p: cmp(conv(v), conv(p)), _cmp, _as)

# Keys whose fixed value keeps a statement from being public (AWS's
# "The meaning of public": a source network, account or organisation).
_RESTRICTING_KEYS = frozenset({
    "aws:sourceip", "aws:sourcevpc", "aws:sourcevpce", "aws:sourcearn", "aws:sourceaccount",
    "aws:sourceowner", "aws:principalorgid", "aws:principalaccount", "aws:userid", "aws:username",
    "aws:principalarn", "s3:dataaccesspointarn", "s3:dataaccesspointaccount",
})


def _conditions(value: object) -> tuple[Condition, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise errors.MalformedPolicy("Invalid Condition")
    out: list[Condition] = []
    for op_name, block in value.items():
        quantifier, _, op = op_name.rpartition(":")
        if quantifier not in ("", "ForAnyValue", "ForAllValues"):
            raise errors.MalformedPolicy(f"Invalid Condition type : {op_name}")
        if_exists = op.endswith("IfExists") and op != "Null"
        base = op[: -len("IfExists")] if if_exists else op
        if base not in _OPERATORS and base != "Null":
            raise errors.MalformedPolicy(f"Invalid Condition type : {op_name}")
        if not isinstance(block, dict) or not block:
            raise errors.MalformedPolicy("Invalid Condition")
        for key, vals in block.items():
            if isinstance(vals, (bool, int, float)) and not isinstance(vals, bool):
                vals = str(vals)
            if isinstance(vals, bool):
                vals = "true" if vals else "false"
            if isinstance(vals, list):
                vals = [("true" if v else "false") if isinstance(v, bool) else str(v) for v in vals]
            out.append(Condition(base, key.lower(), _strings(vals, "condition value"), if_exists, quantifier))
    return tuple(out)


@dataclass(frozen=True)
class Statement:
    allow: bool
    principals: tuple[str, ...] | None
    not_principals: tuple[str, ...] | None
    actions: tuple[str, ...] | None
    not_actions: tuple[str, ...] | None
    resources: tuple[str, ...] | None
    not_resources: tuple[str, ...] | None
    conditions: tuple[Condition, ...]

    def applies(self, who: Principal, action: str, resource: str, context: Context) -> bool:
        if self.principals is not None and not _principal_matches(self.principals, who):
            return False
        if self.not_principals is not None and _principal_matches(self.not_principals, who):
            return False
        if self.actions is not None and not any(wild_match(a, action, fold=True) for a in self.actions):
            return False
        if self.not_actions is not None and any(wild_match(a, action, fold=True) for a in self.not_actions):
            return False
        if self.resources is not None and not any(wild_match(r, resource) for r in self.resources):
            return False
        if self.not_resources is not None and any(wild_match(r, resource) for r in self.not_resources):
            return False
        return all(c.holds(context) for c in self.conditions)

    @property
    def public(self) -> bool:
        everyone = (self.principals is not None and "*" in self.principals) or self.not_principals is not None
        restricted = any(c.key in _RESTRICTING_KEYS and not c.negated for c in self.conditions)
        return self.allow and everyone and not restricted


@dataclass(frozen=True)
class Policy:
    statements: tuple[Statement, ...]

    @property
    def public(self) -> bool:
        """Grants something to everyone, unrestricted (what Public Access
        Block's BlockPublicPolicy refuses and GetBucketPolicyStatus says)."""
        return any(s.public for s in self.statements)

    def evaluate(self, who: Principal, action: str, resource: str, context: Context) -> str | None:
        verdict = None
        for s in self.statements:
            if s.applies(who, action, resource, context):
                if not s.allow:
                    return "Deny"
                verdict = "Allow"
        return verdict


def _resource_ok(resource: str, bucket: str) -> bool:
    if not resource.startswith(ARN_PREFIX):
        return resource == "*"
    named = resource[len(ARN_PREFIX):].split("/", 1)[0]
    return wild_match(named, bucket)


def _pair(st: dict[str, object], name: str, parse: Callable[[object], tuple[str, ...]]) -> tuple[
        tuple[str, ...] | None, tuple[str, ...] | None]:
    yes, no = st.get(name), st.get("Not" + name)
    if yes is not None and no is not None:
        raise errors.MalformedPolicy(f"Policy has both {name} and Not{name}")
    return (parse(yes) if yes is not None else None), (parse(no) if no is not None else None)


def parse_policy(text: str, bucket: str) -> Policy:
    """A bucket policy as a client sent it; MalformedPolicy where AWS
    refuses one."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise errors.MalformedPolicy("Policy exceeds the maximum allowed document size.")
    try:
        doc = json.loads(text)
    except ValueError:
        raise errors.MalformedPolicy("Policies must be valid JSON and the first byte must be '{'") from None
    if not isinstance(doc, dict):
        raise errors.MalformedPolicy("Policies must be valid JSON and the first byte must be '{'")
    version = doc.get("Version")
    if version is not None and version not in ("2012-10-17", "2008-10-17"):
        raise errors.MalformedPolicy("The policy must contain a valid version string")
    raw = doc.get("Statement")
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise errors.MalformedPolicy("Missing required field Statement")
    statements: list[Statement] = []
    for st in raw:
        if not isinstance(st, dict):
            raise errors.MalformedPolicy("Statement is not an object")
        effect = st.get("Effect")
        if effect not in ("Allow", "Deny"):
            raise errors.MalformedPolicy("Invalid effect: " + str(effect))
        principals, not_principals = _pair(st, "Principal", _principals)
        if principals is None and not_principals is None:
            raise errors.MalformedPolicy("Missing required field Principal")
        actions, not_actions = _pair(st, "Action", lambda v: _strings(v, "action"))
        if actions is None and not_actions is None:
            raise errors.MalformedPolicy("Missing required field Action")
        for a in (actions or ()) + (not_actions or ()):
            if a != "*" and not a.lower().startswith("s3:"):
                raise errors.MalformedPolicy("Policy has invalid action")
        resources, not_resources = _pair(st, "Resource", lambda v: _strings(v, "resource"))
        if resources is None and not_resources is None:
            raise errors.MalformedPolicy("Missing required field Resource")
        for r in (resources or ()) + (not_resources or ()):
            if not _resource_ok(r, bucket):
                raise errors.MalformedPolicy("Policy has invalid resource")
        statements.append(Statement(effect == "Allow", principals, not_principals, actions, not_actions,
                                    resources, not_resources, _conditions(st.get("Condition"))))
    return Policy(tuple(statements))


@functools.lru_cache(maxsize=1024)
def parsed(text: str, bucket: str) -> Policy:
    """``parse_policy``, once per policy text (a stored policy parsed when
    it was put, so this never raises for one)."""
    return parse_policy(text, bucket)

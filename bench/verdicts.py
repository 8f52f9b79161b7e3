"""Targets met or not: the words every target row of every bench prints.

`nearstore bench` (bench/report.py) and the client benches (bench/loader.py,
bench/models.py) judge their targets the same way: a met column that says
"met", "**not met**" or "n/a" (not judged), then a count.
"""

from __future__ import annotations

from dataclasses import dataclass


def verdict(ok: bool | None) -> str:
    """What every target row's met column says."""
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def count_met(verdicts: list[bool | None]) -> str:
    """'met: 2 of 3.' (plus how many were not judged)."""
    judged = [v for v in verdicts if v is not None]
    out = f"met: {sum(judged)} of {len(judged)}."
    if len(judged) < len(verdicts):
        out += f" Not judged: {len(verdicts) - len(judged)}."
    return out


@dataclass(frozen=True)
class RatioTarget:
    """`subject` / `reference` of one figure (higher is better) at least
    `ratio_min`; the figures are None where they were not measured."""

    text: str
    subject: str
    reference: str
    ratio_min: float
    value: float | None
    ref_value: float | None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.ref_value:
            return None
        return self.value / self.ref_value

    @property
    def met(self) -> bool | None:
        r = self.ratio
        return None if r is None else r >= self.ratio_min


def ratio_table(targets: list[RatioTarget], unit: str) -> str:
    """Markdown: one row per target, then the count."""
    lines = [f"| target | subject | reference | subject's {unit} | reference's {unit} | ratio | met |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in targets:
        v = "-" if t.value is None else f"{t.value:,.3g}"
        rv = "-" if t.ref_value is None else f"{t.ref_value:,.3g}"
        r = "-" if t.ratio is None else f"{t.ratio:.2f}"
        lines.append(f"| {t.text} | {t.subject} | {t.reference} | {v} | {rv} | {r} | {verdict(t.met)} |")
    return "\n".join(lines) + "\n\nTargets " + count_met([t.met for t in targets])

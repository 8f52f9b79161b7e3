"""Small statistics: nearest-rank percentiles and median/min/max of runs."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float
    n: int


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: list[float]) -> Stat | None:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return None
    return Stat(statistics.median(vals), min(vals), max(vals), len(vals))

"""Pure statistics for the benchmark: percentiles, summaries, CDFs. No clocks, no I/O.

Percentiles use linear interpolation between closest ranks (numpy's default, "type 7"), so p100 is
the maximum, p0 the minimum, and one sample is every percentile of itself.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values`; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    return percentile_sorted(ordered, q)


def percentile_sorted(ordered: Sequence[float], q: float) -> float:
    n = len(ordered)
    if n == 0:
        return math.nan
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


def summarize_ms(seconds: Iterable[float]) -> dict:
    """Latency summary in milliseconds (rounded to 0.01 ms); None fields when there are no samples."""
    ordered = sorted(seconds)
    if not ordered:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    ms = lambda v: round(v * 1000.0, 2)  # noqa: E731
    return {
        "count": len(ordered),
        "p50": ms(percentile_sorted(ordered, 50)),
        "p95": ms(percentile_sorted(ordered, 95)),
        "p99": ms(percentile_sorted(ordered, 99)),
        "max": ms(ordered[-1]),
        "mean": ms(math.fsum(ordered) / len(ordered)),
    }


def cdf_points(seconds: Iterable[float], points: int = 200) -> list[list[float]]:
    """A downsampled empirical CDF: [[latency_ms, fraction <= it], ...], at most `points` + 1 rows,
    always ending at the maximum with fraction 1.0."""
    ordered = sorted(seconds)
    n = len(ordered)
    if n == 0:
        return []
    if points < 1:
        raise ValueError("points must be >= 1")
    step = max(1, n // points)
    idx = list(range(step - 1, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return [[round(ordered[i] * 1000.0, 3), round((i + 1) / n, 6)] for i in idx]

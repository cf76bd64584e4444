"""Percentiles the benchmarks report, computed one way for all of them."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ttft_summary(ttfts: Iterable[float]) -> dict[str, float]:
    """TTFT p50 (median), p90 and p99 in seconds, rounded as the reports print them."""
    sample = list(ttfts)
    return {
        "ttft_p50_s": round(statistics.median(sample), 4),
        "ttft_p90_s": round(percentile(sample, 0.90), 4),
        "ttft_p99_s": round(percentile(sample, 0.99), 4),
    }

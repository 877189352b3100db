"""Median and spread of repeated timings: how job.json and the benchmarks report a timing."""

from __future__ import annotations

import statistics


def stats(times: list[float]) -> dict[str, float]:
    """Median, extremes and interquartile range of repeated timings (seconds), and their count."""
    if not times:
        raise ValueError("stats needs at least one timing")
    ordered = sorted(times)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1 = q3 = ordered[0]
    return {
        "median_s": round(statistics.median(ordered), 5),
        "min_s": round(ordered[0], 5),
        "max_s": round(ordered[-1], 5),
        "iqr_s": round(q3 - q1, 5),
        "n": len(ordered),
    }

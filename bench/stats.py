"""Figures the benchmarks report: medians and p90s of samples taken in seconds."""

from __future__ import annotations

import statistics


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_ms": statistics.median(values) * 1000,
        "p90_ms": pct(values, 0.9) * 1000,
        "max_ms": max(values) * 1000,
    }

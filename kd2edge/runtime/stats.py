"""Statistics of latency measurements: percentiles, summaries, decode rates.

Pure functions over plain lists of seconds (no numpy, so they run anywhere the
runtime does). Every figure is a summary over several runs, never a single run.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks.

    The same definition as numpy's default ("linear"): the sorted values sit at
    ranks 0..n-1 and percentile q lies at rank h = (n - 1) * q / 100.

    Args:
        values: one or more numbers.
        q: the percentile, 0 to 100.

    Returns:
        The interpolated value.

    Raises:
        ValueError: no values, or q outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(values)
    h = (len(ordered) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def summarize(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict:
    """p50, p90, p99, min, max, mean and count of `values` times `scale` (e.g. 1000 for s -> ms).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("summary of no values")
    scaled = [v * scale for v in values]
    out = {f"p{q}": percentile(scaled, q) for q in (50, 90, 99)}
    out.update(min=min(scaled), max=max(scaled), mean=statistics.fmean(scaled))
    out = {k: round(v, digits) for k, v in out.items()}
    out["n"] = len(scaled)
    return out


def decode_tokens_per_s(token_latencies_s: Sequence[float]) -> float:
    """Decode throughput of one run: tokens after the first divided by the time they took.

    The first token is excluded on purpose: its latency is the prefill (time to first
    token), which depends on the prompt length, not on decoding speed.

    Args:
        token_latencies_s: seconds per decoded token after the first, shape [new_tokens - 1].

    Raises:
        ValueError: no latencies or a non-positive total time.
    """
    total = sum(token_latencies_s)
    if not token_latencies_s or total <= 0:
        raise ValueError("decode rate needs at least one decoded token with a positive duration")
    return len(token_latencies_s) / total


def median_and_spread(values: Sequence[float], digits: int = 3) -> tuple[float, float]:
    """(median, max - min) of per-run figures such as tokens/s over repeats.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("median of no values")
    return round(statistics.median(values), digits), round(max(values) - min(values), digits)

"""The budget gate: each measured figure against the device profile's limit.

Which figure a budget is compared with (the choice is recorded in each verdict's `measured_as`):

- max_artifact_mb:       the artifact's size on disk (every file of the folder), in MiB.
- max_peak_memory_mb:    the profiling process's peak resident memory (VmHWM on Linux), in MiB.
                         On shared-memory boards (Jetson) where tegrastats reports it, the
                         larger of that and the rise in system RAM in use, since GPU
                         allocations there do not show in the process RSS.
- max_ttft_ms:           the median time to first token at the *longest* profiled prompt
                         length: the profile lists the lengths the device must serve, so the
                         budget must hold at the hardest of them.
- min_decode_tokens_per_s: the median over repeats of decode tokens/s at that same longest
                         prompt length (decoding slows as the KV cache grows).

"MB" in the profiles' budget names is read as MiB (2**20 bytes), like memory figures.
"""

from __future__ import annotations

from kd2edge.errors import BudgetError

MIB = 2**20

# budget name -> (key of the measured figure, "max" (value <= limit) or "min" (value >= limit), what it is)
BUDGET_RULES: dict[str, tuple[str, str, str]] = {
    "max_artifact_mb": ("size_mb", "max", "artifact size on disk, MiB"),
    "max_peak_memory_mb": ("peak_memory_mb", "max", "peak resident memory of the profiling process, MiB"),
    "max_ttft_ms": ("ttft_ms_p50", "max", "median time to first token at the longest prompt length, ms"),
    "min_decode_tokens_per_s": ("decode_tokens_per_s", "min", "median decode tokens/s at the longest prompt length"),
}


def budget_verdicts(limits: dict[str, float], measured: dict[str, float | None]) -> dict[str, dict]:
    """Compare measured figures with the budgets that the profiler can check.

    Args:
        limits: budget name -> limit (the profile's `budgets`; names not in BUDGET_RULES,
            such as min_retention, are left to the stage that measures them).
        measured: figure key (size_mb, peak_memory_mb, ttft_ms_p50, decode_tokens_per_s) -> value
            or None when it could not be measured.

    Returns:
        {name: {limit, value, pass, measured_as}}; `pass` is None when the value is missing.
    """
    out = {}
    for name, (key, sense, what) in BUDGET_RULES.items():
        if name not in limits:
            continue
        limit, value = float(limits[name]), measured.get(key)
        if value is None:
            verdict = None
        else:
            verdict = value <= limit if sense == "max" else value >= limit
        out[name] = {"limit": limit, "value": None if value is None else round(float(value), 3),
                     "pass": verdict, "measured_as": what}
    return out


def failed_budgets(verdicts: dict[str, dict]) -> list[str]:
    """Names of the budgets whose verdict is a fail (not the unmeasured ones)."""
    return [name for name, v in verdicts.items() if v.get("pass") is False]


def enforce(verdicts: dict[str, dict], where: str = "") -> None:
    """The gate: raise if any budget failed.

    Raises:
        BudgetError: naming every failed budget with its value and limit.
    """
    failed = failed_budgets(verdicts)
    if failed:
        parts = [f"{n} ({verdicts[n]['value']} vs limit {verdicts[n]['limit']})" for n in failed]
        suffix = f"; see {where}" if where else ""
        raise BudgetError(f"budget missed: {', '.join(parts)}{suffix} (--no-gate to report only)")

"""Budget verdicts and the gate."""

from __future__ import annotations

import pytest

from kd2edge.errors import BudgetError
from kd2edge.runtime.budgets import budget_verdicts, enforce, failed_budgets

LIMITS = {"max_artifact_mb": 250.0, "max_peak_memory_mb": 1024.0, "max_ttft_ms": 1500.0,
          "min_decode_tokens_per_s": 20.0, "min_retention": 0.7}


def test_verdicts_compare_each_figure_with_its_limit():
    v = budget_verdicts(LIMITS, {"size_mb": 100.0, "peak_memory_mb": 1024.0, "ttft_ms_p50": 1600.0,
                                 "decode_tokens_per_s": 20.0})
    assert set(v) == {"max_artifact_mb", "max_peak_memory_mb", "max_ttft_ms", "min_decode_tokens_per_s"}
    assert v["max_artifact_mb"] == {"limit": 250.0, "value": 100.0, "pass": True,
                                    "measured_as": v["max_artifact_mb"]["measured_as"]}
    assert v["max_peak_memory_mb"]["pass"] is True       # equal to a max limit passes
    assert v["max_ttft_ms"]["pass"] is False             # 1600 > 1500
    assert v["min_decode_tokens_per_s"]["pass"] is True  # equal to a min limit passes
    assert failed_budgets(v) == ["max_ttft_ms"]


def test_unmeasured_figure_leaves_the_verdict_open():
    v = budget_verdicts(LIMITS, {"size_mb": 10.0})
    assert v["max_ttft_ms"]["pass"] is None and v["max_ttft_ms"]["value"] is None
    assert failed_budgets(v) == []
    enforce(v)  # nothing failed: no error


def test_tight_budget_fails_the_gate_naming_it():
    tight = dict(LIMITS, min_decode_tokens_per_s=1e9)
    v = budget_verdicts(tight, {"size_mb": 1.0, "peak_memory_mb": 80.0, "ttft_ms_p50": 5.0,
                                "decode_tokens_per_s": 400.0})
    with pytest.raises(BudgetError, match=r"min_decode_tokens_per_s \(400.0 vs limit 1000000000.0\)") as e:
        enforce(v, where="out/profile.json")
    assert "max_ttft_ms" not in str(e.value) and "out/profile.json" in str(e.value)
    assert e.value.exit_code == 7

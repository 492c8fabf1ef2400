"""Latency statistics and the per-length summaries, on hand-computed figures."""

from __future__ import annotations

import pytest

from kd2edge.errors import ConfigError
from kd2edge.runtime.profiler import (RunTiming, check_prompt_lengths, latency_metrics, prompt_ids,
                                        summarize_length, time_runs, usable_context)
from kd2edge.runtime.stats import decode_tokens_per_s, median_and_spread, percentile, summarize


def test_percentile_interpolates_between_ranks():
    # sorted [1, 2, 3, 4] at ranks 0..3: p50 at rank 1.5 -> 2.5; p90 at rank 2.7 -> 3 + 0.7 * 1
    values = [4, 1, 3, 2]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 0) == 1 and percentile(values, 100) == 4
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_empty_and_bad_q():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentiles_are_ordered_on_a_skewed_sample():
    # a decode-like distribution: mostly ~10 ms, a few slow steps
    values = [0.010 + 0.0001 * (i % 7) for i in range(200)] + [0.05, 0.08, 0.2]
    s = summarize(values, scale=1000)
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["n"] == 203
    assert s["max"] == pytest.approx(200.0)


def test_summarize_scales_seconds_to_ms():
    s = summarize([0.001, 0.002, 0.003], scale=1000)
    assert (s["p50"], s["min"], s["max"], s["mean"], s["n"]) == (2.0, 1.0, 3.0, 2.0, 3)


def test_decode_rate_excludes_nothing_it_is_given():
    # 3 decode steps taking 0.4 s in all -> 7.5 tokens/s
    assert decode_tokens_per_s([0.1, 0.1, 0.2]) == pytest.approx(7.5)
    with pytest.raises(ValueError):
        decode_tokens_per_s([])


def test_median_and_spread_over_repeats():
    assert median_and_spread([10.0, 12.0, 11.0]) == (11.0, 2.0)
    assert median_and_spread([10.0, 12.0]) == (11.0, 2.0)


def test_summarize_length_uses_medians_over_repeats():
    runs = [RunTiming(16, 0.100, [0.01, 0.01, 0.02]),   # 3 / 0.04 = 75 tok/s
            RunTiming(16, 0.120, [0.02, 0.02, 0.02]),   # 50 tok/s
            RunTiming(16, 0.110, [0.01, 0.01, 0.01])]   # 100 tok/s
    s = summarize_length(runs)
    assert s["ttft_ms"]["p50"] == pytest.approx(110.0)
    assert (s["ttft_ms"]["min"], s["ttft_ms"]["max"]) == (100.0, 120.0)
    assert s["decode_tokens_per_s"] == pytest.approx(75.0)
    assert s["decode_tokens_per_s_spread"] == pytest.approx(50.0)
    # 9 pooled steps: five of 10 ms, four of 20 ms -> p50 is the 5th smallest = 10 ms
    assert s["token_latency_ms"]["p50"] == pytest.approx(10.0)
    assert s["token_latency_ms"]["p99"] == pytest.approx(20.0)
    assert s["token_latency_ms"]["n"] == 9


def test_headline_figures_come_from_the_longest_prompt():
    short = summarize_length([RunTiming(8, 0.01, [0.01]), RunTiming(8, 0.03, [0.01])])
    long = summarize_length([RunTiming(32, 0.05, [0.02]), RunTiming(32, 0.07, [0.02])])
    lat = latency_metrics({8: short, 32: long}, budget_length=32)
    assert lat["ttft_ms_p50"] == pytest.approx(60.0) and lat["ttft_prompt_tokens"] == 32
    assert lat["decode_tokens_per_s"] == pytest.approx(50.0)
    assert set(lat["ttft_ms_by_prompt"]) == {"8", "32"}
    assert lat["ttft_ms_by_prompt"]["8"] == {"p50": 20.0, "p90": 28.0, "min": 10.0, "max": 30.0}
    assert lat["decode_by_prompt"]["8"]["tokens_per_s"] == pytest.approx(100.0)


class _FakeGeneration:
    def __init__(self, index):
        self.prompt_tokens, self.ttft_s, self.token_latencies_s = 4, float(index), [0.5]


def test_time_runs_discards_warmup():
    calls = []

    def generate(ids, n):
        calls.append((tuple(ids), n))
        return _FakeGeneration(len(calls))

    runs = time_runs(generate, [1, 2, 3, 4], 5, warmup=2, repeats=3)
    assert len(calls) == 5 and calls[0] == ((1, 2, 3, 4), 5)
    assert [r.ttft_s for r in runs] == [3.0, 4.0, 5.0]  # calls 1 and 2 were warm-up
    assert all(r.wall_s is not None and r.wall_s >= 0 for r in runs)


def test_prompt_ids_have_exactly_the_length_asked():
    assert prompt_ids(lambda t: [1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]
    assert prompt_ids(lambda t: [1, 2, 3], 2) == [1, 2]
    with pytest.raises(ConfigError, match="no tokens"):
        prompt_ids(lambda t: [], 4)


def test_prompt_beyond_the_model_context_is_a_config_error():
    assert usable_context(512, 2048) == 512 and usable_context(None, 2048) == 2048
    check_prompt_lengths((128, 256), 64, model_context=512, profile_context=2048)  # fits
    with pytest.raises(ConfigError, match=r"512 \+ 64 new tokens exceed the context of 512 tokens "
                                          r"\(the model's max_position_embeddings\)"):
        check_prompt_lengths((128, 512), 64, model_context=512, profile_context=2048)
    with pytest.raises(ConfigError, match="profile's runtime.context_length"):
        check_prompt_lengths((1024,), 64, model_context=8192, profile_context=1024)

"""report.html: key figures present, unmeasured budgets shown as such, plots embedded, text escaped."""

from __future__ import annotations

import base64

from kd2edge.artifacts import Artifact
from kd2edge.config import STAGES, load_config
from kd2edge.pipeline import StageResult
from kd2edge.report import build_report
from kd2edge.report_html import fmt, render_html, write_html

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


def _artifact(path, stage, metrics, **extra):
    path.mkdir(parents=True, exist_ok=True)
    return Artifact(path, {"stage": stage, "content_hash": stage, "metrics": metrics, **extra})


def _full_run(tmp_path):
    """Artifacts and results of a run where every stage finished, one budget failing."""
    config = load_config(profile="laptop-cpu")
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "ttft_vs_prompt.png").write_bytes(PNG)
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "loss_curve.png").write_bytes(PNG)
    latency = {"ttft_ms_p50": 812.5, "ttft_prompt_tokens": 512,
               "ttft_ms_by_prompt": {"128": {"p50": 210.25, "p90": 230.0, "min": 200.0, "max": 240.0},
                                     "512": {"p50": 812.5, "p90": 850.0, "min": 800.0, "max": 870.0}},
               "decode_tokens_per_s": 17.5, "decode_tokens_per_s_spread": 0.4,
               "decode_by_prompt": {"128": {"tokens_per_s": 19.25, "spread": 0.2},
                                    "512": {"tokens_per_s": 17.5, "spread": 0.4}},
               "token_latency_ms": {"p50": 56.1, "p90": 60.2, "p99": 75.3}, "peak_rss_mb": 321.0, "load_s": 0.42,
               "size_bytes": 95 * 2**20, "providers": ["CPUExecutionProvider"], "fallback": False,
               "host": {"cpu_model": "Test CPU <x86>", "cores_usable": 2, "memory_bytes": 8 * 2**30,
                        "arch": "x86_64", "os": "Linux", "onnxruntime": "1.32.0"}}
    budgets = {"max_artifact_mb": {"limit": 250.0, "value": 95.0, "pass": True},
               "max_peak_memory_mb": {"limit": 1024.0, "value": 321.0, "pass": True},
               "max_ttft_ms": {"limit": 1500.0, "value": 812.5, "pass": True},
               "min_decode_tokens_per_s": {"limit": 20.0, "value": 17.5, "pass": False}}
    baseline = {"status": "done", "prompt_tokens": 128, "new_tokens": 16, "ttft_ms_p50": 1234.5,
                "decode_tokens_per_s": 9.75, "peak_rss_mb": 1100.0, "threads": 4, "dtype": "float32"}
    quality = {"dataset": "embedded", "shots": 1, "teacher": {"em": 0.5, "f1": 0.625},
               "student": {"em": 0.45, "f1": 0.6}, "deployed": {"em": 0.4, "f1": 0.55},
               "retention": {"student": {"f1": 0.96}, "deployed": {"f1": 0.88}}, "retention_f1": 0.88,
               "split": "validation", "split_info": {"by": "article", "groups": {"train": 30, "validation": 8}},
               "retention_f1_interval": {
                   "deployed": {"value": 0.88, "low": 0.71, "high": 1.04, "level": 0.95, "n": 384},
                   "student": {"value": 0.96, "low": 0.8, "high": 1.1, "level": 0.95, "n": 384},
                   "by_language": {"es": {"deployed": {"value": 0.5, "low": None, "high": None, "level": 0.95, "n": 4},
                                          "student": {"value": None, "low": None, "high": None, "level": 0.95,
                                                      "n": 4}}}}}
    quality["teacher"]["by_language"] = {"es": {"f1": 0.25, "em": 0.0}}
    quality["deployed"]["by_language"] = {"es": {"f1": 0.125, "em": 0.0}}
    artifacts = {
        "teacher": Artifact(tmp_path / "teacher", {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "content_hash": "t"}),
        "distill": _artifact(tmp_path / "distill", "distill", {
            "teacher": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "params": 134515008},
            "student": {"id": "student<b>", "params": 81234567}, "param_reduction": 0.3961}),
        "quantize": _artifact(tmp_path / "quantize", "quantize", {}),
        "export": _artifact(tmp_path / "export", "export", {"size_bytes": 95 * 2**20}, format="onnx"),
        "profile": _artifact(tmp_path / "profile", "profile", {"latency": latency, "budgets": budgets,
                                                               "baseline_teacher": baseline}),
        "evaluate": _artifact(tmp_path / "evaluate", "evaluate", {
            "quality": quality, "budgets": {"min_retention": {"limit": 0.7, "value": 0.88, "pass": True}}}),
        "package": _artifact(tmp_path / "package", "package", {"context_dir": "x"}),
    }
    results = {n: StageResult(n, "done", artifacts[n], 1.5) for n in STAGES}
    report = build_report(config, artifacts, results)
    report["baseline_teacher"] = baseline  # report.py does not copy it (yet): render_html reads either
    return report


def test_html_holds_the_key_figures(tmp_path):
    report = _full_run(tmp_path)
    page = render_html(report)
    for text in ("134,515,008", "81,234,567", "39.6%",               # params and reduction
                 "95.0 MiB",                                         # deployed size
                 "1,234.5 ms", "210.2 ms",                           # TTFT teacher vs deployed at 128 tokens
                 "9.8 tok/s", "19.2 tok/s", "1,100 MiB", "321 MiB",  # decode and memory, like for like
                 "0.625", "0.550", "88.0%", "96.0%",                 # QA F1 and retention
                 "56.10/60.20/75.30 ms", "812.5"):
        assert text in page, text
    assert page.count('class="fail">FAIL') == 1 and "min_decode_tokens_per_s" in page
    assert '<span class="badge fail">FAIL</span>' in page
    assert page.count("data:image/png;base64,") == 2  # the TTFT plot and the loss curve
    retention = page.split("<h2>QA retention</h2>")[1].split("<h2>")[0]
    assert "8 of 38 articles, never trained on" in retention and "1-shot" in retention
    assert "88.0%" in retention and "[71.0%, 104.0%]" in retention        # the interval, overall
    assert "<td>es</td>" in retention and "undefined" in retention and "0.125" in retention
    assert page.index("distill: loss_curve.png") < page.index("profile: ttft_vs_prompt.png")
    # report text is escaped, not markup
    assert "student&lt;b&gt;" in page and "Test CPU &lt;x86&gt;" in page and "student<b>" not in page

    path = write_html(report, tmp_path / "report.html")
    assert path.read_text(encoding="utf-8") == page


def test_an_unmeasured_budget_is_shown_open_not_invented(tmp_path):
    report = _full_run(tmp_path)
    del report["budgets"]["min_retention"]["value"]
    report["budgets"]["min_retention"].update(value=None, **{"pass": None}, status="not measured")
    report["budgets"]["min_decode_tokens_per_s"]["pass"] = True
    report["pass"] = None
    page = render_html(report)
    assert '<span class="badge open">OPEN (a budget not measured)</span>' in page
    assert page.count("not measured") >= 2 and 'class="fail">FAIL' not in page


def test_fmt():
    assert fmt(None) == "—" and fmt(1234567) == "1,234,567" and fmt(3.14159, 2, " ms") == "3.14 ms"
    assert fmt(True) == "yes"

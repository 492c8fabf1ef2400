"""The pipeline with stand-in stages: order, resume, atomicity, the gate."""

import types

import pytest

from kd2edge import pipeline
from kd2edge.artifacts import write_artifact
from kd2edge.config import load_config
from kd2edge.errors import BudgetError, StageError

CALLS: list[str] = []


def _stage(name, metrics=None, fail_once=None):
    def run(config, input_artifact, out_dir):
        CALLS.append(name)
        # The payload depends on the stage's config and input, as a real stage's output does.
        (out_dir / "payload.txt").write_text(f"{name} from {input_artifact.stage}")
        (out_dir / "config.txt").write_text(repr(config.stage_config(name)) + input_artifact.content_hash)
        if fail_once and fail_once.pop():
            raise StageError(f"{name} failed")
        return write_artifact(out_dir, name, config.stage_config(name), input_artifact, metrics or {})
    module = types.ModuleType(f"fake_{name}")
    module.run = run
    return module


@pytest.fixture
def fake_stages(monkeypatch):
    CALLS.clear()
    modules = {}
    for name in pipeline.MODULES:
        modules[name] = _stage(name)
        monkeypatch.setitem(pipeline.MODULES, name, modules[name])
    return modules


def _config(tiny_llama_dir, **overrides):
    return load_config(overrides={"teacher": str(tiny_llama_dir), **overrides})


def test_runs_every_stage_in_order_then_skips_on_rerun(fake_stages, tiny_llama_dir, tmp_path):
    config = _config(tiny_llama_dir)
    report = pipeline.run_pipeline(config, tmp_path)
    assert CALLS == ["distill", "quantize", "export", "profile", "evaluate", "package"]
    assert (tmp_path / "export" / "payload.txt").read_text() == "export from quantize"
    assert (tmp_path / "evaluate" / "payload.txt").read_text() == "evaluate from export"
    assert (tmp_path / "report.json").is_file()
    assert report["pass"] is None  # no stage measured the budgets: verdict open, not faked
    CALLS.clear()
    report = pipeline.run_pipeline(config, tmp_path)
    assert CALLS == []
    assert {s["status"] for s in report["stages"].values()} == {"skipped"}


def test_a_changed_config_reruns_that_stage_and_everything_after(fake_stages, tiny_llama_dir, tmp_path):
    pipeline.run_pipeline(_config(tiny_llama_dir), tmp_path)
    CALLS.clear()
    pipeline.run_pipeline(_config(tiny_llama_dir, **{"quantize.damp": 0.02}), tmp_path)
    assert CALLS == ["quantize", "export", "profile", "evaluate", "package"]


def test_identical_output_is_content_addressed(fake_stages, tiny_llama_dir, tmp_path, monkeypatch):
    """A stage rerun that produces the same bytes does not invalidate what follows it."""
    pipeline.run_pipeline(_config(tiny_llama_dir), tmp_path)
    CALLS.clear()
    pipeline.run_pipeline(_config(tiny_llama_dir), tmp_path, force=True)
    assert CALLS == ["distill", "quantize", "export", "profile", "evaluate", "package"]
    before = (tmp_path / "report.json").read_text()
    assert '"status": "done"' in before


def test_a_failed_stage_leaves_no_folder_and_the_rerun_resumes(fake_stages, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.MODULES, "export", _stage("export", fail_once=[True]))
    config = _config(tiny_llama_dir)
    with pytest.raises(StageError):
        pipeline.run_pipeline(config, tmp_path)
    assert CALLS == ["distill", "quantize", "export"]
    assert not (tmp_path / "export").exists() and not (tmp_path / ".export.partial").exists()
    CALLS.clear()
    pipeline.run_pipeline(config, tmp_path)
    assert CALLS == ["export", "profile", "evaluate", "package"]


def test_the_pipeline_runs_the_configured_stages_each_on_its_input():
    from kd2edge.config import STAGE_SECTIONS, STAGES

    assert tuple(name for name, _, _ in pipeline.STAGES) == STAGES == tuple(STAGE_SECTIONS)
    order = ("teacher",) + STAGES
    for name, module, source in pipeline.STAGES:
        assert module.__name__.endswith(".stage") and callable(module.run)
        assert order.index(source) < order.index(name)   # every stage reads one that ran before it


def test_a_failed_budget_gates_after_the_report(fake_stages, tiny_llama_dir, tmp_path, monkeypatch):
    budgets = {"max_ttft_ms": {"limit": 1, "value": 5, "pass": False}}
    latency = {"ttft_ms_p50": 5, "decode_tokens_per_s": 10, "peak_rss_mb": 100}
    monkeypatch.setitem(pipeline.MODULES, "profile", _stage("profile", {"budgets": budgets, "latency": latency}))
    with pytest.raises(BudgetError, match=r"max_ttft_ms \(5 vs limit 1\)"):
        pipeline.run_pipeline(_config(tiny_llama_dir), tmp_path)
    assert (tmp_path / "report.json").is_file()
    no_gate = pipeline.run_pipeline(_config(tiny_llama_dir, **{"profiling.gate": False}), tmp_path / "b")
    assert no_gate["pass"] is False and no_gate["latency"]["ttft_ms_p50"] == 5

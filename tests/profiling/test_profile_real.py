"""A real profile of a tiny exported artifact: the stage, the CLI and its gate, errors, fallback."""

from __future__ import annotations

import json

import pytest

from kd2edge.artifacts import Artifact
from kd2edge.cli import main
from kd2edge.config import load_config
from kd2edge.errors import ConfigError
from kd2edge.profiling.stage import LATENCY_PNG, PROFILE_JSON, TTFT_PNG, profile_to_folder
from kd2edge.resources import folder_size


def test_stage_profiles_a_real_artifact(exported_tiny, write_profile, tmp_path):
    config = load_config(profile=str(write_profile()))
    art = profile_to_folder(config, exported_tiny, tmp_path / "profile")
    lat, checks = art.metrics["latency"], art.metrics["checks"]

    assert checks["torch_free"] and checks["full_runs"] and checks["timings_within_wall"]
    assert 0 < checks["timed_fraction_min"] <= 1
    assert set(lat["ttft_ms_by_prompt"]) == {"8", "32"} and lat["ttft_prompt_tokens"] == 32
    for s in lat["ttft_ms_by_prompt"].values():
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["max"]
    assert lat["ttft_ms_p50"] == lat["ttft_ms_by_prompt"]["32"]["p50"]
    tl = lat["token_latency_ms"]
    assert 0 < tl["p50"] <= tl["p90"] <= tl["p99"]
    assert lat["decode_tokens_per_s"] > 0 and lat["decode_tokens_per_s_spread"] >= 0
    assert lat["size_bytes"] == folder_size(exported_tiny)
    assert lat["peak_rss_mb"] > lat["rss_before_load_mb"] > 0 and lat["load_s"] > 0
    assert lat["providers"] == ["CPUExecutionProvider"] and lat["fallback"] is False
    assert lat["host"]["cpu_model"] and lat["host"]["onnxruntime"]

    budgets = art.metrics["budgets"]
    assert set(budgets) == {"max_artifact_mb", "max_peak_memory_mb", "max_ttft_ms", "min_decode_tokens_per_s"}
    assert budgets["max_artifact_mb"]["value"] == pytest.approx(lat["size_bytes"] / 2**20, abs=1e-3)
    assert budgets["max_ttft_ms"]["value"] == pytest.approx(lat["ttft_ms_p50"])
    assert all(b["pass"] is True for b in budgets.values())

    profile_json = json.loads((art.path / PROFILE_JSON).read_text())
    runs = profile_json["runs"]["32"]
    assert len(runs) == 2 and all(len(r["token_latencies_s"]) == 7 for r in runs)  # 8 new tokens: 1 + 7 steps
    for png in (LATENCY_PNG, TTFT_PNG):
        assert (art.path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert art.manifest["input"]["stage"] == "export"

    base = art.metrics["baseline_teacher"]  # the teacher found through the lineage, timed in PyTorch
    assert base["status"] == "done", base
    assert base["id"] == "tiny-teacher" and base["prompt_tokens"] == 8 and base["new_tokens"] == 8
    assert base["ttft_ms_p50"] > 0 and base["decode_tokens_per_s"] > 0 and base["peak_rss_mb"] > 0


def test_cli_gate_fails_a_tight_budget(exported_tiny, write_profile, tmp_path, capsys):
    tight = write_profile("tight", lengths=(8,), min_decode=1e12)
    argv = ["profile", str(exported_tiny), "-p", str(tight), "--out", str(tmp_path / "p"), "--no-baseline"]
    assert main(argv) == 7
    err = capsys.readouterr().err
    assert "budget missed: min_decode_tokens_per_s" in err and "max_ttft_ms" not in err.split("budget missed")[1]
    assert (tmp_path / "p" / PROFILE_JSON).is_file()  # the figures are kept even when the gate fails

    assert main(argv + ["--no-gate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budgets"]["min_decode_tokens_per_s"]["pass"] is False
    assert out["baseline_teacher"]["status"] == "skipped"


def test_prompt_beyond_context_is_a_config_error(exported_tiny, write_profile, tmp_path, capsys):
    # the tiny model's max_position_embeddings is 512: 600 + 8 tokens cannot fit
    config = load_config(profile=str(write_profile("long", lengths=(600,))))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        profile_to_folder(config, exported_tiny, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    assert main(["profile", str(exported_tiny), "-p", str(write_profile("long2", lengths=(600,))),
                 "--out", str(tmp_path / "p2")]) == 2
    assert "600 + 8 new tokens exceed the context of 512" in capsys.readouterr().err


def test_missing_provider_errors_or_falls_back(exported_tiny, write_profile, tmp_path):
    # CoreML exists only on macOS builds of onnxruntime
    profile = write_profile("coreml", lengths=(8,), providers=("CoreMLExecutionProvider", "CPUExecutionProvider"),
                            accelerator="Apple Neural Engine")
    with pytest.raises(ConfigError, match="CoreMLExecutionProvider is not available"):
        profile_to_folder(load_config(profile=str(profile)), exported_tiny, tmp_path / "a")
    config = load_config(profile=str(profile), overrides={"profiling.allow_fallback": True,
                                                          "profiling.baseline_teacher": False})
    art = profile_to_folder(config, exported_tiny, tmp_path / "b")
    assert art.metrics["latency"]["providers"] == ["CPUExecutionProvider"]
    assert art.metrics["latency"]["fallback"] is True
    assert any("CoreMLExecutionProvider" in w for w in art.manifest["warnings"])
    saved = json.loads((art.path / PROFILE_JSON).read_text())
    assert saved["latency"]["fallback"] is True and saved["notes"]


def test_find_teacher_walks_the_lineage(exported_tiny):
    from kd2edge.profiling.baseline import find_teacher

    teacher = find_teacher(Artifact.load(exported_tiny))
    assert teacher is not None and teacher.manifest["id"] == "tiny-teacher"
    assert find_teacher(Artifact.load(exported_tiny.parent / "distill").input_artifact()) is None

"""The distill stage end to end on tiny models: three architectures, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd2edge.config import load_config
from kd2edge.errors import BudgetError, ConfigError, DataError, Interrupted, ModelError
from kd2edge.models import resolve_model
from kd2edge.pipeline import run_stage
from kd2edge.testing import tiny_model_dir

FAST = {"distill.steps": 4, "distill.batch_size": 4, "distill.max_param_fraction": 0.9, "distill.eval_limit": 3,
        "evaluate.max_new_tokens": 3, "evaluate.shots": 0, "distill.checkpoint_every": 2, "distill.lr": 1e-3,
        "distill.topk_logits": 16}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """4-layer tiny teachers (a 2-layer one has no student under the default parameter cap)."""
    root = tmp_path_factory.mktemp("teachers")
    return {arch: tiny_model_dir(root / arch, arch, num_layers=4) for arch in ("llama", "qwen2", "gpt_neox")}


def _config(teacher: Path, **overrides):
    return load_config(profile="laptop-cpu", overrides={"teacher": str(teacher), **FAST, **overrides})


def _run(teacher: Path, out: Path, **overrides):
    return run_stage("distill", _config(teacher, **overrides), resolve_model(str(teacher)), out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_distill_tiny_architectures(teachers, tmp_path, arch):
    result = _run(teachers[arch], tmp_path / "distill")
    assert result.status == "done"
    folder = result.artifact.path
    for name in ("model.safetensors", "config.json", "tokenizer.json", "loss_history.csv", "loss_curve.png"):
        assert (folder / name).is_file(), name
    m = result.artifact.metrics
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == m["student"]["layers"] == len(m["student"]["layers_kept"])
    kept = m["student"]["layers_kept"]
    assert kept[0] == 0 and kept[-1] == 3 and len(m["student"]["importance"]) == 4
    assert 0 < m["param_reduction"] < 1 and m["student"]["params"] < m["teacher"]["params"]
    assert m["reload_max_abs_diff"] <= 1e-4
    assert len((folder / "loss_history.csv").read_text().strip().splitlines()) == 1 + 4
    for key in ("f1_before", "f1_after", "em_before", "em_after", "kd_loss_first", "kd_loss_last"):
        assert isinstance(m[key], float), key
    # The saved folder is a normal transformers model that generates.
    from kd2edge.models import load_causal_lm

    model, tok = load_causal_lm(folder)
    out = model.generate(input_ids=tok("Question: Who?", return_tensors="pt")["input_ids"], max_new_tokens=2,
                         do_sample=False)
    assert out.shape[1] >= 3


def test_kd_loss_falls_when_training_longer(teachers, tmp_path):
    m = _run(teachers["llama"], tmp_path / "distill", **{"distill.steps": 12, "distill.kd_ratio": 1.0,
                                                        "distill.lr": 3e-3}).artifact.metrics
    assert m["kd_loss_last"] < 0.8 * m["kd_loss_first"]


def test_resume_after_interruption_gives_identical_weights(teachers, tmp_path, monkeypatch):
    import kd2edge.distill.train as train

    reference = _run(teachers["llama"], tmp_path / "a" / "distill", **{"distill.steps": 6})
    saved = train.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        saved(path, *args, **kwargs)
        raise Interrupted("stopped by SIGTERM")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    out = tmp_path / "b" / "distill"
    with pytest.raises(Interrupted):
        _run(teachers["llama"], out, **{"distill.steps": 6})
    assert not out.exists() and (tmp_path / "b" / ".distill.work" / "checkpoint.pt").is_file()
    monkeypatch.setattr(train, "save_checkpoint", saved)
    resumed = _run(teachers["llama"], out, **{"distill.steps": 6})
    assert resumed.artifact.metrics["train"]["resumed_from"] == 2
    a = load_file(reference.artifact.path / "model.safetensors")
    b = load_file(resumed.artifact.path / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.artifact.metrics["loss_last"] == reference.artifact.metrics["loss_last"]
    assert not (tmp_path / "b" / ".distill.work").exists()


def test_student_with_another_tokenizer_is_refused(teachers, tmp_path):
    from transformers import AutoTokenizer

    student = tiny_model_dir(tmp_path / "student", "llama", num_layers=1)
    tok = AutoTokenizer.from_pretrained(student)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(student)
    with pytest.raises(ModelError, match="does not share the teacher's tokenizer"):
        _run(teachers["llama"], tmp_path / "distill", **{"distill.student": str(student)})


def test_student_larger_than_teacher_is_refused(teachers, tmp_path):
    big = tiny_model_dir(tmp_path / "big", "llama", num_layers=6)
    with pytest.raises(ModelError, match="not fewer than the teacher"):
        _run(teachers["llama"], tmp_path / "distill", **{"distill.student": str(big)})


def test_separate_smaller_student_is_trained(teachers, tmp_path):
    small = tiny_model_dir(tmp_path / "small", "llama", num_layers=1, seed=3)
    m = _run(teachers["llama"], tmp_path / "distill", **{"distill.student": str(small)}).artifact.metrics
    assert m["student"]["layers"] == 1 and m["student"]["layers_kept"] is None


def test_dataset_without_usable_items_fails_fast(teachers, tmp_path):
    with pytest.raises(DataError, match="no usable training item"):
        _run(teachers["llama"], tmp_path / "distill", **{"distill.max_length": 16})


def test_profile_no_candidate_fits(teachers, tmp_path):
    from kd2edge.profiles import profiles_dir

    text = (profiles_dir() / "laptop-cpu.toml").read_text().replace("min_decode_tokens_per_s = 20",
                                                                      "min_decode_tokens_per_s = 1e12")
    profile = tmp_path / "impossible.toml"
    profile.write_text(text)
    config = load_config(profile=str(profile), overrides={"teacher": str(teachers["llama"]), **FAST})
    with pytest.raises(BudgetError, match="no student fits"):
        run_stage("distill", config, resolve_model(str(teachers["llama"])), tmp_path / "distill")


@pytest.mark.parametrize("overrides, message", [
    ({"distill.temperature": 0}, "temperature: 0.0 is below the minimum"),
    ({"distill.kd_ratio": 1.5}, "kd_ratio: 1.5 is above the maximum"),
    ({"distill.loss": "jsd", "distill.jsd_beta": 1.0}, "strictly between 0 and 1"),
    ({"distill.loss": "l2"}, "is not one of"),
])
def test_out_of_range_loss_parameters(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(profile="laptop-cpu", overrides=overrides)


@pytest.mark.parametrize("overrides", [{"distill.loss": "none"},
                                       {"distill.topk_logits": 0, "distill.loss": "jsd"},
                                       {"distill.loss": "reverse_kl", "distill.shots": 1}])
def test_loss_variants_and_full_vocab_cache(teachers, tmp_path, overrides):
    m = _run(teachers["qwen2"], tmp_path / "distill", **overrides).artifact.metrics
    if overrides["distill.loss"] == "none":
        assert m["kd_loss_first"] == 0.0 and m["loss_first"] > 0
    else:
        assert m["kd_loss_first"] > 0
    assert m["train"]["topk_logits"] == overrides.get("distill.topk_logits", 16)


def test_distill_cli_json_and_rerun_skips(teachers, tmp_path):
    from click.testing import CliRunner

    from kd2edge.distill.cli import distill

    config = tmp_path / "run.json"
    nested: dict = {}
    for key, value in FAST.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    config.write_text(json.dumps(nested))
    args = ["--teacher", str(teachers["gpt_neox"]), "--config", str(config), "--out", str(tmp_path / "s"),
            "--steps", "3", "--kd-ratio", "0.7", "--json"]
    first = CliRunner().invoke(distill, args)
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["status"] == "done" and data["kd_ratio"] == 0.7 and data["train"]["steps"] == 3
    second = CliRunner().invoke(distill, args)
    assert json.loads(second.stdout)["status"] == "skipped"

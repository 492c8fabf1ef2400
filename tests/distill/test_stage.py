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

FAST = {"data": "embedded", "distill.steps": 4, "distill.batch_size": 4, "distill.max_param_fraction": 0.9, "distill.eval_limit": 3,
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


def _kd_history(artifact) -> list[float]:
    import csv

    with open(artifact.path / artifact.metrics["loss_history"], encoding="utf-8") as fh:
        return [float(row["kd"]) for row in csv.DictReader(fh)]


def test_kd_loss_falls_when_training_longer(teachers, tmp_path):
    """The divergence of the last 3 steps against the first 3 (one step's loss depends on its batch's
    sequences, which length grouping makes alike)."""
    kd = _kd_history(_run(teachers["llama"], tmp_path / "distill", **{"distill.steps": 12, "distill.kd_ratio": 1.0,
                                                                     "distill.lr": 3e-3}).artifact)
    assert sum(kd[-3:]) < 0.9 * sum(kd[:3])   # 2.93 -> 2.37 here


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
        *section, name = key.split(".")
        (nested.setdefault(section[0], {}) if section else nested)[name] = value
    config.write_text(json.dumps(nested))
    args = ["--teacher", str(teachers["gpt_neox"]), "--config", str(config), "--out", str(tmp_path / "s"),
            "--steps", "3", "--kd-ratio", "0.7", "--json"]
    first = CliRunner().invoke(distill, args)
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["status"] == "done" and data["kd_ratio"] == 0.7 and data["train"]["steps"] == 3
    second = CliRunner().invoke(distill, args)
    assert json.loads(second.stdout)["status"] == "skipped"


def test_a_trimmed_vocabulary_is_one_consistent_model_and_counts_honestly(teachers, tmp_path):
    """vocab_size below the teacher's: fewer embedding rows, a tokenizer of the same size, ids remapped."""
    from kd2edge.models import count_params, load_causal_lm

    result = _run(teachers["llama"], tmp_path / "distill", **{"distill.vocab_size": 300})
    folder, m = result.artifact.path, result.artifact.metrics
    model, tokenizer = load_causal_lm(folder)
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 300
    assert m["student"]["vocabulary"]["size"] == 300 and m["student"]["vocabulary"]["teacher_size"] == 400
    old_ids = json.loads((folder / "vocab_trim.json").read_text())["old_ids"]
    teacher, teacher_tok = load_causal_lm(teachers["llama"])
    text = "Context: The Velmora Institute was founded in 1871.\nQuestion: When?"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text   # round trip
    # Every student token is the teacher token old_ids[id]: same strings.
    assert tokenizer.convert_ids_to_tokens(list(range(300))) == teacher_tok.convert_ids_to_tokens(old_ids)
    # Parameters count the dropped rows once (tied): the untrimmed student of the same depth has 100 x 64 more.
    full = _run(teachers["llama"], tmp_path / "full").artifact.metrics
    assert full["student"]["params"] - m["student"]["params"] == 100 * 64
    assert m["student"]["params"] == count_params(model) and m["param_reduction"] > full["param_reduction"]
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids(teacher_tok.convert_ids_to_tokens(
        teacher.config.eos_token_id))


def test_teacher_logits_for_a_trimmed_student_are_the_kept_columns(teachers):
    """The teacher reads the student's sequence in its own ids; its rows are its logits at the kept columns."""
    from kd2edge.distill.data import compute_teacher_logits
    from kd2edge.distill.train import TrainExample
    from kd2edge.models import load_causal_lm

    teacher, _ = load_causal_lm(teachers["llama"])
    old_ids = list(range(0, 400, 2))                                      # the student keeps the even ids
    student_ids = (5, 17, 3, 40, 2)
    example = TrainExample(student_ids, (-100, -100, -100, 2, -100))
    (rows,) = compute_teacher_logits(teacher, [example], vocab_size=200, topk=0, pad_id=0, kd_positions="all",
                                     old_ids=old_ids, progress=False)
    with torch.no_grad():
        full = teacher(input_ids=torch.tensor([[old_ids[i] for i in student_ids]])).logits[0, :-1]   # [4, 400]
    assert rows.shape == (4, 200)                                          # every position but the last
    assert torch.allclose(rows.float(), full[:, ::2], atol=1e-2)            # fp16 storage of the full rows
    (answer,) = compute_teacher_logits(teacher, [example], vocab_size=200, topk=0, pad_id=0, old_ids=old_ids,
                                       progress=False)
    assert torch.allclose(answer.float(), full[3:4, ::2], atol=1e-2)        # "answer": the one labelled position


def test_collate_scores_every_predicting_position_or_only_the_answer():
    from kd2edge.distill.train import TrainExample, collate

    a, b = TrainExample((1, 2, 3, 4), (-100, -100, 4, -100)), TrainExample((5, 6), (6, -100))
    everything, answer = collate([a, b], 0, "all"), collate([a, b], 0, "answer")
    assert everything["scored"].tolist() == [[True, True, True, False], [True, False, False, False]]
    assert answer["scored"].tolist() == [[False, False, True, False], [True, False, False, False]]
    assert a.scored_positions("all") == 3 and a.scored_positions("answer") == 1


def test_a_width_pruned_student_keeps_fewer_mlp_neurons_and_the_plan_counts_them(teachers, tmp_path):
    m = _run(teachers["llama"], tmp_path / "distill", **{"distill.intermediate_size": 64}).artifact
    config = json.loads((m.path / "config.json").read_text())
    assert config["intermediate_size"] == 64 and "[MLP 64 of 128]" in m.metrics["student"]["id"]
    assert m.metrics["plan"]["assumptions"]["intermediate_size"] == 64
    assert m.metrics["student"]["params"] == m.metrics["plan"]["choice"]["params"]


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_on_cpu_is_bf16_only_where_the_cpu_has_it(monkeypatch, native, expected):
    from kd2edge.distill import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    assert train.resolve_mixed_precision("auto") == expected
    assert train.resolve_mixed_precision("bf16") == "bf16"     # asked for: runs (emulated where not native)
    assert train.resolve_mixed_precision("fp16") == "no"       # fp16 autocast wants a GPU
    assert train.resolve_mixed_precision("no") == "no"


def test_bf16_teacher_logits_are_close_to_fp32_and_keyed_apart(teachers):
    """bf16 decoder layers with an fp32 head: the cached rows stay within bf16's rounding of the fp32
    ones, and the cache never hands one precision's rows to the other."""
    from kd2edge.distill.data import compute_teacher_logits, teacher_cache_key
    from kd2edge.distill.train import TrainExample
    from kd2edge.models import load_causal_lm

    teacher, _ = load_causal_lm(teachers["llama"])
    example = TrainExample((5, 17, 3, 40, 2, 9, 11), (-100, -100, -100, 2, 9, -100, -100))
    kwargs = dict(vocab_size=400, topk=0, pad_id=0, kd_positions="all", progress=False)
    (fp32,) = compute_teacher_logits(teacher, [example], **kwargs)
    (bf16,) = compute_teacher_logits(teacher, [example], bf16=True, **kwargs)
    assert fp32.shape == bf16.shape == (6, 400)
    diff = (fp32.float() - bf16.float()).abs()
    assert 0 < diff.max() < 0.05 * fp32.float().abs().max()
    assert teacher_cache_key("t", [example], topk=0) != teacher_cache_key("t", [example], topk=0, bf16=True)
    assert teacher_cache_key("t", [example], topk=0) == teacher_cache_key("t", [example], topk=0, bf16=False)


def test_bf16_training_on_cpu_is_recorded_and_learns(teachers, tmp_path):
    artifact = _run(teachers["llama"], tmp_path / "distill", **{"distill.steps": 12, "distill.kd_ratio": 1.0,
                                                               "distill.lr": 3e-3, "distill.mixed_precision": "bf16"}
                    ).artifact
    m = artifact.metrics
    assert m["train"]["mixed_precision"] == "bf16"
    assert m["distributed"]["teacher_cache"]["precision"] == "bf16 layers, fp32 head"
    kd = _kd_history(artifact)
    assert sum(kd[-3:]) < 0.9 * sum(kd[:3])   # 2.93 -> 2.37 here

"""Issue #9 in the distill stage: rationale / critique-revision teacher data, the training
methods, GRPO after KD, the config rule and the CLI flags, on a tiny llama.

The tiny teacher writes garbage, so its generation is replaced by a scripted one that
answers every question with a well-formed "Rationale: ... Answer: <gold>" (the filter
then keeps every item), or with nothing usable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd2edge.config import load_config
from kd2edge.data.loaders import load_qa
from kd2edge.errors import ConfigError, DataError
from kd2edge.models import resolve_model
from kd2edge.pipeline import run_stage
from kd2edge.testing import tiny_model_dir

N_TRAIN = 5
FAST = {"data": "embedded", "distill.steps": 2, "distill.batch_size": 4, "distill.max_param_fraction": 0.9, "distill.eval_limit": 2,
        "evaluate.max_new_tokens": 3, "evaluate.shots": 0, "distill.checkpoint_every": 2, "distill.lr": 1e-3,
        "distill.topk_logits": 16, "distill.train_limit": N_TRAIN}
RATIONALE = "The context states this directly"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("teacher") / "llama", "llama", num_layers=4)


def _gold_by_question() -> dict[str, str]:
    items = load_qa("embedded", "train", N_TRAIN, 0).items
    return {it.question: it.gold[0] for it in items}


def scripted_teacher(monkeypatch, reply=None) -> list[tuple[str, int]]:
    """Replace the teacher's generation; returns the (step, number of prompts) calls it saw."""
    import kd2edge.reasoning.generate as generate

    gold, calls = _gold_by_question(), []

    def fake(model, tokenizer, prompts, max_new_tokens=128, batch_size=8, desc="generate", progress=True,
             primers=None):
        calls.append((desc, len(prompts)))
        if reply is not None:
            return [reply for _ in prompts]
        out = []
        for prompt in prompts:
            if desc == "critique":
                out.append("The reasoning is sound and reaches the correct answer.")
                continue
            # The question asked is the last "Question:" line (the worked example comes first).
            question = [line for line in prompt.splitlines() if line.startswith("Question: ")][-1][len("Question: "):]
            out.append(f"Rationale: {RATIONALE}.\nAnswer: {gold[question]}")
        return out

    monkeypatch.setattr(generate, "greedy_generate", fake)
    return calls


def _run(teacher: Path, out: Path, **overrides):
    config = load_config(profile="laptop-cpu", overrides={"teacher": str(teacher), **FAST, **overrides})
    return run_stage("distill", config, resolve_model(str(teacher)), out)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_rationale_data_rationale_training(teacher, tmp_path, monkeypatch):
    calls = scripted_teacher(monkeypatch)
    art = _run(teacher, tmp_path / "distill", **{"distill.data_method": "rationale",
                                                  "distill.train_method": "rationale"}).artifact
    assert calls == [("rationale", N_TRAIN)]           # one batched pass over the training items
    m = art.metrics
    r = m["reasoning"]
    assert (r["items"], r["kept"], r["usable_rationales"], r["pairs"]) == (N_TRAIN, N_TRAIN, N_TRAIN, N_TRAIN)
    assert r["pairs_by_task"] == {"rationale": N_TRAIN} and r["dropped"] == {}
    assert m["train"]["items"] == N_TRAIN and m["train_method"] == "rationale"
    records = _lines(art.path / "teacher_data.jsonl")
    assert [x["kept"] for x in records] == [True] * N_TRAIN
    assert all(x["rationale"] == RATIONALE + "." and x["score"] == 1.0 for x in records)
    # The student is scored as it was trained: asked with the rationale prompt, so the
    # answer budget is the rationale one (not evaluate.max_new_tokens = 3).
    assert isinstance(m["f1_after"], float) and "grpo" not in m


def test_multitask_pairs_two_examples_per_item(teacher, tmp_path, monkeypatch):
    scripted_teacher(monkeypatch)
    m = _run(teacher, tmp_path / "distill", **{"distill.data_method": "rationale",
                                                "distill.train_method": "multitask"}).artifact.metrics
    assert m["reasoning"]["pairs_by_task"] == {"answer": N_TRAIN, "rationale": N_TRAIN}
    assert m["train"]["items"] == 2 * N_TRAIN and m["train_method"] == "multitask"


def test_critique_revision_data_answer_training(teacher, tmp_path, monkeypatch):
    calls = scripted_teacher(monkeypatch)
    art = _run(teacher, tmp_path / "distill", **{"distill.data_method": "critique-revision"}).artifact
    assert [c[0] for c in calls] == ["draft", "critique", "revision"]
    records = _lines(art.path / "teacher_data.jsonl")
    assert all(list(x["outputs"]) == ["draft", "critique", "revision"] and x["kept"] for x in records)
    assert art.metrics["reasoning"]["pairs_by_task"] == {"answer": N_TRAIN}
    assert art.metrics["train_method"] == "answer"


def test_training_targets_are_the_method_pairs(teacher, tmp_path, monkeypatch):
    """The examples handed to the training loop are prompt + target + EOS of the method's pairs."""
    import kd2edge.distill.train as train
    from transformers import AutoTokenizer

    from kd2edge.data.prompts import rationale_student_prompt

    scripted_teacher(monkeypatch)
    seen = {}
    real = train.train_student

    def spy(student, examples, *args, **kwargs):
        seen["examples"] = examples
        return real(student, examples, *args, **kwargs)

    monkeypatch.setattr(train, "train_student", spy)
    _run(teacher, tmp_path / "distill", **{"distill.data_method": "rationale", "distill.train_method": "rationale"})
    tok = AutoTokenizer.from_pretrained(teacher)
    item = load_qa("embedded", "train", N_TRAIN, 0).items[0]
    ex = seen["examples"][0]
    prompt = tok.apply_chat_template([{"role": "user", "content": rationale_student_prompt(item)}], tokenize=False,
                                     add_generation_prompt=True)
    target = f" {RATIONALE}.\nAnswer: {item.gold[0]}"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = [t for t in ex.labels if t != -100]
    assert tok.decode(answer_ids) == target + tok.eos_token       # only the target (and EOS) is learnt
    assert len(ex.input_ids) == n_prompt + len(answer_ids) and ex.item_id == item.id


def test_no_usable_rationale_fails_before_training(teacher, tmp_path, monkeypatch):
    import kd2edge.distill.train as train

    scripted_teacher(monkeypatch, reply="I do not know.")

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train_student", never)
    with pytest.raises(DataError, match="no teacher record was kept"):
        _run(teacher, tmp_path / "distill", **{"distill.data_method": "rationale",
                                                "distill.train_method": "rationale", "distill.keep": "all"})
    assert not (tmp_path / "distill").exists()


def test_teacher_records_cached_in_work_dir(teacher, tmp_path, monkeypatch):
    from kd2edge.data.items import QAItem
    from kd2edge.reasoning.generate import cached_teacher_records

    def teacher_records(*args, **kwargs):
        return cached_teacher_records(*args, min_score=0.5, max_new_tokens=160, **kwargs)

    calls = scripted_teacher(monkeypatch)
    items = load_qa("embedded", "train", 2, 0).items
    cache = tmp_path / "records.jsonl"
    first = teacher_records(None, None, items, "rationale", "correct", cache, batch_size=2, progress=False)
    again = teacher_records(None, None, items, "rationale", "correct", cache, batch_size=2, progress=False)
    assert [r.to_json() for r in again] == [r.to_json() for r in first] and len(calls) == 1                     # read back, not generated again
    other = [QAItem(id="zz", question=items[0].question, context=items[0].context, answers=items[0].answers)]
    teacher_records(None, None, other, "rationale", "correct", cache, batch_size=2, progress=False)
    assert len(calls) == 2                                         # other items: generated anew


def test_grpo_after_kd(teacher, tmp_path, monkeypatch):
    scripted_teacher(monkeypatch)
    art = _run(teacher, tmp_path / "distill", **{"distill.data_method": "rationale",
                                                  "distill.train_method": "rationale",
                                                  "distill.grpo_steps": 2}).artifact
    m = art.metrics
    assert [row["step"] for row in m["grpo"]] == [1, 2]
    for row in m["grpo"]:
        assert row["reward"] == pytest.approx(row["correctness"] + 0.2 * row["format"], abs=1e-6)
    info = m["grpo_info"]
    assert info["weights"] == {"correctness": 1.0, "format": 0.2} and info["reload_max_abs_diff"] == 0.0
    assert isinstance(info["f1_after_kd"], float)
    assert (art.path / info["plot"]).is_file() and m["reload_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"distill.train_method": "rationale"}, "train_method: 'rationale' needs rationales"),
    ({"distill.data_method": "rationale", "distill.sequence_kd": True}, "sequence_kd: the teacher already writes"),
    ({"distill.data_method": "rationale", "distill.grpo_steps": 3}, "grpo_steps: GRPO samples the rationale prompt"),
    ({"distill.grpo_steps": -1}, "grpo_steps: -1 is below the minimum"),
    ({"distill.data_method": "cot"}, "is not one of"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(profile="laptop-cpu", overrides=overrides)


def test_defaults_keep_the_answer_path():
    d = load_config(profile="laptop-cpu").distill
    assert (d.data_method, d.train_method, d.keep, d.grpo_steps) == ("answer", "answer", "correct", 0)


def test_cli_flags(teacher, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kd2edge.distill.cli import distill

    scripted_teacher(monkeypatch)
    from kd2edge.config import dump_config

    config = tmp_path / "run.json"
    config.write_text(dump_config(load_config(profile="laptop-cpu", overrides=FAST)))
    args = ["--teacher", str(teacher), "--config", str(config), "--out", str(tmp_path / "s"),
            "--data-method", "critique-revision", "--train-method", "multitask", "--keep", "all", "--json"]
    result = CliRunner().invoke(distill, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["reasoning"]["data_method"] == "critique-revision" and data["reasoning"]["keep"] == "all"
    assert data["train_method"] == "multitask" and data["train"]["items"] == 2 * N_TRAIN
    bad = CliRunner().invoke(distill, ["--teacher", str(teacher), "--out", str(tmp_path / "t"),
                                       "--train-method", "rationale"])
    assert bad.exit_code != 0 and not (tmp_path / "t").exists()

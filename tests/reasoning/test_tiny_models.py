"""generate-data, GRPO and rationale evaluation end to end on the tiny in-process llama.

The tiny model's text is garbage: these tests check the file schema, the filter
decisions, that GRPO logs rewards and saves a changed model, and the bad inputs.
"""

from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner

from kd2edge.data.items import QAItem
from kd2edge.errors import DataError
from kd2edge.reasoning.cli import generate_data as generate_data_cmd
from kd2edge.reasoning.generate import DATA_METHODS, NO_ANSWER, NO_RATIONALE, WRONG_ANSWER, generate_data

RECORD_KEYS = {"id", "method", "item", "student_prompt", "prompts", "outputs", "rationale", "answer", "score",
               "kept", "drop_reason"}
# Free-text items whose reference is made of the tiny tokenizer's corpus words, so sampled
# completions overlap it by varying amounts (Rouge-L) and GRPO's groups get unequal rewards.
CORPUS_ITEMS = [QAItem(id=f"f{i}", question="Describe the valley.", task="free_text",
                       answers=("A river flows north through the valley; its water feeds the orchards",))
                for i in range(4)]


def test_generate_data_cli_answer_method(tiny_llama_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(generate_data_cmd, [
        "--teacher", str(tiny_llama_dir), "--data", "embedded", "--method", "answer", "--out", str(out),
        "--limit", "3", "--max-new-tokens", "6", "--keep", "all", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["items"] == 3 and summary["method"] == "answer" and summary["usable_rationales"] is None
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3 and all(set(x) == RECORD_KEYS for x in lines)
    for x in lines:
        assert list(x["prompts"]) == list(x["outputs"]) == ["answer"]
        assert x["prompts"]["answer"] == x["student_prompt"] and x["student_prompt"].endswith("Answer:")
        # keep=all: an answer is kept whatever its score; only a missing answer is dropped.
        assert x["kept"] == (x["answer"] is not None)
        assert x["drop_reason"] in (None, NO_ANSWER, WRONG_ANSWER)
    assert summary["kept"] == sum(x["kept"] for x in lines)


@pytest.mark.parametrize("method", DATA_METHODS[1:])
def test_generate_data_without_usable_rationale(tiny_llama_dir, tmp_path, method):
    out = tmp_path / "rationales.jsonl"
    with pytest.raises(DataError, match="no usable 'Rationale: ... Answer: ...'"):
        generate_data(str(tiny_llama_dir), "embedded", method, out, limit=2, max_new_tokens=6, progress=False)
    # The file is still written, for inspection, with every step's prompt and output.
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    steps = ["rationale"] if method == "rationale" else ["draft", "critique", "revision"]
    assert len(lines) == 2 and all(list(x["outputs"]) == steps for x in lines)
    assert all(not x["kept"] and x["drop_reason"] in (NO_ANSWER, NO_RATIONALE) for x in lines)
    # Rationale replies are primed: the teacher continued "Rationale: The context says"; critiques are not.
    for x in lines:
        assert x["outputs"][steps[-1]].startswith("Rationale: The context says")
        assert not x["outputs"].get("critique", "").startswith("Rationale:")


def test_generate_data_bad_method(tiny_llama_dir, tmp_path):
    with pytest.raises(DataError, match="unknown data method"):
        generate_data(str(tiny_llama_dir), "embedded", "cot", tmp_path / "x.jsonl", limit=1)
    assert not (tmp_path / "x.jsonl").exists()


def _params(folder):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_grpo_few_steps_logs_rewards_and_saves(tiny_llama_dir, tmp_path):
    from kd2edge.artifacts import Artifact
    from kd2edge.reasoning.grpo import run_grpo

    out = tmp_path / "grpo"
    result = run_grpo(tiny_llama_dir, CORPUS_ITEMS, out, steps=2, reward_weights={"correctness": 1.0, "format": 0.5},
                      num_generations=4, max_new_tokens=12, lr=1e-2, seed=0, progress=False)
    assert [r["step"] for r in result["steps"]] == [1, 2]
    for row in result["steps"]:
        assert 0.0 <= row["correctness"] <= 1.0 and 0.0 <= row["format"] <= 1.0
        assert row["reward"] == pytest.approx(row["correctness"] + 0.5 * row["format"], abs=1e-6)
    assert any(r["reward_std"] > 0 for r in result["steps"])        # the groups were not all equal
    artifact = Artifact.load(out, stage="grpo")
    assert artifact.metrics["steps"] == result["steps"]
    assert result["reload_max_abs_diff"] == 0.0
    assert (out / "grpo_rewards.png").is_file() and (out / "tokenizer.json").is_file()
    before, after = _params(tiny_llama_dir), _params(out)
    assert max(float((before[k] - after[k]).abs().max()) for k in before) > 0   # GRPO moved the weights


def test_grpo_bad_inputs(tiny_llama_dir, tmp_path):
    from kd2edge.reasoning.grpo import run_grpo

    unlabelled = [QAItem(id="u", question="Why?", context="Because.", answers=())]
    with pytest.raises(DataError, match="gold answers"):
        run_grpo(tiny_llama_dir, unlabelled, tmp_path / "a", steps=1)
    with pytest.raises(DataError, match="num_generations=1"):
        run_grpo(tiny_llama_dir, CORPUS_ITEMS, tmp_path / "b", steps=1, num_generations=1)
    with pytest.raises(DataError, match="unknown reward"):
        run_grpo(tiny_llama_dir, CORPUS_ITEMS, tmp_path / "c", steps=1, reward_weights={"speed": 1.0})
    assert not any((tmp_path / n).exists() for n in "abc")


def test_grpo_all_zero_weights_warns(tiny_llama_dir, tmp_path, capsys):
    from kd2edge.reasoning.grpo import run_grpo

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_grpo(tiny_llama_dir, CORPUS_ITEMS[:1], tmp_path / "z", steps=1,
                          reward_weights={"correctness": 0.0, "format": 0.0}, num_generations=2,
                          max_new_tokens=4, progress=True)
    assert capsys.readouterr().out == ""        # logs and progress on stderr: stdout stays clean for --json
    texts = [str(w.message) for w in caught]
    assert any("GRPO learns nothing: every reward weight is 0" in t for t in texts)
    assert result["steps"][0]["reward"] == 0.0 and result["warnings"]


def test_evaluate_with_rationales(tiny_llama_dir):
    from kd2edge.scoring.methods import evaluate_with_rationales, score_rationale_output

    item = QAItem(id="m0", question="Where does the river flow?", choices=("north", "south", "east"),
                  choice_labels=("A", "B", "C"), answer_key="A", task="multiple_choice")
    record = score_rationale_output(" The text says it flows north.\nAnswer: (A)", item)
    assert record["choice"] == "A" and record["correct"] and record["format"] == 1.0
    assert score_rationale_output(" no idea", item)["choice"] is None
    items = [item, QAItem(id="m1", question="What does the port export?", choices=("coffee", "steel", "cars"),
                          choice_labels=("A", "B", "C"), answer_key="A", task="multiple_choice")]
    result = evaluate_with_rationales(tiny_llama_dir, items, max_new_tokens=6, progress=False)
    assert result["n"] == 2 and len(result["records"]) == 2
    assert result["plain"]["mode"] == "loglik" and 0.0 <= result["plain"]["accuracy"] <= 1.0
    correct = sum(r["correct"] for r in result["records"])
    assert result["rationale"]["accuracy"] == correct / 2
    with pytest.raises(DataError, match="multiple-choice items"):
        evaluate_with_rationales(tiny_llama_dir, CORPUS_ITEMS[:1])


def test_grpo_cli_rejects_bad_reward_weights(tiny_llama_dir, tmp_path):
    from kd2edge.errors import ConfigError
    from kd2edge.reasoning.cli import grpo

    with pytest.raises(ConfigError, match="--rewards: unknown reward 'speed'"):
        CliRunner().invoke(grpo, ["--model", str(tiny_llama_dir), "--out", str(tmp_path / "g"),
                                  "--rewards", "speed=1"], catch_exceptions=False)
    assert not (tmp_path / "g").exists()

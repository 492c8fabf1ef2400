"""Students trained with rationales, evaluated as they were trained (issue #9 in the evaluate stage).

Scoring is checked on scripted outputs (a fake backend) with hand-computed figures; the
stage is run on a tiny teacher/student/ONNX lineage whose distill manifest names the
training method.
"""

from __future__ import annotations

import json
import shutil

import pytest

from kd2edge.artifacts import Artifact, write_artifact
from kd2edge.config import load_config
from kd2edge.data.items import QADataset, QAItem
from kd2edge.errors import ArtifactError
from kd2edge.scoring.evaluator import EvalSet, Prompted
from kd2edge.pipeline import run_stage
from kd2edge.scoring.methods import (RATIONALE_MAX_NEW_TOKENS, method_evalset, rationale_comparison,
                                          run_method_items)
from kd2edge.data.prompts import ANSWER_PREFIX, rationale_student_prompt

MC = [QAItem(id=f"m{i}", question=q, choices=("fridge", "bank account", "the river"),
             choice_labels=("A", "B", "C"), answer_key=key, task="multiple_choice")
      for i, (q, key) in enumerate([("Where do you keep milk?", "A"), ("Where is money?", "B"),
                                    ("What is wet?", "C")])]
EX = QAItem(id="x0", question="Who founded it?", context="It was founded by Adaline Qorr.", answers=("Adaline Qorr",))


class Scripted:
    """A backend that answers from a script (keyed by a substring of the prompt) and records its calls."""

    kind, batch_size = "scripted", 2

    def __init__(self, script: dict[str, str]):
        self.script, self.calls = script, []

    def format_prompt(self, text: str) -> str:
        return f"<user>{text}</user>"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def generate(self, prompts, max_new_tokens):
        self.calls.append((len(prompts), max_new_tokens))
        return [next(v for k, v in self.script.items() if k in p) for p in prompts]

    def token_logprobs(self, sequences):
        import numpy as np

        # Every choice continuation scores its length in tokens: the longest choice wins ("bank account").
        return [np.zeros(len(s) - 1) + 1.0 for s in sequences]


def _evalset(items, prompts=None):
    from kd2edge.data.prompts import build_prompt

    return EvalSet(QADataset("t", "validation", tuple(items), items[0].task),
                   tuple(Prompted(it, p) for it, p in zip(items, prompts or [build_prompt(it) for it in items])),
                   shots=0, example_split=None)


def test_rationale_student_read_after_its_answer_label():
    backend = Scripted({"milk": " Milk is kept cold.\nAnswer: A", "money": " Money is in a bank.\nAnswer: (C)",
                        "wet": " Water is wet, rivers are water. The answer is the river."})
    records = run_method_items(backend, _evalset(MC), "rationale", max_new_tokens=24, progress=False)
    assert [r["choice"] for r in records] == ["A", "C", "C"]
    assert [r["accuracy"] for r in records] == [1.0, 0.0, 1.0]
    assert records[0]["prompt"] == f"<user>{rationale_student_prompt(MC[0])}</user>"
    assert records[0]["rationale"] == "Milk is kept cold." and records[1]["prediction"] == "the river"
    # Rationale budget, batches of the backend's size: 2 + 1 prompts.
    assert backend.calls == [(2, RATIONALE_MAX_NEW_TOKENS), (1, RATIONALE_MAX_NEW_TOKENS)]
    # The plain reader would have scored every one of these wrong: it reads the first line.
    plain = run_method_items(backend, _evalset(MC, [rationale_student_prompt(it) for it in MC]), "answer",
                             max_new_tokens=24, mode="generate", progress=False)
    assert [r["choice"] for r in plain] == [None, None, None]


def test_rationale_student_extractive_scores():
    backend = Scripted({"Adaline": " The text names the founder.\nAnswer: Qorr"})
    (record,) = run_method_items(backend, _evalset([EX]), "rationale", max_new_tokens=8, progress=False)
    # F1 of "Qorr" against "Adaline Qorr": P = 1, R = 1/2 -> 2/3; EM 0.
    assert record["prediction"] == "Qorr" and record["em"] == 0.0 and record["f1"] == pytest.approx(2 / 3)


def test_multitask_student_gets_the_answer_prefix():
    evalset = _evalset([EX])
    asked = method_evalset(evalset, "multitask")
    assert asked.prompts[0].text == ANSWER_PREFIX + evalset.prompts[0].text
    assert method_evalset(evalset, "answer") is evalset
    backend = Scripted({ANSWER_PREFIX: " Adaline Qorr\nmore"})
    (record,) = run_method_items(backend, evalset, "multitask", max_new_tokens=8, progress=False)
    assert record["em"] == 1.0 and backend.calls == [(1, 8)]


def test_rationale_comparison_reuses_outputs():
    backend = Scripted({})
    # Formatted = a labelled answer after a rationale of >= 3 words: only the first.
    outputs = [" Milk must stay cold.\nAnswer: A", " no idea", " Water.\nAnswer: the river"]
    result = rationale_comparison(backend, MC, max_new_tokens=16, progress=False, rationale_outputs=outputs)
    assert backend.calls == []                                  # nothing generated again
    assert result["rationale"] == {"accuracy": pytest.approx(2 / 3), "answered": pytest.approx(2 / 3),
                                   "formatted": pytest.approx(1 / 3)}
    # Plain log-likelihood: the scripted backend prefers the longest choice, "bank account" (B): 1 of 3.
    assert result["plain"] == {"accuracy": pytest.approx(1 / 3), "mode": "loglik"}


# ----------------------------------------------------------------------------- the stage

CSQA = [{"id": f"c{i}", "answerKey": key,
         "question": {"stem": stem, "choices": [{"label": lab, "text": text} for lab, text in
                                                zip("ABC", ["fridge", "bank account", "the river"])]}}
        for i, (stem, key) in enumerate([("Where do you keep milk?", "A"), ("Where is it cold?", "C"),
                                         ("What is wet?", "C")])]


@pytest.fixture(scope="module")
def lineages(tmp_path_factory):
    """{method: export artifact}: one tiny teacher, one student exported once, linked through distill
    manifests that name each training method."""
    from exporters.traced import export_with_past
    from kd2edge.testing import sharp_tiny_model, sharp_tiny_model_dir

    root = tmp_path_factory.mktemp("lineages")
    teacher = Artifact.external(sharp_tiny_model_dir(root / "teacher", "llama", seed=0), kind="model", id="t")
    student, tokenizer = sharp_tiny_model("llama", seed=1)
    export_with_past(student, tokenizer, root / "onnx")
    out = {}
    for method in ("rationale", "multitask"):
        run = root / method
        (run / "distill").mkdir(parents=True)
        student.save_pretrained(run / "distill")
        tokenizer.save_pretrained(run / "distill")
        distill = write_artifact(run / "distill", "distill", {}, teacher, {"train_method": method})
        (run / "quantize").mkdir()
        quantize = write_artifact(run / "quantize", "quantize", {}, distill)
        shutil.copytree(root / "onnx", run / "export")
        out[method] = write_artifact(run / "export", "export", {}, quantize, format="onnx")
    return out


def _read(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_stage_rationale_student_on_multiple_choice(lineages, tmp_path):
    data = tmp_path / "csqa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in CSQA) + "\n", encoding="utf-8")
    config = load_config(overrides={"evaluate.data": str(data), "evaluate.shots": 0, "evaluate.split": "all",
                                    "evaluate.max_new_tokens": 4})
    art = run_stage("evaluate", config, lineages["rationale"], tmp_path / "evaluate").artifact
    q = art.metrics["quality"]
    assert q["train_method"] == "rationale"
    assert q["prompts"]["teacher"]["method"] == "answer" and q["prompts"]["teacher"]["mode"] == "loglik"
    for name in ("student", "deployed"):
        p = q["prompts"][name]
        assert (p["method"], p["mode"], p["max_new_tokens"]) == ("rationale", "generate", RATIONALE_MAX_NEW_TOKENS)
        assert p["example"].endswith("Rationale:<|im_end|>\n<|im_start|>assistant\n")
    assert q["prompts"]["teacher"]["example"].endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    pred = art.path / "predictions"
    student = _read(pred / "student.jsonl")
    assert all("rationale" in r for r in student)
    # The rationale half of rationale_eval reuses the student's own rationale outputs.
    rationale = _read(pred / "rationale_student.jsonl")
    assert [r["generation"] for r in rationale] == [r["generation"] for r in student]
    re = q["rationale_eval"]
    assert re["max_new_tokens"] == RATIONALE_MAX_NEW_TOKENS and set(re) == {"max_new_tokens", "student", "deployed"}
    assert re["student"]["n"] == 3
    assert re["student"]["rationale"]["accuracy"] == pytest.approx(sum(r["correct"] for r in rationale) / 3)
    assert q["student"]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in student) / 3)
    assert {"predictions/rationale_student.jsonl", "predictions/rationale_deployed.jsonl"} <= set(art.manifest["files"])


def test_stage_multitask_student_on_extractive(lineages, tmp_path):
    data = tmp_path / "squad.json"
    data.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": EX.context, "qas": [{"id": "q1", "question": EX.question,
                                         "answers": [{"text": "Adaline Qorr", "answer_start": 19}]}]}]}]}),
        encoding="utf-8")
    config = load_config(overrides={"evaluate.data": str(data), "evaluate.shots": 0, "evaluate.max_new_tokens": 3})
    art = run_stage("evaluate", config, lineages["multitask"], tmp_path / "evaluate").artifact
    q = art.metrics["quality"]
    assert q["prompts"]["student"]["example"].startswith("<|im_start|>user\n" + ANSWER_PREFIX + "Context:")
    assert q["prompts"]["deployed"]["max_new_tokens"] == 3 and "rationale_eval" not in q
    assert _read(art.path / "predictions" / "teacher.jsonl")[0]["prompt"].startswith("<|im_start|>user\nContext:")


def test_student_train_method_from_the_manifest(tmp_path):
    from kd2edge.evaluate.stage import student_train_method

    teacher = Artifact.external(tmp_path, kind="model")
    old = write_artifact(tmp_path / "old", "distill", {}, teacher) if (tmp_path / "old").mkdir() is None else None
    assert student_train_method(old) == "answer"                      # manifests from before issue #9
    (tmp_path / "cfg").mkdir()
    from_config = write_artifact(tmp_path / "cfg", "distill", {"distill": {"train_method": "multitask"}}, teacher)
    assert student_train_method(from_config) == "multitask"
    (tmp_path / "bad").mkdir()
    bad = write_artifact(tmp_path / "bad", "distill", {}, teacher, {"train_method": "cot"})
    with pytest.raises(ArtifactError, match="train_method 'cot'"):
        student_train_method(bad)

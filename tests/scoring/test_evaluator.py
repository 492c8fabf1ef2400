"""evaluate() end to end on tiny models and dataset files written here."""

from __future__ import annotations

import json

import pytest

from kd2edge.errors import DataError, ModelError
from kd2edge.scoring import backends
from kd2edge.scoring import evaluator as ev
from kd2edge.scoring import metrics


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_evaluate_tiny_model_writes_predictions(tiny_llama_dir, squad_file, tmp_path):
    preds = tmp_path / "out" / "preds.jsonl"
    result = ev.evaluate(str(tiny_llama_dir), str(squad_file), shots=1, limit=3, seed=0, max_new_tokens=4,
                         predictions_path=preds, progress=False)
    assert result["n"] == 3 and result["task"] == "extractive" and result["backend"] == "transformers"
    assert result["prompt_template"].endswith("Context: {context}\nQuestion: {question}\nAnswer:")
    records = read_jsonl(preds)
    assert len(records) == 3
    for r in records:
        assert {"id", "prompt", "prediction", "answers", "em", "f1", "example_id", "correct"} <= set(r)
        # the scores are the metrics of the written prediction against the written answers
        assert (r["em"], r["f1"]) == metrics.squad_scores(r["prediction"], r["answers"])
        assert r["prompt"].startswith("<|im_start|>user\n") and r["prompt"].endswith("<|im_start|>assistant\n")
    assert result["em"] == pytest.approx(sum(r["em"] for r in records) / 3)
    assert result["f1"] == pytest.approx(sum(r["f1"] for r in records) / 3)
    assert {r["id"] for r in records} <= {"q1", "q2", "q3", "q4"}


def test_one_shot_prompt_never_contains_the_item(squad_file):
    # every item evaluated: the example must be another item of the file
    evalset = ev.prepare(str(squad_file), "all", shots=1, limit=None, seed=3)
    assert len(evalset.prompts) == 4
    for p in evalset.prompts:
        assert p.example_id is not None and p.example_id != p.item.id
        assert p.text.count(p.item.question) == 1          # the item's question once: its own block
        assert p.text.endswith(f"Question: {p.item.question}\nAnswer:")
        example_block = p.text.split("\n\n")[0]
        assert p.item.question not in example_block
    assert any("every item is evaluated" in w for w in evalset.warnings)


def test_one_shot_examples_come_from_the_train_split():
    evalset = ev.prepare("embedded", "validation", shots=1, limit=6, seed=0)
    from kd2edge.data.loaders import load_qa

    train_ids = {it.id for it in load_qa("embedded", "train").items}
    assert evalset.example_split == "train"
    assert all(p.example_id in train_ids and p.item.id not in train_ids for p in evalset.prompts)


class CannedBackend:
    """Returns fixed generations, to check extraction and scoring end to end."""

    kind, batch_size = "canned", 2

    def __init__(self, outputs):
        self.outputs = outputs

    def format_prompt(self, text):
        return text

    def generate(self, prompts, max_new_tokens):
        return [self.outputs[p.split("Question: ")[-1].split("\n")[0]] for p in prompts]


def test_generated_answers_are_extracted_and_scored(squad_file):
    evalset = ev.prepare(str(squad_file), "all", shots=0, limit=None, seed=0)
    backend = CannedBackend({
        "Who founded the Velmora Institute?": " Adaline Qorr.\nQuestion: more text",   # first line: EM 1
        "When was the Velmora Institute founded?": "Answer: in the year 1871",       # [in, year, 1871] vs [1871]: F1 0.5
        "Which way does the river flow?": "\n\nsouth",                                 # wrong
        "What does the river feed?": "orchards of the monastery",                      # best gold "orchards": P 1/3 R 1 -> 0.5
    })
    records = {r["id"]: r for r in ev.run_items(backend, evalset, 8, progress=False)}
    assert records["q1"]["prediction"] == "Adaline Qorr." and records["q1"]["em"] == 1.0
    assert records["q2"]["prediction"] == "in the year 1871" and records["q2"]["f1"] == pytest.approx(0.5)
    assert records["q3"]["prediction"] == "south" and records["q3"]["f1"] == 0.0
    assert records["q4"]["f1"] == pytest.approx(0.5) and records["q4"]["em"] == 0.0
    s = ev.summarize(list(records.values()), "extractive")
    assert s["em"] == pytest.approx(0.25) and s["f1"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_multiple_choice_generate_mode_reads_letter_or_text(csqa_file):
    evalset = ev.prepare(str(csqa_file), "all", shots=0, limit=None, seed=0)
    backend = CannedBackend({"Where do you keep milk?": "A", "Where is it cold?": "fridge",
                             "What is wet?": "C. the river", "Where is money?": "I don't know"})
    records = {r["id"]: r for r in ev.run_items(backend, evalset, 8, mode="generate", progress=False)}
    assert [records[i]["choice"] for i in ("c0", "c1", "c2", "c3")] == ["A", "A", "C", None]
    assert ev.summarize(list(records.values()), "multiple_choice")["accuracy"] == pytest.approx(0.5)


def test_onnx_backend_matches_pytorch_on_the_same_prompts(lineage, squad_file, csqa_file):
    torch_backend = backends.load_backend(str(lineage["student"]))
    onnx_backend = backends.load_backend(str(lineage["export"].path))
    assert onnx_backend.kind == "onnx"
    squad = ev.prepare(str(squad_file), "all", shots=0, limit=None, seed=0)
    a = ev.run_items(torch_backend, squad, 6, progress=False)
    b = ev.run_items(onnx_backend, squad, 6, progress=False)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert [r["generation"] for r in a] == [r["generation"] for r in b]
    csqa = ev.prepare(str(csqa_file), "all", shots=0, limit=None, seed=0)
    a = ev.run_items(torch_backend, csqa, 6, progress=False)
    b = ev.run_items(onnx_backend, csqa, 6, progress=False)
    for x, y in zip(a, b):
        assert x["choice_scores"] == pytest.approx(y["choice_scores"], abs=1e-3)
        assert x["choice"] == y["choice"]


def test_model_path_errors(tmp_path, squad_file):
    with pytest.raises(ModelError, match="not found"):
        ev.evaluate(str(tmp_path / "missing"), str(squad_file), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        ev.evaluate(str(tmp_path / "empty"), str(squad_file), progress=False)


def test_data_errors(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": "1.1", "data": []}))
    with pytest.raises(DataError):
        ev.evaluate(str(tiny_llama_dir), str(empty), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(DataError):
        ev.evaluate(str(tiny_llama_dir), str(bad), progress=False)
    with pytest.raises(DataError, match="mode"):
        ev.evaluate(str(tiny_llama_dir), "embedded", mode="sample", progress=False)


def test_gptq_checkpoint_is_evaluated_dequantized(tmp_path, squad_file):
    import torch

    from kd2edge.testing import sharp_tiny_model
    from kd2edge.gptq_checkpoint import write_gptq_checkpoint
    from kd2edge.quantize.gptq import rtn_quantize_weight

    model, tokenizer = sharp_tiny_model("llama")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    results = {n: rtn_quantize_weight(model.get_submodule(n).weight, 4, 32, sym=False) for n in names}
    write_gptq_checkpoint(model, tokenizer, results, tmp_path / "gptq", bits=4, group_size=32, desc_act=False,
                          sym=False, dtype="float32")
    assert backends.model_kind(str(tmp_path / "gptq")) == "gptq"
    with torch.no_grad():  # the reference: the same quantized weights in memory
        for name, r in results.items():
            model.get_submodule(name).weight.copy_(r.dequant)
    evalset = ev.prepare(str(squad_file), "all", shots=0, limit=None, seed=0)
    loaded = ev.run_items(backends.load_backend(str(tmp_path / "gptq")), evalset, 6, progress=False)
    reference = ev.run_items(backends.TorchBackend(model, tokenizer), evalset, 6, progress=False)
    assert [r["generation"] for r in loaded] == [r["generation"] for r in reference]
    assert any(r["generation"].strip() for r in reference)   # the sharp model says something

"""Fixtures for the evaluate tests: tiny dataset files and a teacher/student/export lineage."""

from __future__ import annotations

import json

import pytest

SQUAD = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
    {"context": "The Velmora Institute was founded in 1871 by Adaline Qorr in the city of Tessaly.",
     "qas": [{"id": "q1", "question": "Who founded the Velmora Institute?",
              "answers": [{"text": "Adaline Qorr", "answer_start": 45}]},
             {"id": "q2", "question": "When was the Velmora Institute founded?",
              "answers": [{"text": "1871", "answer_start": 37}]}]},
    {"context": "A river flows north through the valley; its water feeds the orchards of the old monastery.",
     "qas": [{"id": "q3", "question": "Which way does the river flow?",
              "answers": [{"text": "north", "answer_start": 14}]},
             {"id": "q4", "question": "What does the river feed?",
              "answers": [{"text": "the orchards", "answer_start": 56}, {"text": "orchards", "answer_start": 60}]}]},
]}]}

CSQA = [{"id": f"c{i}", "answerKey": key,
         "question": {"stem": stem, "choices": [{"label": lab, "text": text} for lab, text in
                                                zip("ABC", ["fridge", "bank account", "the river"])]}}
        for i, (stem, key) in enumerate([("Where do you keep milk?", "A"), ("Where is it cold?", "C"),
                                         ("What is wet?", "C"), ("Where is money?", "B")])]


@pytest.fixture
def squad_file(tmp_path):
    path = tmp_path / "tiny_squad.json"
    path.write_text(json.dumps(SQUAD), encoding="utf-8")
    return path


@pytest.fixture
def csqa_file(tmp_path):
    path = tmp_path / "tiny_csqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CSQA) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """{teacher, student, export}: two different sharp tiny llamas and the student's fp32 ONNX export,
    linked by manifests as a run links them (export <- quantize <- distill <- teacher)."""
    from exporters.optimum_onnx import export_with_past
    from kd2edge.artifacts import Artifact, write_artifact
    from kd2edge.export.testing import sharp_tiny_model, sharp_tiny_model_dir

    root = tmp_path_factory.mktemp("lineage")
    teacher_dir = sharp_tiny_model_dir(root / "teacher", "llama", seed=0)
    student, tokenizer = sharp_tiny_model("llama", seed=1)
    (root / "distill").mkdir()
    student.save_pretrained(root / "distill")
    tokenizer.save_pretrained(root / "distill")
    teacher = Artifact.external(teacher_dir, kind="model", id="tiny-teacher")
    distill = write_artifact(root / "distill", "distill", {}, teacher)
    (root / "quantize").mkdir()
    quantize = write_artifact(root / "quantize", "quantize", {}, distill)
    export_with_past(student, tokenizer, root / "export")
    export = write_artifact(root / "export", "export", {}, quantize, format="onnx")
    return {"teacher": teacher_dir, "student": root / "distill", "export": export}

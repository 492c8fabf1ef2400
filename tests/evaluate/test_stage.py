"""The evaluate stage on a tiny lineage (teacher, distilled student, its ONNX export)."""

from __future__ import annotations

import json

import pytest

from kd2edge.artifacts import Artifact, write_artifact
from kd2edge.config import load_config
from kd2edge.errors import ArtifactError
from kd2edge.scoring import metrics
from kd2edge.evaluate.stage import find_models
from kd2edge.pipeline import run_stage


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_stage_scores_three_models_and_retention(lineage, csqa_file, tmp_path):
    config = load_config(overrides={"evaluate.data": str(csqa_file), "evaluate.shots": 0, "evaluate.split": "all"})
    result = run_stage("evaluate", config, lineage["export"], tmp_path / "evaluate")
    art = result.artifact
    q, budgets = art.metrics["quality"], art.metrics["budgets"]
    assert q["dataset"] == str(csqa_file) and q["split"] == "all" and q["shots"] == 0 and q["n"] == 4
    assert q["prompt_template"].startswith("Question: {question}\nA. {choice_A}")
    records = {n: read_jsonl(art.path / "predictions" / f"{n}.jsonl") for n in ("teacher", "student", "deployed")}
    for name, rs in records.items():
        assert [r["id"] for r in rs] == ["c0", "c1", "c2", "c3"]
        assert q[name]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in rs) / 4)
        assert q[name]["f1"] == pytest.approx(sum(r["f1"] for r in rs) / 4)
    # the deployed model is the student's fp32 export: same choices, so the same scores
    assert [r["choice"] for r in records["deployed"]] == [r["choice"] for r in records["student"]]
    assert q["deployed_student_agreement"] == 1.0
    expected = q["deployed"]["f1"] / q["teacher"]["f1"] if q["teacher"]["f1"] else None
    assert q["retention_f1"] == pytest.approx(expected)
    assert q["regressions"] == metrics.regressions(records["teacher"], records["deployed"])
    limit = config.profile.budgets.min_retention
    assert budgets["min_retention"]["limit"] == limit
    assert budgets["min_retention"]["pass"] == (None if expected is None else expected >= limit)
    assert (art.path / "quality.png").is_file()
    assert art.manifest["timings"]["teacher_cached"] is False

    # a forced rerun reuses the teacher's cached scores
    again = run_stage("evaluate", config, lineage["export"], tmp_path / "evaluate", force=True).artifact
    assert again.manifest["timings"]["teacher_cached"] is True
    assert again.metrics["quality"]["teacher"] == q["teacher"]


def test_retention_per_language_with_a_paired_interval_and_the_gate_note(lineage, tmp_path):
    """Real-text layout: a file of English and Spanish questions split by article; retention per language."""
    from kd2edge.evaluate.stage import retention_budget

    doc = {"version": "1.1", "data": [{"title": f"T{a}", "paragraphs": [{"context": "Orvel opened in 1901 near the river.",
                                                                       "qas": [{"id": f"{a}-{q}", "question": f"When did Orvel open ({q})?",
                                                                                "answers": [{"text": "1901", "answer_start": 16}]}
                                                                               for q in range(3)]}]} for a in range(10)]}
    for lang in ("en", "es"):
        (tmp_path / f"xquad.{lang}.json").write_text(json.dumps(doc))
    from kd2edge.data.loaders import load_qa

    assert load_qa(str(tmp_path / "xquad.es.json")).items[0].language == "es"     # language from the file name
    config = load_config(overrides={"evaluate.data": str(tmp_path / "xquad.es.json"), "evaluate.shots": 1,
                                    "evaluate.max_new_tokens": 3})
    q = run_stage("evaluate", config, lineage["export"], tmp_path / "evaluate").artifact.metrics["quality"]
    assert q["split"] == "validation" and q["split_info"]["by"] == "article" and q["n"] == 6      # 2 of 10 articles
    interval = q["retention_f1_interval"]["deployed"]
    assert interval["n"] == 6 and interval["level"] == 0.95 and interval["value"] == q["retention_f1"]
    if interval["value"] is not None:
        assert interval["low"] <= interval["value"] <= interval["high"]
    # The gate passes on the point estimate and says when the interval contains the limit.
    verdict = retention_budget(0.7, {"retention_f1": 0.8, "retention_f1_interval": {
        "deployed": {"low": 0.6, "high": 1.0, "level": 0.95, "n": 50}}})
    assert verdict["pass"] is True and verdict["interval"] == [0.6, 1.0] and "contains the limit 0.7" in verdict["note"]
    clear = retention_budget(0.7, {"retention_f1": 0.95, "retention_f1_interval": {
        "deployed": {"low": 0.9, "high": 1.0, "level": 0.95, "n": 500}}})
    assert clear["pass"] is True and "note" not in clear


def test_retention_intervals_are_computed_per_language():
    from kd2edge.evaluate.stage import retention_intervals

    def rec(lang, f1):
        return {"language": lang, "f1": f1}
    records = {"teacher": [rec("en", 1.0), rec("en", 0.5), rec("es", 0.4), rec("es", 0.4)],
               "student": [rec("en", 1.0), rec("en", 0.5), rec("es", 0.2), rec("es", 0.2)],
               "deployed": [rec("en", 0.5), rec("en", 0.25), rec("es", 0.4), rec("es", 0.0)]}
    out = retention_intervals(records, "f1", seed=0)
    assert out["deployed"]["value"] == pytest.approx(1.15 / 2.3)
    assert out["by_language"]["en"]["deployed"]["value"] == pytest.approx(0.5)       # 0.75 / 1.5
    assert out["by_language"]["es"]["student"]["value"] == pytest.approx(0.5)
    assert out["by_language"]["en"]["deployed"]["low"] == pytest.approx(0.5)         # every pair keeps half


def test_find_models_follows_the_lineage(lineage, tmp_path):
    found = find_models(lineage["export"])
    assert found["student"].path == lineage["student"] and found["teacher"].path == lineage["teacher"]
    lonely = tmp_path / "export"
    lonely.mkdir()
    with pytest.raises(ArtifactError, match="no distill stage"):
        find_models(write_artifact(lonely, "export", {}, Artifact.external(lineage["teacher"], kind="model")))

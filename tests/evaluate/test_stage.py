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
    config = load_config(overrides={"evaluate.data": str(csqa_file), "evaluate.shots": 0, "evaluate.split": "dev"})
    result = run_stage("evaluate", config, lineage["export"], tmp_path / "evaluate")
    art = result.artifact
    q, budgets = art.metrics["quality"], art.metrics["budgets"]
    assert q["dataset"] == str(csqa_file) and q["split"] == "dev" and q["shots"] == 0 and q["n"] == 4
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


def test_find_models_follows_the_lineage(lineage, tmp_path):
    found = find_models(lineage["export"])
    assert found["student"].path == lineage["student"] and found["teacher"].path == lineage["teacher"]
    lonely = tmp_path / "export"
    lonely.mkdir()
    with pytest.raises(ArtifactError, match="no distill stage"):
        find_models(write_artifact(lonely, "export", {}, Artifact.external(lineage["teacher"], kind="model")))

"""report.json: the run's answer in one file, assembled from the stages' manifests."""

from __future__ import annotations

from pathlib import Path

from kd2edge.artifacts import Artifact, write_json_atomic
from kd2edge.config import RunConfig
from kd2edge.schema import to_dict


def build_report(config: RunConfig, artifacts: dict[str, Artifact], results: dict) -> dict:
    """Assemble report.json's content.

    Args:
        config: the resolved run config.
        artifacts: stage name (and "teacher") -> its artifact.
        results: stage name -> StageResult (status, seconds).
    """
    metrics = {name: a.metrics for name, a in artifacts.items()}
    distill, export, profile = metrics["distill"], artifacts["export"], metrics["profile"]
    teacher = artifacts["teacher"].manifest
    budgets = {**profile.get("budgets", {}), **metrics["evaluate"].get("budgets", {})}
    for name, limit in to_dict(config.profile.budgets).items():
        budgets.setdefault(name, {"limit": limit, "value": None, "pass": None, "status": "not measured"})
    verdicts = [b["pass"] for b in budgets.values()]
    return {
        "profile": config.profile.name,
        "stages": {name: {"status": r.status, "seconds": round(r.seconds, 2), "path": str(r.artifact.path),
                          "warnings": r.artifact.manifest.get("warnings", [])}
                   for name, r in results.items()},
        "teacher": distill.get("teacher", {"id": teacher.get("id")}), "student": distill.get("student"),
        "param_reduction": distill.get("param_reduction"),
        "artifact": {"path": str(export.path), "size_bytes": export.metrics.get("size_bytes"),
                     "format": export.manifest.get("format", "onnx")},
        "latency": profile.get("latency"), "baseline_teacher": profile.get("baseline_teacher"),
        "llama_cpp": profile.get("llama_cpp"),
        "profile_warnings": artifacts["profile"].manifest.get("warnings", []),
        "quality": metrics["evaluate"].get("quality"), "package": metrics["package"],
        "budgets": budgets,
        # pass: every budget measured and met; one missed fails; one not measured leaves it open (None).
        "pass": False if False in verdicts else (True if all(v is True for v in verdicts) else None),
        "config": to_dict(config),
    }


def write_report(report: dict, out_dir: Path) -> Path:
    """Write report.json and report.html into `out_dir`; returns report.json's path."""
    from kd2edge.report_html import write_html

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    write_json_atomic(path, report)
    write_html(report, out_dir / "report.html")
    return path

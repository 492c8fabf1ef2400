"""report.json: the run's answer in one file, assembled from the stages' manifests.

A stage that did not run is marked `{"status": "missing"|"blocked", "reason": ...}`
where its figures would be: never a made-up number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd2edge.artifacts import Artifact, write_json_atomic
from kd2edge.config import STAGES, RunConfig
from kd2edge.schema import to_dict


def _absent(result: Any, what: str) -> dict:
    status = getattr(result, "status", "missing")
    reason = getattr(result, "reason", "") or f"the {what} stage did not run"
    return {"status": status if status in ("missing", "blocked") else "missing", "reason": reason}


def build_report(config: RunConfig, artifacts: dict[str, Artifact | None], results: dict) -> dict:
    """Assemble report.json's content.

    Args:
        config: the resolved run config.
        artifacts: stage name (and "teacher") -> its artifact, or None if it did not run.
        results: stage name -> StageResult (status, seconds, reason).
    """
    metrics = {name: (a.metrics if a is not None else None) for name, a in artifacts.items()}
    distill = metrics.get("distill")
    teacher = artifacts["teacher"]
    report: dict[str, Any] = {
        "profile": config.profile.name,
        "stages": {name: {"status": r.status, "seconds": round(r.seconds, 2),
                          "path": str(r.artifact.path) if r.artifact else None,
                          **({"reason": r.reason} if r.reason else {})}
                   for name, r in results.items()},
    }
    if distill:
        report["teacher"] = distill.get("teacher", {"id": teacher.manifest.get("id")})
        report["student"] = distill.get("student")
        report["param_reduction"] = distill.get("param_reduction")
    else:
        report["teacher"] = {"id": teacher.manifest.get("id"), "params": None}
        report["student"] = _absent(results.get("distill"), "distill")
        report["param_reduction"] = None
    export = artifacts.get("export")
    if export is not None:
        report["artifact"] = {"path": str(export.path), "size_bytes": export.metrics.get("size_bytes"),
                              "format": export.manifest.get("format", "onnx")}
    else:
        report["artifact"] = _absent(results.get("export"), "export")
    profile_m = metrics.get("profile")
    report["latency"] = profile_m["latency"] if profile_m else _absent(results.get("profile"), "profile")
    report["baseline_teacher"] = profile_m.get("baseline_teacher") if profile_m else None
    report["profile_warnings"] = artifacts["profile"].manifest.get("warnings", []) if profile_m else []
    evaluate_m = metrics.get("evaluate")
    report["quality"] = evaluate_m["quality"] if evaluate_m else _absent(results.get("evaluate"), "evaluate")
    package_m = metrics.get("package")
    report["package"] = package_m if package_m else _absent(results.get("package"), "package")

    budgets: dict[str, Any] = {}
    for source in ("profile", "evaluate"):
        if metrics.get(source):
            budgets.update(metrics[source].get("budgets", {}))
    for name, limit in to_dict(config.profile.budgets).items():
        budgets.setdefault(name, {"limit": limit, "value": None, "pass": None,
                                  "status": "not measured (its stage did not run)"})
    report["budgets"] = budgets
    verdicts = [b["pass"] for b in budgets.values() if b.get("pass") is not None]
    complete = all(r.status in ("done", "skipped") for r in results.values())
    # pass: every budget measured and met. Unmeasured budgets leave the verdict open (None).
    if any(v is False for v in verdicts):
        report["pass"] = False
    elif complete and len(verdicts) == len(budgets):
        report["pass"] = True
    else:
        report["pass"] = None
    report["missing_stages"] = [n for n in STAGES if results.get(n) and results[n].status in ("missing", "blocked")]
    report["config"] = to_dict(config)
    return report


def write_report(report: dict, out_dir: Path) -> Path:
    """Write report.json (and report.html when the HTML renderer is available)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    write_json_atomic(path, report)
    try:
        from kd2edge.report_html import write_html  # built by the profiling work
    except ImportError:
        return path
    write_html(report, out_dir / "report.html")
    return path

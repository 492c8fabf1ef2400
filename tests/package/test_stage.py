"""The package stage and `kd2edge package`: a complete context, its manifest and self-checks."""

from __future__ import annotations

import json

import pytest

from kd2edge.artifacts import Artifact, content_hash
from kd2edge.errors import ArtifactError
from kd2edge.package.context import unreadable_by_others


def test_stage_writes_a_complete_context_with_its_checks(cpu_context, tiny_export):
    ctx, m = cpu_context.path, cpu_context.metrics
    for name in ("Dockerfile", ".dockerignore", "README.md", "requirements.txt", "app/settings.json",
                 "app/kd2edge/runtime/entrypoint.py", "app/kd2edge/runtime/serve.py", "app/kd2edge/runtime/lm.py",
                 "app/artifact/model.onnx", "app/artifact/tokenizer.json"):
        assert (ctx / name).is_file(), name
    assert content_hash(ctx / "app" / "artifact") == Artifact.load(tiny_export).content_hash
    assert m["context_dir"] == str(ctx)                       # the final folder, not the partial one
    assert m["build_command"] == f"docker build --network host --platform linux/amd64 -t {m['image']} {ctx}"
    assert m["image"].startswith("kd2edge-model:tiny-cpu-") and m["platform"] == "linux/amd64"
    checks = m["checks"]
    assert checks["artifact_hash_match"] is True and checks["hadolint"] == "clean"
    assert unreadable_by_others(ctx) == []      # the image's uid 10001 reads every file
    assert checks["smoke"]["answer_matches"] is True and checks["smoke"]["exit_code"] == 0
    reqs = [line.split("==")[0] for line in (ctx / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert {"onnxruntime", "uvicorn", "starlette", "prometheus_client"} <= set(reqs)
    assert not {"torch", "transformers", "optimum"} & set(reqs)
    assert not any((ctx / "app" / "kd2edge" / f).exists() for f in ("cli.py", "config.py", "package/stage.py"))
    settings = json.loads((ctx / "app" / "settings.json").read_text())
    assert (settings["providers"], settings["threads"], settings["allow_fallback"]) == (["CPUExecutionProvider"], 0, False)  # 0: one per host core
    assert "docker build" in (ctx / "README.md").read_text()


def test_stage_refuses_a_non_export_artifact(tmp_path, tiny_profile):
    from kd2edge.artifacts import write_artifact
    from kd2edge.config import load_config
    from kd2edge.package.stage import run

    (tmp_path / "q").mkdir()
    quant = write_artifact(tmp_path / "q", "quantize", {}, None)
    with pytest.raises(ArtifactError, match="package the output of `kd2edge export`"):
        run(load_config(profile=str(tiny_profile)), quant, tmp_path / "out")


def test_cli_package_for_jetson_prints_the_build_command(tiny_export, tmp_path):
    from click.testing import CliRunner

    from kd2edge.cli import cli

    out = tmp_path / "jetson"
    result = CliRunner().invoke(cli, ["package", str(tiny_export), "--profile", "jetson-orin-nano", "--out", str(out),
                                      "--no-smoke-test", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["build_command"] == f"docker build --network host --platform linux/arm64 -t {summary['image']} {out}"
    assert summary["checks"]["smoke"].startswith("skipped") and summary["checks"]["hadolint"] == "clean"
    assert not any(r.startswith("onnxruntime") for r in summary["requirements"])  # from NVIDIA's index instead
    dockerfile = (out / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0" in dockerfile and "onnxruntime-gpu==1.23.0" in dockerfile
    assert json.loads((out / "app" / "settings.json").read_text())["allow_fallback"] is True


def test_image_problems_name_every_failed_check_of_a_container_run():
    from kd2edge.package.stage import image_problems

    good = {"answer_status": 200, "answer": "Adaline Qorr", "bad_request_status": 400, "health": "healthy",
            "user": "10001", "exit_code": 0}
    assert image_problems(good, "Adaline Qorr") == []
    bad = {**good, "answer": "Ada", "bad_request_status": 500, "health": "unhealthy", "user": "", "exit_code": 137}
    assert image_problems(bad, "Adaline Qorr") == [
        "it answered 'Ada' where the runtime answers 'Adaline Qorr'", "a bad request got HTTP 500, not a 4xx",
        "its HEALTHCHECK reported unhealthy, not healthy", "it runs as root",
        "docker stop ended it with exit code 137, not 0"]
    assert image_problems({**good, "answer_status": 503}, "x")[0] == "/v1/answer answered HTTP 503"

"""The laptop-cpu image, built with `docker build` and run with `docker run`, for real (slow).

What a new user does: `kd2edge package --build` on an exported artifact whose weights were
written 0600 (as the exporters write them), then `docker run` of the image. Docker is
started if this machine can (root, dockerd installed), the base image is the Debian
stand-in when no registry has it; when Docker cannot run, the test is skipped with the
reason (pytest -ra prints it). The image must answer as the installed runtime does, as
uid 10001, refuse a bad request with a 4xx, become healthy through its own HEALTHCHECK
on the port it was told, expose Prometheus text, and stop with exit 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kd2edge.package import docker as dk
from kd2edge.package.launch import request_json
from kd2edge.package.stage import SMOKE_CONTEXT, SMOKE_QUESTION

QUESTION = ("Where does the river flow?", "A river flows north through the valley.")


@pytest.fixture(scope="module")
def built(docker_ready, tiny_export, tmp_path_factory):
    """The package stage's artifact for laptop-cpu with package.build (the image built and run once)."""
    from kd2edge.artifacts import Artifact
    from kd2edge.config import load_config
    from kd2edge.pipeline import run_stage

    root = tmp_path_factory.mktemp("image")
    export = root / "export"
    shutil.copytree(tiny_export, export)
    for weights in export.glob("*.onnx*"):
        weights.chmod(0o600)   # what made the image unable to read its own weights
    config = load_config(profile="laptop-cpu", overrides={"package.build": True})
    return run_stage("package", config, Artifact.load(export), root / "package").artifact


@pytest.mark.slow
def test_package_build_records_the_image_and_its_run(built, reference, record_property):
    build = built.metrics["build"]
    assert build["image_id"].startswith("sha256:") and dk.image_size(built.metrics["image"]) == build["size_bytes"]
    assert build["size_bytes"] > build["base_size_bytes"] > 10_000_000 and build["build_seconds"] > 0
    assert build["base"]["image"] == dk.DEFAULT_BASE_IMAGE
    run = build["run"]
    assert run["user"] == "10001"
    assert (run["answer_status"], run["answer"]) == (200, reference(SMOKE_QUESTION, SMOKE_CONTEXT))
    assert run["bad_request_status"] == 400 and run["health"] == "healthy" and run["exit_code"] == 0
    assert 0 < run["listen_seconds"] <= run["healthy_seconds"]
    assert "app/artifact/model.onnx (was 0600)" in built.metrics["checks"]["made_readable"]
    record_property("image_size_bytes", build["size_bytes"])
    record_property("base_size_bytes", build["base_size_bytes"])
    print(f"image {built.metrics['image']}: {build['size_bytes'] / 2**20:.0f} MiB "
          f"(base {build['base_size_bytes'] / 2**20:.0f} MiB), built in {build['build_seconds']} s, "
          f"healthy {run['healthy_seconds']} s after docker run")


@pytest.mark.slow
def test_the_image_serves_as_uid_10001_with_metrics_and_json_logs(built, reference):
    image = built.metrics["image"]
    port = dk.free_port()
    cid = dk.run_container(image, port=port, args=["serve", "--port", str(port), "--log-format", "json"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request_json(url + "/healthz", timeout_s=5)[0] == 200:
                    break
            except OSError:
                assert dk.container_state(cid)["status"] == "running", dk.container_logs(cid)
                assert time.monotonic() < deadline, dk.container_logs(cid)
                time.sleep(0.2)
        status, body, _ = request_json(url + "/v1/answer", "POST", {"question": QUESTION[0], "context": QUESTION[1]})
        assert (status, body["answer"]) == (200, reference(*QUESTION))
        assert request_json(url + "/v1/answer", "POST", body=b"[]")[0] == 400
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        answered = [s for s in families["kd2edge_requests"].samples
                    if s.labels == {"route": "/v1/answer", "status": "200"} and s.name.endswith("_total")]
        assert [s.value for s in answered] == [1.0]
        assert families["kd2edge_generated_tokens"].samples[0].value > 0
        uid = subprocess.run(["docker", "exec", cid, "id", "-u"], capture_output=True, text=True, timeout=60)
        assert uid.stdout.strip() == "10001"
        logs = [json.loads(line) for line in dk.container_logs(cid, 50).splitlines() if line.startswith("{")]
        assert [(r["path"], r["status"]) for r in logs if r["path"] == "/v1/answer"] == [("/v1/answer", 200),
                                                                                         ("/v1/answer", 400)]
    except BaseException:
        dk.stop_container(cid, timeout_s=5)
        raise
    assert dk.stop_container(cid, timeout_s=30) == 0

"""The packaged server as the image runs it: the context's entrypoint in a subprocess
(kd2edge imported from the context only, torch and transformers unimportable), a real
tiny exported artifact, real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kd2edge.package.context import entrypoint_argv, unreadable_by_others
from kd2edge.package.launch import ServerProcess, request_json

QUESTIONS = [
    ("Who founded the Velmora Institute?", "The Velmora Institute was founded in 1871 by Adaline Qorr in Tessaly."),
    ("¿Quién fundó Brimor?", "La ciudad de Brimor fue fundada en 1620 por el explorador Tomás Ivarra."),
    ("What does the port export?", "El puerto exporta café, cacao y madera."),
    ("Where does the river flow?", "A river flows north through the valley."),
]


def test_health_reports_the_cpu_provider(server):
    status, body, _ = request_json(server.url + "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert body["providers"] == ["CPUExecutionProvider"] and body["max_new_tokens"] == 24


def test_answers_equal_the_installed_runtime_and_are_deterministic(server, reference):
    for question, context in QUESTIONS:
        first = request_json(server.url + "/v1/answer", "POST", {"question": question, "context": context})
        again = request_json(server.url + "/v1/answer", "POST", {"question": question, "context": context})
        assert first[0] == again[0] == 200
        assert first[1]["answer"] == again[1]["answer"] == reference(question, context)
        assert first[1]["latency_ms"] > 0


def test_bad_requests_get_json_errors(server):
    url = server.url
    assert request_json(url + "/v1/answer", "POST", body=b'{"question": "q"')[:1] == (400,)
    status, body, _ = request_json(url + "/v1/answer", "POST", {"context": "c"})
    assert (status, body["error"]) == (400, "missing field 'question'")
    status, body, _ = request_json(url + "/v1/answer", "POST", body=json.dumps({"question": "q", "context": "x" * 70_000}).encode())
    assert status == 413 and "limit is 65536" in body["error"]
    assert request_json(url + "/v2/answer", "POST", {"question": "q", "context": ""})[0] == 404
    assert request_json(url + "/metrics", "PUT", {"question": "q", "context": ""})[0] == 405


def test_concurrent_clients_all_get_their_own_answer(server, reference):
    results: dict[int, tuple] = {}

    def ask(i):
        q, c = QUESTIONS[i % len(QUESTIONS)]
        results[i] = request_json(server.url + "/v1/answer", "POST", {"question": q, "context": c})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]  # max_queue 8: none refused
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    for i, (status, body, _) in results.items():
        assert status == 200 and body["answer"] == reference(*QUESTIONS[i % len(QUESTIONS)])


def test_sigterm_finishes_the_request_in_flight_then_exits_0(cpu_context, reference):
    proc = ServerProcess(entrypoint_argv(cpu_context.path, "serve", "--host", "127.0.0.1", "--port", "0", "--quiet"),
                         cwd=cpu_context.path)
    question, context = QUESTIONS[0]
    body = json.dumps({"question": question, "context": context}).encode()
    with socket.create_connection((proc.host, proc.port), timeout=30) as sock:
        # The request is in flight once its headers are in: the handler waits for the body.
        sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.5)
        proc.proc.terminate()  # SIGTERM
        time.sleep(1.0)
        assert proc.proc.poll() is None, "the server exited with a request in flight"
        sock.sendall(body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")  # and the server closed the connection after it (read to EOF)
    assert json.loads(payload)["answer"] == reference(question, context)
    assert proc.proc.wait(30) == 0
    assert "kd2edge serve: stopped" in proc.tail()
    # and a new connection is refused: it no longer listens
    try:
        socket.create_connection((proc.host, proc.port), timeout=2).close()
        refused = False
    except OSError:
        refused = True
    assert refused


def test_profile_mode_measures_the_artifact_against_the_budgets(cpu_context):
    import subprocess

    proc = subprocess.run(entrypoint_argv(cpu_context.path, "profile", "--repeats", "1"), cwd=cpu_context.path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 7), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["profile"] == "tiny-cpu" and report["providers"] == ["CPUExecutionProvider"]
    assert report["latency"]["ttft_prompt_tokens"] == 32 and report["latency"]["ttft_ms_p50"] > 0
    assert set(report["budgets"]) == {"max_artifact_mb", "max_peak_memory_mb", "max_ttft_ms", "min_decode_tokens_per_s"}
    assert proc.returncode == (7 if any(v["pass"] is False for v in report["budgets"].values()) else 0)


def test_the_context_refuses_to_run_an_installed_kd2edge_instead_of_its_own(cpu_context, tmp_path):
    import shutil
    import subprocess

    empty = tmp_path / "ctx"
    (empty / "app").mkdir(parents=True)
    shutil.copy(cpu_context.path / "app" / "settings.json", empty / "app")
    proc = subprocess.run(entrypoint_argv(empty, "healthcheck"), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not from the build context" in proc.stderr


def test_healthcheck_probes_the_port_the_server_really_listens_on(cpu_context, tmp_path):
    ready = tmp_path / "ready.json"
    env = {**os.environ, "KD2EDGE_READY_FILE": str(ready), "KD2EDGE_PORT": "1"}  # port 1: nothing listens there

    def healthcheck() -> int:
        return subprocess.run(entrypoint_argv(cpu_context.path, "healthcheck"), env=env, capture_output=True,
                              timeout=60).returncode

    with ServerProcess(entrypoint_argv(cpu_context.path, "serve", "--host", "127.0.0.1", "--port", "0", "--quiet"),
                       cwd=cpu_context.path, env=env) as proc:
        assert json.loads(ready.read_text())["port"] == proc.port
        assert healthcheck() == 0
    assert proc.proc.returncode == 0 and not ready.exists()
    assert healthcheck() == 1  # nothing listens now: the healthcheck fails, as Docker must see it


# ------------------------------------------------------------------ as the image's user (uid 10001)

def _as_image_user() -> list[str]:
    """The command prefix that runs a program as uid/gid 10001, as the image does; skips when it cannot."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running as uid 10001 needs root and setpriv (util-linux)")
    return ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups"]


@pytest.fixture(scope="module")
def narrow_context(tiny_export, tiny_profile):
    """A context written from a copy of the tiny export whose weights are mode 0600 (as safetensors and
    ONNX external data are written), in a folder every user can reach."""
    from kd2edge.artifacts import Artifact
    from kd2edge.config import load_config
    from kd2edge.pipeline import run_stage

    root = Path(tempfile.mkdtemp(prefix="kd2edge-uid-test-", dir="/tmp"))
    root.chmod(0o755)
    try:
        export = root / "export"
        shutil.copytree(tiny_export, export)
        for onnx in export.glob("*.onnx*"):
            onnx.chmod(0o600)
        config = load_config(profile=str(tiny_profile), overrides={"package.smoke_test": False})
        yield run_stage("package", config, Artifact.load(export), root / "package").artifact
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_context_is_readable_by_the_image_user_even_from_a_0600_artifact(narrow_context, reference):
    prefix = _as_image_user()
    ctx = narrow_context.path
    assert unreadable_by_others(ctx) == []
    assert "app/artifact/model.onnx (was 0600)" in narrow_context.metrics["checks"]["made_readable"]
    question, context = QUESTIONS[0]
    with ServerProcess(prefix + entrypoint_argv(ctx, "serve", "--host", "127.0.0.1", "--port", "0", "--quiet"),
                       cwd="/") as proc:
        status, body, _ = request_json(proc.url + "/v1/answer", "POST", {"question": question, "context": context})
        assert (status, body["answer"]) == (200, reference(question, context))
    assert proc.proc.returncode == 0, proc.tail()


def test_an_unreadable_model_is_one_line_and_a_non_zero_exit(narrow_context):
    prefix = _as_image_user()
    model = narrow_context.path / "app" / "artifact" / "model.onnx"
    mode = stat.S_IMODE(model.stat().st_mode)
    model.chmod(0o600)
    try:
        proc = subprocess.run(prefix + entrypoint_argv(narrow_context.path, "serve", "--port", "0"), cwd="/",
                              capture_output=True, text=True, timeout=120)
    finally:
        model.chmod(mode)
    assert proc.returncode == 5, proc.stderr          # ArtifactError's exit code
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.onnx (mode 0600) not readable by uid 10001" in lines[0] and "chmod" in lines[0]

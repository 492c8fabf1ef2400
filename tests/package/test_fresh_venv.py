"""The context's requirements are enough: a fresh virtual environment (no system site
packages, no torch) installs requirements.txt from PyPI and serves the tiny artifact."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kd2edge.package.context import entrypoint_argv
from kd2edge.package.launch import ServerProcess, request_json


@pytest.mark.slow
def test_requirements_alone_serve_the_artifact(cpu_context, reference, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                          str(cpu_context.path / "requirements.txt")], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=60)
    assert missing.returncode != 0  # torch is not there at all
    question, context = "Who founded the Velmora Institute?", "It was founded in 1871 by Adaline Qorr."
    with ServerProcess(entrypoint_argv(cpu_context.path, "serve", "--host", "127.0.0.1", "--port", "0", "--quiet",
                                       python=python), cwd=cpu_context.path) as server:
        status, body, _ = request_json(server.url + "/v1/answer", "POST", {"question": question, "context": context})
        assert status == 200 and body["answer"] == reference(question, context)
    assert server.proc.returncode == 0

"""Shared fixtures: tiny models built in-process (no hub, no files from outside the repo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kd2edge.profiles import profiles_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{arch: folder} for tiny llama, qwen2 and gpt_neox models (2 layers, hidden 64)."""
    from kd2edge.testing import ARCHS, tiny_model_dir

    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_model_dir(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Tests never write into the user's cache, except slow ones that reuse the converted teacher."""
    if "slow" not in request.keywords:
        monkeypatch.setenv("KD2EDGE_CACHE", str(tmp_path / "kd2edge-cache"))


# ----------------------------------------------------------------------------------------------
# Fixtures for the evaluate tests: tiny dataset files and a teacher/student/export lineage.
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
    from exporters.traced import export_with_past
    from kd2edge.artifacts import Artifact, write_artifact
    from kd2edge.testing import sharp_tiny_model, sharp_tiny_model_dir

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


# ----------------------------------------------------------------------------------------------
# Fixtures: a real tiny exported artifact, a build context for it, and its server in a subprocess.
# laptop-cpu with profiling lengths the tiny model's 512-token context can hold.
TINY_PROFILE_PATCH = {"prompt_lengths = [128, 512]": "prompt_lengths = [16, 32]", "new_tokens = 64": "new_tokens = 8"}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A sharp tiny llama exported by optimum (text-generation-with-past) as an 'export' artifact."""
    from optimum.exporters.onnx import main_export

    from kd2edge.artifacts import write_artifact
    from kd2edge.testing import sharp_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny-export")
    src = sharp_tiny_model_dir(root / "src", "llama")
    out = root / "export"
    main_export(str(src), output=str(out), task="text-generation-with-past", do_validation=False)
    write_artifact(out, "export", {"test": "tiny"}, None, format="onnx")
    return out


@pytest.fixture(scope="session")
def tiny_profile(tmp_path_factory) -> Path:
    text = (profiles_dir() / "laptop-cpu.toml").read_text()
    for old, new in TINY_PROFILE_PATCH.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path_factory.mktemp("profile") / "tiny-cpu.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def cpu_context(tiny_export, tiny_profile, tmp_path_factory):
    """The package stage's output for the tiny artifact (its smoke test included)."""
    from kd2edge.artifacts import Artifact
    from kd2edge.config import load_config
    from kd2edge.pipeline import run_stage

    config = load_config(profile=str(tiny_profile), overrides={"package.max_queue": 8})
    out = tmp_path_factory.mktemp("run") / "package"
    return run_stage("package", config, Artifact.load(tiny_export), out).artifact


@pytest.fixture(scope="session")
def reference(tiny_export):
    """The installed runtime's answers, in this process: what the served answers must equal."""
    from kd2edge.runtime.serve import load_service

    service = load_service(tiny_export, threads=4, max_new_tokens=24)
    return service.answer


@pytest.fixture(scope="module")
def server(cpu_context):
    """The context's entrypoint serving on a free loopback port (torch blocked), stopped after the module."""
    from kd2edge.package.context import entrypoint_argv
    from kd2edge.package.launch import ServerProcess

    proc = ServerProcess(entrypoint_argv(cpu_context.path, "serve", "--host", "127.0.0.1", "--port", "0", "--quiet"),
                         cwd=cpu_context.path)
    yield proc
    assert proc.stop() == 0, proc.tail()


# ----------------------------------------------------------------------------------------------
# A tiny exported artifact (optimum ONNX, KV cache) with a fake kd2edge lineage, and test profiles.
PROFILE_TOML = """
description = "test profile for a tiny model on this host"
[hardware]
arch = "{arch}"
cores = 2
memory = "8GB"
memory_bandwidth = "10GB/s"
accelerator = "{accelerator}"
[runtime]
execution_providers = {providers}
threads = 2
context_length = 2048
[budgets]
max_artifact_mb = 250
max_peak_memory_mb = 4096
max_ttft_ms = 10000
min_decode_tokens_per_s = {min_decode}
min_retention = 0.7
[quantization]
[profiling]
prompt_lengths = {lengths}
new_tokens = 8
warmup = 1
repeats = 2
[docker]
base_image = "python:3.11-slim"
platform = "{platform}"
"""


@pytest.fixture
def write_profile(tmp_path):
    """write_profile(name, **changes) -> path of a small profile TOML for this host."""
    import platform

    from kd2edge.runtime.host import normalize_arch

    def write(name="tiny", lengths=(8, 32), providers=("CPUExecutionProvider",), min_decode=0.0,
              accelerator="none"):
        arch = normalize_arch(platform.machine())
        text = PROFILE_TOML.format(arch=arch, providers=json.dumps(list(providers)), min_decode=min_decode,
                                   lengths=json.dumps(list(lengths)), accelerator=accelerator,
                                   platform="linux/arm64" if arch == "aarch64" else "linux/amd64")
        path = tmp_path / f"{name}.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory, tiny_llama_dir):
    """run/{teacher, distill, export}: a tiny llama as teacher and student, exported with optimum.

    The manifests link export <- distill <- teacher as a kd2edge run does, so the
    profile stage finds the teacher for its baseline.
    """
    from optimum.exporters.onnx import main_export

    from kd2edge.artifacts import Artifact, write_artifact

    run = tmp_path_factory.mktemp("run")
    teacher = Artifact.external(tiny_llama_dir, kind="model", id="tiny-teacher")
    distill = run / "distill"
    import shutil

    shutil.copytree(tiny_llama_dir, distill)
    distill_art = write_artifact(distill, "distill", {}, teacher, id="tiny-student")
    export = run / "export"
    main_export(str(distill), output=str(export), task="text-generation-with-past", device="cpu",
                no_post_process=True)
    write_artifact(export, "export", {}, distill_art, format="onnx")
    return Path(export)

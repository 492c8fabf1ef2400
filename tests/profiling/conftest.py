"""A tiny exported artifact (optimum ONNX, KV cache) with a fake kd2edge lineage, and test profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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

    from kd2edge.profiling.host import normalize_arch

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

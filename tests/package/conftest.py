"""Fixtures: a real tiny exported artifact, a build context for it, and its server in a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd2edge.profiles import profiles_dir

# laptop-cpu with profiling lengths the tiny model's 512-token context can hold.
TINY_PROFILE_PATCH = {"prompt_lengths = [128, 512]": "prompt_lengths = [16, 32]", "new_tokens = 64": "new_tokens = 8"}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A sharp tiny llama exported by optimum (text-generation-with-past) as an 'export' artifact."""
    from optimum.exporters.onnx import main_export

    from kd2edge.artifacts import write_artifact
    from kd2edge.export.testing import sharp_tiny_model_dir

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
    from kd2edge.serve import load_service

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

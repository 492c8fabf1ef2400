"""Build-context pieces: base images, templates, the module scan, requirements, hadolint."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd2edge.errors import ConfigError, StageError
from kd2edge.package.context import (JETSON_RELEASES, ModuleScan, base_image, build_command, build_note, dockerfile,
                                     hadolint, image_requirements, image_tag, make_readable, render, scan_modules,
                                     unreadable_by_others)


def test_render_fills_placeholders_and_rejects_mismatches():
    assert render("FROM @@A@@ # @@B@@ @@A@@", {"A": "x", "B": "y"}) == "FROM x # y x"
    with pytest.raises(KeyError):
        render("@@A@@ @@B@@", {"A": "x"})
    with pytest.raises(KeyError):
        render("@@A@@", {"A": "x", "C": "z"})


def test_base_image_kinds():
    py = base_image("python:3.11-slim-bookworm")
    assert (py.kind, py.python, py.jetson) == ("python", "3.11", None)
    jet = base_image("nvcr.io/nvidia/l4t-jetpack:r36.4.0")
    assert (jet.kind, jet.python) == ("l4t", "3.10")
    assert jet.jetson == JETSON_RELEASES["r36.4"]
    assert (jet.jetson.cuda, jet.jetson.jetpack) == ("12.6", "6.1")
    with pytest.raises(ConfigError, match="r35.4 is not supported"):
        base_image("nvcr.io/nvidia/l4t-jetpack:r35.4.1")
    with pytest.raises(ConfigError, match="ubuntu:22.04 is not supported"):
        base_image("ubuntu:22.04")


def test_build_command_and_tag():
    assert build_command("m:t", "linux/amd64", "/c") == "docker build --network host --platform linux/amd64 -t m:t /c"
    # plain `docker build --platform` works natively, with QEMU, and with both builders; buildx is only
    # needed with a docker-container builder, and the note says so
    assert build_command("m:t", "linux/arm64", "/c") == "docker build --network host --platform linux/arm64 -t m:t /c"
    note = build_note("linux/arm64")
    assert "qemu-user-static" in note and "docker buildx build --platform linux/arm64 --load" in note
    assert image_tag("kd2edge-model", "laptop-cpu", "0123456789abcdef") == "kd2edge-model:laptop-cpu-0123456789ab"


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_scan_follows_kd2edge_imports_at_any_depth(tmp_path):
    root = tmp_path / "kd2edge"
    _write(root, "__init__.py", "")
    _write(root, "entry.py", "import json\nimport numpy as np\nfrom kd2edge.sub import b\n"
                             "def f():\n    import torch\n    from kd2edge import lazy\n")
    _write(root, "sub/__init__.py", "")
    _write(root, "sub/b.py", "from . import c\nfrom .c import name\n")
    _write(root, "sub/c.py", "import tokenizers\nname = 1\n")
    _write(root, "lazy.py", "import psutil\n")
    _write(root, "unused.py", "import transformers\n")
    scan = scan_modules("kd2edge.entry", root)
    assert [p.as_posix() for p in scan.files] == ["__init__.py", "entry.py", "lazy.py", "sub/__init__.py",
                                                   "sub/b.py", "sub/c.py"]
    assert set(scan.libraries) == {"numpy", "torch", "tokenizers", "psutil"}  # json is stdlib
    assert scan.libraries["torch"] == ["kd2edge/entry.py:5"]
    # psutil is imported at module level by lazy.py, which is itself imported lazily: it ships
    assert set(scan.lazy_only) == {"torch"}


def test_requirements_pin_allowed_libraries_and_refuse_heavy_ones():
    cpu = base_image("python:3.11-slim-bookworm")
    scan = ModuleScan(libraries={"numpy": ["a.py:1"], "onnxruntime": ["a.py:2"], "torch": ["a.py:9"]},
                      lazy_only={"torch": ["a.py:9"], "onnxruntime": ["a.py:2"]})
    lines, notes = image_requirements(scan, cpu, "onnxruntime")
    from importlib.metadata import version
    assert lines == [f"numpy=={version('numpy')}", f"onnxruntime=={version('onnxruntime')}"]
    assert len(notes) == 1 and notes[0].startswith("torch is imported only inside functions (a.py:9)")
    eager_torch = ModuleScan(libraries={"torch": ["a.py:3"]}, lazy_only={})
    with pytest.raises(StageError, match=r"torch imported at a.py:3"):
        image_requirements(eager_torch, cpu, "onnxruntime")


def test_jetson_requirements_leave_onnxruntime_to_nvidias_index_and_pin_py310_releases():
    jet = base_image("nvcr.io/nvidia/l4t-jetpack:r36.4.0")
    scan = ModuleScan(libraries={"numpy": ["a.py:1"], "onnxruntime": ["a.py:2"]}, lazy_only={})
    lines, _ = image_requirements(scan, jet, "onnxruntime-gpu")
    assert lines == ["numpy==2.2.6"]
    server = ModuleScan(libraries={"uvicorn": ["s.py:1"], "starlette": ["s.py:2"], "prometheus_client": ["m.py:1"]})
    from importlib.metadata import version
    prometheus = f"prometheus_client=={version('prometheus_client')}"
    # the newest uvicorn and starlette with Python 3.10 wheels; the 3.11 images get the tested versions
    assert image_requirements(server, jet, "onnxruntime-gpu")[0] == [prometheus, "starlette==1.7.0", "uvicorn==0.54.0"]
    cpu = image_requirements(server, base_image("python:3.11-slim-bookworm"), "onnxruntime")[0]
    assert cpu == [prometheus, f"starlette=={version('starlette')}", f"uvicorn=={version('uvicorn')}"]
    with pytest.raises(StageError, match="tomllib"):
        image_requirements(ModuleScan(libraries={"tomllib": ["p.py:1"]}), jet, "onnxruntime-gpu")


def test_the_real_image_modules_are_torch_free_and_need_only_runtime_libraries():
    scan = scan_modules()
    files = {p.as_posix() for p in scan.files}
    assert {"runtime/entrypoint.py", "runtime/serve.py", "runtime/lm.py", "data/prompts.py", "runtime/profiler.py"} <= files
    assert "cli.py" not in files and "package/stage.py" not in files
    lines, _ = image_requirements(scan, base_image("python:3.11-slim-bookworm"), "onnxruntime")
    names = {line.split("==")[0].lower() for line in lines}
    assert {"onnxruntime", "tokenizers", "numpy", "jinja2", "uvicorn", "starlette", "prometheus_client"} <= names
    assert not names & {"torch", "transformers", "optimum", "onnx"}


@pytest.mark.parametrize("profile", ["laptop-cpu", "raspberry-pi-5", "jetson-orin-nano"])
def test_generated_dockerfiles_pass_hadolint(profile, tmp_path):
    from kd2edge.profiles import load_profile

    p = load_profile(profile)
    base = base_image(p.docker.base_image)
    path = tmp_path / "Dockerfile"
    path.write_text(dockerfile(base, p.name, p.docker.platform, 8080, build_command("i:t", p.docker.platform, ".")))
    findings = hadolint(path)
    assert findings == [], findings
    text = path.read_text()
    assert f"FROM {p.docker.base_image}" in text
    if base.jetson:
        assert "onnxruntime-gpu==1.23.0" in text and "https://pypi.jetson-ai-lab.io/jp6/cu126" in text
        assert "CUDA 12.6" in text and "L4T r36.4" in text


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    findings = hadolint(path)
    assert findings is not None and any("DL3007" in f for f in findings)  # the :latest tag


def test_package_config_rejects_bad_image_names():
    from kd2edge.package.config import PackageConfig
    from kd2edge.schema import from_dict

    assert from_dict(PackageConfig, {"image_name": "registry.local/team/kd2edge-model"}).image_name
    with pytest.raises(ConfigError, match="not a Docker repository name"):
        from_dict(PackageConfig, {"image_name": "Bad Name"})


def test_the_projects_own_dockerfile_passes_hadolint():
    from kd2edge.profiles import profiles_dir

    dockerfile_path = profiles_dir().parent / "Dockerfile"
    assert hadolint(dockerfile_path) == []
    text = dockerfile_path.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text and "download.pytorch.org/whl/cpu" in text


def test_make_readable_opens_narrow_files_to_the_image_user(tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "app" / "artifact").mkdir(parents=True)
    data, script, fine = ctx / "app/artifact/model.onnx.data", ctx / "app/run.sh", ctx / "app/settings.json"
    for path, mode in ((data, 0o600), (script, 0o700), (fine, 0o644)):
        path.write_text("x")
        path.chmod(mode)
    (ctx / "app" / "artifact").chmod(0o700)
    assert unreadable_by_others(ctx) == ["app/artifact (0700)", "app/artifact/model.onnx.data (0600)", "app/run.sh (0700)"]
    fixed = make_readable(ctx)
    assert fixed == ["app/artifact (was 0700)", "app/artifact/model.onnx.data (was 0600)", "app/run.sh (was 0700)"]
    assert unreadable_by_others(ctx) == [] and make_readable(ctx) == []
    modes = {p.name: p.stat().st_mode & 0o777 for p in (data, script, fine, ctx / "app" / "artifact")}
    assert modes == {"model.onnx.data": 0o644, "run.sh": 0o755, "settings.json": 0o644, "artifact": 0o755}

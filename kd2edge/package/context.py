"""Docker build contexts: one folder per device profile that `docker build` turns into a serving image.

Layout of a context (what `write_context` writes):

    Dockerfile          for the profile's base image (python:3.x-slim or NVIDIA L4T JetPack)
    .dockerignore
    README.md           build / run commands, endpoints, the Jetson versions
    requirements.txt    the runtime's pinned, torch-free requirements
    app/kd2edge/...     only the kd2edge modules the entrypoint reaches (torch-free, checked)
    app/settings.json   the profile's serving and profiling settings
    app/artifact/       the exported artifact, copied

Every file in a context is made readable by everyone (folders listable): the image runs
as uid 10001, and `COPY` keeps the modes of the files it copies, so a file written 0600
(safetensors and ONNX external data are) would be unreadable in the container. Docker's
legacy builder has no `COPY --chmod`, so the modes are fixed here.

The image's code is *copied*, not installed from a wheel: only the modules that
`kd2edge.runtime.entrypoint` reaches through its imports, found by reading their
import statements. Every third-party import among them must be one of the runtime
libraries (IMAGE_LIBRARIES); one at module level that is not (torch...) is a bug
and stops packaging. The requirements are the installed versions of exactly the
libraries those modules import.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import kd2edge
from kd2edge.errors import ConfigError, StageError

ENTRY_MODULE = "kd2edge.runtime.entrypoint"
# Distributions the image may install (lower-case names): the runtime, the profiler and the HTTP server.
IMAGE_LIBRARIES = ("onnxruntime", "onnxruntime-gpu", "tokenizers", "numpy", "jinja2", "psutil", "tqdm",
                   "uvicorn", "starlette", "prometheus-client")
# Never importable where the image's code is checked, so a stray import fails loudly. (click is not
# among them: uvicorn imports it; kd2edge's own CLI is kept out because it is not in the context.)
HEAVY_MODULES = ("torch", "transformers", "optimum", "accelerate", "trl", "datasets", "onnx")
# The newest releases with wheels for Python 3.10 (the JetPack 6 image); images on Python 3.11+
# get the versions kd2edge is tested with (installed here).
PY310_PINS = {"numpy": "2.2.6", "uvicorn": "0.54.0", "starlette": "1.7.0"}
# Standard-library modules newer than Python 3.10 (the JetPack 6 image runs 3.10).
PY311_MODULES = ("tomllib", "wsgiref.types")
TEMPLATES = Path(__file__).parent / "templates"
APP = "app"


@dataclass(frozen=True)
class JetsonRelease:
    """What an L4T release ships, and where its onnxruntime-gpu wheels come from."""

    l4t: str
    jetpack: str
    cuda: str
    ubuntu: str
    python: str
    ort_index: str
    ort_version: str


# NVIDIA's Jetson AI Lab index builds onnxruntime-gpu per JetPack and CUDA (jp6/cu126 = JetPack 6.1/6.2,
# CUDA 12.6); PyPI has no aarch64 CUDA build. r36.4 images are Ubuntu 22.04 with Python 3.10.
JETSON_RELEASES = {
    "r36.4": JetsonRelease(l4t="r36.4", jetpack="6.1", cuda="12.6", ubuntu="22.04", python="3.10",
                           ort_index="https://pypi.jetson-ai-lab.io/jp6/cu126", ort_version="1.23.0"),
}


@dataclass(frozen=True)
class BaseImage:
    """How to build on a profile's base image."""

    kind: str                 # "python" (official python:X.Y images) or "l4t" (NVIDIA JetPack)
    image: str
    python: str               # "3.11"
    jetson: JetsonRelease | None = None


@dataclass
class ModuleScan:
    """The kd2edge modules an entry module reaches, and the libraries they import."""

    files: list[Path] = field(default_factory=list)          # relative to the kd2edge package folder
    libraries: dict[str, list[str]] = field(default_factory=dict)    # import name -> where ("path:line")
    lazy_only: dict[str, list[str]] = field(default_factory=dict)    # imported inside functions only


def base_image(image: str) -> BaseImage:
    """Classify a profile's `docker.base_image`.

    Raises:
        ConfigError: an image kd2edge does not know how to build on.
    """
    m = re.match(r"^(?:docker\.io/)?(?:library/)?python:(3\.\d+)", image)
    if m:
        return BaseImage("python", image, m.group(1))
    m = re.match(r"^nvcr\.io/nvidia/l4t-(?:jetpack|base|cuda)[^:]*:(r\d+\.\d+)", image)
    if m:
        release = JETSON_RELEASES.get(m.group(1))
        if release is None:
            raise ConfigError(f"docker.base_image {image}: L4T {m.group(1)} is not supported "
                              f"(supported: {', '.join(JETSON_RELEASES)}): use nvcr.io/nvidia/l4t-jetpack:r36.4.0",
                              source="profile")
        return BaseImage("l4t", image, release.python, release)
    raise ConfigError(f"docker.base_image {image} is not supported: use an official python:3.x-slim image "
                      f"or NVIDIA's nvcr.io/nvidia/l4t-jetpack:r36.4.0", source="profile")


def _module_file(root: Path, module: str) -> Path | None:
    """The source file of `kd2edge.x.y` under `root` (the kd2edge folder), or None."""
    parts = module.split(".")[1:]
    as_package = root.joinpath(*parts, "__init__.py")
    if as_package.is_file():
        return as_package
    as_module = root.joinpath(*parts[:-1], parts[-1] + ".py") if parts else root / "__init__.py"
    return as_module if as_module.is_file() else None


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(absolute module name, line, inside a function) for every import in a module's syntax tree."""
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[:len(package) - (child.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                out.append((base, child.lineno, in_function))
                # `from kd2edge.data import prompts` may name a submodule.
                out.extend((f"{base}.{a.name}", child.lineno, in_function) for a in child.names if a.name != "*")
            visit(child, nested)

    visit(tree, False)
    return out


def scan_modules(entry: str = ENTRY_MODULE, root: Path | None = None) -> ModuleScan:
    """Follow the kd2edge imports of `entry` (at any depth) and collect what they import.

    Args:
        entry: the dotted entry module.
        root: the kd2edge package folder (default: the installed one).

    Returns:
        The module files (with every parent package's __init__.py) and the third-party
        top-level import names with where they occur.
    """
    root = Path(root or Path(kd2edge.__file__).parent)
    scan = ModuleScan()
    seen: set[str] = set()
    todo = [entry]
    stdlib = set(sys.stdlib_module_names)
    eager: dict[str, list[str]] = {}
    lazy: dict[str, list[str]] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(root, module)
        if path is None:
            continue  # a name imported from a module, not a submodule
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        rel = path.relative_to(root)
        scan.files.append(rel)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line, in_function in _imports(tree, module, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top == "kd2edge":
                todo.append(name)
            elif name in PY311_MODULES:
                eager.setdefault(name, []).append(f"kd2edge/{rel.as_posix()}:{line}")
            elif top and top not in stdlib and top != "__future__":
                (lazy if in_function else eager).setdefault(top, []).append(f"kd2edge/{rel.as_posix()}:{line}")
    scan.files = sorted(set(scan.files))
    scan.libraries = {k: sorted(set(v)) for k, v in sorted({**lazy, **eager}.items())}
    scan.lazy_only = {k: sorted(set(v)) for k, v in sorted(lazy.items()) if k not in eager}
    return scan


def distribution_of(import_name: str) -> str | None:
    """The installed distribution providing a top-level import name ("jinja2" -> "Jinja2"), or None."""
    names = importlib.metadata.packages_distributions().get(import_name) or []
    return names[0] if names else None


def normalize_name(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503): "prometheus_client" -> "prometheus-client"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_requirements(scan: ModuleScan, base: BaseImage, onnxruntime_package: str) -> tuple[list[str], list[str]]:
    """Pinned requirements for the image, from what its modules import.

    Args:
        scan: the image's modules and their imports.
        base: the base image (Jetson releases install onnxruntime-gpu from NVIDIA's index; Python 3.10
            images get the PY310_PINS versions).
        onnxruntime_package: the profile's `docker.onnxruntime_package`.

    Returns:
        (requirement lines, notes): notes name lazily imported libraries left out of the image.

    Raises:
        StageError: a module-level import of a library the image must not hold (torch...),
            or a Python 3.11 module in an image running 3.10.
    """
    allowed = {normalize_name(n) for n in IMAGE_LIBRARIES}
    wanted: dict[str, str] = {}
    notes: list[str] = []
    problems: list[str] = []
    for name, where in scan.libraries.items():
        if name in PY311_MODULES:
            if base.python == "3.10":
                problems.append(f"{name} (Python 3.11+, the image runs {base.python}) imported at {', '.join(where)}")
            continue
        dist = distribution_of(name)
        key = normalize_name(dist or name)
        if key in allowed and dist is not None:
            wanted[key] = dist
        elif name in scan.lazy_only:
            notes.append(f"{name} is imported only inside functions ({', '.join(where)}) and is not in the image")
        else:
            problems.append(f"{name} imported at {', '.join(where)}")
    if problems:
        raise StageError("the image's modules must import only the runtime libraries "
                         f"({', '.join(IMAGE_LIBRARIES)}): {'; '.join(problems)}: move these imports into "
                         "the functions that need them, outside the serving and profiling paths")
    lines = []
    for key, dist in sorted(wanted.items()):
        version = importlib.metadata.version(dist)
        if key in ("onnxruntime", "onnxruntime-gpu"):
            if base.jetson is not None:
                continue  # installed from NVIDIA's index in its own Dockerfile step
            dist = onnxruntime_package
        if base.python == "3.10":
            version = PY310_PINS.get(key, version)
        lines.append(f"{dist}=={version}")
    return lines, notes


def render(template: str, values: dict[str, str]) -> str:
    """Replace every `@@NAME@@` in `template` with values[NAME].

    Raises:
        KeyError: a placeholder without a value, or a value without a placeholder (a template bug).
    """
    names = set(re.findall(r"@@([A-Z0-9_]+)@@", template))
    if names - set(values) or set(values) - names:
        raise KeyError(f"template placeholders {sorted(names)} do not match values {sorted(values)}")
    return re.sub(r"@@([A-Z0-9_]+)@@", lambda m: str(values[m.group(1)]), template)


def build_command(image: str, platform: str, context_dir: str | Path) -> str:
    """The command that builds the image, for any platform.

    Plain `docker build --platform` works with the legacy builder and with BuildKit's default
    (docker) driver, natively or through QEMU for another architecture (see `build_note`), and
    leaves the image in the local store. `docker buildx build --load` is only needed with a
    docker-container builder, e.g. for multi-platform builds. `--network host`: the build's
    `pip install` needs the network, and a daemon without a bridge network
    (`dockerd --bridge=none`) gives build steps none otherwise; with a bridge it changes nothing
    the image holds.
    """
    return f"docker build --network host --platform {platform} -t {image} {context_dir}"


def build_note(platform: str) -> str:
    """What building for `platform` needs on a host of another architecture, in one sentence."""
    arch = platform.rsplit("/", 1)[-1]
    return (f"On a host of another architecture, building {platform} needs QEMU registered with binfmt_misc "
            f"(apt-get install qemu-user-static binfmt-support, or `docker run --privileged --rm tonistiigi/binfmt "
            f"--install {arch}`); `docker buildx build --platform {platform} --load` is only needed with a "
            f"docker-container builder.")


def image_tag(image_name: str, profile: str, artifact_hash: str) -> str:
    """`name:profile-<12 hex of the artifact hash>`: one tag per profile and artifact."""
    return f"{image_name}:{profile}-{artifact_hash[:12]}"


def dockerfile(base: BaseImage, profile: str, platform: str, port: int, build: str) -> str:
    """The Dockerfile text for `base`."""
    values = {"PROFILE": profile, "PLATFORM": platform, "BASE_IMAGE": base.image, "PORT": str(port),
              "BUILD_COMMAND": build}
    if base.jetson is None:
        return render((TEMPLATES / "Dockerfile.python").read_text(encoding="utf-8"), values)
    j = base.jetson
    values.update(L4T=j.l4t, JETPACK=j.jetpack, CUDA=j.cuda, UBUNTU=j.ubuntu, PYTHON=j.python,
                  ORT_INDEX=j.ort_index, ORT_REQUIREMENT=f"onnxruntime-gpu=={j.ort_version}")
    return render((TEMPLATES / "Dockerfile.l4t").read_text(encoding="utf-8"), values)


def readme(base: BaseImage, profile: str, platform: str, image: str, port: int, build: str,
           requirements: list[str], notes: str) -> str:
    """The context's README.md: how to build, run, profile and call the image."""
    gpu = "--runtime nvidia " if base.jetson is not None else ""
    if base.jetson is not None:
        j = base.jetson
        device = (f"Built on {base.image}: L4T {j.l4t} (JetPack {j.jetpack}, Ubuntu {j.ubuntu}, Python {j.python}, "
                  f"CUDA {j.cuda}). The board must run the same L4T release (check /etc/nv_tegra_release). "
                  f"onnxruntime-gpu=={j.ort_version} comes from NVIDIA's Jetson AI Lab index {j.ort_index} "
                  f"(PyPI has no aarch64 CUDA build) and needs CUDA {j.cuda}. Run with `--runtime nvidia`; "
                  f"without a usable CUDA the server falls back to the CPU provider and says so in its log "
                  f"and in GET /healthz (`providers`, `notes`).")
    else:
        device = f"Built on {base.image} (Python {base.python}), CPU execution provider."
    if base.jetson is not None:
        requirements = requirements + [f"onnxruntime-gpu=={base.jetson.ort_version}  (from {base.jetson.ort_index})"]
    values = {"PROFILE": profile, "PLATFORM": platform, "IMAGE": image, "PORT": str(port), "BUILD_COMMAND": build,
              "BUILD_NOTE": build_note(platform), "GPU_FLAG": gpu, "DEVICE": device, "NOTES": notes or "-",
              "REQUIREMENTS": "\n".join(f"    {r}" for r in requirements) or "    (none)"}
    return render((TEMPLATES / "README.md").read_text(encoding="utf-8"), values)


def copy_modules(files: list[Path], app_dir: Path, root: Path | None = None) -> None:
    """Copy the scanned kd2edge modules into `app_dir/kd2edge/`, keeping their layout."""
    root = Path(root or Path(kd2edge.__file__).parent)
    for rel in files:
        target = app_dir / "kd2edge" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def make_readable(folder: Path) -> list[str]:
    """Give everyone read access to every file under `folder` (and list access to its folders).

    Files become 0644 (0755 when their owner may execute them), folders 0755; symlinks are left alone.

    Args:
        folder: the build context.

    Returns:
        The files and folders whose modes were too narrow, relative to `folder`, with their old modes
        (e.g. "app/artifact/model.onnx.data (was 0600)").
    """
    fixed: list[str] = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            wanted = mode | 0o755
        else:
            wanted = mode | (0o755 if mode & stat.S_IXUSR else 0o644)
        if wanted != mode:
            os.chmod(path, wanted)
        need = (stat.S_IROTH | stat.S_IXOTH) if path.is_dir() else stat.S_IROTH
        if mode & need != need:
            fixed.append(f"{path.relative_to(folder).as_posix() or '.'} (was {mode:04o})")
    return fixed


def unreadable_by_others(folder: Path) -> list[str]:
    """Files under `folder` another user (the image's uid 10001) cannot read, folders it cannot list.

    Args:
        folder: the build context.

    Returns:
        Their paths relative to `folder` with their modes; empty when the image can read everything.
    """
    bad = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        need = (stat.S_IROTH | stat.S_IXOTH) if path.is_dir() else stat.S_IROTH
        if mode & need != need:
            bad.append(f"{path.relative_to(folder).as_posix() or '.'} ({mode:04o})")
    return bad


def settings(profile, port: int, max_new_tokens: int, max_queue: int) -> dict:
    """The image's app/settings.json: serving and profiling values from the device profile.

    Args:
        profile: a `kd2edge.profiles.DeviceProfile`.
    """
    providers = list(profile.runtime.execution_providers)
    return {
        "profile": profile.name,
        "artifact": "artifact",  # relative to the app folder
        "host": "0.0.0.0",  # inside a container: reachable through -p PORT:PORT
        "port": port,
        "providers": providers,
        "threads": profile.runtime.threads,
        # A GPU profile whose CUDA is not usable (no --runtime nvidia) still serves, on CPU, with a warning.
        "allow_fallback": providers != ["CPUExecutionProvider"],
        "context_length": profile.runtime.context_length,
        "max_new_tokens": max_new_tokens,
        "max_queue": max_queue,
        "profiling": {"prompt_lengths": list(profile.profiling.prompt_lengths), "new_tokens": profile.profiling.new_tokens,
                      "warmup": profile.profiling.warmup, "repeats": profile.profiling.repeats,
                      "shared_memory": profile.hardware.shared_memory},
        "budgets": {k: v for k, v in vars(profile.budgets).items() if k != "min_retention"},
    }


@dataclass(frozen=True)
class ContextInfo:
    context_dir: Path
    dockerfile: Path
    build_command: str
    image: str
    platform: str
    requirements: list[str]
    modules: list[str]
    notes: list[str]
    made_readable: list[str] = field(default_factory=list)


def write_context(artifact_dir: Path, artifact_hash: str, profile, out_dir: Path, image_name: str,
                  port: int, max_new_tokens: int, max_queue: int) -> ContextInfo:
    """Write a complete Docker build context for `profile` into `out_dir`.

    Args:
        artifact_dir: the exported artifact folder (copied whole into app/artifact).
        artifact_hash: its content hash (names the image tag).
        profile: the `DeviceProfile` to build for.
        out_dir: the context folder (created if needed).
        image_name: the image repository name ("kd2edge-model").
        port: the port the server listens on in the container.
        max_new_tokens: tokens generated per answer.
        max_queue: requests waiting behind the running one before 503.

    Returns:
        What was written and the build command.

    Raises:
        ConfigError: an unsupported base image.
        StageError: the image's modules import a library the image must not hold.
    """
    out_dir = Path(out_dir)
    base = base_image(profile.docker.base_image)
    scan = scan_modules()
    requirements, notes = image_requirements(scan, base, profile.docker.onnxruntime_package)
    image = image_tag(image_name, profile.name, artifact_hash)
    platform = profile.docker.platform
    build = build_command(image, platform, out_dir)
    build_here = build_command(image, platform, ".")  # what the context's own files say: run it in the folder
    app_dir = out_dir / APP
    app_dir.mkdir(parents=True, exist_ok=True)
    copy_modules(scan.files, app_dir)
    shutil.copytree(artifact_dir, app_dir / "artifact", dirs_exist_ok=True)
    (app_dir / "settings.json").write_text(json.dumps(settings(profile, port, max_new_tokens, max_queue), indent=2) + "\n",
                                           encoding="utf-8")
    pins = ", ".join(f"{k} {v}" for k, v in PY310_PINS.items())
    header = [f"# kd2edge serving image, profile {profile.name}; runtime libraries and the HTTP server only (no torch).",
              "# Versions are those kd2edge was tested with" +
              (f"; for Python 3.10 the newest with 3.10 wheels: {pins}." if base.python == "3.10" else ".")]
    (out_dir / "requirements.txt").write_text("\n".join(header + requirements) + "\n", encoding="utf-8")
    (out_dir / "Dockerfile").write_text(dockerfile(base, profile.name, platform, port, build_here), encoding="utf-8")
    shutil.copy2(TEMPLATES / "dockerignore", out_dir / ".dockerignore")
    (out_dir / "README.md").write_text(readme(base, profile.name, platform, image, port, build_here, requirements,
                                              profile.docker.notes), encoding="utf-8")
    made_readable = make_readable(out_dir)
    return ContextInfo(out_dir, out_dir / "Dockerfile", build, image, platform, requirements,
                       [f"kd2edge/{f.as_posix()}" for f in scan.files], notes, made_readable)


def entrypoint_argv(context_dir: Path, *args: str, python: str | None = None) -> list[str]:
    """The command that runs the context's entrypoint outside Docker, as the image would.

    It imports kd2edge from `context_dir/app` only, with torch, transformers and the other
    toolchain libraries made unimportable, and refuses to start if kd2edge came from
    anywhere else (an installed copy): so what runs is exactly what the image holds.
    """
    app = (Path(context_dir) / APP).resolve()
    boot = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(app)!r})\n"
        f"sys.modules.update(dict.fromkeys({HEAVY_MODULES!r}))\n"
        "import kd2edge\n"
        f"if not kd2edge.__file__.startswith({str(app)!r}):\n"
        "    sys.exit('kd2edge was imported from ' + kd2edge.__file__ + ', not from the build context')\n"
        f"sys.argv = [{ENTRY_MODULE!r}] + sys.argv[1:]\n"
        f"runpy.run_module({ENTRY_MODULE!r}, run_name='__main__', alter_sys=True)\n"
    )
    return [python or sys.executable, "-c", boot, *args]


def hadolint(dockerfile_path: Path) -> list[str] | None:
    """hadolint's findings on a Dockerfile (empty when clean), or None when hadolint is not installed."""
    exe = shutil.which("hadolint") or (str(Path(sys.executable).parent / "hadolint")
                                       if (Path(sys.executable).parent / "hadolint").is_file() else None)
    if exe is None:
        return None
    proc = subprocess.run([exe, "--no-color", str(dockerfile_path)], capture_output=True, text=True, timeout=60)
    return [line for line in proc.stdout.splitlines() if line.strip()] + \
        ([proc.stderr.strip()] if proc.returncode and not proc.stdout.strip() else [])

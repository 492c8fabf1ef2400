"""Device profiles: the hardware, runtime settings, budgets and packaging of a target.

Profiles are data (TOML files in the top-level `profiles/` folder, shipped in the
wheel); this module turns one into a frozen, validated `DeviceProfile`. A profile
is addressed by name (`laptop-cpu`) or by a path to a `.toml`/`.json` file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kd2edge.errors import ConfigError, ProfileError
from kd2edge.schema import Bytes, Rate, from_dict, rule

PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
             "CoreMLExecutionProvider", "DmlExecutionProvider")


@dataclass(frozen=True)
class Hardware:
    arch: Literal["x86_64", "aarch64"]
    cores: int = field(metadata=rule(min=1, max=1024))
    memory: Bytes = field(metadata=rule(min=64 * 2**20))
    memory_bandwidth: Rate = field(metadata=rule(min=1e8, help="bytes/s, datasheet peak"))
    accelerator: str = "none"
    shared_memory: bool = False  # CPU and GPU share DRAM (Jetson): one memory budget


@dataclass(frozen=True)
class Runtime:
    execution_providers: tuple[str, ...]
    threads: int = field(metadata=rule(min=0, max=1024, help="intra-op threads; 0 = one per core of the host"))
    exporter: Literal["onnx", "onnx-genai"] = "onnx"
    context_length: int = field(default=2048, metadata=rule(min=64, max=1_048_576))

    def problems(self) -> list[str]:
        out = [f"execution_providers: unknown provider {p!r} (known: {', '.join(PROVIDERS)})"
               for p in self.execution_providers if p not in PROVIDERS]
        if not self.execution_providers:
            out.append("execution_providers: name at least one, e.g. ['CPUExecutionProvider']")
        return out


@dataclass(frozen=True)
class Budgets:
    max_artifact_mb: float = field(metadata=rule(min=1))
    max_peak_memory_mb: float = field(metadata=rule(min=1))
    max_ttft_ms: float = field(metadata=rule(min=1))
    min_decode_tokens_per_s: float = field(metadata=rule(min=0))
    min_retention: float = field(metadata=rule(min=0, max=1.5))


@dataclass(frozen=True)
class Quantization:
    bits: int = 4
    group_size: int = 128
    act_order: bool = True
    sym: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.bits not in (2, 3, 4, 8):
            out.append(f"bits: {self.bits} is not supported (use 2, 3, 4 or 8)")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            out.append(f"group_size: {self.group_size} must be -1 (per channel) or a power of two >= 16")
        return out


@dataclass(frozen=True)
class Profiling:
    prompt_lengths: tuple[int, ...] = (128, 512)
    new_tokens: int = field(default=64, metadata=rule(min=1, max=4096))
    warmup: int = field(default=1, metadata=rule(min=0, max=100))
    repeats: int = field(default=3, metadata=rule(min=1, max=1000))

    def problems(self) -> list[str]:
        if not self.prompt_lengths or any(n < 1 for n in self.prompt_lengths):
            return ["prompt_lengths: give one or more positive token counts, e.g. [128, 512]"]
        return []


@dataclass(frozen=True)
class Docker:
    base_image: str
    platform: Literal["linux/amd64", "linux/arm64"]
    onnxruntime_package: str = "onnxruntime"  # pip requirement for the runtime image
    notes: str = ""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    hardware: Hardware
    runtime: Runtime
    budgets: Budgets
    quantization: Quantization
    docker: Docker
    profiling: Profiling = Profiling()

    def problems(self) -> list[str]:
        out = []
        if "CPUExecutionProvider" not in self.runtime.execution_providers and self.hardware.accelerator == "none":
            out.append("runtime.execution_providers: a device without an accelerator needs CPUExecutionProvider")
        expected = {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}[self.hardware.arch]
        if self.docker.platform != expected:
            out.append(f"docker.platform: {self.docker.platform} does not match hardware.arch {self.hardware.arch}")
        return out


def _toml_loads(text: str) -> dict:
    # tomllib is stdlib from Python 3.11; the Jetson image runs 3.10 and never reads TOML.
    try:
        import tomllib
    except ModuleNotFoundError:
        raise ProfileError("reading .toml profiles needs Python 3.11+: pass the profile as .json",
                           source="profile") from None
    return tomllib.loads(text)


def profiles_dir() -> Path:
    """The folder of built-in profiles (the `profiles` package)."""
    import profiles  # the data package shipped beside kd2edge

    return Path(profiles.__file__).parent


def list_profiles() -> list[DeviceProfile]:
    """All built-in profiles, sorted by name."""
    return [load_profile(p.stem) for p in sorted(profiles_dir().glob("*.toml"))]


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by built-in name or file path, validating every field.

    Raises:
        ProfileError: unknown name, unreadable file, or every problem in its content.
    """
    text_path = Path(name_or_path)
    if text_path.suffix in (".toml", ".json") or text_path.exists():
        path = text_path
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist", source="profile")
    else:
        path = profiles_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            known = ", ".join(p.stem for p in sorted(profiles_dir().glob("*.toml")))
            raise ProfileError(f"unknown profile {str(name_or_path)!r} (known: {known}; or give a .toml path)",
                               source="profile")
    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw) if path.suffix == ".json" else _toml_loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ProfileError(f"cannot parse {path.name}: {e}", source="profile") from e
    data.setdefault("name", path.stem)
    try:
        return from_dict(DeviceProfile, data, source=f"profile {path.name}")
    except ConfigError as e:  # the schema's error, re-labelled as a profile problem
        raise ProfileError(e.problems, source=e.source) from None

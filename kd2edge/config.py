"""The run config: one frozen, validated object describing a whole `kd2edge run`.

It is built from (lowest to highest precedence) defaults, a `--config` file
(JSON or TOML) and CLI flags; the device profile is loaded and embedded whole, and
the sections' "use the profile's" fields (None) are resolved from it. The result
can be printed (`--print-config`) and fed back (`--config FILE`) to reproduce a run.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd2edge.distill.config import DistillConfig
from kd2edge.errors import ConfigError
from kd2edge.evaluate.config import EvaluateConfig
from kd2edge.export.config import ExportConfig
from kd2edge.package.config import PackageConfig
from kd2edge.profiles import DeviceProfile, load_profile
from kd2edge.profiling.config import ProfileStageConfig
from kd2edge.quantize.config import QuantizeConfig
from kd2edge.schema import from_dict, rule, to_dict

# The run's stages in order, each with the RunConfig field that holds its settings: the one
# name that differs is the profile stage's, `profiling`, since `profile` is the device profile.
STAGE_SECTIONS = {"distill": "distill", "quantize": "quantize", "export": "export", "profile": "profiling",
                  "evaluate": "evaluate", "package": "package"}
STAGES = tuple(STAGE_SECTIONS)


@dataclass(frozen=True)
class RunConfig:
    profile: DeviceProfile
    teacher: str = "embedded"   # "embedded" (SmolLM2-135M-Instruct GGUF), a hub id, a folder or a .gguf
    data: str = "xquad"         # "xquad[-en|-es]", "embedded[-en|-es]", a hub id, a local SQuAD JSON / JSONL file; "SPEC@split[slice]"
    seed: int = field(default=0, metadata=rule(min=0))
    distill: DistillConfig = DistillConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    export: ExportConfig = ExportConfig()
    profiling: ProfileStageConfig = ProfileStageConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    package: PackageConfig = PackageConfig()

    def stage_config(self, stage: str) -> dict:
        """The JSON-able part of the config that decides `stage`'s output (its fingerprint)."""
        common = {"seed": self.seed, "teacher": self.teacher, "data": self.data}
        out = {**common, stage: to_dict(getattr(self, STAGE_SECTIONS[stage]))}
        if stage in ("profile", "package", "export"):
            out["device"] = to_dict(self.profile)
        return out


def load_config(file: str | Path | None = None, profile: str | None = None,
                overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build the resolved run config.

    Args:
        file: a JSON or TOML config file (as written by `--print-config`), or None.
        profile: a profile name or path; overrides the file's.
        overrides: dotted keys to values from CLI flags, e.g. {"quantize.bits": 4}.
            A None value means "not given" and is ignored.

    Returns:
        The frozen config with the profile embedded and profile defaults resolved.

    Raises:
        ConfigError: with every problem found (unknown keys, types, ranges).
        ProfileError: an unknown or malformed profile.
    """
    data: dict[str, Any] = {}
    if file is not None:
        data = _read_file(config_path(file))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if profile is not None:
        data["profile"] = profile
    data.setdefault("profile", "laptop-cpu")
    if isinstance(data["profile"], str):
        data["profile"] = to_dict(load_profile(data["profile"]))
    config = from_dict(RunConfig, data, source=str(file) if file else "config")
    return resolve(config)


def resolve(config: RunConfig) -> RunConfig:
    """Fill the sections' None ("the profile's") fields from the device profile."""
    q, p = config.quantize, config.profile.quantization
    quantize = dataclasses.replace(
        q,
        bits=p.bits if q.bits is None else q.bits,
        group_size=p.group_size if q.group_size is None else q.group_size,
        act_order=p.act_order if q.act_order is None else q.act_order,
        sym=p.sym if q.sym is None else q.sym,
    )
    export = config.export
    if export.exporter is None:
        export = dataclasses.replace(export, exporter=config.profile.runtime.exporter)
    evaluate = config.evaluate
    if evaluate.data is None:
        evaluate = dataclasses.replace(evaluate, data=config.data)
    return dataclasses.replace(config, quantize=quantize, export=export, evaluate=evaluate)


def data_leak_warning(config: RunConfig) -> str | None:
    """A warning when training and evaluation would read the same questions.

    Without a split in the spec, training reads its train part and evaluation its validation
    part (a single file is split by article: `kd2edge.data.splits`). A spec that names its split
    ("FILE@all") overrides both, so the same spec for both stages means the same items.
    """
    data, evaluate = config.data, config.evaluate.data
    if "@" in data and evaluate == data:
        return (f"training and evaluation both read {data}: drop the '@{data.rpartition('@')[2]}' so that training "
                f"reads the train part and evaluation the validation part, or set evaluate.data to other data")
    return None


def dump_config(config: RunConfig) -> str:
    """The config as JSON, loadable again with `load_config(file=...)`."""
    return json.dumps(to_dict(config), indent=2) + "\n"


def recipes_dir() -> Path:
    """The shipped recipes: partial run configs (`kd2edge/recipes/*.toml`)."""
    return Path(__file__).parent / "recipes"


def config_path(name_or_path: str | Path) -> Path:
    """A config file by path, or a shipped recipe by name (`--config study`), as profiles are found.

    Raises:
        ConfigError: neither a file nor a recipe's name (the message lists the recipes).
    """
    path = Path(name_or_path)
    if path.suffix in (".toml", ".json") or path.exists():
        return path
    recipe = recipes_dir() / f"{name_or_path}.toml"
    if recipe.is_file():
        return recipe
    known = ", ".join(p.stem for p in sorted(recipes_dir().glob("*.toml")))
    raise ConfigError(f"no config file or recipe {str(name_or_path)!r} (recipes: {known}; or give a .toml/.json path)",
                      source="config")


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}", source="config") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path.name} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}",
                          source="config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a table of keys at the top level", source="config")
    return data

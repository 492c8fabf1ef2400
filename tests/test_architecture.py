"""The house rules of the code, checked by reading every module's imports (module level and in functions).

Layers, from the bottom:
- core: every kd2edge module outside the stage packages and the composition layer (data, scoring,
  runtime, reasoning, models, sizing, artifacts, ...), and the top-level `exporters` package;
- stage packages: distill, quantize, export, profiling, evaluate, package (one per pipeline stage);
- composition: the CLI (`kd2edge.cli`, `kd2edge.cli_common`, every `*.cli` module), the run config
  that composes the stages' config sections, the pipeline, the report, and `kd2edge.testing` (tiny
  models and checkpoints for tests and benchmarks, made with any stage's code).
A module imports its own layer's or lower layers' modules only, a stage package imports no other
stage package, nothing but the CLI imports the CLI, and no two files import each other, even
through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGE_PACKAGES = ("distill", "quantize", "export", "profiling", "evaluate", "package")
COMPOSITION = {"kd2edge.cli", "kd2edge.cli_common", "kd2edge.config", "kd2edge.pipeline", "kd2edge.report",
               "kd2edge.report_html", "kd2edge.testing"}
CLI = {"kd2edge.cli", "kd2edge.cli_common"}


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("kd2edge", "exporters"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """The kd2edge / exporters modules `module` imports; `from pkg import sub` counts as importing pkg.sub."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("kd2edge", "exporters") and n != module}
    return found


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if module in COMPOSITION or parts[-1] == "cli":
        return "composition"
    if parts[0] == "kd2edge" and len(parts) > 1 and parts[1] in STAGE_PACKAGES:
        return "stage"
    return "core"


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "kd2edge" and len(parts) > 1 and parts[1] in STAGE_PACKAGES else None


def test_the_walk_sees_the_code():
    assert {"kd2edge.distill.stage", "kd2edge.runtime.lm", "exporters.fused", "kd2edge.scoring.backends"} <= set(MODULES)
    assert "kd2edge.sizing" in IMPORTS["kd2edge.distill.plan"]
    assert "exporters.onnx_graph" in IMPORTS["exporters.fused"]     # `from exporters import onnx_graph as g`


def test_no_stage_package_imports_another():
    bad = [f"{m} -> {d}" for m, deps in IMPORTS.items() for d in deps
           if stage_of(m) and stage_of(d) and stage_of(m) != stage_of(d)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("low, high", [("core", {"stage", "composition"}), ("stage", {"composition"})])
def test_imports_go_downward(low, high):
    bad = [f"{m} -> {d}" for m, deps in IMPORTS.items() if layer(m) == low for d in deps if layer(d) in high
           # a stage names its config type for annotations: RunConfig is the one upward reference allowed
           and not (low == "stage" and d == "kd2edge.config")]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_the_cli():
    bad = [f"{m} -> {d}" for m, deps in IMPORTS.items() for d in deps
           if d in CLI and m not in CLI and m.split(".")[-1] != "cli"]
    assert not bad, "\n".join(bad)


def test_exporters_depend_on_the_core_only_and_only_the_export_stage_reads_them():
    bad = [f"{m} -> {d}" for m, deps in IMPORTS.items() for d in deps
           if (m.startswith("exporters") and d.startswith("kd2edge") and layer(d) != "core")
           or (d.startswith("exporters") and m.startswith("kd2edge") and stage_of(m) != "export")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_files():
    # Tarjan's strongly connected components over the module graph.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in IMPORTS.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, cycles

"""Profile an exported artifact (default: the embedded teacher exported fp32) and print the figures.

    python benchmarks/profile_artifact.py [--artifact DIR] [--profile laptop-cpu] [--out DIR]

Without --artifact, SmolLM2-135M-Instruct (the embedded teacher) is exported once with
optimum (fp32 ONNX with KV cache, no quantization) into $KD2EDGE_CACHE/bench/teacher-onnx:
a stand-in for the deployed artifact until a run's export is at hand. Prints the profile
stage's figures, its self-checks (the share of each generate call the runtime's own
timings cover), and the wall time of the whole profile.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def export_teacher(folder: Path) -> Path:
    """The embedded teacher as an optimum ONNX decoder with KV cache (cached)."""
    if (folder / "model.onnx").is_file():
        return folder
    from optimum.exporters.onnx import main_export

    from kd2edge.models import resolve_model

    teacher = resolve_model("embedded")
    main_export(str(teacher.path), output=str(folder), task="text-generation-with-past", device="cpu")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--profile", default="laptop-cpu")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kd2edge-bench-profile"))
    args = parser.parse_args()

    from kd2edge.config import load_config
    from kd2edge.models import cache_dir
    from kd2edge.profiling.stage import profile_to_folder

    artifact = args.artifact or export_teacher(cache_dir() / "bench" / "teacher-onnx")
    config = load_config(profile=args.profile)
    started = time.perf_counter()
    result = profile_to_folder(config, artifact, args.out)
    wall = time.perf_counter() - started
    m = result.metrics
    lat = m["latency"]
    print(json.dumps({
        "artifact": str(artifact), "profile": args.profile, "wall_s": round(wall, 1),
        "host": {k: lat["host"][k] for k in ("cpu_model", "cores_usable", "arch", "onnxruntime")},
        "providers": lat["providers"], "load_s": lat["load_s"], "size_mib": round(lat["size_bytes"] / 2**20, 1),
        "peak_rss_mb": lat["peak_rss_mb"], "rss_before_load_mb": lat["rss_before_load_mb"],
        "ttft_ms_by_prompt": lat["ttft_ms_by_prompt"], "decode_by_prompt": lat["decode_by_prompt"],
        "token_latency_ms": lat["token_latency_ms"], "checks": m["checks"],
        "budgets": {k: [v["value"], v["limit"], v["pass"]] for k, v in m["budgets"].items()},
        "baseline_teacher": m["baseline_teacher"], "out": str(result.path)}, indent=1))


if __name__ == "__main__":
    main()

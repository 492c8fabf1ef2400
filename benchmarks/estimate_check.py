"""How the stages' resource estimates compare with what the stages really use.

Runs distill (a short run), quantize and export on a teacher (default: the embedded
SmolLM2-135M-Instruct) through the CLI, each in its own process, and records the process's
peak resident memory (`os.wait4` rusage) and the bytes it left in its output folder, beside
the stage's `estimate(config, input)`. The estimates count the stage's data only; the
interpreter with torch and transformers imported (measured here too) comes on top.

    python benchmarks/estimate_check.py [--teacher embedded] [--out runs/estimate_check] [--steps 2]
                                        [--stages distill,quantize,export]

Prints a table and writes estimate_check-STAGES.json into --out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kd2edge.artifacts import Artifact
from kd2edge.config import load_config
from kd2edge.models import resolve_model
from kd2edge.resources import folder_size
from kd2edge.units import format_bytes


def peak_rss(argv: list[str]) -> tuple[int, float, int]:
    """(peak RSS bytes, seconds, exit code) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, time.perf_counter() - started, proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="embedded")
    p.add_argument("--out", default="runs/estimate_check")
    p.add_argument("--steps", type=int, default=2, help="distillation steps (the estimate does not depend on them)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--stages", default="distill,quantize,export",
                   help="which to run; a later one alone reuses the earlier ones' folders in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.json"
    config_file.write_text(json.dumps({"teacher": args.teacher, "distill": {"steps": args.steps, "eval_limit": 2},
                                       "evaluate": {"max_new_tokens": 4},
                                       "quantize": {"calib_samples": args.calib_samples}}))
    config = load_config(config_file)
    py = [sys.executable, "-m", "kd2edge.cli"]
    base, _, _ = peak_rss([sys.executable, "-c", "import torch, transformers, onnxruntime"])
    steps = [("distill", "kd2edge.distill.stage", resolve_model(args.teacher),
              py + ["distill", "--config", str(config_file), "--out", str(out / "distill"), "--force"]),
             ("quantize", "kd2edge.quantize.stage", None,
              py + ["quantize", str(out / "distill"), "--config", str(config_file), "--out", str(out / "quantize"),
                    "--force"]),
             ("export", "kd2edge.export.stage", None,
              py + ["export", str(out / "quantize"), "--out", str(out / "export"), "--force"])]
    rows = []
    wanted = args.stages.split(",")
    for name, module, source, cmd in steps:
        if name not in wanted:
            continue
        source = source or Artifact.load(Path(cmd[4]))  # the previous stage's output
        needs = importlib.import_module(module).estimate(config, source)
        rss, seconds, code = peak_rss(cmd)
        if code != 0:
            print(f"{name} failed (exit {code}): run `{' '.join(cmd)}` to see why", file=sys.stderr)
            return 1
        written = folder_size(out / name)
        rows.append({"stage": name, "estimate_memory": needs.memory_bytes, "peak_rss": rss,
                     "peak_rss_above_interpreter": rss - base, "estimate_disk": needs.disk_bytes,
                     "written": written, "seconds": round(seconds, 1)})
        print(f"{name:<9} memory: estimate {format_bytes(needs.memory_bytes):>10}, peak RSS {format_bytes(rss):>10} "
              f"({format_bytes(rss - base)} above the interpreter); disk: estimate "
              f"{format_bytes(needs.disk_bytes):>10}, written {format_bytes(written):>10}; {seconds:.0f} s")
    result = {"teacher": args.teacher, "interpreter_rss": base, "stages": rows}
    (out / f"estimate_check-{'-'.join(wanted)}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"interpreter with torch/transformers/onnxruntime: {format_bytes(base)}; written into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

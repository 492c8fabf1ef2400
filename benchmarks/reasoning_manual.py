"""Issue #9 on the real embedded teacher (SmolLM2-135M-Instruct, CPU): data, training, GRPO.

    python benchmarks/reasoning_manual.py --out /tmp/kd2edge-reasoning
    python benchmarks/reasoning_manual.py --data ../shared/data/csqa_dev_sample.jsonl --split validation \\
        --no-distill

1. `generate`: the teacher writes rationale and critique-revision data for --limit items
   (`kd2edge generate-data`); kept counts, drop reasons, timings and a few outputs.
2. `distill` (unless --no-distill): the distill stage as `kd2edge distill --data-method
   rationale --train-method rationale --grpo-steps N --steps S` runs it: the teacher writes
   rationales for S x 8 training items, the kept ones train the planned 14-layer student,
   then GRPO runs N steps on top; the stage's kept counts, KD losses, validation F1 before
   and after (the student asked as trained) and the logged GRPO rewards per step.

Prints one JSON document to stdout (progress on stderr). Each part writes under --out;
rerunning with the same --out resumes or reuses the distill stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def generate_part(args) -> dict:
    """Teacher data per method on --limit items: the generate-data summary, timing and examples."""
    from kd2edge.errors import DataError
    from kd2edge.reasoning.generate import generate_data, read_records

    out = {}
    for method in filter(None, args.methods.split(",")):
        started = time.perf_counter()
        path = args.out / f"{method}.jsonl"
        try:
            summary = generate_data("embedded", args.data, method, path, limit=args.limit, split=args.split,
                                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        except DataError as e:
            summary = {"error": str(e)}
        summary["seconds"] = round(time.perf_counter() - started, 1)
        if path.is_file():
            records = read_records(path)
            summary["examples"] = [{"id": r.id, "kept": r.kept, "drop_reason": r.drop_reason,
                                    "final_output": list(r.outputs.values())[-1][:300]} for r in records[:3]]
        out[method] = summary
        print(json.dumps({method: summary}, indent=1)[:3000], file=sys.stderr)
    return out


def distill_part(args) -> dict:
    """The distill stage with rationale data, rationale training and GRPO, on the embedded default."""
    from kd2edge.config import load_config
    from kd2edge.models import resolve_model
    from kd2edge.pipeline import run_stage

    config = load_config(profile="laptop-cpu", overrides={
        "data": args.data, "distill.data_method": "rationale", "distill.train_method": "rationale",
        "distill.grpo_steps": args.grpo_steps, "distill.steps": args.steps})
    started = time.perf_counter()
    result = run_stage("distill", config, resolve_model("embedded"), args.out / "student")
    m = result.artifact.metrics
    keys = ("student", "param_reduction", "kd_loss_first", "kd_loss_last", "f1_before", "f1_after", "em_before",
            "em_after", "eval", "train_method", "reasoning", "grpo", "grpo_info")
    return {"status": result.status, "seconds": round(time.perf_counter() - started, 1),
            "path": str(result.artifact.path), **{k: m.get(k) for k in keys}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=32, help="items for the generate part")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="rationale,critique-revision")
    parser.add_argument("--steps", type=int, default=24, help="distill steps (8 items each)")
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--no-distill", action="store_true", help="only the generate part")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kd2edge-reasoning"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"data": args.data, "split": args.split, "limit": args.limit, "generate": generate_part(args)}
    if not args.no_distill:
        report["distill"] = distill_part(args)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

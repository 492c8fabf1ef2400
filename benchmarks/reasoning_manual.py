"""Manual check of issue #9 on the real embedded teacher (SmolLM2-135M-Instruct, CPU).

    python benchmarks/reasoning_manual.py --limit 20 --out /tmp/kd2edge-reasoning
    python benchmarks/reasoning_manual.py --data ../shared/data/csqa_dev_sample.jsonl --split validation

1. The teacher writes rationale and critique-revision data (--limit items each); kept
   counts, drop reasons and timings are reported.
2. A small student (the teacher cut to --student-layers decoder layers, evenly spaced)
   gets a few GRPO steps on the same items; the logged rewards per step are reported.

Prints one JSON document to stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def pruned_student(teacher_dir: Path, layers: int, out: Path) -> Path:
    """Save the teacher cut to `layers` evenly spaced decoder layers (first and last kept)."""
    from kd2edge.distill.student import decoder_layers, prune_layers
    from kd2edge.models import load_causal_lm

    model, tokenizer = load_causal_lm(teacher_dir)
    total = len(decoder_layers(model))
    keep = sorted({round(i * (total - 1) / (layers - 1)) for i in range(layers)})
    prune_layers(model, keep)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--methods", default="rationale,critique-revision")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kd2edge-reasoning"))
    args = parser.parse_args()

    from kd2edge.data.loaders import load_qa
    from kd2edge.errors import DataError
    from kd2edge.models import resolve_model
    from kd2edge.reasoning.generate import generate_data, read_records
    from kd2edge.reasoning.grpo import run_grpo

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"data": args.data, "split": args.split, "limit": args.limit, "generate": {}}
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
        report["generate"][method] = summary
        print(json.dumps({method: summary}, indent=1)[:3000], file=sys.stderr)

    student = pruned_student(resolve_model("embedded").path, args.student_layers, args.out / "student")
    items = load_qa(args.data, split=args.split, limit=args.limit).items
    started = time.perf_counter()
    result = run_grpo(student, items, args.out / "student-grpo", steps=args.grpo_steps,
                      num_generations=args.num_generations, max_new_tokens=args.max_new_tokens, lr=1e-5)
    report["grpo"] = {"student_layers": args.student_layers, "seconds": round(time.perf_counter() - started, 1),
                      "steps": result["steps"], "warnings": result["warnings"], "out_dir": result["out_dir"]}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

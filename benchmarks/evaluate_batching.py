"""Evaluation throughput of the PyTorch backend per generation batch size, and whether batching
(left padding) changes any answer.

    python benchmarks/evaluate_batching.py                          # embedded teacher, 16 embedded items
    python benchmarks/evaluate_batching.py --model DIR --data FILE --limit 32 --batch-sizes 1,4,8,16

Prints one JSON document to stdout (progress on stderr): per batch size the seconds, items/s,
EM/F1, and how many predictions differ from batch size 1's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args(argv)

    import torch

    from kd2edge.scoring.backends import load_backend
    from kd2edge.scoring.evaluator import prepare, run_items, summarize

    evalset = prepare(args.data, args.split, args.shots, args.limit, seed=0)
    backend = load_backend(args.model)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    runs, reference = {}, None
    for size in sizes:
        backend.batch_size = size
        started = time.perf_counter()
        records = run_items(backend, evalset, args.max_new_tokens, desc=f"batch {size}")
        seconds = time.perf_counter() - started
        answers = [r["prediction"] for r in records]
        reference = reference or answers
        summary = summarize(records, evalset.task)
        runs[size] = {"seconds": round(seconds, 2), "items_per_s": round(len(records) / seconds, 3),
                      "em": summary["em"], "f1": summary["f1"],
                      "differ_from_first": sum(a != b for a, b in zip(answers, reference))}
        print(f"batch {size}: {runs[size]}", file=sys.stderr)
    print(json.dumps({"model": args.model, "data": args.data, "n": len(evalset.prompts), "shots": args.shots,
                      "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
                      "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Datasets check: what `load_qa` reads from real sample files, and how well the embedded teacher
answers the embedded dataset (is there signal for distillation?).

    python benchmarks/data_check.py                       # loaders on ../shared/data (or --samples DIR)
    python benchmarks/data_check.py --teacher 40          # + the embedded teacher on 40 validation items,
                                                          #   zero- and one-shot (CPU, ~1-2 min)

Prints one JSON document to stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path


def check_loaders(samples: Path) -> dict:
    """Load every sample file (and the embedded splits) and report counts, warnings and load time."""
    from kd2edge.data.loaders import load_qa

    specs = [str(p) for p in sorted(samples.glob("*.json*"))] + [
        "embedded@train", "embedded@validation", "embedded-en", "embedded-es"]
    out = {}
    for spec in specs:
        started = time.perf_counter()
        ds = load_qa(spec)
        seconds = time.perf_counter() - started
        out[Path(spec).name] = {
            "task": ds.task, "items": len(ds), "languages": dict(Counter(it.language for it in ds.items)),
            "answers": sum(len(it.gold) for it in ds.items), "warnings": list(ds.warnings),
            "load_ms": round(1000 * seconds, 1)}
    return out


def check_teacher(n: int, seed: int) -> dict:
    """EM/F1 of the embedded teacher (PyTorch, through the evaluation stage's code) on embedded validation."""
    from kd2edge.scoring.evaluator import evaluate

    out = {}
    for shots in (0, 1):
        print(f"teacher, {shots}-shot, {n} items ...", file=sys.stderr)
        r = evaluate("embedded", "embedded", "validation", shots=shots, limit=n, seed=seed, max_new_tokens=16)
        out[f"{shots}-shot"] = {k: r[k] for k in ("n", "em", "f1", "by_language", "seconds") if k in r}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, default=Path("../shared/data"))
    parser.add_argument("--teacher", type=int, default=0, metavar="N", help="items to score the teacher on (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = {"loaders": check_loaders(args.samples) if args.samples.is_dir() else "samples folder not found"}
    if args.teacher:
        report["teacher_on_embedded_validation"] = check_teacher(args.teacher, args.seed)
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

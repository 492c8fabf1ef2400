"""Real-text retention of distilled students: the ablation behind the distill defaults.

For each variant (named overrides of the run config), runs the distill stage into
OUT/<variant>/distill, the teacher's logits shared through OUT/teacher-cache (computed once
per vocabulary and data), then scores the fp32 student and the teacher on the held-out
XQuAD validation articles (never trained on: the split is by article), English and Spanish,
one-shot, the same items for both, and reports F1/EM, F1 retention with a paired bootstrap
95% interval, parameters and minutes. Every finished variant is appended to
OUT/results.jsonl, so an interrupted sweep resumes (a finished distill folder is reused by
fingerprint as in `kd2edge run`).

The deployed (4-bit ONNX) figures come from `kd2edge run` with the chosen settings; this script
compares students before quantization, where the choices are made.

    python benchmarks/retention.py --out runs/ablation --variants fast,long --per-language 96
    python benchmarks/retention.py --list
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# name -> (what it tests, config overrides); the defaults of kd2edge's distill stage are "fast".
MEDIUM = {"distill.steps": 120}
VARIANTS = {
    "fast": ("the defaults (make demo)", {}),
    "medium": ("3x the default steps", MEDIUM),
    "medium-answer-kd": ("KD at answer positions only (the previous default)", {**MEDIUM, "distill.kd_positions": "answer"}),
    "medium-no-trim": ("no vocabulary trimming: 8 layers at the same parameter budget",
                       {**MEDIUM, "distill.vocab_size": None}),
    "medium-16k": ("16k-token vocabulary: 13 layers at the same budget", {**MEDIUM, "distill.vocab_size": 16384}),
    "medium-w16": ("width and depth: 16 layers with MLPs of 1024 neurons (of 1536), the same budget",
                   {**MEDIUM, "distill.intermediate_size": 1024}),
    "medium-w19": ("width and depth: 19 layers with MLPs of 768 neurons, the same budget",
                   {**MEDIUM, "distill.intermediate_size": 768}),
    "light": ("lighter pruning: 60% of the teacher's parameters (18 of 30 layers; the default since)",
              {"distill.max_param_fraction": 0.6}),
    "light-80": ("the default student, twice the steps (kd2edge run --steps 80)", {"distill.max_param_fraction": 0.6, "distill.steps": 80}),
    "light-0shot": ("the default student trained on zero-shot prompts (half the tokens), scored one-shot",
                    {"distill.max_param_fraction": 0.6, "distill.shots": 0}),
    "long": ("the defaults at 9x the steps", {"distill.steps": 360}),
    # The study's compression (>= 57% fewer parameters than the teacher) at the default 40 steps:
    # depth only (12 layers) against depth and width at the same budget.
    "study-12": ("12 layers (max_param_fraction 0.43), 40 steps", {"distill.max_param_fraction": 0.43}),
    "study-w16": ("16 layers with MLPs of 1024 neurons (0.43), 40 steps",
                  {"distill.max_param_fraction": 0.43, "distill.intermediate_size": 1024}),
    "study-w19": ("19 layers with MLPs of 768 neurons (0.43), 40 steps",
                  {"distill.max_param_fraction": 0.43, "distill.intermediate_size": 768}),
    # A shipped recipe, read from kd2edge/recipes/ as `kd2edge run --config study` reads it.
    "study": ("the shipped recipe `--config study`", "recipe:study"),
}


def evalsets(per_language: int, seed: int):
    from kd2edge.scoring.evaluator import prepare

    return {lang: prepare(f"xquad-{lang}", "validation", 1, per_language, seed) for lang in ("en", "es")}


def score(model_spec: str, sets: dict, max_new_tokens: int) -> dict:
    """Per language, the model's per-item records (greedy, one-shot)."""
    from kd2edge.scoring.backends import load_backend
    from kd2edge.scoring.evaluator import run_items

    backend = load_backend(model_spec)
    return {lang: run_items(backend, evalset, max_new_tokens, desc=f"{Path(model_spec).name} {lang}")
            for lang, evalset in sets.items()}


def summarize(teacher: dict, student: dict) -> dict:
    from kd2edge.scoring.metrics import paired_bootstrap_retention

    out = {}
    for lang in teacher:
        t, s = teacher[lang], student[lang]
        interval = paired_bootstrap_retention([r["f1"] for r in t], [r["f1"] for r in s])
        out[lang] = {"n": len(t), "teacher_f1": round(sum(r["f1"] for r in t) / len(t), 4),
                     "teacher_em": round(sum(r["em"] for r in t) / len(t), 4),
                     "student_f1": round(sum(r["f1"] for r in s) / len(s), 4),
                     "student_em": round(sum(r["em"] for r in s) / len(s), 4),
                     "retention_f1": interval["value"] and round(interval["value"], 3),
                     "interval": [interval["low"] and round(interval["low"], 3),
                                  interval["high"] and round(interval["high"], 3)]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--variants", default="fast")
    ap.add_argument("--per-language", type=int, default=96, help="validation items per language")
    ap.add_argument("--profile", default="laptop-cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="an extra override for every variant, e.g. distill.steps=40")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for name, (what, overrides) in VARIANTS.items():
            print(f"{name:10s} {what}: {json.dumps(overrides)}")
        return 0

    from kd2edge.config import load_config
    from kd2edge.models import resolve_model
    from kd2edge.pipeline import run_stage

    args.out.mkdir(parents=True, exist_ok=True)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    sets = evalsets(args.per_language, args.seed)
    teacher = resolve_model("embedded")
    teacher_file = args.out / f"teacher-{args.per_language}-{args.seed}.json"
    if teacher_file.is_file():
        teacher_records = json.loads(teacher_file.read_text())
    else:
        teacher_records = score(str(teacher.path), sets, 24)
        teacher_file.write_text(json.dumps(teacher_records))
    for name in args.variants.split(","):
        what, overrides = VARIANTS[name]
        # A recipe variant is the recipe's file, found by name as `--config NAME` finds it.
        recipe = overrides.removeprefix("recipe:") if isinstance(overrides, str) else None
        config = load_config(recipe, profile=args.profile, overrides={
            "distill.teacher_cache": str(args.out / "teacher-cache"), "seed": args.seed,
            **({} if recipe else overrides), **extra})
        if recipe:
            overrides = {"recipe": recipe}   # what the results row records
        started = time.perf_counter()
        result = run_stage("distill", config, teacher, args.out / name / "distill")
        seconds = time.perf_counter() - started
        m = result.artifact.metrics
        row = {"variant": name, "what": what, "overrides": {**overrides, **extra}, "status": result.status,
               "params": m["student"]["params"], "param_reduction": m["param_reduction"],
               "layers": m["student"]["layers"], "vocabulary": m["student"].get("vocabulary"),
               "distill_minutes": round(m.get("timings", {}).get("total_s", seconds) / 60, 1)
               if result.status == "skipped" else round(seconds / 60, 1),
               "train": {k: m["train"].get(k) for k in ("items", "steps", "tokens", "tokens_per_s")},
               "kd_loss_first": m["kd_loss_first"], "kd_loss_last": m["kd_loss_last"],
               **summarize(teacher_records, student_records := score(str(result.artifact.path), sets, 24))}
        (args.out / name / "predictions.json").write_text(json.dumps(student_records))
        with open(args.out / "results.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

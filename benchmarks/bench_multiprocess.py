"""One process against N at the same global batch: the distill stage's loss curves, student and timings.

Runs `kd2edge distill` twice on the same teacher and data: one process at batch B, then
`--num-processes N` at batch B/N per process (gloo on CPU, nccl on GPUs), and writes

* OUT/loss_1_vs_N.png: both loss curves (total and KD) and their difference per step;
* OUT/results.json: the losses per step, their largest difference, validation F1 before and after,
  the largest weight difference of the two students, and each run's wall time, training time
  and stage time, as the manifests record them;

and prints a summary. With --fsdp it also runs N processes with the accelerate config
benchmarks/accelerate/fsdp.yaml and reports what accelerate did with it (on CPU: DDP).

The default teacher is a tiny random 4-layer llama written into OUT (seconds per run on a
laptop); `--teacher embedded` uses SmolLM2-135M-Instruct.

    python benchmarks/bench_multiprocess.py --out runs/bench_mp
    python benchmarks/bench_multiprocess.py --out runs/bench_mp --teacher embedded --steps 10 --fsdp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _distill(out: Path, config: Path, teacher: str, extra: list[str]) -> dict:
    """Run `kd2edge distill` in a child process; its manifest metrics with the wall time added."""
    argv = [sys.executable, "-m", "kd2edge.cli", "distill", "--teacher", teacher, "--config", str(config),
            "--out", str(out), "--force", "--json", *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": round(wall, 2), "metrics": manifest["metrics"], "timings": manifest["timings"],
            "warnings": manifest.get("warnings", []), "path": str(out)}


def _history(folder: Path) -> list[dict]:
    import csv

    with open(Path(folder) / "loss_history.csv", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((x[k] - y[k]).abs().max().item() for k in x)


def _plot(one: list[dict], many: list[dict], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in one]
    fig, (ax, dx) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for key, style in (("loss", "-"), ("kd", "--")):
        ax.plot(steps, [r[key] for r in one], style, color="C0", label=f"1 process, {key}")
        ax.plot(steps, [r[key] for r in many], style, color="C1", marker="o", markersize=3, linewidth=0.8,
                label=f"{n} processes, {key}")
    ax.set_ylabel("loss")
    ax.set_title(f"distill: 1 process vs {n} at the same global batch")
    ax.legend(fontsize=8)
    dx.plot(steps, [b["loss"] - a["loss"] for a, b in zip(one, many)], color="C2")
    dx.set_ylabel(f"loss({n}) - loss(1)")
    dx.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_multiprocess"))
    parser.add_argument("--teacher", default=None, help="teacher spec; default: a tiny 4-layer llama in OUT")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=16)
    parser.add_argument("--fsdp", action="store_true", help="also run with benchmarks/accelerate/fsdp.yaml")
    args = parser.parse_args()
    if args.batch % args.processes:
        sys.exit(f"--batch {args.batch} must be a multiple of --processes {args.processes}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher
    if teacher is None:
        from kd2edge.testing import tiny_model_dir

        teacher = str(tiny_model_dir(out / "teacher", "llama", num_layers=4))
    configs = {}
    for name, batch in (("one", args.batch), ("many", args.batch // args.processes)):
        configs[name] = out / f"{name}.json"
        configs[name].write_text(json.dumps({
            "data": args.data,
            "distill": {"steps": args.steps, "batch_size": batch, "eval_limit": args.eval_limit,
                        "checkpoint_every": max(1, args.steps // 2), "max_param_fraction": 0.9 if args.teacher is None
                        else 0.6},
            "evaluate": {"max_new_tokens": 8}}))
    runs = {"one": _distill(out / "one" / "distill", configs["one"], teacher, []),
            "many": _distill(out / "many" / "distill", configs["many"], teacher,
                             ["--num-processes", str(args.processes)])}
    if args.fsdp:
        runs["fsdp"] = _distill(out / "fsdp" / "distill", configs["many"], teacher,
                                ["--num-processes", str(args.processes),
                                 "--accelerate-config", str(HERE / "accelerate" / "fsdp.yaml")])
    one, many = _history(out / "one" / "distill"), _history(out / "many" / "distill")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, many)]
    _plot(one, many, args.processes, out / f"loss_1_vs_{args.processes}.png")
    results = {
        "teacher": teacher, "data": args.data, "steps": args.steps, "global_batch": args.batch,
        "processes": args.processes,
        "loss": {"one": [r["loss"] for r in one], "many": [r["loss"] for r in many], "max_abs_diff": max(diffs)},
        "kd_first_last": {k: [h[0]["kd"], h[-1]["kd"]] for k, h in (("one", one), ("many", many))},
        "max_weight_diff": _max_weight_diff(out / "one" / "distill", out / "many" / "distill"),
        "runs": {k: {"wall_s": r["wall_s"], "train_s": r["timings"].get("train_s"),
                     "teacher_targets_s": r["timings"].get("teacher_targets_s"), "stage_s": r["timings"].get("total_s"),
                     "f1_before": r["metrics"]["f1_before"], "f1_after": r["metrics"]["f1_after"],
                     "distributed": r["metrics"].get("distributed"), "warnings": r["warnings"]}
                 for k, r in runs.items()},
        "plot": f"loss_1_vs_{args.processes}.png",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"loss 1 process:  {one[0]['loss']:.6f} -> {one[-1]['loss']:.6f}")
    print(f"loss {args.processes} processes: {many[0]['loss']:.6f} -> {many[-1]['loss']:.6f}; "
          f"max |difference| per step {max(diffs):.2e}; max weight difference {results['max_weight_diff']:.2e}")
    for name, r in results["runs"].items():
        print(f"{name:>5}: wall {r['wall_s']:.1f} s, stage {r['stage_s']:.1f} s, train {r['train_s']:.1f} s, "
              f"teacher targets {r['teacher_targets_s']:.1f} s, F1 {r['f1_before']:.3f} -> {r['f1_after']:.3f}"
              + (f"; warnings: {r['warnings']}" if r["warnings"] else ""))
    print(f"plot: {out / results['plot']}")


if __name__ == "__main__":
    main()

"""Distillation throughput and peak memory: kd2edge's loop against TRL's GKDTrainer.

Both train the same student (the embedded SmolLM2-135M teacher cut to its 14 most
influential layers) on the same sequences (embedded QA train split, zero-shot chat
prompts, answer-only labels), same batch, same hardware, forward KL:

* trl:     GKDTrainer with lmbda=0 and seq_kd=False (plain supervised KD on the dataset's
           answers) and beta=0 (its forward-KL case): the teacher runs every step and both
           models produce full-vocabulary logits for every position.
* kd2edge: the teacher's top-k logits at answer positions cached once (timed separately:
           `cache_s`), then `train_student`, which gathers answer positions before the lm_head.

Each mode runs in its own process (clean peak-memory figures). Tokens/s counts sequence
tokens (padding excluded) over the timed steps; the first step is warm-up and not timed.

    python benchmarks/bench_distill.py                     # both, 4 steps, batch 8
    python benchmarks/bench_distill.py --steps 6 --topk 0  # kd2edge with full-vocabulary cache
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _setup(args):
    """Teacher, student (pruned copy), tokenizer and the training examples, as the stage builds them."""
    import copy

    import torch

    from kd2edge.data.loaders import load_qa
    from kd2edge.data.prompts import target_text
    from kd2edge.distill.data import build_examples, build_prompts
    from kd2edge.distill.student import choose_layers, measure_block_influence, prune_layers
    from kd2edge.distill.train import collate
    from kd2edge.models import load_causal_lm, resolve_model

    torch.manual_seed(0)
    teacher, tok = load_causal_lm(resolve_model(args.teacher).path)
    n = args.batch * (args.steps + 1)
    items = [it for it in load_qa(args.data, "train", n, 0).items if it.gold]
    prompts = build_prompts(items, items, 0, 0)
    examples, _ = build_examples(tok, items, prompts, [target_text(it) for it in items], args.max_length)
    calib = [collate(examples[:8], tok.pad_token_id)]
    scores = measure_block_influence(teacher, [{k: v for k, v in calib[0].items() if k != "labels"}])
    student = prune_layers(copy.deepcopy(teacher), choose_layers(scores, args.layers))
    return teacher, student, tok, examples


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_kd2edge(args) -> dict:
    import tempfile

    from kd2edge.distill.data import compute_teacher_logits
    from kd2edge.distill.train import train_student

    teacher, student, tok, examples = _setup(args)
    vocab = len(tok)
    t = time.perf_counter()
    cache = compute_teacher_logits(teacher, examples, vocab_size=vocab, topk=args.topk, pad_id=tok.pad_token_id,
                                   batch_size=args.batch, progress=False)
    cache_s = time.perf_counter() - t
    del teacher
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step, row):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with tempfile.TemporaryDirectory() as work:
        common = dict(vocab_size=vocab, pad_id=tok.pad_token_id, loss="forward_kl", temperature=1.0, kd_ratio=1.0,
                      beta=0.5, batch_size=args.batch, grad_accum=1, lr=1e-4, warmup_ratio=0.0, max_grad_norm=1.0,
                      seed=0, work_dir=Path(work), checkpoint_every=10**9, progress=False)
        last[0] = time.perf_counter()
        result = train_student(student, examples, cache, steps=args.steps + 1, on_step=on_step, **common)
    tokens_per_step = result.tokens / (args.steps + 1)
    timed = sum(times[1:])
    return {"mode": "kd2edge", "topk": args.topk, "cache_s": round(cache_s, 2),
            "step_s": round(timed / args.steps, 3), "tokens_per_s": round(tokens_per_step * args.steps / timed, 1),
            "cache_tokens_per_s": round(sum(len(e.input_ids) for e in examples) / cache_s, 1),
            "peak_mb": round(_peak_mb(), 1), "loss_first": result.history[0]["kd"], "loss_last": result.history[-1]["kd"]}


def run_trl(args) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kd2edge.distill.losses import IGNORE_INDEX
    from kd2edge.distill.train import collate

    teacher, student, tok, examples = _setup(args)
    # TRL shifts labels itself: give it unshifted labels (label[t] = ids[t] on answer tokens).
    rows = [{"input_ids": list(e.input_ids), "labels": [IGNORE_INDEX] + list(e.labels[:-1])} for e in examples]

    def collator(batch):
        from kd2edge.distill.train import TrainExample

        out = collate([TrainExample(tuple(r["input_ids"]), tuple(r["labels"])) for r in batch], tok.pad_token_id)
        tokens.append(int(out["attention_mask"].sum()))  # one call per step (no worker processes)
        return out

    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(output_dir=out, lmbda=0.0, beta=0.0, seq_kd=False, per_device_train_batch_size=args.batch,
                           max_steps=args.steps + 1, learning_rate=1e-4, lr_scheduler_type="constant",
                           logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
                           max_length=args.max_length, dataloader_drop_last=True, seed=0,
                           bf16=torch.cuda.is_available(), disable_tqdm=True)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, data_collator=collator,
                             train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Timer()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = sum(times[1:])
    return {"mode": "trl", "step_s": round(timed / args.steps, 3),
            "tokens_per_s": round(sum(tokens[1:args.steps + 1]) / timed, 1),
            "peak_mb": round(_peak_mb(), 1), "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["both", "kd2edge", "trl"], default="both")
    p.add_argument("--teacher", default="embedded")
    p.add_argument("--data", default="embedded")
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--steps", type=int, default=4, help="timed steps (one more runs as warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.mode != "both":
        result = run_kd2edge(args) if args.mode == "kd2edge" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for mode in ("kd2edge", "trl"):
        cmd = [sys.executable, __file__, "--mode", mode] + [x for k, v in vars(args).items()
                                                             if k not in ("mode", "out")
                                                             for x in (f"--{k.replace('_', '-')}", str(v)) if v is not None]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[-1][len("RESULT "):]))
    ours, trl = results
    speedup = ours["tokens_per_s"] / trl["tokens_per_s"]
    print(json.dumps(results, indent=1))
    print(f"kd2edge {ours['tokens_per_s']} tok/s (train; cache {ours['cache_tokens_per_s']} tok/s once) vs "
          f"TRL GKD {trl['tokens_per_s']} tok/s: {speedup:.1f}x; peak {ours['peak_mb']} vs {trl['peak_mb']} MB")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "speedup": speedup}, indent=1))


if __name__ == "__main__":
    main()

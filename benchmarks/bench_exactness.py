"""Is the exported artifact exact to its GPTQ codes? Greedy agreement with the dequantized PyTorch student.

For each validation prompt (the evaluate stage's prompts: one-shot, chat template), the
dequantized PyTorch model (`load_dequantized_model` of the quantize stage's checkpoint: every
weight the codes' float value) generates `--new-tokens` greedily; the ONNX artifact is then fed
the same prompt and continuation in one prefill (teacher forcing, logits at every position) and
its argmax is compared with PyTorch's at each generated position. Also reported: how many prompts
the artifact's own greedy generation reproduces token for token, and the largest logit difference.

    python benchmarks/bench_exactness.py --checkpoint runs/demo/quantize --artifact runs/demo/export \
        --data xquad --split validation --limit 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="the quantize stage's folder")
    ap.add_argument("--artifact", type=Path, required=True, help="the export stage's folder")
    ap.add_argument("--data", default="xquad")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from tqdm import tqdm

    from kd2edge.gptq_checkpoint import load_dequantized_model
    from kd2edge.runtime.lm import OnnxLM
    from kd2edge.scoring.evaluator import prepare

    torch.set_num_threads(args.threads)
    model, _ = load_dequantized_model(args.checkpoint)
    lm = OnnxLM.load(args.artifact, threads=args.threads)
    evalset = prepare(args.data, args.split, args.shots, args.limit, args.seed)
    positions = agree = same_prompts = 0
    worst = 0.0
    for prompted in tqdm(evalset.prompts, desc="prompts", unit="prompt"):
        prompt = lm.encode(lm.format_prompt(prompted.text))
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=model.config.eos_token_id)
            ref = model(out).logits[0].numpy()               # [prompt + new, vocab]
        new = out[0, len(prompt):].tolist()
        # ONNX logits at every position of prompt + continuation: [prompt + new, vocab]
        logits = lm.forward(out[0].tolist(), lm.new_cache(), logits_to_keep=0)
        logits = logits.reshape(-1, logits.shape[-1])
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(new))    # the positions that chose `new`
        ours, theirs = logits[span].argmax(-1), ref[span].argmax(-1)
        positions += len(new)
        agree += int((ours == theirs).sum())
        worst = max(worst, float(np.abs(logits[span] - ref[span]).max()))
        generated = lm.generate(prompt, max_new_tokens=args.new_tokens)
        same_prompts += int(list(generated.tokens)[:len(new)] == new)
    summary = {"prompts": len(evalset.prompts), "data": args.data, "split": args.split, "shots": args.shots,
               "positions": positions, "top1_agreement": round(agree / max(positions, 1), 5),
               "greedy_identical_prompts": same_prompts, "max_abs_logit_diff": worst}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

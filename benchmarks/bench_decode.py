"""Decode speed of exported artifacts: TTFT and decode tokens/s, vs PyTorch fp32.

    python benchmarks/bench_decode.py [--checkpoint GPTQ_DIR] [--student GPTQ_DIR] [--threads 2]

Without --checkpoint, the embedded teacher (SmolLM2-135M-Instruct) is quantized with
4-bit RTN (group 64, kd2edge.quant) into a temporary GPTQ checkpoint. Each variant is
exported, then timed on a ~60-token prompt with 64 greedy new tokens (best of 3).
The memory-bandwidth bound is the bytes of weights read per token / the laptop-cpu
profile's 51.2 GB/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPT = ("Context: The Velmora Institute was founded in 1871 by Adaline Qorr in the city of Tessaly, "
          "on the banks of the river Selen.\nQuestion: Who founded the Velmora Institute, and where?\nAnswer:")
BANDWIDTH = 51.2e9


def rtn_checkpoint(out: Path, group_size: int = 64) -> Path:
    """A 4-bit RTN GPTQ-format checkpoint of the embedded teacher (fast stand-in for GPTQ)."""
    import torch

    from kd2edge.models import load_causal_lm, resolve_model
    from kd2edge.quant.checkpoint import write_gptq_checkpoint
    from kd2edge.quant.gptq import rtn_quantize_weight

    model, tokenizer = load_causal_lm(resolve_model("embedded").path)
    head = model.get_output_embeddings()
    results = {n: rtn_quantize_weight(m.weight, 4, group_size) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head}
    write_gptq_checkpoint(model, tokenizer, results, out, bits=4, group_size=group_size, desc_act=False, sym=False)
    return out


def time_runtime(folder: Path, threads: int, new_tokens: int = 64, repeats: int = 3) -> dict:
    from kd2edge.runtime import OnnxLM

    lm = OnnxLM.load(folder, threads=threads)
    ids = lm.encode(PROMPT)
    lm.generate(ids, 4)  # warm-up
    runs = [lm.generate(ids, new_tokens, stop_token_ids=[]) for _ in range(repeats)]
    best = max(runs, key=lambda g: g.decode_tokens_per_s or 0)
    weights = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    return {"ttft_ms": round(min(g.ttft_s for g in runs) * 1000, 1),
            "decode_tok_s": round(best.decode_tokens_per_s, 1), "prompt_tokens": len(ids),
            "model_bytes": weights, "bandwidth_bound_tok_s": round(BANDWIDTH / weights, 1)}


def time_pytorch(checkpoint: Path, threads: int, new_tokens: int = 64) -> dict:
    import torch

    from kd2edge.quant.checkpoint import load_dequantized_model

    torch.set_num_threads(threads)
    model, tokenizer = load_dequantized_model(checkpoint)
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        total = time.perf_counter() - started
    return {"ttft_ms": round(ttft * 1000, 1), "decode_tok_s": round((new_tokens - 1) / max(total - ttft, 1e-9), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="GPTQ checkpoint (default: RTN of the embedded teacher)")
    parser.add_argument("--student", type=Path, help="a second GPTQ checkpoint to time the same way")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-pytorch", action="store_true")
    args = parser.parse_args()

    from exporters.genai import export as genai_export
    from exporters.optimum_onnx import export as onnx_export
    from kd2edge.errors import ModelError

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        tmp = Path(tmp)
        checkpoints = {"teacher": args.checkpoint or rtn_checkpoint(tmp / "teacher-rtn")}
        if args.student:
            checkpoints["student"] = args.student
        for who, ckpt in checkpoints.items():
            variants = {
                "onnx": lambda o, c=ckpt: onnx_export(c, o),
                "onnx+int4-embeddings": lambda o, c=ckpt: onnx_export(c, o, quantize_embeddings=True),
                "onnx+int4-embeddings+acc4": lambda o, c=ckpt: onnx_export(c, o, quantize_embeddings=True,
                                                                           accuracy_level=4),
                "onnx-genai": lambda o, c=ckpt: genai_export(c, o),
            }
            for name, build in variants.items():
                out = tmp / f"{who}-{name}"
                print(f"[{who}] exporting {name} ...", file=sys.stderr)
                try:
                    build(out)
                except ModelError as e:
                    results[f"{who}/{name}"] = {"skipped": str(e)}
                    continue
                results[f"{who}/{name}"] = time_runtime(out, args.threads)
                print(f"[{who}] {name}: {results[f'{who}/{name}']}", file=sys.stderr)
            if not args.skip_pytorch:
                results[f"{who}/pytorch-fp32"] = time_pytorch(ckpt, args.threads)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

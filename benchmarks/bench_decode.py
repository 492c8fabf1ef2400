"""Decode speed of exported artifacts: TTFT and decode tokens/s, interleaved so machine load cancels out.

    python benchmarks/bench_decode.py [--checkpoint GPTQ_DIR] [--work DIR] [--threads 2] [--repeats 5]
                                      [--variants onnx,onnx-genai,...] [--plot decode.png]

Without --checkpoint, the embedded teacher (SmolLM2-135M-Instruct) is quantized with
4-bit RTN (group 64, kd2edge.quantize) into a GPTQ checkpoint. Every variant is exported
(into --work, reused when already there), loaded once, warmed up, then timed round-robin:
repeat r runs each variant once, starting at a different variant each round, so a busy
neighbour slows all variants alike; medians are reported.

Variants:
    onnx                  the default exporter (fused graph for Llama/Qwen2/Mistral, exact weights)
    onnx-acc4             + MatMulNBits accuracy_level 4 (int8 activations), float lm_head
    onnx-int4emb          + 4-bit embeddings / lm_head (GatherBlockQuantized, MatMulNBits), exact activations
    onnx-int4emb-acc4     both: the settings of onnxruntime-genai's CPU int4 build
    onnx-traced           the optimum-traced graph with MatMulNBits (no fusion): the previous default
    onnx-traced-ortopt    onnx-traced through onnxruntime.transformers.optimizer (model_type gpt2)
    onnx-genai            onnxruntime-genai's model builder (int4, its CPU defaults)
    pytorch               the dequantized model in PyTorch fp32 (same greedy loop with a KV cache)

The memory-bandwidth bound is the bytes one decode step must read (weights as they sit
in memory at run time, plus the KV cache at the mean context) / the laptop-cpu
profile's 51.2 GB/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

PROMPT = ("Context: The Velmora Institute was founded in 1871 by Adaline Qorr in the city of Tessaly, "
          "on the banks of the river Selen.\nQuestion: Who founded the Velmora Institute, and where?\nAnswer:")
BANDWIDTH = 51.2e9
ALL_VARIANTS = ("onnx", "onnx-acc4", "onnx-int4emb", "onnx-int4emb-acc4", "onnx-traced", "onnx-traced-ortopt", "onnx-genai",
                "pytorch")
DEFAULT_VARIANTS = ("onnx", "onnx-int4emb-acc4", "onnx-traced", "onnx-genai", "pytorch")


def build(variant: str, checkpoint: Path, out: Path) -> None:
    """Export `checkpoint` as `variant` into `out`."""
    from exporters.genai import export as genai_export
    from exporters.onnx_export import export

    if variant == "onnx-genai":
        genai_export(checkpoint, out)
    elif variant == "onnx-traced-ortopt":
        build("onnx-traced", checkpoint, out.with_name(out.name + ".src"))
        ort_optimize(out.with_name(out.name + ".src"), out)
    else:
        export(checkpoint, out, quantize_embeddings="int4emb" in variant,
               accuracy_level=4 if variant.endswith("acc4") else 0, fuse=not variant.startswith("onnx-traced"))


def ort_optimize(src: Path, out: Path) -> dict:
    """onnxruntime's transformer optimizer over a traced export (the fusions it applies, by op type)."""
    import json as _json
    import shutil

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    config = _json.loads((src / "config.json").read_text())
    model = optimize_model(str(src / "model.onnx"), model_type="gpt2", num_heads=config["num_attention_heads"],
                           hidden_size=config["hidden_size"], opt_level=0, optimization_options=FusionOptions("gpt2"))
    out.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    for f in src.iterdir():
        if not f.name.startswith("model.onnx"):
            shutil.copy2(f, out / f.name)
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def bytes_per_token(model_path: Path) -> int:
    """Weight bytes one decode step reads: every initializer once, at its run-time dtype.

    A table only gathered from (embedding Gather / GatherBlockQuantized data) costs one
    row, counted as 0; a float16 initializer Cast to float32 is read as float32 (the
    Cast is folded at load); a tensor with several consumers counts once, at its widest.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = onnx.load(str(model_path), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    def cost(name: str, elements: int, itemsize: int) -> int:
        worst = 0
        for node, index in consumers.get(name, []):
            if (node.op_type in ("Gather", "GatherBlockQuantized") and index == 0) or \
                    (node.op_type == "GroupQueryAttention" and index in (7, 8)):
                continue                                              # one row per token (table, cos/sin cache)
            if node.op_type in ("Cast", "Transpose", "Reshape"):
                size = 4 if node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == \
                    TensorProto.FLOAT else itemsize
                worst = max(worst, cost(node.output[0], elements, size))
            else:
                worst = max(worst, elements * itemsize)
        return worst

    total = 0
    for tensor in graph.initializer:
        elements = 1
        for d in tensor.dims:
            elements *= d
        total += cost(tensor.name, elements, helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    return total


def kv_bytes(config: dict, context: int) -> int:
    """KV cache bytes read by one decode step at `context` tokens (float32 keys and values, all layers)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * context * 4


def onnx_runner(folder: Path, threads: int, new_tokens: int) -> Callable[[], tuple[float, float]]:
    """A callable timing one greedy generation: (TTFT s, decode tokens/s)."""
    from kd2edge.runtime.lm import OnnxLM

    lm = OnnxLM.load(folder, threads=threads)
    ids = lm.encode(PROMPT)
    lm.generate(ids, 4)                                                  # warm-up (first-run allocations)

    def run() -> tuple[float, float]:
        out = lm.generate(ids, new_tokens, stop_token_ids=[])
        return out.ttft_s, out.decode_tokens_per_s

    return run


def pytorch_runner(checkpoint: Path, threads: int, new_tokens: int) -> Callable[[], tuple[float, float]]:
    """The same greedy loop as OnnxLM.generate (prefill, then one cached step a token) in PyTorch fp32."""
    import torch

    from kd2edge.gptq_checkpoint import load_dequantized_model

    torch.set_num_threads(threads)
    model, tokenizer = load_dequantized_model(checkpoint)
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False).input_ids])

    def run() -> tuple[float, float]:
        with torch.no_grad():
            started = time.perf_counter()
            out = model(ids, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            ttft = time.perf_counter() - started
            started = time.perf_counter()
            past = out.past_key_values
            for _ in range(new_tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return ttft, (new_tokens - 1) / (time.perf_counter() - started)

    run()
    return run


def interleave(runners: dict[str, Callable[[], tuple[float, float]]], repeats: int) -> dict[str, dict]:
    """Run every runner `repeats` times, round-robin with a rotating start; per variant the raw figures."""
    names = list(runners)
    raw = {n: {"ttft_s": [], "decode_tok_s": []} for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ttft, rate = runners[name]()
            raw[name]["ttft_s"].append(ttft)
            raw[name]["decode_tok_s"].append(rate)
            print(f"  round {r + 1}/{repeats} {name}: {rate:.1f} tok/s, TTFT {ttft * 1000:.0f} ms", file=sys.stderr)
    return raw


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if "decode_tok_s" in results[n]]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names)))
    ax.barh(names, [results[n]["decode_tok_s"] for n in names], color="tab:blue")
    for y, n in enumerate(names):
        ax.text(results[n]["decode_tok_s"], y, f" {results[n]['decode_tok_s']:.1f}", va="center")
    ax.set_xlim(0, 1.15 * max(results[n]["decode_tok_s"] for n in names))
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (median, interleaved runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="GPTQ checkpoint (default: RTN of the embedded teacher)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-decode"),
                        help="where exports are written (and reused on a later run)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(ALL_VARIANTS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--plot", type=Path, help="write a bar chart of decode tokens/s here")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(ALL_VARIANTS)}")

    from kd2edge.errors import ModelError
    from kd2edge.testing import embedded_rtn_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or args.work / "teacher-rtn"
    if not (checkpoint / "config.json").is_file():
        print(f"quantizing the embedded teacher (RTN) -> {checkpoint}", file=sys.stderr)
        embedded_rtn_checkpoint(checkpoint)
    from tokenizers import Tokenizer

    config = json.loads((checkpoint / "config.json").read_text())
    prompt_tokens = len(Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids)
    context = prompt_tokens + args.new_tokens // 2         # mean context over the decode steps
    results: dict = {}
    runners = {}
    for variant in variants:
        if variant == "pytorch":
            runners[variant] = pytorch_runner(checkpoint, args.threads, args.new_tokens)
            results[variant] = {}
            continue
        out = args.work / variant
        if not (out / "model.onnx").is_file():
            print(f"exporting {variant} -> {out}", file=sys.stderr)
            started = time.perf_counter()
            try:
                build(variant, checkpoint, out)
            except ModelError as e:
                results[variant] = {"skipped": str(e)}
                continue
            print(f"  {time.perf_counter() - started:.0f} s", file=sys.stderr)
        runners[variant] = onnx_runner(out, args.threads, args.new_tokens)
        read = bytes_per_token(out / "model.onnx")
        results[variant] = {"size_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
                            "weight_bytes_per_token": read,
                            "bandwidth_bound_tok_s": round(BANDWIDTH / (read + kv_bytes(config, context)), 1)}
    raw = interleave(runners, args.repeats)
    for name, figures in raw.items():
        results[name].update({"decode_tok_s": round(statistics.median(figures["decode_tok_s"]), 2),
                              "ttft_ms": round(statistics.median(figures["ttft_s"]) * 1000, 1),
                              "decode_tok_s_runs": [round(v, 2) for v in figures["decode_tok_s"]]})
    results["_setup"] = {"checkpoint": str(checkpoint), "prompt_tokens": prompt_tokens, "threads": args.threads,
                         "repeats": args.repeats,
                         "new_tokens": args.new_tokens, "bandwidth_GBps": BANDWIDTH / 1e9}
    if args.plot:
        plot(results, args.plot)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The tied output head / embedding in 4 bits: GPTQ (calibrated) vs RTN, measured against the fp32 student.

    python benchmarks/bench_head_quant.py --checkpoint RUN/quantize --student RUN/distill --out DIR
                                          [--data embedded] [--limit 100] [--new-tokens 24] [--export]

Starts from a GPTQ checkpoint whose lm_head is float (the layers already quantized), quantizes
its head with `kd2edge.quantize.orchestrate.quantize_head` both ways (same grid and groups as
the layers, calibrated on the quantize stage's own calibration set), writes each as a
checkpoint (DIR/head-gptq, DIR/head-rtn) and compares, on real validation prompts:

  reconstruction   ||WX - QX|| / ||WX|| of the head on calibration inputs and on held-out inputs
                   (the validation prompts' final hidden states); ||W - Q|| / ||W|| over rows
                   (what a tied embedding lookup loses)
  agreement        the greedy continuation of the fp32 student (--new-tokens per prompt) is fed to
                   every model (teacher forcing); agreement = share of those positions whose argmax
                   equals the fp32 student's token ("vs fp32") or the float-head checkpoint's argmax
                   ("vs float head": what the head's 4 bits alone change)
  NLL              mean next-token loss on the validation prompts + gold answers
  F1 / EM          the evaluate stage's scoring (one-shot, greedy, --limit items) in PyTorch
  exported         (--export) each checkpoint through the onnx exporter, then ONNX vs its own
                   dequantized PyTorch model: argmax agreement on the same teacher-forced positions
                   and free-running greedy generations that match token for token

Variants: fp32 student, float head (the checkpoint as given), head-gptq, head-rtn (group size of
the checkpoint), and rtn-b32 (the exporter's older `--quantize-embeddings`: RTN, blocks of 32).
Prints a table; --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path


def add_head(checkpoint: Path, out: Path, name: str, result) -> Path:
    """A copy of `checkpoint` with `name` (the output head) stored as 4-bit GPTQ tensors.

    The float tensors stay; a tied embedding's float16 copy becomes the dequantized head rounded to
    float16, as `write_gptq_checkpoint` writes it (kd2edge's reader rebuilds it exactly from the codes).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from kd2edge.gptq_checkpoint import WEIGHTS_FILE, pack_result

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("manifest.json", "*.png", "quant_report.json"))
    tensors = load_file(str(out / WEIGHTS_FILE))
    qt = pack_result(result)
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        tensors[f"{name}.{suffix}"] = getattr(qt, suffix)
    config = json.loads((out / "config.json").read_text())
    if config.get("tie_word_embeddings"):
        embed = next(k for k in tensors if k.endswith("embed_tokens.weight"))
        tensors[embed] = result.dequant.to(torch.float16)
    else:
        tensors.pop(f"{name}.weight", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config["quantization_config"]["lm_head"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (out / "quantize_config.json").is_file():
        qcfg = json.loads((out / "quantize_config.json").read_text())
        (out / "quantize_config.json").write_text(json.dumps({**qcfg, "lm_head": True}, indent=2) + "\n")
    return out


def teacher_forced_argmax(model, sequences: list[list[int]], starts: list[int]):
    """Per sequence, the model's argmax at positions start-1 .. len-2 (predicting tokens start .. len-1)."""
    import torch

    out = []
    with torch.no_grad():
        for ids, start in zip(sequences, starts):
            logits = model(torch.tensor([ids])).logits[0]
            out.append(logits[start - 1:len(ids) - 1].argmax(-1).tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    return same / max(1, sum(len(p) for p in a))


def greedy_continuations(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The fp32 student's greedy continuations (no stop token: every prompt gets new_tokens positions)."""
    import torch

    out = []
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            if i % 20 == 0:
                print(f"  {i}/{len(prompts)}", file=sys.stderr)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


def f1_em(model, tokenizer, evalset, max_new_tokens: int) -> dict:
    from kd2edge.scoring.backends import TorchBackend
    from kd2edge.scoring.evaluator import run_items, summarize

    records = run_items(TorchBackend(model, tokenizer), evalset, max_new_tokens, progress=False)
    s = summarize(records, evalset.task)
    return {"f1": s["f1"], "em": s["em"], "n": s["n"]}


def onnx_checks(artifact: Path, reference, sequences, starts, prompts, new_tokens: int) -> dict:
    """ONNX vs its dequantized PyTorch model: teacher-forced argmax agreement and exact greedy generations."""
    import torch

    from kd2edge.runtime.lm import OnnxLM

    lm = OnnxLM.load(artifact, threads=1)
    onnx_argmax, worst = [], 0.0
    for ids, start in zip(sequences, starts):
        logits = lm.forward(ids, lm.new_cache(len(ids)))
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, float(abs(logits - ref).max()))
        onnx_argmax.append(logits[start - 1:len(ids) - 1].argmax(-1).tolist())
    torch_argmax = teacher_forced_argmax(reference, sequences, starts)
    same_generations = 0
    for ids in prompts:
        ours = lm.generate(ids, new_tokens, stop_token_ids=[]).tokens
        with torch.no_grad():
            ref = reference.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        same_generations += ours == ref
    return {"argmax_agreement": agreement(onnx_argmax, torch_argmax), "max_abs_logit_diff": worst,
            "identical_generations": f"{same_generations}/{len(prompts)}",
            "size_bytes": sum(p.stat().st_size for p in artifact.iterdir() if p.name.startswith("model.onnx"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a GPTQ checkpoint with a float lm_head")
    parser.add_argument("--student", type=Path, required=True, help="the fp32 student it was quantized from")
    parser.add_argument("--out", type=Path, required=True, help="where the head-quantized checkpoints go")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-max-tokens", type=int, default=512)
    parser.add_argument("--limit", type=int, default=100, help="validation items (agreement, NLL, F1)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a busy host: threads that wait for each other at every op crawl)")
    parser.add_argument("--export", action="store_true", help="also export each checkpoint and check ONNX parity")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from exporters.vocab import quantize_embeddings_rtn
    from kd2edge.gptq_checkpoint import load_dequantized_model, read_quantization_config
    from kd2edge.models import load_causal_lm
    from kd2edge.quantize.orchestrate import head_inputs_hessian, quantize_head, relative_output_error, row_error
    from kd2edge.quantize.stage import calibration_texts, mean_nll, tokenize_calibration
    from kd2edge.scoring.evaluator import prepare

    torch.set_num_threads(args.threads)
    qcfg = read_quantization_config(args.checkpoint)
    group_size = int(qcfg["group_size"])
    student, tokenizer = load_causal_lm(args.student)
    texts, _ = calibration_texts(args.data, "train", args.calib_samples, args.seed)
    calib = tokenize_calibration(tokenizer, texts, args.calib_max_tokens)
    held_texts, _ = calibration_texts(args.data, "validation", args.limit, args.seed + 1)
    held = tokenize_calibration(tokenizer, held_texts, args.calib_max_tokens)
    evalset = prepare(args.data, "validation", 1, args.limit, args.seed)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True)
               for p in evalset.prompts]
    print(f"{len(prompts)} validation prompts, {len(calib)} calibration samples; fp32 greedy continuations",
          file=sys.stderr)
    continuations = greedy_continuations(student, prompts, args.new_tokens)
    sequences = [p + c for p, c in zip(prompts, continuations)]
    starts = [len(p) for p in prompts]

    models = {"fp32 student": student}
    float_head, _ = load_dequantized_model(args.checkpoint)
    models["float head"] = float_head
    held_H, _ = head_inputs_hessian(float_head, held)
    W = float_head.get_output_embeddings().weight.detach().clone()
    rows: dict[str, dict] = {}
    checkpoints = {}
    for method in ("gptq", "rtn"):
        model, _ = load_dequantized_model(args.checkpoint)
        started = time.perf_counter()
        name, result, row = quantize_head(model, calib, method=method, bits=4, group_size=group_size,
                                          act_order=bool(qcfg.get("desc_act") or qcfg.get("static_groups")))
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["held_out_rel_err"] = round(relative_output_error(W, result.dequant, held_H), 6)
        rows[f"head-{method}"] = row
        models[f"head-{method}"] = model
        checkpoints[f"head-{method}"] = add_head(args.checkpoint, args.out / f"head-{method}", name, result)
    model, _ = load_dequantized_model(args.checkpoint)
    quantize_embeddings_rtn(model)                          # the exporter's --quantize-embeddings rounding
    Q = model.get_output_embeddings().weight.detach()
    rows["rtn-b32"] = {"held_out_rel_err": round(relative_output_error(W, Q, held_H), 6),
                       "row_rel_err": round(row_error(W, Q), 6)}
    models["rtn-b32"] = model

    print("teacher-forced argmax, NLL, F1", file=sys.stderr)
    argmax = {k: teacher_forced_argmax(m, sequences, starts) for k, m in models.items()}
    results: dict = {"settings": vars(args) | {"group_size": group_size, "prompts": len(prompts),
                                               "positions": sum(len(c) for c in continuations)}, "variants": {}}
    for key, model in models.items():
        results["variants"][key] = {
            **rows.get(key, {}),
            "agreement_vs_fp32": round(agreement(argmax[key], continuations), 4),
            "agreement_vs_float_head": round(agreement(argmax[key], argmax["float head"]), 4),
            "nll": round(mean_nll(model, held), 5),
            **f1_em(model, tokenizer, evalset, 24),
        }
        print(f"  {key}: {results['variants'][key]}", file=sys.stderr)
    if args.export:
        from exporters.onnx_export import export

        for key, folder in checkpoints.items():
            artifact = args.out / f"{key}-onnx"
            export(folder, artifact)
            reference, _ = load_dequantized_model(folder)
            results["variants"][key]["onnx"] = onnx_checks(artifact, reference, sequences, starts, prompts,
                                                           args.new_tokens)
            print(f"  {key} onnx: {results['variants'][key]['onnx']}", file=sys.stderr)
    print(f"\n{'variant':14}{'out err cal':>12}{'out err val':>12}{'row err':>9}{'agree fp32':>11}"
          f"{'agree fhead':>12}{'NLL':>9}{'F1':>7}{'EM':>7}")
    for key, v in results["variants"].items():
        cal = v.get("gptq_rel_err", v.get("rtn_rel_err") if key == "head-rtn" else None)
        print(f"{key:14}{_fmt(cal):>12}{_fmt(v.get('held_out_rel_err')):>12}{_fmt(v.get('row_rel_err')):>9}"
              f"{v['agreement_vs_fp32']:11.4f}{v['agreement_vs_float_head']:12.4f}{v['nll']:9.4f}"
              f"{v['f1']:7.3f}{v['em']:7.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


if __name__ == "__main__":
    main()

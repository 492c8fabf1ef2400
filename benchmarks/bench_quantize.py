"""Perplexity of fp32 vs RTN vs GPTQ at the same bits/group size, and quantization wall time.

    python benchmarks/bench_quantize.py [--model embedded] [--student PATH] [--calib-samples 128]
                                        [--group-size 128] [--bits 4] [--threads 2] [--json out.json]

Held-out text: the embedded dataset's validation passages plus a few paragraphs written
here (never seen in calibration, which uses the train split's prompts + answers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

HELD_OUT_EXTRA = [
    "The old lighthouse stood at the end of the harbour wall. Every evening the keeper climbed the spiral "
    "stairs, trimmed the wick and wound the clockwork that turned the lens, so that ships far out at sea "
    "could count the flashes and know which coast they were approaching.",
    "To bake bread you need flour, water, salt and yeast. Mix them into a dough, knead it for ten minutes "
    "until it is smooth, let it rise for an hour in a warm place, shape the loaf and bake it in a hot oven "
    "until the crust is brown and the bottom sounds hollow when tapped.",
    "In 1905 a young clerk at the patent office published four papers that changed physics: one explained "
    "the photoelectric effect, one Brownian motion, and two introduced special relativity, including the "
    "famous relation between mass and energy.",
    "El tren salió de la estación a las ocho de la mañana. Durante el viaje, los pasajeros miraban por la "
    "ventana los campos de trigo, los pueblos blancos y las montañas que se alzaban al fondo del valle.",
]


def held_out_texts() -> list[str]:
    from kd2edge.data.loaders import load_qa

    contexts = list(dict.fromkeys(item.context for item in load_qa("embedded", "validation").items if item.context))
    return contexts[:48] + HELD_OUT_EXTRA


def perplexity(model, tokenizer, texts: list[str]) -> float:
    from kd2edge.quantize.stage import mean_nll

    return math.exp(mean_nll(model, [tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]))


def bench_model(spec: str, args) -> dict:
    import torch

    from kd2edge.models import load_causal_lm, resolve_model
    from kd2edge.quantize.orchestrate import quantize_model, summarize
    from kd2edge.quantize.stage import calibration_texts, tokenize_calibration

    path = resolve_model(spec).path
    texts = held_out_texts()
    model, tok = load_causal_lm(path)
    calib_texts, _ = calibration_texts("embedded", "train", args.calib_samples, 0)
    calib = tokenize_calibration(tok, calib_texts, 512)
    out = {"model": spec, "held_out_texts": len(texts), "calib_samples": len(calib),
           "calib_tokens": sum(int(c.numel()) for c in calib), "bits": args.bits, "group_size": args.group_size,
           "threads": torch.get_num_threads(), "ppl": {}, "quantize_s": {}, "reconstruction": {}}
    out["ppl"]["fp32"] = round(perplexity(model, tok, texts), 4)
    print(f"[{spec}] fp32 ppl {out['ppl']['fp32']}", file=sys.stderr)
    variants = [("rtn", dict(method="rtn")),
                ("gptq", dict(method="gptq", act_order=False)),
                ("gptq_act_order_static", dict(method="gptq", act_order=True, static_groups=True))]
    if args.dynamic_groups:
        variants.append(("gptq_act_order_dynamic", dict(method="gptq", act_order=True, static_groups=False)))
    for name, kw in variants:
        model, tok = load_causal_lm(path)
        t = time.perf_counter()
        _, report = quantize_model(model, calib, bits=args.bits, group_size=args.group_size, sym=False, **kw)
        out["quantize_s"][name] = round(time.perf_counter() - t, 1)
        out["reconstruction"][name] = summarize(report)
        out["ppl"][name] = round(perplexity(model, tok, texts), 4)
        print(f"[{spec}] {name}: ppl {out['ppl'][name]}, {out['quantize_s'][name]} s", file=sys.stderr)
    fp, rtn = out["ppl"]["fp32"], out["ppl"]["rtn"]
    for name in out["ppl"]:
        if name.startswith("gptq") and rtn > fp:
            out[f"{name}_recovered"] = round((rtn - out["ppl"][name]) / (rtn - fp), 3)
    return out


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--student", default=None, help="also benchmark a distilled student folder")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dynamic-groups", action="store_true", help="also run act-order with dynamic groups")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [bench_model(args.model, args)]
    if args.student:
        results.append(bench_model(args.student, args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

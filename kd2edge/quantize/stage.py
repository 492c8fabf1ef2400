"""The quantize stage: distilled model -> 4-bit GPTQ checkpoint (standard on-disk format).

Calibration is the run's own training prompts (prompt + gold answer, as distillation sees
them). The checkpoint is read back and checked against the quantizer's weights (must be
bit-identical), and the reloaded model's loss on held-out prompts is compared with the
unquantized model's. With act-order, groups are static by default: onnxruntime-genai's
builder passes g_idx to MatMulNBits when `desc_act` is true, and on CPU (onnxruntime 1.32)
that gives wrong outputs even for a trivial g_idx (relative logit error ~0.3 on a tiny
qwen2), while the same weights without g_idx match to 1e-7.
"""

from __future__ import annotations

import math
from pathlib import Path

from kd2edge.artifacts import Artifact, write_artifact
from kd2edge.errors import ArtifactError, StageError

HELD_OUT_SAMPLES = 8


def calibration_texts(data: str, split: str, n: int, seed: int) -> tuple[list[str], dict]:
    """Up to `n` prompts of `split` with their gold answers, and where they came from.

    Raises:
        DataError: the dataset cannot be loaded or is empty.
    """
    from kd2edge.data.loaders import load_qa
    from kd2edge.data.prompts import build_prompt, target_text

    dataset = load_qa(data, split, limit=n, seed=seed)
    texts = [build_prompt(item) + (target_text(item) if item.gold else "") for item in dataset.items]
    return texts, {"dataset": dataset.name, "split": dataset.split, "warnings": list(dataset.warnings)}


def tokenize_calibration(tokenizer, texts: list[str], max_tokens: int) -> list:
    """Each text as a 1-D LongTensor of at most `max_tokens` ids."""
    return [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens).input_ids[0] for t in texts]


def mean_nll(model, ids_list: list) -> float:
    """Mean next-token negative log-likelihood (nats/token) of `model` over the samples."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids in ids_list:
            ids = ids.reshape(1, -1).to(device)
            if ids.shape[1] < 2:
                continue
            logits = model(ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / max(count, 1)


def write_error_plot(report: list[dict], path: Path) -> Path:
    """Per-Linear relative output error, GPTQ vs RTN, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.5))
    x = range(len(report))
    ax.plot(x, [r["rtn_rel_err"] for r in report], ".", label="RTN", alpha=0.7)
    if report and "gptq_rel_err" in report[0]:
        ax.plot(x, [r["gptq_rel_err"] for r in report], ".", label="GPTQ", alpha=0.9)
    ax.set_xlabel("Linear (layer order)")
    ax.set_ylabel("||WX - QX|| / ||WX||")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Reconstruction error per quantized Linear on calibration inputs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(config, input_artifact: Artifact, out_dir: Path) -> Artifact:
    """Quantize the input model with the run's [quantize] settings and write the GPTQ checkpoint.

    Steps: load the model and its calibration and held-out prompts; GPTQ (or RTN) layer by
    layer; write the checkpoint and check that it reads back bit for bit; held-out loss of
    the quantized model against the float one; per-layer errors as JSON and a plot.

    Raises:
        DataError: calibration data missing or too small.
        ModelError / ConfigError: a model or setting GPTQ cannot handle.
        StageError: the written checkpoint does not read back to the quantized weights.
    """
    import torch

    from kd2edge.artifacts import Stopwatch, write_json_atomic
    from kd2edge.gptq_checkpoint import write_gptq_checkpoint
    from kd2edge.models import load_causal_lm, model_folder
    from kd2edge.quantize.orchestrate import fitting_group_size, head_packable, quantize_head, quantize_model

    q, out_dir, clock = config.quantize, Path(out_dir), Stopwatch()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = model_folder(input_artifact.path)
    with clock("load_s"):
        model, tokenizer = load_causal_lm(src, device=device)
        calib, held, source = calibration_sets(tokenizer, config.data, q.calib_samples, HELD_OUT_SAMPLES,
                                               q.calib_max_tokens, config.seed)
        nll_fp = mean_nll(model, held)
    static = bool(q.static_groups and q.act_order)
    group_size = fitting_group_size(model, q.group_size)
    warnings = [] if group_size == q.group_size else [
        f"group size {q.group_size} does not divide this model's layer widths: using {group_size}"]
    with clock("quantize_s"):
        results, report = quantize_model(model, calib, bits=q.bits, group_size=group_size, act_order=q.act_order,
                                         sym=q.sym, damp=q.damp, block_size=q.block_size, method=q.method,
                                         device=device, static_groups=static)
        head = q.head
        if head != "float" and head_packable(model, q.bits, group_size) is not None:
            warnings.append(f"the output head stays float: {head_packable(model, q.bits, group_size)}")
            head = "float"
        if head != "float":
            name, result, row = quantize_head(model, calib, method=head, bits=q.bits, group_size=group_size,
                                              act_order=q.act_order, sym=q.sym, damp=q.damp,
                                              block_size=q.block_size, device=device)
            results[name] = result
            report.append(row)
    with clock("write_check_s"):
        write_gptq_checkpoint(model, tokenizer, results, out_dir, bits=q.bits, group_size=group_size,
                              desc_act=bool(q.act_order and not static), sym=q.sym, damp=q.damp, static_groups=static)
        del model
        readback, nll_q = check_checkpoint(out_dir, results, held, device)
    # Seconds vary run to run: they go to the manifest's timings, not into the artifact's
    # files, so that the same quantization has the same content hash.
    clock.timings["per_layer_s"] = {row["name"]: row.pop("seconds") for row in report if "seconds" in row}
    write_json_atomic(out_dir / "quant_report.json", report)
    write_error_plot(report, out_dir / "quant_errors.png")
    metrics = quantize_metrics(q, group_size, static, device, calib, source, report, readback, held, nll_fp, nll_q,
                               src, out_dir)
    metrics["head"] = head
    model_id = input_artifact.manifest.get("id", str(src))
    return write_artifact(out_dir, "quantize", config.stage_config("quantize"), input_artifact, metrics,
                          id=f"{model_id} ({q.method.upper()} {q.bits}-bit)", kind="model", format="gptq",
                          timings=clock.total(), warnings=warnings)


def calibration_sets(tokenizer, data: str, n_calib: int, n_held: int, max_tokens: int, seed: int):
    """(calibration ids from the train split, held-out ids from the validation split, where they came from)."""
    texts, source = calibration_texts(data, "train", n_calib, seed)
    held_texts, _ = calibration_texts(data, "validation", n_held, seed + 1)
    return tokenize_calibration(tokenizer, texts, max_tokens), tokenize_calibration(tokenizer, held_texts, max_tokens), source


def check_checkpoint(out_dir: Path, results: dict, held: list, device: str) -> tuple[float, float]:
    """Check that the written checkpoint reads back to the quantized weights, and score it on `held`.

    Returns:
        (max |read-back - quantized weight| (0.0), mean held-out NLL of the reloaded model).

    Raises:
        StageError: the checkpoint does not read back bit for bit.
    """
    from kd2edge.gptq_checkpoint import dequantize_tensors, load_dequantized_model, read_gptq_tensors

    stored = read_gptq_tensors(out_dir)
    readback = max(float((dequantize_tensors(qt) - results[name].dequant.cpu()).abs().max())
                   for name, qt in stored.items())
    if readback != 0.0 or stored.keys() != results.keys():
        raise StageError(f"the written checkpoint does not read back to the quantized weights (max diff {readback:g}): "
                         f"check free disk and rerun with --force")
    reloaded, _ = load_dequantized_model(out_dir, device=device)
    return readback, mean_nll(reloaded, held)


def quantize_metrics(q, group_size: int, static: bool, device: str, calib: list, source: dict, report: list[dict],
                     readback: float, held: list, nll_fp: float, nll_q: float, src: Path, out_dir: Path) -> dict:
    """The quantize manifest's metrics: settings as applied, calibration, reconstruction errors, held-out loss, sizes."""
    from kd2edge.quantize.orchestrate import summarize
    from kd2edge.resources import folder_size

    calib_info = {**source, "samples": len(calib), "requested_samples": q.calib_samples,
                  "tokens": sum(int(ids.numel()) for ids in calib), "max_tokens": q.calib_max_tokens,
                  "longest": max(int(ids.numel()) for ids in calib)}
    if len(calib) < q.calib_samples:
        calib_info["note"] = f"the dataset has only {len(calib)} training items: calibrated on all of them"
    return {
        "method": q.method, "bits": q.bits, "group_size": group_size, "group_size_requested": q.group_size,
        "act_order": q.act_order, "sym": q.sym, "static_groups": static, "damp": q.damp, "device": device,
        "calibration": calib_info, "reconstruction": summarize(report),
        "per_layer": "quant_report.json", "error_plot": "quant_errors.png", "readback_max_abs_diff": readback,
        "held_out": {"samples": len(held), "nll_fp32": round(nll_fp, 5), "nll_quantized": round(nll_q, 5),
                     "ppl_fp32": round(math.exp(nll_fp), 4), "ppl_quantized": round(math.exp(nll_q), 4)},
        "size_bytes": folder_size(out_dir),
        "input_size_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")),
    }


# ----------------------------------------------------------------------------------------------
# Resource estimate (kd2edge.pipeline.run_stage checks it against free disk and memory first).

def quantize_needs(total_params: int, linear_params: int, hidden: int, intermediate: int, bits: int,
                   group_size: int, calib_tokens: int):
    """Disk and peak memory of GPTQ on one model (bytes).

    Memory: the model in fp32 twice (the one quantized, then the checkpoint reloaded for the
    held-out check) and the fp16 tensors being written (10 B/param); every quantized Linear's
    result, held to the end for the read-back check, int32 codes + fp32 dequantized copy
    (8 B/weight); one decoder layer's Hessians at once, H = 2XX^T/N of shape (in, in) fp32 for
    q, k, v, o, gate, up (in = hidden) and down (in = intermediate); the calibration hidden
    states, (tokens, hidden) fp32, held as the layer's inputs and outputs. Measured on a
    SmolLM2-135M student (benchmarks/estimate_check.py): 1.4 GiB above the interpreter.
    Disk: the GPTQ checkpoint (`kd2edge.sizing.quantized_size_bytes`).

    Returns:
        kd2edge.resources.Needs.
    """
    from kd2edge.resources import Needs
    from kd2edge.sizing import quantized_size_bytes

    hessians = 4 * (6 * hidden * hidden + intermediate * intermediate)
    activations = 2 * 4 * calib_tokens * hidden
    memory = 10 * total_params + 8 * linear_params + hessians + activations
    disk = quantized_size_bytes(linear_params, total_params - linear_params, bits, group_size)
    return Needs(disk_bytes=disk, memory_bytes=memory)


def estimate(config, input_artifact: Artifact):
    """What the quantize stage needs for `input_artifact` with the run's [quantize] settings (see quantize_needs)."""
    from kd2edge.models import model_folder, read_model_config
    from kd2edge.sizing import hidden_size, stored_weights

    q = config.quantize
    src = model_folder(input_artifact.path)
    total, layer = stored_weights(src)
    model_config = read_model_config(src)
    hidden = hidden_size(model_config)
    return quantize_needs(total, layer, hidden, model_config.get("intermediate_size") or 4 * hidden, q.bits, q.group_size,
                          q.calib_samples * q.calib_max_tokens)

"""Quantize a whole causal LM layer by layer (the GPTQ paper's sequential scheme).

The calibration batch is run up to the first decoder layer once; then for each layer:
hooks on its Linears accumulate H = 2XX^T/N from the layer's inputs, every Linear is
quantized (GPTQ or round-to-nearest) and replaced by its dequantized weight, and the
layer is run again so the *quantized* layer's outputs are the next layer's inputs
(errors of earlier layers are then seen, and partly compensated, by later ones).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from kd2edge.errors import DataError, ModelError
from kd2edge.models import decoder_layers
from kd2edge.gptq_checkpoint import check_packable
from kd2edge.quantize.gptq import GPTQResult, accumulate_hessian, check_quant_args, gptq_quantize_weight, rtn_quantize_weight

MIN_CALIB_TOKENS = 64


class _StopForward(Exception):
    """Raised by the capture hook once the first layer's inputs are recorded (ends the forward early)."""


@dataclass
class _LayerCall:
    """One calibration sample as the decoder layers see it: hidden states plus the other arguments."""

    hidden: torch.Tensor          # (1, seq, hidden)
    args: tuple
    kwargs: dict


def quantizable_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers inside one decoder layer (attention and MLP projections), by relative name."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def check_model(model, bits: int, group_size: int) -> None:
    """Refuse before any work if some Linear cannot be quantized/packed with these settings.

    Raises:
        ModelError: no decoder layers, or a layer without Linear layers (e.g. GPT-2's Conv1D).
        ConfigError: bits unsupported, or a group size / output size the checkpoint cannot hold.
    """
    prefix, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        linears = quantizable_linears(layer)
        if not linears:
            raise ModelError(f"decoder layer {prefix}.{i} has no torch Linear layers to quantize "
                             f"(a {type(layer).__name__}): quantize a llama, qwen2 or gpt_neox style model")
        for name, lin in linears.items():
            check_quant_args(bits, group_size, lin.in_features)
            check_packable(lin.out_features, bits, f"{prefix}.{i}.{name} out_features")
            check_packable(lin.in_features, bits, f"{prefix}.{i}.{name} in_features")


def fitting_group_size(model, group_size: int) -> int:
    """The largest power of two <= `group_size` (and >= 16) that divides every quantized Linear's inputs.

    Profiles ask for 128, but e.g. SmolLM2-135M has 576 = 4.5 * 128 input features; the
    stage then uses 64 and records it. Returns `group_size` itself when it fits (or is -1),
    and -1 (per channel) when no power of two >= 16 fits.
    """
    if group_size == -1:
        return -1
    _, layers = decoder_layers(model)
    widths = {lin.in_features for layer in layers for lin in quantizable_linears(layer).values()}
    g = group_size
    while g >= 16:
        if all(w % g == 0 for w in widths):
            return g
        g //= 2
    return -1


def _capture_first_layer_inputs(model, layers, calib_ids: list[torch.Tensor], device) -> list[_LayerCall]:
    """Run the model on each sample until the first decoder layer; keep what that layer receives."""
    calls: list[_LayerCall] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append(_LayerCall(hidden, tuple(args[1:]), kwargs))
        raise _StopForward

    _feed_until(model, layers[0].register_forward_pre_hook(hook, with_kwargs=True), calib_ids, device)
    return calls


def _feed_until(model, handle, calib_ids, device) -> None:
    """Run each calibration sequence through `model` until the pre-hook behind `handle` stops it
    (it raises _StopForward once it has seen its input), then remove the hook."""
    try:
        for ids in calib_ids:
            try:
                model(ids.reshape(1, -1).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()


def _layer_output(out: Any) -> torch.Tensor:
    """Decoder layers return the hidden states, or a tuple whose first item they are."""
    return out[0] if isinstance(out, (tuple, list)) else out


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """||W X - Q X|| / ||W X|| computed from H = 2XX^T/N (no need to keep X).

    ||E X||^2 = N/2 tr(E H E^T), so the ratio is sqrt(tr(E H E^T) / tr(W H W^T)).
    """
    W = W.float()
    E = W - Q.float()
    num = float(((E @ H) * E).sum())
    den = float(((W @ H) * W).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


@torch.no_grad()
def quantize_model(model, calib_ids: list[torch.Tensor], bits: int = 4, group_size: int = 128,
                   act_order: bool = True, sym: bool = False, damp: float = 0.01, block_size: int = 128,
                   method: str = "gptq", device: str = "cpu", static_groups: bool = False,
                   min_tokens: int = MIN_CALIB_TOKENS) -> tuple[dict[str, GPTQResult], list[dict]]:
    """Quantize every decoder-layer Linear of `model` in place (weights become their dequantized values).

    Args:
        model: a transformers causal LM (llama, qwen2, gpt_neox style); moved to `device`.
        calib_ids: calibration samples, each a 1-D (or (1, seq)) LongTensor of token ids.
        bits, group_size, act_order, sym, damp, block_size: GPTQ settings (see `gptq_quantize_weight`).
        static_groups: see `gptq_quantize_weight` (keeps g_idx trivial under act-order).
        method: "gptq" or "rtn" (round-to-nearest; calibration is still run, for the error report).
        device: "cpu" or "cuda".
        min_tokens: refuse fewer calibration tokens than this (or than the widest Linear's in_features).

    Returns:
        (results, report): results maps full module names ("model.layers.0.self_attn.q_proj") to
        GPTQResults; report has one row per Linear: {layer, name, in, out, gptq_rel_err (GPTQ only),
        rtn_rel_err, damp_used, damp_raised, seconds}. Relative errors are ||WX - QX|| / ||WX|| on the
        calibration inputs of the (partly quantized) model.

    Raises:
        DataError: no or too few calibration tokens.
        ModelError / ConfigError: see `check_model`.
    """
    from tqdm import tqdm

    if method not in ("gptq", "rtn"):
        raise ValueError(f"unknown method {method!r}")
    check_model(model, bits, group_size)
    prefix, layers = decoder_layers(model)
    # Fewer tokens than input features leave H rank-deficient: GPTQ would rest on damping alone.
    widest = max(lin.in_features for layer in layers for lin in quantizable_linears(layer).values())
    need = max(min_tokens, widest)
    n_tokens = sum(int(ids.numel()) for ids in calib_ids)
    if n_tokens < need:
        raise DataError(f"only {n_tokens} calibration tokens ({len(calib_ids)} samples): need at least {need} "
                        f"(the widest layer's inputs); give a larger dataset (--data) or more --calib-samples")
    model.to(device).eval()
    calls = _capture_first_layer_inputs(model, layers, calib_ids, device)

    results: dict[str, GPTQResult] = {}
    report: list[dict] = []
    for i, layer in enumerate(tqdm(layers, desc=f"{method} layers", unit="layer", disable=None)):
        linears = quantizable_linears(layer)
        hessians: dict[str, tuple[torch.Tensor | None, int]] = {name: (None, 0) for name in linears}

        def make_hook(name):
            def hook(module, inputs, output):
                H, n = hessians[name]
                hessians[name] = accumulate_hessian(H, inputs[0], n)
            return hook

        handles = [lin.register_forward_hook(make_hook(name)) for name, lin in linears.items()]
        try:
            for c in calls:
                layer(c.hidden, *c.args, **c.kwargs)
        finally:
            for h in handles:
                h.remove()

        for name, lin in linears.items():
            t0 = time.perf_counter()
            H = hessians[name][0]
            W = lin.weight.data
            rtn = rtn_quantize_weight(W, bits, group_size, sym, H=H)
            row = {"layer": i, "name": name, "in": lin.in_features, "out": lin.out_features,
                   "rtn_rel_err": round(relative_output_error(W, rtn.dequant, H), 6)}
            if method == "gptq":
                result = gptq_quantize_weight(W, H, bits, group_size, act_order, sym, damp, block_size,
                                              static_groups=static_groups)
                row["gptq_rel_err"] = round(relative_output_error(W, result.dequant, H), 6)
            else:
                result = rtn
            row["damp_used"] = result.damp_used
            row["damp_raised"] = method == "gptq" and result.damp_used != damp
            row["seconds"] = round(time.perf_counter() - t0, 4)
            lin.weight.data.copy_(result.dequant.to(W.dtype))
            results[f"{prefix}.{i}.{name}"] = result
            report.append(row)
        del hessians

        # The next layer sees what this quantized layer outputs.
        for c in calls:
            c.hidden = _layer_output(layer(c.hidden, *c.args, **c.kwargs))
    return results, report


def head_packable(model, bits: int, group_size: int) -> str | None:
    """Why the output head cannot be held in a GPTQ checkpoint at these settings (None when it can).

    The checkpoint packs zero points along the output (vocabulary) axis in 32-bit words and
    groups along the hidden axis: a trimmed vocabulary of, say, 24,001 tokens does not pack.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return "the model has no Linear output head"
    if (head.out_features * bits) % 32:
        return f"a vocabulary of {head.out_features} tokens does not pack at {bits} bits (needs a multiple of {32 // math.gcd(32, bits)})"
    if group_size != -1 and head.in_features % group_size:
        return f"group size {group_size} does not divide the head's {head.in_features} inputs"
    return None


@torch.no_grad()
def head_inputs_hessian(model, calib_ids: list[torch.Tensor], device: str = "cpu") -> tuple[torch.Tensor, int]:
    """H = 2XX^T/N of the output head's inputs (the final-norm hidden states) over the calibration samples.

    The forward stops at the head (a pre-hook raises): the [tokens, vocab] logits are never computed.

    Returns:
        (H (hidden, hidden) float32, tokens counted).
    """
    head = model.get_output_embeddings()
    state: dict = {"H": None, "n": 0}

    def hook(module, args):
        state["H"], state["n"] = accumulate_hessian(state["H"], args[0], state["n"])
        raise _StopForward

    _feed_until(model, head.register_forward_pre_hook(hook), calib_ids, device)
    return state["H"], state["n"]


@torch.no_grad()
def quantize_head(model, calib_ids: list[torch.Tensor], method: str = "gptq", bits: int = 4, group_size: int = 64,
                  act_order: bool = True, sym: bool = False, damp: float = 0.01, block_size: int = 128,
                  device: str = "cpu") -> tuple[str, GPTQResult, dict]:
    """Quantize the output head (tied: the input embedding too) in place, calibrated on the model's own inputs to it.

    Run after the decoder layers are quantized, so the head sees the quantized model's hidden
    states, as it will at run time. GPTQ minimises the logits' error ||W X - Q X|| on those
    inputs; a tied embedding reads rows of the same Q, which GPTQ does not optimise for (the
    report's `row_rel_err` measures what the embedding loses, `rtn_row_rel_err` the RTN baseline).
    Act-order uses static groups: g_idx stays trivial, so a tied embedding can gather the
    4-bit rows in stored order.

    Args:
        model: a transformers causal LM with a Linear output head (its decoder layers quantized).
        calib_ids: calibration samples (1-D LongTensors).
        method: "gptq" or "rtn" (same grid and groups).
        bits, group_size, act_order, sym, damp, block_size: as for `quantize_model`.
        device: "cpu" or "cuda".

    Returns:
        (module name, GPTQResult, report row {layer: "head", name, in, out, rtn_rel_err,
         gptq_rel_err (GPTQ), row_rel_err, rtn_row_rel_err, damp_used, damp_raised, seconds, tied}).

    Raises:
        ConfigError: `head_packable` says why the head cannot be quantized (a caller checks first).
    """
    from kd2edge.errors import ConfigError

    if method not in ("gptq", "rtn"):
        raise ValueError(f"unknown method {method!r}")
    reason = head_packable(model, bits, group_size)
    if reason is not None:
        raise ConfigError(f"cannot quantize the output head: {reason}; keep it float (quantize.head = \"float\")",
                          source="quantize")
    model.to(device).eval()
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    tied = head.weight is model.get_input_embeddings().weight
    t0 = time.perf_counter()
    H, _ = head_inputs_hessian(model, calib_ids, device)
    W = head.weight.data
    rtn = rtn_quantize_weight(W, bits, group_size, sym, H=H)
    if method == "gptq":
        result = gptq_quantize_weight(W, H, bits, group_size, act_order, sym, damp, block_size, static_groups=True)
    else:
        result = rtn
    row = {"layer": "head", "name": name, "in": head.in_features, "out": head.out_features,
           "rtn_rel_err": round(relative_output_error(W, rtn.dequant, H), 6)}
    if method == "gptq":
        row["gptq_rel_err"] = round(relative_output_error(W, result.dequant, H), 6)
    row.update(row_rel_err=round(row_error(W, result.dequant), 6), rtn_row_rel_err=round(row_error(W, rtn.dequant), 6),
               damp_used=result.damp_used, damp_raised=method == "gptq" and result.damp_used != damp,
               seconds=round(time.perf_counter() - t0, 4), tied=tied)
    W.copy_(result.dequant.to(W.dtype))          # tied: the embedding is the same tensor
    return name, result, row


def row_error(W: torch.Tensor, Q: torch.Tensor) -> float:
    """||W - Q||_F / ||W||_F: what an embedding lookup of every row loses (no input weighting)."""
    W = W.float()
    return float(torch.linalg.norm(W - Q.float()) / torch.linalg.norm(W))


def summarize(report: list[dict]) -> dict:
    """Mean/max relative output errors and damping over a `quantize_model` report."""
    head = [r for r in report if r["layer"] == "head"]
    report = [r for r in report if r["layer"] != "head"]
    out: dict[str, Any] = {"linears": len(report)}
    for key in ("gptq_rel_err", "rtn_rel_err"):
        values = [r[key] for r in report if key in r]
        if values:
            out[f"{key}_mean"] = round(sum(values) / len(values), 6)
            out[f"{key}_max"] = round(max(values), 6)
    out["damp_max"] = max((r["damp_used"] for r in report), default=0.0)
    out["damp_raised"] = [f"{r['layer']}.{r['name']}" for r in report + head if r["damp_raised"]]
    if head:
        out["head"] = {k: v for k, v in head[0].items() if k not in ("layer", "seconds")}
    return out

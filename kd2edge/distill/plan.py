"""Sizing a student for a device: parameters, 4-bit size, KV cache, predicted decode speed.

Candidates are the teacher cut to 1 .. L-1 decoder layers. For each, a roofline
estimate of decode speed: generating one token reads every weight once plus the whole
KV cache, so tokens/s <= memory bandwidth / (weight bytes + KV-cache bytes).

Size model (what the quantize + export stages produce):
* the decoder layers' linear weights at `bits` bits, plus per group of `group_size`
  weights one 16-bit scale and one `bits`-bit zero point (asymmetric GPTQ);
* everything else (token embeddings, an untied lm_head, norms, biases) at 16 bits.
KV cache: 2 (K and V) x layers x kv_heads x head_dim x context x bytes per value, with
4-byte values on CPU-only devices (onnxruntime's CPU kernels run in fp32) and 2 with an accelerator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kd2edge.errors import BudgetError, ModelError

MIB = 2**20


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameter counts of a decoder-only model, split by what layer pruning changes."""

    total: int            # whole model (tied weights once)
    per_layer: int        # one decoder layer
    per_layer_linear: int  # of which in nn.Linear weights (what GPTQ quantizes)
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def fixed(self) -> int:
        """Parameters outside the decoder layers (embeddings, final norm, untied head)."""
        return self.total - self.layers * self.per_layer

    def params_with(self, layers: int) -> int:
        return self.fixed + layers * self.per_layer


@dataclass(frozen=True)
class Candidate:
    layers: int
    params: int
    size_bytes: int
    kv_cache_bytes: int
    memory_bytes: int
    decode_tokens_per_s: float
    param_fraction: float
    fails: tuple[str, ...]     # budgets it misses (empty: it fits)

    def to_dict(self) -> dict:
        return asdict(self)


def param_breakdown(model_config) -> ParamBreakdown:
    """Count parameters per part by building the architecture on the meta device (no memory, no weights).

    Args:
        model_config: a transformers PretrainedConfig of a decoder-only causal LM.

    Raises:
        ModelError: the architecture cannot be instantiated or has no decoder layer list.
    """
    import copy

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from kd2edge.distill.student import decoder_layers

    def build(n_layers: int):
        cfg = copy.deepcopy(model_config)
        cfg.num_hidden_layers = n_layers
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = list(cfg.layer_types)[:n_layers]
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
        model.tie_weights()  # on the meta device ties are not applied by from_config: count shared weights once
        return model

    try:
        model = build(1)
    except (ValueError, KeyError) as e:
        raise ModelError(f"cannot size the {model_config.model_type} architecture: {e}") from None
    layer = decoder_layers(model)[0]
    total_one = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in layer.parameters())
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    n = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    return ParamBreakdown(total=total_one + (n - 1) * per_layer, per_layer=per_layer, per_layer_linear=linear,
                          layers=n, kv_heads=kv_heads, head_dim=head_dim)


def quantized_size_bytes(linear_params: int, other_params: int, bits: int, group_size: int,
                         other_bytes: int = 2) -> int:
    """Bytes of a GPTQ-quantized model: packed weights + per-group scale (fp16) and zero point.

    Args:
        linear_params: weights that are quantized. other_params: weights kept at `other_bytes`.
        bits: weight bits. group_size: weights per group, -1 = one group per output row
            (approximated as 1 group per 1024 weights, the row length of small models).
    """
    groups = linear_params / (group_size if group_size > 0 else 1024)
    return int(linear_params * bits / 8 + groups * (2 + bits / 8) + other_params * other_bytes)


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context_length: int, value_bytes: int) -> int:
    """K and V for every layer, head and position of a full context."""
    return 2 * layers * kv_heads * head_dim * context_length * value_bytes


def decode_tokens_per_s(bytes_per_token: float, bandwidth: float) -> float:
    """Memory-bound roofline: each generated token streams `bytes_per_token` from memory once."""
    return bandwidth / bytes_per_token


def candidates(breakdown: ParamBreakdown, *, bits: int, group_size: int, context_length: int,
               bandwidth: float, kv_value_bytes: int, max_artifact_mb: float, max_peak_memory_mb: float,
               min_decode_tokens_per_s: float, max_param_fraction: float) -> list[Candidate]:
    """Every layer-pruned student (1 .. L-1 layers) with its estimates and the budgets it misses.

    Args:
        breakdown: the teacher's `param_breakdown`.
        bits, group_size: the quantization the profile uses.
        context_length: tokens of KV cache to budget for.
        bandwidth: the device's memory bandwidth in bytes/s.
        kv_value_bytes: bytes per cached K/V value (4 on CPU, 2 with an accelerator).
        max_artifact_mb, max_peak_memory_mb, min_decode_tokens_per_s: the profile's budgets.
        max_param_fraction: a student may hold at most this fraction of the teacher's parameters.
    """
    out = []
    for n in range(1, breakdown.layers):
        params = breakdown.params_with(n)
        linear = n * breakdown.per_layer_linear
        size = quantized_size_bytes(linear, params - linear, bits, group_size)
        kv = kv_cache_bytes(n, breakdown.kv_heads, breakdown.head_dim, context_length, kv_value_bytes)
        tps = decode_tokens_per_s(size + kv, bandwidth)
        fraction = params / breakdown.total
        fails = []
        if size / MIB > max_artifact_mb:
            fails.append("max_artifact_mb")
        if (size + kv) / MIB > max_peak_memory_mb:
            fails.append("max_peak_memory_mb")
        if tps < min_decode_tokens_per_s:
            fails.append("min_decode_tokens_per_s")
        if fraction > max_param_fraction:
            fails.append("max_param_fraction")
        out.append(Candidate(n, params, size, kv, size + kv, round(tps, 1), round(fraction, 4), tuple(fails)))
    return out


def choose(cands: list[Candidate], profile_name: str = "the profile") -> Candidate:
    """The largest candidate that meets every budget.

    Raises:
        BudgetError: none fits (the message names what the smallest one misses).
    """
    fitting = [c for c in cands if not c.fails]
    if not fitting:
        if not cands:
            raise BudgetError("the teacher has a single decoder layer: there is no smaller layer-pruned student; "
                              "pass --student with a smaller model")
        smallest = cands[0]
        raise BudgetError(f"no student fits {profile_name}: even {smallest.layers} layer(s) miss "
                          f"{', '.join(smallest.fails)}; choose a larger profile or a smaller teacher")
    return max(fitting, key=lambda c: c.params)

"""Sizing a model from its config and weight files: parameters, bytes, KV cache, predicted speed.

Shared by the stages' planning and resource estimates (no stage-specific logic here).

Size model of a 4-bit artifact (what the quantize + export stages produce):
* the decoder layers' linear weights at `bits` bits, plus per group of `group_size`
  weights one 16-bit scale and one `bits`-bit zero point (asymmetric GPTQ);
* everything else (token embeddings, an untied lm_head, norms, biases) at 16 bits.
KV cache: 2 (K and V) x layers x kv_heads x head_dim x context x bytes per value.
Predicted decode speed: a memory-bound roofline; generating one token reads every weight
once plus the whole KV cache, so tokens/s <= memory bandwidth / bytes read per token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from kd2edge.errors import ArtifactError, ModelError
from kd2edge.models import decoder_layers, read_model_config

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
    vocab: int = 0        # embedding rows
    hidden: int = 0       # embedding width
    tied: bool = True     # the lm_head shares the embedding matrix
    intermediate: int = 0     # MLP neurons per layer
    per_neuron: int = 0       # parameters of one MLP neuron (a gated MLP: its gate and up rows, its down column)

    @property
    def fixed(self) -> int:
        """Parameters outside the decoder layers (embeddings, final norm, untied head)."""
        return self.total - self.layers * self.per_layer

    def dropped_per_layer(self, intermediate: int | None) -> int:
        """Parameters a layer loses when its MLP keeps `intermediate` neurons (all linear weights)."""
        return max(0, self.intermediate - intermediate) * self.per_neuron if intermediate is not None else 0

    def params_with(self, layers: int, vocab: int | None = None, intermediate: int | None = None) -> int:
        """Parameters of the model cut to `layers` decoder layers and, if given, `vocab` token rows and
        `intermediate` MLP neurons per layer."""
        dropped_rows = max(0, self.vocab - vocab) if vocab is not None else 0
        return (self.fixed - dropped_rows * self.hidden * (1 if self.tied else 2)
                + layers * (self.per_layer - self.dropped_per_layer(intermediate)))


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
    layer = decoder_layers(model)[1][0]
    total_one = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in layer.parameters())
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    n = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    mlp = getattr(layer, "mlp", None)
    gated = all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
    intermediate = getattr(model_config, "intermediate_size", 0) or 0
    return ParamBreakdown(total=total_one + (n - 1) * per_layer, per_layer=per_layer, per_layer_linear=linear,
                          layers=n, kv_heads=kv_heads, head_dim=head_dim, vocab=int(embedding.shape[0]),
                          hidden=int(embedding.shape[1]), tied=head is None or head.weight is embedding,
                          intermediate=intermediate if gated else 0,
                          per_neuron=sum(p.numel() for p in mlp.parameters()) // intermediate
                          if gated and intermediate else 0)


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


def predicted_decode_tokens_per_s(bytes_per_token: float, bandwidth: float) -> float:
    """Memory-bound roofline: each generated token streams `bytes_per_token` from memory once (a prediction,
    not a measurement: measured speeds are `kd2edge.runtime.stats.decode_tokens_per_s`)."""
    return bandwidth / bytes_per_token


def stored_weights(folder: Path) -> tuple[int, int]:
    """(all parameters, parameters of the decoder layers' matrices) in `folder`'s safetensors files.

    Read from the files' headers only (no tensor is loaded), for any architecture. In a GPTQ
    checkpoint a packed `qweight` int32 holds 32 / bits weights; its qzeros, scales and g_idx
    are bookkeeping, not parameters.

    Raises:
        ArtifactError: a weights file is unreadable.
    """
    from safetensors import SafetensorError, safe_open

    bits = (read_model_config(folder).get("quantization_config") or {}).get("bits")
    in_layers = re.compile(r"\.(layers|h)\.\d+\.")
    total = layer = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{f} is unreadable ({e}): write the model again") from None
        for name, shape in shapes.items():
            if name.endswith((".qzeros", ".scales", ".g_idx")):
                continue
            n = math.prod(shape) * (32 // bits if bits and name.endswith(".qweight") else 1)
            total += n
            if len(shape) == 2 and in_layers.search(name):
                layer += n
    return total, layer


def hidden_size(config: dict) -> int:
    """The model width in a config.json dict (`hidden_size`, GPT-2 style `n_embd`), 0 if absent."""
    return config.get("hidden_size") or config.get("n_embd") or 0

"""The standard GPTQ checkpoint: write, read, unpack and dequantize.

On-disk layout (what auto-gptq, GPTQModel, transformers, vLLM and onnxruntime-genai's
model builder read, `checkpoint_format: gptq`), per quantized Linear `<name>`:

    <name>.qweight  int32 (in * bits / 32, out)   codes packed along the input dim
    <name>.qzeros   int32 (n_groups, out * bits / 32)  (zero - 1) packed along the output dim
    <name>.scales   float16 (n_groups, out)
    <name>.g_idx    int32 (in,)                    group of each input column
    <name>.bias     (out,) if the layer has one

Packing is a little-endian bit stream in 32-bit words: value k of a packed run
occupies bits [k*bits, (k+1)*bits) of the concatenated words. For 2, 4 and 8 bits
this is "32/bits values per word, lowest first"; for 3 bits, 32 values fill exactly
3 words and values 10 and 21 span two words, which is the GPTQ reference layout.

Every other tensor (embeddings, norms) is stored unquantized; lm_head too, unless it was
quantized (`quantization_config.lm_head` true, as GPTQModel writes it). A tied lm_head is
the input embedding: the embedding is then also stored in float16, rounded from the
dequantized head, for readers that do not dequantize lm_head, and `load_dequantized_model`
rebuilds it exactly from the head's codes. config.json carries `quantization_config`;
quantize_config.json repeats it for older readers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kd2edge.errors import ArtifactError, ConfigError, ModelError

SUPPORTED_BITS = (2, 3, 4, 8)
# One quantized Linear as `kd2edge.quantize.gptq` returns it (GPTQResult): qweight_int, scales, zeros,
# g_idx, dequant, bits, group_size. This module reads the fields only, so it needs no import of the quantizer.
QuantizedWeight = Any
WEIGHTS_FILE = "model.safetensors"
_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


@dataclass(frozen=True)
class QuantTensors:
    """The stored tensors of one quantized Linear, as read from a checkpoint."""

    qweight: torch.Tensor        # int32 (in * bits / 32, out)
    qzeros: torch.Tensor         # int32 (n_groups, out * bits / 32), holding zero - 1
    scales: torch.Tensor         # float16 (n_groups, out)
    g_idx: torch.Tensor          # int32 (in,)
    bias: torch.Tensor | None    # (out,) or None
    bits: int
    group_size: int

    @property
    def in_features(self) -> int:
        return int(self.g_idx.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[1])


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale * (q - zero). The one formula every reader of our checkpoints uses."""
    return scale * (q.float() - zero.float())


def check_packable(n: int, bits: int, what: str) -> None:
    """Raise ConfigError unless n values of `bits` bits fill whole 32-bit words."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits: {bits} is not supported (use 2, 3, 4 or 8)", source="quantize")
    if (n * bits) % 32:
        step = 32 // math.gcd(32, bits)
        raise ConfigError(f"{what} of size {n} cannot be packed at {bits} bits (needs a multiple of {step}); "
                          f"use 4 or 8 bits for this model", source="quantize")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes along dim 0 into int32 words (the GPTQ bit-stream layout).

    Args:
        codes: (n, cols) integers in [0, 2^bits); n * bits must be a multiple of 32.
        bits: 2, 3, 4 or 8.

    Returns:
        (n * bits / 32, cols) int32.

    Raises:
        ConfigError: unsupported bits or n not packable.
        ValueError: a code outside [0, 2^bits) (a caller bug).
    """
    n, cols = codes.shape
    check_packable(n, bits, "a dimension")
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise ValueError(f"codes outside [0, {2 ** bits}) cannot be packed at {bits} bits")
    # 32 values fill exactly `bits` words: pad the stream to whole runs of 32, drop the padding words after.
    runs = torch.nn.functional.pad(codes, (0, 0, 0, -n % 32)).reshape(-1, 32, cols)
    words = torch.zeros(runs.shape[0], bits, cols, dtype=torch.int64, device=codes.device)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        words[:, word] |= (runs[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:                               # spills into the next word (3 bits)
            words[:, word + 1] |= runs[:, j] >> (32 - shift)
    words = words.reshape(-1, cols)[: n * bits // 32]
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows`: (n * bits / 32, cols) int32 -> (n, cols) int32 codes."""
    m, cols = packed.shape
    if bits not in SUPPORTED_BITS:
        raise ArtifactError(f"{bits}-bit values are not supported (2, 3, 4 or 8): the checkpoint is not one kd2edge reads")
    words = packed.to(torch.int64) & 0xFFFFFFFF            # unsigned view of each word
    words = torch.nn.functional.pad(words, (0, 0, 0, -m % bits)).reshape(-1, bits, cols)
    mask = 2 ** bits - 1
    out = torch.empty(words.shape[0], 32, cols, dtype=torch.int64, device=packed.device)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        value = words[:, word] >> shift
        if shift + bits > 32:
            value = value | (words[:, word + 1] << (32 - shift))
        out[:, j] = value & mask
    return out.reshape(-1, cols)[: m * 32 // bits].to(torch.int32)


def pack_result(result: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantTensors:
    """Turn one QuantizedWeight into its on-disk tensors (zero - 1 stored, GPTQ v1 convention)."""
    out, cols = result.qweight_int.shape
    check_packable(cols, result.bits, "in_features")
    check_packable(out, result.bits, "out_features")
    maxq = 2 ** result.bits - 1
    qweight = pack_rows(result.qweight_int.T.contiguous(), result.bits)           # (in*bits/32, out)
    qzeros = pack_rows((result.zeros - 1) & maxq, result.bits).T.contiguous()        # (n_groups, out*bits/32)
    return QuantTensors(qweight=qweight, qzeros=qzeros, scales=result.scales.T.contiguous().half(),
                        g_idx=result.g_idx.to(torch.int32).contiguous(), bias=bias,
                        bits=result.bits, group_size=result.group_size)


def dequantize_tensors(qt: QuantTensors) -> torch.Tensor:
    """The (out, in) float32 weight a GPTQ reader computes from the stored tensors.

    Equals the QuantizedWeight's `dequant` bit for bit (same codes, same float16 scales,
    same formula `scale * (q - zero)`).
    """
    maxq = 2 ** qt.bits - 1
    codes = unpack_rows(qt.qweight, qt.bits).T                                    # (out, in)
    zeros = (unpack_rows(qt.qzeros.T.contiguous(), qt.bits).T + 1) & maxq         # (n_groups, out)
    g = qt.g_idx.long()
    scales = qt.scales.float()
    return dequantize_codes(codes, scales.T[:, g], zeros.T[:, g])


def quantization_config(bits: int, group_size: int, desc_act: bool, sym: bool, damp: float = 0.01,
                        static_groups: bool = False, lm_head: bool = False) -> dict:
    """The `quantization_config` block of config.json (also quantize_config.json)."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "damp_percent": damp, "static_groups": static_groups, "true_sequential": False,
            "checkpoint_format": "gptq", "model_file_base_name": "model", "lm_head": lm_head}


def write_gptq_checkpoint(model, tokenizer, results: dict[str, QuantizedWeight], out_dir: str | Path, bits: int,
                          group_size: int, desc_act: bool, sym: bool, damp: float = 0.01,
                          dtype: str = "float16", static_groups: bool = False) -> Path:
    """Write `model` as a standard GPTQ checkpoint folder, its Linears in `results` quantized.

    Args:
        model: the transformers causal LM the results were computed on (its other tensors are saved as is).
        tokenizer: saved beside the weights.
        results: module name (e.g. "model.layers.0.self_attn.q_proj") -> its QuantizedWeight.
        out_dir: the folder to write (created if needed).
        bits, group_size, desc_act, sym, damp, static_groups: recorded in `quantization_config`; bits and
            group_size must match every result.
        dtype: "float16" or "float32" for the unquantized tensors (embeddings, norms, lm_head).

    Returns:
        The path of the weights file.

    Raises:
        ModelError: a result names no Linear of `model`, or its shape differs.
        ConfigError: a result quantized with other bits/group size, or a shape that cannot be packed.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    float_dtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in state.items():
        # Tied weights (lm_head = embed_tokens) share storage; safetensors stores each once.
        if value.data_ptr() in seen_storage:
            continue
        seen_storage.add(value.data_ptr())
        tensors[key] = value.detach().to("cpu", float_dtype if value.is_floating_point() else value.dtype)
    for name, result in results.items():
        module = _linear(model, name)
        if tuple(module.weight.shape) != tuple(result.dequant.shape):
            raise ModelError(f"{name}: quantized shape {tuple(result.dequant.shape)} differs from the layer's "
                             f"{tuple(module.weight.shape)}: results come from another model")
        if (result.bits, result.group_size) != (bits, group_size):
            raise ConfigError(f"{name} was quantized with bits={result.bits}, group_size={result.group_size}, "
                              f"not {bits}/{group_size}: quantize again with one setting", source="quantize")
        bias = None if module.bias is None else module.bias.detach().to("cpu", float_dtype)
        qt = pack_result(_to_cpu(result), bias)
        tensors.pop(f"{name}.weight", None)
        tensors.pop(f"{name}.bias", None)
        for suffix in _SUFFIXES:
            value = getattr(qt, suffix)
            if value is not None:
                tensors[f"{name}.{suffix}"] = value
    embedding = model.get_input_embeddings()
    embed_key = next(f"{n}.weight" for n, m in model.named_modules() if m is embedding)
    # a tied head whose key the storage de-duplication kept: the embedding's float copy stays for other readers
    tensors.setdefault(embed_key, embedding.weight.detach().to("cpu", float_dtype))
    weights = out_dir / WEIGHTS_FILE
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})

    head = model.get_output_embeddings()
    head_names = [n for n, m in model.named_modules() if head is not None and m is head]
    qcfg = quantization_config(bits, group_size, desc_act, sym, damp, static_groups,
                               lm_head=bool(head_names) and head_names[0] in results)
    config = model.config.to_dict()
    config.update(quantization_config=qcfg, torch_dtype=dtype, dtype=dtype)
    # save_pretrained fills this in; readers (onnxruntime-genai's builder) dispatch on it.
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    # Where the model was loaded from is no property of the checkpoint, and would make two
    # identical quantizations hash differently.
    config.pop("_name_or_path", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n", encoding="utf-8")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return weights


def _linear(model, name: str):
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"{name} is not a module of this model: results come from another model") from None
    if not isinstance(module, torch.nn.Linear):
        raise ModelError(f"{name} is a {type(module).__name__}, not a Linear layer: only Linears can be GPTQ-quantized")
    return module


def _to_cpu(result: QuantizedWeight) -> QuantizedWeight:
    from dataclasses import replace

    return replace(result, qweight_int=result.qweight_int.cpu(), scales=result.scales.cpu(),
                   zeros=result.zeros.cpu(), g_idx=result.g_idx.cpu(), dequant=result.dequant.cpu())


def read_quantization_config(path: str | Path) -> dict:
    """The `quantization_config` of a GPTQ checkpoint folder.

    Raises:
        ArtifactError: no config.json, or no GPTQ quantization_config in it.
    """
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} has no config.json: give a GPTQ checkpoint folder (the quantize stage's output)") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}/config.json is unreadable ({e}): quantize the model again") from None
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "gptq":
        raise ArtifactError(f"{path} is not a GPTQ checkpoint (config.json has no quantization_config with "
                            f"quant_method 'gptq'): run `kd2edge quantize` first")
    if qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise ArtifactError(f"{path}: checkpoint_format {qcfg.get('checkpoint_format')!r} is not supported "
                            f"(only 'gptq'): convert it to the GPTQ v1 format")
    return qcfg


def is_gptq_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a folder holding a GPTQ checkpoint (config + safetensors weights)."""
    path = Path(path)
    try:
        read_quantization_config(path)
    except ArtifactError:
        return False
    return any(path.glob("*.safetensors"))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"{path} holds no .safetensors weights: quantize the model again")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{f} is unreadable ({e}): quantize the model again") from None
    return tensors


def _split_tensors(tensors: dict[str, torch.Tensor], bits: int,
                   group_size: int) -> tuple[dict[str, QuantTensors], dict[str, torch.Tensor]]:
    """Group `<name>.qweight/...` entries into QuantTensors; return (quantized, the other tensors)."""
    names = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    quantized, rest = {}, dict(tensors)
    for name in names:
        try:
            parts = {s: rest.pop(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        except KeyError as e:
            raise ArtifactError(f"GPTQ checkpoint lacks {e.args[0]}: it is incomplete, quantize again") from None
        quantized[name] = QuantTensors(**parts, bias=rest.pop(f"{name}.bias", None), bits=bits, group_size=group_size)
    return quantized, rest


def read_gptq_tensors(path: str | Path) -> dict[str, QuantTensors]:
    """Read the quantized Linears of a GPTQ checkpoint folder.

    Args:
        path: the folder (config.json with quantization_config, *.safetensors).

    Returns:
        module name -> QuantTensors, in file order.

    Raises:
        ArtifactError: not a GPTQ checkpoint, or incomplete.
    """
    path = Path(path)
    qcfg = read_quantization_config(path)
    quantized, _ = _split_tensors(_read_safetensors(path), int(qcfg["bits"]), int(qcfg["group_size"]))
    return quantized


def load_dequantized_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """Load a GPTQ checkpoint as a plain float32 transformers model (the export/parity reference).

    Every quantized Linear's weight is `dequantize_tensors` of its stored tensors, so it
    equals the quantizer's dequantized weight exactly; other tensors are upcast to float32.

    Args:
        path: a GPTQ checkpoint folder.
        device: "cpu" or "cuda".

    Returns:
        (model in eval mode, tokenizer with a pad token).

    Raises:
        ArtifactError: not a GPTQ checkpoint, or its tensors do not fit its config.json.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    qcfg = read_quantization_config(path)
    quantized, rest = _split_tensors(_read_safetensors(path), int(qcfg["bits"]), int(qcfg["group_size"]))
    config = AutoConfig.from_pretrained(path)
    # Without quantization_config transformers builds ordinary Linears (no GPTQ kernel backend needed).
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() if v.is_floating_point() else v for k, v in rest.items()}
    for name, qt in quantized.items():
        state[f"{name}.weight"] = dequantize_tensors(qt)
        if qt.bias is not None:
            state[f"{name}.bias"] = qt.bias.float()
    _exact_tied_embedding(model, state, quantized)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ArtifactError(f"{path}: weights do not fit config.json (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}): the checkpoint is corrupt, quantize again")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _exact_tied_embedding(model, state: dict, quantized: dict) -> None:
    """With a tied 4-bit lm_head, make the embedding the head's dequantized weight (edits `state`).

    The checkpoint's float16 copy of the embedding is that weight rounded to float16, and
    `tie_weights` would otherwise make the head read the rounded copy.
    """
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    names = {id(m): n for n, m in model.named_modules()}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    head_name = names.get(id(head)) if head is not None else None
    if head_name in quantized:
        state[f"{names[id(embedding)]}.weight"] = state[f"{head_name}.weight"]

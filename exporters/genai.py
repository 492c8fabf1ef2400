"""The "onnx-genai" exporter: onnxruntime-genai's model builder fed with the GPTQ checkpoint.

The builder writes a hand-fused decoder (GroupQueryAttention, SkipSimplifiedLayerNorm,
MatMulNBits) and genai_config.json, for the architectures it has a builder for.
kd2edge.runtime.lm runs the result with a plain onnxruntime session and `tokenizers`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

from kd2edge.errors import ArtifactError, ModelError

# The decoder-only architectures onnxruntime-genai 0.11's builder handles (builder.py's dispatch).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "PhiForCausalLM",
    "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM",
    "OlmoForCausalLM", "NemotronForCausalLM", "SmolLM3ForCausalLM",
)
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


# config.json written from a model that was never saved may lack `architectures`.
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
                  "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "granite": "GraniteForCausalLM", "olmo": "OlmoForCausalLM", "nemotron": "NemotronForCausalLM",
                  "smollm3": "SmolLM3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


def check_supported(config: dict) -> str:
    """The checkpoint's architecture, if the genai builder supports it.

    Raises:
        ModelError: another architecture (says which exporter handles it).
    """
    arch = (config.get("architectures") or [_BY_MODEL_TYPE.get(config.get("model_type"), "?")])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"onnxruntime-genai's builder does not support {arch}: export it with --exporter onnx "
                         f"(optimum-onnx handles it), or use a Llama/Qwen/Phi/Gemma/Mistral model")
    return arch


def export(checkpoint_dir: Path, out_dir: Path, quantize_embeddings: bool = False,
           accuracy_level: int | None = None) -> dict:
    """Build an int4 CPU model with onnxruntime-genai from a GPTQ checkpoint.

    Args:
        checkpoint_dir: a 4-bit GPTQ checkpoint folder.
        out_dir: where the builder writes model.onnx, model.onnx.data and genai_config.json.
        quantize_embeddings: also make the embedding 4-bit (the builder's Gather quantization,
            shared with lm_head when tied).
        accuracy_level: MatMulNBits accuracy level (None: the builder's default for CPU).

    Returns:
        Metadata: format, exporter, files, size_bytes, builder options.

    Raises:
        ArtifactError: not a GPTQ checkpoint.
        ModelError: an architecture the builder does not support.
    """
    from kd2edge.gptq_checkpoint import is_gptq_checkpoint

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not is_gptq_checkpoint(checkpoint_dir):
        raise ArtifactError(f"{checkpoint_dir} is not a GPTQ checkpoint: export the output of `kd2edge quantize`")
    config = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
    arch = check_supported(config)
    if (config.get("quantization_config") or {}).get("desc_act"):
        # Measured: the builder passes g_idx to MatMulNBits, which onnxruntime's CPU kernel
        # ignores, so act-order layers come out with scrambled groups (logits off by ~6 on a tiny Llama).
        raise ModelError("onnxruntime-genai's CPU MatMulNBits ignores g_idx, so act-order GPTQ checkpoints export "
                         "wrongly: quantize with act_order = false, or use --exporter onnx")
    try:
        from onnxruntime_genai.models.builder import create_model
    except ImportError as e:
        raise ModelError(f"the onnx-genai exporter needs onnxruntime-genai's model builder ({e}): "
                         f"pip install onnxruntime-genai onnx-ir") from None
    options: dict = {"filename": "model.onnx"}
    if accuracy_level is not None:
        options["int4_accuracy_level"] = str(accuracy_level)
    if quantize_embeddings:
        options["int4_op_types_to_quantize"] = "MatMul/Gather"
        if config.get("tie_word_embeddings"):
            options["shared_embeddings"] = "true"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".genai-cache-", dir=out_dir.parent) as cache:
        source = _with_architecture(checkpoint_dir, config, arch, Path(cache) / "input")
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):   # the builder prints per-layer progress to stdout
                create_model(arch, str(source), str(out_dir), "int4", "cpu", str(Path(cache) / "hf"), **options)
        except NotImplementedError as e:
            raise ModelError(f"onnxruntime-genai's builder cannot build this model ({e}): use --exporter onnx") from None
    for name in COPIED_FILES:
        if (checkpoint_dir / name).is_file() and not (out_dir / name).is_file():
            shutil.copy2(checkpoint_dir / name, out_dir / name)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    return {"format": "onnx-genai", "exporter": "onnx-genai", "architecture": arch, "builder_options": options,
            # the builder's CPU default is 4 (int8 activations; seen on every MatMulNBits it writes)
            "accuracy_level": 4 if accuracy_level is None else accuracy_level,
            "embeddings": "int4" if quantize_embeddings else "float", "files": files,
            "size_bytes": sum((out_dir / f).stat().st_size for f in files)}


def _with_architecture(checkpoint_dir: Path, config: dict, arch: str, staging: Path) -> Path:
    """The checkpoint itself, or a linked copy whose config.json names `arch` (the builder dispatches on it)."""
    if config.get("architectures"):
        return checkpoint_dir
    staging.mkdir(parents=True)
    for item in checkpoint_dir.iterdir():
        if item.is_file() and item.name != "config.json":
            (staging / item.name).symlink_to(item.resolve())
    (staging / "config.json").write_text(json.dumps({**config, "architectures": [arch]}, indent=2), encoding="utf-8")
    return staging

"""The "onnx" exporter: a GPTQ checkpoint -> an ONNX decoder with a KV cache and 4-bit MatMulNBits weights.

The Llama family (llama, qwen2, mistral with full attention) gets the hand-fused graph
(`exporters/fused.py`); any other architecture optimum-onnx exports is traced and its
MatMuls rewritten (`exporters/traced.py`). Both hold the GPTQ codes themselves and are
finished the same way (`finish_graph`): weight self-check, dead nodes dropped, exact
fp16 storage of what stays float.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from exporters.vocab import vocab_matrices
from kd2edge.errors import ArtifactError, StageError

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


def export(checkpoint_dir: Path, out_dir: Path, quantize_embeddings: bool = False, accuracy_level: int = 0,
           fuse: bool = True) -> dict:
    """Export a GPTQ checkpoint to an ONNX decoder with a KV cache and 4-bit MatMulNBits weights.

    Args:
        checkpoint_dir: a GPTQ checkpoint folder (kd2edge quantize output, 4 bits).
        out_dir: where to write model.onnx (+ model.onnx.data), configs and tokenizer files.
        quantize_embeddings: also hold what the checkpoint left float of the vocabulary
            matrices in 4 bits (RTN, blocks of 32): GatherBlockQuantized for the input
            embedding, MatMulNBits for lm_head (one shared matrix when tied). A checkpoint with
            a 4-bit lm_head (`kd2edge quantize`, head = gptq or rtn) is exported with its own
            codes either way: tied, they are the embedding's too.
        accuracy_level: MatMulNBits' accuracy_level (0: float32 activations, exact to the
            dequantized weights; 4: int8 activations, faster, not exact).
        fuse: write the hand-fused graph (`exporters.fused`) for the Llama family; False
            (or another family) traces with optimum instead.

    Returns:
        Metadata: format, exporter, graph ("fused" or "traced", with fallback_reason),
        counts of rewritten layers, weight self-check, files, sizes.

    Raises:
        ArtifactError: not a 4-bit GPTQ checkpoint.
        StageError: a quantized layer has no MatMul in the traced graph, or its MatMulNBits
            weight differs from the checkpoint's dequantized weight.
    """
    import onnx

    from exporters.fused import build_fused_decoder, unquantized_projections, unsupported_reason
    from exporters.traced import export_with_past, rewrite_graph
    from kd2edge.gptq_checkpoint import (is_gptq_checkpoint, load_dequantized_model, read_gptq_tensors,
                                          read_quantization_config)

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not is_gptq_checkpoint(checkpoint_dir):
        raise ArtifactError(f"{checkpoint_dir} is not a GPTQ checkpoint: export the output of `kd2edge quantize`")
    bits = int(read_quantization_config(checkpoint_dir)["bits"])
    if bits != 4:
        raise ArtifactError(f"{checkpoint_dir} holds {bits}-bit weights; the onnx exporter writes 4-bit "
                            f"MatMulNBits: quantize with bits = 4")
    layers = read_gptq_tensors(checkpoint_dir)
    model, tokenizer = load_dequantized_model(checkpoint_dir)
    vocab, vocab_info = vocab_matrices(model, layers, quantize_embeddings)     # takes lm_head out of `layers`
    reason = unsupported_reason(model.config) if fuse else "fuse=False"
    if reason is None and unquantized_projections(model.config.num_hidden_layers, layers):
        reason = f"float projections ({unquantized_projections(model.config.num_hidden_layers, layers)[0]}, ...)"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=out_dir) as tmp:
        if reason is None:
            proto, info = build_fused_decoder(model, layers, vocab, accuracy_level)
            info = {**info, "accuracy_level": accuracy_level}
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            export_with_past(model, tokenizer, Path(tmp))
            proto = onnx.load(str(Path(tmp) / "model.onnx"))
            info = rewrite_graph(proto, model, layers, vocab, accuracy_level)
        info = finish_graph(proto, {**info, **vocab_info})
        info = {"graph": "fused" if reason is None else "traced", "fallback_reason": reason, **info}
        for name in SIDE_FILES:
            if (Path(tmp) / name).is_file():
                shutil.copy2(Path(tmp) / name, out_dir / name)
    (out_dir / "model.onnx.data").unlink(missing_ok=True)
    onnx.save(proto, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    return {"format": "onnx", "exporter": "onnx", **info, "files": files,
            "size_bytes": sum((out_dir / f).stat().st_size for f in files)}


def finish_graph(proto, info: dict) -> dict:
    """Check the 4-bit weights, drop what nothing reads, store exact-fp16 floats compactly.

    Args:
        proto: the decoder (edited in place).
        info: what built it, with `nbits_weight_max_abs_diff` (max |MatMulNBits weight - dequantized
            weight| over the decoder layers), `vocab_weight_max_abs_diff` (the same for the 4-bit
            vocabulary matrices) and `embeddings` / `lm_head` ("float" or how they are held).

    Returns:
        `info` with float storage made precise ("float16" when stored so exactly) and fp16_saved_bytes.

    Raises:
        StageError: the MatMulNBits weights are not exactly the checkpoint's.
    """
    from exporters import onnx_graph as g

    worst = max(info["nbits_weight_max_abs_diff"], info.get("vocab_weight_max_abs_diff", 0.0))
    if worst > 1e-6:
        raise StageError(f"MatMulNBits weights differ from the checkpoint's dequantized weights by {worst:.3g}: "
                         f"this is a kd2edge bug in the GPTQ -> MatMulNBits conversion")
    g.drop_dead_nodes(proto)
    g.drop_unused_initializers(proto)
    fp16_saved = g.store_fp16(proto)
    stored = "float16" if fp16_saved else "float32"
    return {**info, **{k: stored for k in ("embeddings", "lm_head") if info.get(k, "float") == "float"},
            "fp16_saved_bytes": sum(fp16_saved.values())}

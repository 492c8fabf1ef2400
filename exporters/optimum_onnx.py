"""The "onnx" exporter: optimum-onnx decoder with past key values, then 4-bit MatMulNBits.

Any architecture optimum-onnx exports (Llama, Qwen2, GPT-NeoX, ...) works: the
dequantized model is traced to an fp32 ONNX decoder with a KV cache, and each
quantized Linear's MatMul is then swapped for onnxruntime's `MatMulNBits` carrying
the GPTQ codes themselves (see `exporters/matmulnbits.py`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from kd2edge.errors import ArtifactError, StageError

TASK = "text-generation-with-past"


def export_with_past(model, tokenizer, out_dir: Path) -> Path:
    """Trace `model` to an fp32 ONNX decoder with a KV cache, beside its tokenizer and configs.

    Args:
        model: a transformers causal LM (fp32, eval mode).
        tokenizer: its tokenizer (saved next to the model).
        out_dir: the folder to write (model.onnx, config.json, generation_config.json, tokenizer files).

    Returns:
        The path of model.onnx.
    """
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The tracer's warnings about Python control flow are about dynamic shapes that
        # optimum's dummy inputs already cover; they only drown the progress output.
        warnings.simplefilter("ignore")
        level = logging.getLogger("optimum").level
        logging.getLogger("optimum").setLevel(logging.ERROR)
        try:
            onnx_export_from_model(model, out_dir, task=TASK, do_validation=False, device="cpu")
        finally:
            logging.getLogger("optimum").setLevel(level)
    tokenizer.save_pretrained(out_dir)
    return out_dir / "model.onnx"


EMBEDDING_BLOCK = 32      # 4-bit embedding blocks: small enough to keep rare-token rows accurate


def quantize_embeddings_rtn(model, block_size: int = EMBEDDING_BLOCK) -> dict[str, dict]:
    """Replace the vocabulary matrices (input embedding, untied lm_head) by their 4-bit RTN values.

    GPTQ leaves them in float; this is the one extra rounding `quantize_embeddings`
    adds, applied to the PyTorch model so the ONNX graph and the parity reference
    carry the same weights. Returns {module name: rtn_blocks(...)} (codes, zeros, scales).
    """
    import torch

    from exporters.matmulnbits import rtn_blocks

    out = {}
    seen: set[int] = set()
    names = {id(m): n for n, m in model.named_modules()}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None or id(module.weight) in seen:
            continue  # tied: one matrix serves both
        seen.add(id(module.weight))
        weight = module.weight.detach().float().numpy()
        q = rtn_blocks(weight, block_size)
        dequant = np.repeat(q["scales"], block_size, 1) * (q["codes"].astype(np.float32)
                                                          - np.repeat(q["zeros"], block_size, 1))
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(dequant))
        out[names[id(module)]] = q
    return out


SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


def export(checkpoint_dir: Path, out_dir: Path, quantize_embeddings: bool = False, accuracy_level: int = 0,
           fuse: bool = True) -> dict:
    """Export a GPTQ checkpoint to an ONNX decoder with a KV cache and 4-bit MatMulNBits weights.

    Args:
        checkpoint_dir: a GPTQ checkpoint folder (kd2edge quantize output, 4 bits).
        out_dir: where to write model.onnx (+ model.onnx.data), configs and tokenizer files.
        quantize_embeddings: also hold the vocabulary matrices in 4 bits (RTN, blocks of 32):
            GatherBlockQuantized for the input embedding, MatMulNBits for lm_head (one
            shared matrix when tied).
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
    from kd2edge.quant.checkpoint import (is_gptq_checkpoint, load_dequantized_model, read_gptq_tensors,
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
    vocab_q = quantize_embeddings_rtn(model) if quantize_embeddings else {}
    reason = unsupported_reason(model.config) if fuse else "fuse=False"
    if reason is None and unquantized_projections(model.config.num_hidden_layers, layers):
        reason = f"float projections ({unquantized_projections(model.config.num_hidden_layers, layers)[0]}, ...)"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=out_dir) as tmp:
        if reason is None:
            proto, info = build_fused_decoder(model, layers, vocab_q, accuracy_level)
            info = finish_graph(proto, {**info, "accuracy_level": accuracy_level}, vocab_q)
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            export_with_past(model, tokenizer, Path(tmp))
            proto = onnx.load(str(Path(tmp) / "model.onnx"))
            info = rewrite_graph(proto, model, layers, vocab_q, accuracy_level)
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


def rewrite_graph(proto, model, layers: dict, vocab_q: dict, accuracy_level: int) -> dict:
    """Swap the traced fp32 weights for 4-bit ones and store what stays float compactly.

    Args:
        proto: the traced decoder (edited in place).
        model: the PyTorch model it was traced from (for module names and tying).
        layers: GPTQ tensors per module name (`read_gptq_tensors`).
        vocab_q: `quantize_embeddings_rtn` output ({} to keep the vocabulary matrices float).
        accuracy_level: MatMulNBits accuracy_level.

    Returns:
        What was done (counts, the weight self-check, embedding storage).
    """
    from onnx import numpy_helper

    from exporters import onnx_graph as g
    from exporters.matmulnbits import held_weight_error, pack_gptq_layer

    g.ensure_ms_opset(proto)
    inits = g.initializers(proto)
    matmuls = {g.module_of(n): n for n in proto.graph.node if n.op_type == "MatMul"}
    worst, act_order = 0.0, 0
    for name, qt in layers.items():
        node = matmuls.get(name)
        if node is None:
            raise StageError(f"quantized layer {name} has no MatMul in the traced graph: this architecture's "
                             f"graph is not supported by the onnx exporter, try --exporter onnx-genai")
        packed = pack_gptq_layer(qt)
        if node.input[1] not in inits:
            raise StageError(f"the traced MatMul of {name} does not read a stored weight: this architecture's "
                             f"graph is not supported by the onnx exporter, try --exporter onnx-genai")
        traced = numpy_helper.to_array(inits[node.input[1]])                      # (K, N) = W^T
        act_order += packed["perm"] is not None
        worst = max(worst, held_weight_error(packed, traced))
        g.replace_node(proto, node, g.matmulnbits_nodes(name, node.input[0], node.output[0], packed,
                                                        accuracy_level, proto))
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(model.get_input_embeddings())]
    head = model.get_output_embeddings()
    head_name = names[id(head)] if head is not None else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if vocab_q:
        _quantize_vocab(proto, vocab_q, embed_name, head_name if tied else None, matmuls, accuracy_level)
        for name, q in vocab_q.items():
            if name != embed_name and name in matmuls:        # untied lm_head
                _quantize_head(proto, name, q, matmuls[name], accuracy_level)
    elif tied and head_name in matmuls:
        _share_tied_head(proto, embed_name, matmuls[head_name])
    return finish_graph(proto, {"quantized_layers": len(layers), "act_order_layers": act_order,
                                "accuracy_level": accuracy_level, "nbits_weight_max_abs_diff": worst,
                                "tied_embeddings": tied}, vocab_q)


def finish_graph(proto, info: dict, vocab_q: dict) -> dict:
    """Check the 4-bit weights, drop what nothing reads, store exact-fp16 floats compactly.

    Args:
        proto: the decoder (edited in place).
        info: what built it, with `nbits_weight_max_abs_diff` (max |MatMulNBits weight - dequantized weight|).
        vocab_q: the 4-bit vocabulary matrices ({} when float).

    Returns:
        `info` plus embeddings storage and fp16_saved_bytes.

    Raises:
        StageError: the MatMulNBits weights are not exactly the checkpoint's.
    """
    from exporters import onnx_graph as g

    worst = info["nbits_weight_max_abs_diff"]
    if worst > 1e-6:
        raise StageError(f"MatMulNBits weights differ from the checkpoint's dequantized weights by {worst:.3g}: "
                         f"this is a kd2edge bug in the GPTQ -> MatMulNBits conversion")
    g.drop_dead_nodes(proto)
    g.drop_unused_initializers(proto)
    fp16_saved = g.store_fp16(proto)
    return {**info, "embeddings": f"int4-rtn-block{EMBEDDING_BLOCK}" if vocab_q else "float16" if fp16_saved
            else "float32", "fp16_saved_bytes": sum(fp16_saved.values())}


def _embedding_gather(proto, embed_name: str):
    from exporters.onnx_graph import module_of

    for node in proto.graph.node:
        if node.op_type == "Gather" and (node.input[0] == f"{embed_name}.weight" or module_of(node) == embed_name):
            return node
    raise StageError(f"the traced graph has no Gather for {embed_name}: cannot quantize its embeddings; "
                     f"export without --quantize-embeddings")


def vocab_packed(q: dict) -> dict:
    """`rtn_blocks` output of a [V, H] vocabulary matrix as MatMulNBits tensors (N = V, K = H, no permutation)."""
    from exporters.matmulnbits import pack_nibbles

    V, H = q["codes"].shape
    blocks = H // EMBEDDING_BLOCK
    return {"B": pack_nibbles(q["codes"].reshape(V, blocks, EMBEDDING_BLOCK)),
            "scales": q["scales"].reshape(-1), "zero_points": pack_nibbles(q["zeros"]).reshape(-1),
            "perm": None, "K": H, "N": V, "block_size": EMBEDDING_BLOCK}


def _quantize_vocab(proto, vocab_q: dict, embed_name: str, tied_head: str | None, matmuls: dict,
                    accuracy_level: int) -> None:
    """Input embedding -> GatherBlockQuantized over the 4-bit matrix; a tied lm_head -> MatMulNBits on the same bytes."""
    from exporters import onnx_graph as g

    packed = vocab_packed(vocab_q[embed_name])
    gather = _embedding_gather(proto, embed_name)
    weights = g.add_nbits_initializers(proto, embed_name, packed)
    g.replace_node(proto, gather, g.gather_block_quantized_nodes(proto, embed_name, weights, packed,
                                                                 gather.input[1], gather.output[0]))
    if tied_head is not None and tied_head in matmuls:
        node = matmuls[tied_head]
        g.replace_node(proto, node, [g.matmulnbits_node(f"/{tied_head}/MatMulNBits", node.input[0], node.output[0],
                                                        packed, weights, accuracy_level)])


def _quantize_head(proto, head_name: str, q: dict, node, accuracy_level: int) -> None:
    from exporters import onnx_graph as g

    g.replace_node(proto, node, g.matmulnbits_nodes(head_name, node.input[0], node.output[0], vocab_packed(q),
                                                    accuracy_level, proto))


def _share_tied_head(proto, embed_name: str, head_node) -> None:
    """Point a tied lm_head MatMul at Transpose(embedding) instead of the tracer's duplicate copy."""
    from onnx import helper, numpy_helper

    from exporters import onnx_graph as g

    inits = g.initializers(proto)
    embed = f"{embed_name}.weight"
    if head_node.input[1] not in inits or embed not in inits:
        return  # the tracer already reads the embedding through a Transpose
    if not np.array_equal(numpy_helper.to_array(inits[head_node.input[1]]), numpy_helper.to_array(inits[embed]).T):
        return  # not the same matrix after all: keep both
    transposed = f"{embed}.transposed"
    g.insert_before(proto, head_node, [helper.make_node("Transpose", [embed], [transposed],
                                                        name="/tied_lm_head/Transpose", perm=[1, 0])])
    head_node.input[1] = transposed

"""The traced path: optimum-onnx's decoder with past key values, then 4-bit MatMulNBits.

Any architecture optimum-onnx exports (Llama, Qwen2, GPT-NeoX, ...) works: the
dequantized model is traced to an fp32 ONNX decoder with a KV cache, and each
quantized Linear's MatMul is then swapped for onnxruntime's `MatMulNBits` carrying
the GPTQ codes themselves (see `exporters/matmulnbits.py`). The Llama family takes
the hand-fused graph instead (`exporters/fused.py`); `exporters/onnx_export.py` chooses.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from kd2edge.errors import StageError

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


def rewrite_graph(proto, model, layers: dict, vocab: dict, accuracy_level: int) -> dict:
    """Swap the traced fp32 weights for 4-bit ones and store what stays float compactly.

    Args:
        proto: the traced decoder (edited in place).
        model: the PyTorch model it was traced from (for module names and tying).
        layers: GPTQ tensors per module name (`read_gptq_tensors`).
        vocab: the 4-bit vocabulary matrices, `exporters.vocab.vocab_matrices` ({} keeps them float).
        accuracy_level: MatMulNBits accuracy_level.

    Returns:
        What was done (counts, the weight self-check); `kd2edge`'s export driver finishes the graph.
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
    if embed_name in vocab:
        _quantize_vocab(proto, vocab[embed_name], embed_name, head_name if tied else None, matmuls, accuracy_level)
    if head_name in vocab and head_name in matmuls:                # untied 4-bit lm_head
        node = matmuls[head_name]
        g.replace_node(proto, node, g.matmulnbits_nodes(head_name, node.input[0], node.output[0], vocab[head_name],
                                                        accuracy_level, proto))
    elif tied and embed_name not in vocab and head_name in matmuls:
        _share_tied_head(proto, embed_name, matmuls[head_name])
    return {"quantized_layers": len(layers), "act_order_layers": act_order, "accuracy_level": accuracy_level,
            "nbits_weight_max_abs_diff": worst, "tied_embeddings": tied}


def _embedding_gather(proto, embed_name: str):
    from exporters.onnx_graph import module_of

    for node in proto.graph.node:
        if node.op_type == "Gather" and (node.input[0] == f"{embed_name}.weight" or module_of(node) == embed_name):
            return node
    raise StageError(f"the traced graph has no Gather for {embed_name}: cannot quantize its embeddings; "
                     f"export without --quantize-embeddings")


def _quantize_vocab(proto, packed: dict, embed_name: str, tied_head: str | None, matmuls: dict,
                    accuracy_level: int) -> None:
    """Input embedding -> GatherBlockQuantized over the 4-bit matrix; a tied lm_head -> MatMulNBits on the same bytes."""
    from exporters import onnx_graph as g

    gather = _embedding_gather(proto, embed_name)
    weights = g.add_nbits_initializers(proto, embed_name, packed)
    g.replace_node(proto, gather, g.gather_block_quantized_nodes(proto, embed_name, weights, packed,
                                                                 gather.input[1], gather.output[0]))
    if tied_head is not None and tied_head in matmuls:
        node = matmuls[tied_head]
        g.replace_node(proto, node, [g.matmulnbits_node(f"/{tied_head}/MatMulNBits", node.input[0], node.output[0],
                                                        packed, weights, accuracy_level)])


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

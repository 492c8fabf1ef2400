"""Small edits of an ONNX decoder graph: 4-bit MatMuls and embeddings, tied weights, fp16 storage.

Each function edits `model.graph` in place and returns what it did, so the
exporter can record it. Node names follow the torch exporter's scopes
(`/model/layers.0/self_attn/q_proj/MatMul` for module `model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def module_of(node: onnx.NodeProto) -> str:
    """The transformers module a torch-exported node belongs to ("/lm_head/MatMul" -> "lm_head")."""
    return ".".join(p for p in node.name.strip("/").split("/")[:-1])


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def replace_initializer(model: onnx.ModelProto, array: np.ndarray, name: str) -> str:
    """Add (or overwrite) initializer `name` with `array`; returns the name."""
    if any(t.name == name for t in model.graph.initializer):
        drop_initializers(model, {name})
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def drop_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    # Delete in place, last first: rebuilding the list would deep-copy every tensor (GBs for a real model).
    tensors = model.graph.initializer
    for index in reversed([i for i, t in enumerate(tensors) if t.name in names]):
        del tensors[index]


def drop_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes none of whose outputs is read (by a node or as a graph output); returns how many."""
    removed = 0
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        alive = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(alive) == len(model.graph.node):
            return removed
        removed += len(model.graph.node) - len(alive)
        del model.graph.node[:]
        model.graph.node.extend(alive)


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers no node reads; returns how many bytes of raw data that freed."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    unused = {t.name for t in model.graph.initializer if t.name not in used}
    freed = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name in unused)
    drop_initializers(model, unused)
    return freed


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def insert_before(model: onnx.ModelProto, anchor: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
    """Insert nodes just before `anchor`, keeping the node list topologically sorted."""
    nodes = list(model.graph.node)
    index = next(i for i, n in enumerate(nodes) if n is anchor or n.name == anchor.name)
    nodes[index:index] = new_nodes
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def replace_node(model: onnx.ModelProto, old: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
    """Put `new_nodes` where `old` was."""
    nodes = list(model.graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == old.name and list(n.output) == list(old.output))
    nodes[index:index + 1] = new_nodes
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def add_nbits_initializers(model: onnx.ModelProto, prefix: str, packed: dict) -> tuple[str, str, str]:
    """Add MatMulNBits' B, scales and zero_points tensors; returns their names."""
    return (replace_initializer(model, packed["B"], f"{prefix}.qweight_nbits"),
            replace_initializer(model, packed["scales"], f"{prefix}.scales_nbits"),
            replace_initializer(model, packed["zero_points"], f"{prefix}.zeros_nbits"))


def matmulnbits_node(name: str, activation: str, output: str, packed: dict, weights: tuple[str, str, str],
                     accuracy_level: int) -> onnx.NodeProto:
    """One MatMulNBits node `output = activation @ W` reading the stored `weights` (B, scales, zero_points)."""
    return helper.make_node("MatMulNBits", [activation, *weights], [output], name=name, domain=MS_DOMAIN,
                            K=packed["K"], N=packed["N"], bits=4, block_size=packed["block_size"],
                            accuracy_level=accuracy_level)


def permute_features_node(model: onnx.ModelProto, prefix: str, activation: str, perm: np.ndarray) -> onnx.NodeProto:
    """A Gather giving x[..., perm] (act-order: MatMulNBits ignores g_idx on CPU, so groups are made contiguous)."""
    perm_name = replace_initializer(model, perm, f"{prefix}.act_order_perm")
    return helper.make_node("Gather", [activation, perm_name], [f"{prefix}/act_order_input"],
                            name=f"/{prefix}/ActOrderGather", axis=-1)


def matmulnbits_nodes(prefix: str, activation: str, output: str, packed: dict, accuracy_level: int,
                      model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes (an optional input Gather, then MatMulNBits) computing `output = activation @ W`.

    `packed` is `exporters.matmulnbits.to_matmulnbits(...)`; its tensors are added as initializers.
    """
    weights = add_nbits_initializers(model, prefix, packed)
    nodes = []
    if packed["perm"] is not None:
        nodes.append(permute_features_node(model, prefix, activation, packed["perm"]))
        activation = nodes[-1].output[0]
    nodes.append(matmulnbits_node(f"/{prefix}/MatMulNBits", activation, output, packed, weights, accuracy_level))
    return nodes


def gather_block_quantized_nodes(model: onnx.ModelProto, name: str, weights: tuple[str, str, str], packed: dict,
                                 indices: str, output: str) -> list[onnx.NodeProto]:
    """Rows `indices` of a 4-bit [V, H] matrix stored as MatMulNBits tensors (`packed` with N = V, K = H).

    GatherBlockQuantized wants 2-D [V, H/2] data, [V, blocks] scales and [V, ceil(blocks/2)] zeros:
    Reshape views of the MatMulNBits tensors (folded once at load) let a tied lm_head share the bytes.
    """
    V, H, block = packed["N"], packed["K"], packed["block_size"]
    shapes = dict(zip(weights, ([V, H // 2], [V, H // block], [V, -1])))
    nodes, views = [], []
    for tensor, shape in shapes.items():
        shape_name = replace_initializer(model, np.array(shape, dtype=np.int64), f"{tensor}.gather_shape")
        views.append(f"{tensor}.gather_view")
        nodes.append(helper.make_node("Reshape", [tensor, shape_name], [views[-1]],
                                      name=f"/{name}/Reshape_{len(nodes)}"))
    nodes.append(helper.make_node("GatherBlockQuantized", [views[0], indices, views[1], views[2]], [output],
                                  name=f"/{name}/GatherBlockQuantized", domain=MS_DOMAIN, gather_axis=0,
                                  quantize_axis=1, block_size=block, bits=4))
    return nodes


def store_fp16(model: onnx.ModelProto, min_elements: int = 1 << 16) -> dict[str, int]:
    """Store large float32 initializers as float16 + Cast when that loses nothing.

    A weight that came from a float16 checkpoint (embeddings, an unquantized lm_head)
    is exactly representable in float16: storing it so halves its bytes on disk, and
    onnxruntime folds the Cast once at load. Returns {name: bytes saved}.
    """
    saved: dict[str, int] = {}
    for tensor in list(model.graph.initializer):
        if tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) < min_elements:
            continue
        array = numpy_helper.to_array(tensor)
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array):
            continue
        stored = f"{tensor.name}.fp16"
        replace_initializer(model, half, stored)
        drop_initializers(model, {tensor.name})
        # The Cast re-creates the float32 tensor under its old name, so no consumer changes.
        cast = helper.make_node("Cast", [stored], [tensor.name], name=f"/{tensor.name}/CastFp16",
                                to=TensorProto.FLOAT)
        first_user = next(n for n in model.graph.node if tensor.name in n.input)
        insert_before(model, first_user, [cast])
        saved[tensor.name] = array.nbytes - half.nbytes
    return saved

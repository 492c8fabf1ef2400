"""A hand-fused ONNX decoder for the Llama family (Llama, Mistral, Qwen2), built from the GPTQ tensors.

Why not trace and optimize: optimum's graph spends ~100 primitive ops a layer on
masks, rotary tables and attention, and onnxruntime's transformer optimizer
(`optimize_model`, model_type gpt2/bert) only fuses its RMSNorms and rotary
embeddings, never the attention (measured on SmolLM2-135M: 61 norms + 60 rotary
fused, 0 attention; 7,427 nodes become 5,088, decode +3%). This module writes the
graph onnxruntime-genai's builder writes (311 nodes for SmolLM2-135M), but with the
exact GPTQ codes and act-order permutations:

    input_ids -> Gather (float embedding) | GatherBlockQuantized (4-bit)
    each layer:
        [Skip]SimplifiedLayerNormalization (residual add + RMSNorm in one op)
        -> [act-order Gather] -> MatMulNBits q|k|v (one op when they share a permutation) [+ bias]
        -> GroupQueryAttention (rotary via cos/sin caches, past -> present KV, causal)
        -> MatMulNBits o -> SkipSimplifiedLayerNormalization
        -> MatMulNBits gate|up (one op when they share a permutation) -> Split
        -> QuickGelu(gate) * up  (SiLU = x * sigmoid(x): QuickGelu with alpha 1) -> MatMulNBits down
    final SkipSimplifiedLayerNormalization -> Slice (the last `logits_to_keep` positions)
        -> lm_head (float MatMul, or 4-bit MatMulNBits: the checkpoint's GPTQ codes or RTN)

Inputs and outputs are the genai layout that `kd2edge.runtime.lm` runs: input_ids,
attention_mask, past_key_values.{i}.key/value [batch, kv_heads, past, head_dim], plus
logits_to_keep (int64 [1]) -> logits [batch, kept, vocab], present.{i}.key/value (keys after
rotary, as transformers caches them).

Why logits_to_keep: generating needs the next-token logits of the last prompt position
only, and the vocabulary head is a third of a prefill's work when every position gets logits
(SmolLM2's 49152 x 576 at 512 tokens: 29 GFLOP, beside 51 for the 14 decoder layers' projections). Scoring a sequence
(multiple-choice log-likelihoods) needs every position: 0 keeps them all, as in transformers.

GroupQueryAttention may read and write one KV buffer (`past` and `present` bound to the same
memory, [batch, kv_heads, capacity, head_dim]; the op appends the new keys in place at
seqlens_k): the graph says so in its metadata (SHARED_KV_METADATA) and the runtime then
preallocates the cache instead of copying it into a new present tensor every token.
"""

from __future__ import annotations

import numpy as np

from kd2edge.runtime.lm import LOGITS_TO_KEEP, SHARED_KV_METADATA

FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# rope types whose cos/sin depend on the position only (not on the sequence length seen so far)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
OPSET = 17


def unsupported_reason(config) -> str | None:
    """Why a transformers config cannot take the fused graph (None when it can).

    Args:
        config: the model's transformers PretrainedConfig.

    Returns:
        A short reason ("model_type gpt_neox", "sliding-window attention", ...) or None.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model_type {model_type}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", model_type == "mistral") and window is not None \
            and window < config.max_position_embeddings:
        return "sliding-window attention"
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_type {rope_type}"
    return None


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def unquantized_projections(num_layers: int, layers: dict) -> list[str]:
    """The decoder projections the fused graph needs in 4 bits that `layers` lacks (a partly quantized checkpoint)."""
    return [f"model.layers.{i}.{p}" for i in range(num_layers) for p in PROJECTIONS
            if f"model.layers.{i}.{p}" not in layers]


def rotary_caches(model, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's cos/sin caches, float32 [positions, head_dim / 2], from the model's own rotary module.

    transformers returns cos/sin [1, positions, head_dim] with the two halves equal
    (rotate_half layout) and any attention scaling (yarn) already applied; GQA's
    non-interleaved rotary wants one half.
    """
    import torch

    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()              # [positions, head_dim]
    half = cos.shape[-1] // 2
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise ValueError("rotary cos/sin halves differ: not the rotate_half layout GroupQueryAttention implements")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


class _Builder:
    """Appends nodes and initializers to a ModelProto, naming outputs after their nodes."""

    def __init__(self, proto):
        from exporters import onnx_graph as g

        self.proto, self.g = proto, g
        self.gathers: dict[tuple[str, bytes], str] = {}    # (input, perm bytes) -> permuted input

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.proto.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        """Append a default-domain node with one output; returns the output's name."""
        from onnx import helper

        self.proto.graph.node.append(helper.make_node(op, inputs, [f"{name}/output_0"], name=name, **attrs))
        return f"{name}/output_0"

    def permuted(self, x: str, perm: np.ndarray | None, prefix: str) -> str:
        """x[..., perm], one Gather per distinct (input, permutation): q/k/v (gate/up) usually share it."""
        if perm is None:
            return x
        key = (x, perm.tobytes())
        if key not in self.gathers:
            node = self.g.permute_features_node(self.proto, prefix, x, perm)
            self.proto.graph.node.append(node)
            self.gathers[key] = node.output[0]
        return self.gathers[key]

    def linear(self, x: str, packed: dict, name: str, accuracy_level: int, bias: np.ndarray | None = None) -> str:
        """x @ W (+ bias) with W held by MatMulNBits (act-order: on the permuted input)."""
        x = self.permuted(x, packed["perm"], name)
        weights = self.g.add_nbits_initializers(self.proto, name, packed)
        out = f"/{name}/MatMulNBits/output_0"
        self.proto.graph.node.append(self.g.matmulnbits_node(f"/{name}/MatMulNBits", x, out, packed, weights,
                                                             accuracy_level))
        if bias is not None:
            out = self.node("Add", [out, self.init(f"{name}.bias", bias.astype(np.float32))], f"/{name}/BiasAdd")
        return out


def build_fused_decoder(model, layers: dict, vocab: dict, accuracy_level: int):
    """The fused decoder of a Llama-family model whose quantized Linears are `layers`.

    Args:
        model: the dequantized transformers model (float weights for norms, embeddings,
            biases, lm_head; its rotary module gives the cos/sin caches).
        layers: GPTQ tensors per Linear module name (`read_gptq_tensors`): every q/k/v/o,
            gate/up/down projection of every layer (a 4-bit lm_head comes in `vocab`).
        vocab: the vocabulary matrices held in 4 bits, {module name: MatMulNBits tensors with
            N = vocab, K = hidden} (`exporters.vocab.vocab_matrices`): a tied pair has one entry,
            under the input embedding's name; {} keeps both float.
        accuracy_level: MatMulNBits accuracy_level (0 exact float activations, 4 int8).

    Returns:
        (onnx ModelProto, info dict: quantized_layers, act_order_layers, merged_qkv_layers,
         nbits_weight_max_abs_diff, tied_embeddings).

    Raises:
        KeyError: a projection of some layer is not in `layers` (check `unquantized_projections` first).
        ValueError: a 4-bit input embedding with an act-order permutation (GatherBlockQuantized
            reads rows in stored order; `vocab_matrices` refuses it first).
    """
    from onnx import TensorProto, helper

    from exporters import onnx_graph as g
    from exporters.matmulnbits import can_concat, concat_matmulnbits, held_weight_error, pack_gptq_layer

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = float(config.rms_norm_eps)
    vocab_size = config.vocab_size
    proto = helper.make_model(helper.make_graph([], "kd2edge_fused_decoder", [], []),
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(g.MS_DOMAIN, 1)])
    b = _Builder(proto)
    graph = proto.graph
    graph.input.extend([helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                        helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                      ["batch_size", "total_sequence_length"]),
                        helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1])])
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                      ["batch_size", "kept_sequence_length", vocab_size]))
    proto.metadata_props.add(key=SHARED_KV_METADATA, value="1")

    # GQA's sequence bookkeeping from the mask: seqlens_k = tokens seen - 1 (int32 [batch]),
    # total_sequence_length = mask width (int32 scalar).
    one = b.init("const.one", np.array(1, dtype=np.int64))
    axis1 = b.init("const.axis1", np.array([1], dtype=np.int64))
    seen = b.node("ReduceSum", ["attention_mask", axis1], "/attn_mask/ReduceSum", keepdims=0)
    seqlens_k = b.node("Cast", [b.node("Sub", [seen, one], "/attn_mask/Sub")], "/attn_mask/SeqlensK",
                       to=TensorProto.INT32)
    width = b.node("Gather", [b.node("Shape", ["attention_mask"], "/attn_mask/Shape"), one], "/attn_mask/Width",
                   axis=0)
    total_len = b.node("Cast", [width], "/attn_mask/TotalLength", to=TensorProto.INT32)
    cos, sin = rotary_caches(model, int(config.max_position_embeddings))
    cos_cache, sin_cache = b.init("cos_cache", cos), b.init("sin_cache", sin)

    names = {id(m): n for n, m in model.named_modules()}
    embedding = model.get_input_embeddings()
    embed_name = names[id(embedding)]
    head = model.get_output_embeddings()
    tied = head.weight is embedding.weight
    if embed_name in vocab:
        embed_packed = vocab[embed_name]
        if embed_packed["perm"] is not None:
            raise ValueError(f"{embed_name}: a 4-bit embedding with act-order columns cannot be gathered")
        embed_weights = g.add_nbits_initializers(proto, embed_name, embed_packed)
        hidden = f"/{embed_name}/output_0"
        graph.node.extend(g.gather_block_quantized_nodes(proto, embed_name, embed_weights, embed_packed,
                                                         "input_ids", hidden))
    else:
        table = b.init(f"{embed_name}.weight", embedding.weight.detach().float().numpy())
        hidden = b.node("Gather", [table, "input_ids"], f"/{embed_name}/Gather")

    worst, act_order, merged_qkv = 0.0, 0, 0
    residual, pending = hidden, None          # pending: the last block's output, not yet added to the residual
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        packs = {}
        for part in PROJECTIONS:
            name = f"{prefix}.{part}"
            packs[part] = pack_gptq_layer(layers[name])
            module = model.get_submodule(name)
            worst = max(worst, held_weight_error(packs[part], module.weight.detach().float().numpy().T))
            act_order += packs[part]["perm"] is not None
        x, residual = _rms_norm(b, residual, pending, layer.input_layernorm.weight, eps,
                                f"/{prefix}/input_layernorm")

        # attention: [batch, seq, (heads + 2 kv_heads) * head_dim] packed, or q, k, v apart
        qkv_parts = [packs[f"self_attn.{p}_proj"] for p in "qkv"]
        biases = [getattr(attn, f"{p}_proj").bias for p in "qkv"]
        if can_concat(qkv_parts):
            merged_qkv += 1
            bias = None if biases[0] is None else np.concatenate([t.detach().float().numpy() for t in biases])
            qkv = [b.linear(x, concat_matmulnbits(qkv_parts), f"{prefix}.self_attn.qkv_proj", accuracy_level, bias),
                   "", ""]
        else:
            qkv = [b.linear(x, pk, f"{prefix}.self_attn.{p}_proj", accuracy_level, _bias(bias))
                   for p, pk, bias in zip("qkv", qkv_parts, biases)]
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        for name in past:
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                             ["batch_size", kv_heads, "past_sequence_length", head_dim]))
        for name in present:
            graph.output.append(helper.make_tensor_value_info(
                name, TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", head_dim]))
        gqa = helper.make_node("GroupQueryAttention", [*qkv, *past, seqlens_k, total_len, cos_cache, sin_cache],
                               [f"/{prefix}/self_attn/GroupQueryAttention/output_0", *present],
                               name=f"/{prefix}/self_attn/GroupQueryAttention", domain=g.MS_DOMAIN,
                               num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim ** -0.5),
                               do_rotary=1, rotary_interleaved=0)
        graph.node.append(gqa)
        pending = b.linear(gqa.output[0], packs["self_attn.o_proj"], f"{prefix}.self_attn.o_proj", accuracy_level,
                           _bias(attn.o_proj.bias))

        # SwiGLU MLP: down(silu(gate(x)) * up(x)); silu(z) = z * sigmoid(z)
        x, residual = _rms_norm(b, residual, pending, layer.post_attention_layernorm.weight, eps,
                                f"/{prefix}/post_attention_layernorm")
        gate_up = [packs["mlp.gate_proj"], packs["mlp.up_proj"]]
        if can_concat(gate_up):
            # one MatMulNBits [.., 2 * intermediate] then Split: half the kernel launches at decode
            biases = [_bias(mlp.gate_proj.bias), _bias(mlp.up_proj.bias)]
            both = b.linear(x, concat_matmulnbits(gate_up), f"{prefix}.mlp.gate_up_proj", accuracy_level,
                            None if biases[0] is None else np.concatenate(biases))
            sizes = b.init(f"{prefix}.mlp.gate_up_split", np.array([p["N"] for p in gate_up], dtype=np.int64))
            gate, up = f"/{prefix}/mlp/Split/output_0", f"/{prefix}/mlp/Split/output_1"
            graph.node.append(helper.make_node("Split", [both, sizes], [gate, up], name=f"/{prefix}/mlp/Split",
                                               axis=-1))
        else:
            gate = b.linear(x, gate_up[0], f"{prefix}.mlp.gate_proj", accuracy_level, _bias(mlp.gate_proj.bias))
            up = b.linear(x, gate_up[1], f"{prefix}.mlp.up_proj", accuracy_level, _bias(mlp.up_proj.bias))
        # QuickGelu(x) = x * sigmoid(alpha x): with alpha = 1 it is SiLU, in one kernel
        silu = f"/{prefix}/mlp/act_fn/QuickGelu/output_0"
        graph.node.append(helper.make_node("QuickGelu", [gate], [silu], name=f"/{prefix}/mlp/act_fn/QuickGelu",
                                           domain=g.MS_DOMAIN, alpha=1.0))
        pending = b.linear(b.node("Mul", [silu, up], f"/{prefix}/mlp/Mul"), packs["mlp.down_proj"],
                           f"{prefix}.mlp.down_proj", accuracy_level, _bias(mlp.down_proj.bias))

    x, _ = _rms_norm(b, residual, pending, model.model.norm.weight, eps, "/model/norm")
    x = _last_positions(b, x)                                   # [batch, kept, hidden]
    head_name = names[id(head)]
    if tied and embed_name in vocab:
        # MatMulNBits over the embedding's own 4-bit bytes: one matrix serves both
        graph.node.append(g.matmulnbits_node(f"/{head_name}/MatMulNBits", x, "logits", embed_packed, embed_weights,
                                             accuracy_level))
    elif head_name in vocab:
        packed = vocab[head_name]
        x = b.permuted(x, packed["perm"], head_name)
        weights = g.add_nbits_initializers(proto, head_name, packed)
        graph.node.append(g.matmulnbits_node(f"/{head_name}/MatMulNBits", x, "logits", packed, weights, accuracy_level))
    else:
        # float lm_head: x @ W^T; tied reads the embedding table through a Transpose (folded at load)
        if tied:
            weight_t = b.node("Transpose", [f"{embed_name}.weight"], "/lm_head/Transpose", perm=[1, 0])
        else:
            weight_t = b.init(f"{head_name}.weight_t", np.ascontiguousarray(head.weight.detach().float().numpy().T))
        graph.node.append(helper.make_node("MatMul", [x, weight_t], ["logits"], name=f"/{head_name}/MatMul"))
    return proto, {"quantized_layers": len(layers), "act_order_layers": act_order, "merged_qkv_layers": merged_qkv,
                   "nbits_weight_max_abs_diff": worst, "tied_embeddings": tied}


def _last_positions(b: _Builder, x: str) -> str:
    """x[:, -logits_to_keep:, :] (all positions when logits_to_keep is 0: Slice from -0 = 0).

    Args:
        x: [batch, seq, hidden] final hidden states.

    Returns:
        [batch, kept, hidden], kept = min(logits_to_keep, seq), or seq for 0.
    """
    start = b.node("Neg", [LOGITS_TO_KEEP], "/logits_to_keep/Neg")
    end = b.init("const.int64_max", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    return b.node("Slice", [x, start, end, "const.axis1"], "/logits_to_keep/Slice")   # const.axis1: [1]


def _bias(param) -> np.ndarray | None:
    return None if param is None else param.detach().float().numpy()


def _rms_norm(b: _Builder, residual: str, pending: str | None, weight, eps: float, name: str) -> tuple[str, str]:
    """RMSNorm(residual + pending) and the new residual; the first norm of the model has nothing pending.

    Returns:
        (normed output, residual stream after the add).
    """
    gamma = b.init(f"{name.strip('/').replace('/', '.')}.weight", weight.detach().float().numpy())
    if pending is None:
        return b.node("SimplifiedLayerNormalization", [residual, gamma], f"{name}/SimplifiedLayerNorm",
                      axis=-1, epsilon=eps, stash_type=1), residual
    from onnx import helper

    node = f"{name}/SkipLayerNorm"
    out, summed = f"{node}/output_0", f"{node}/output_3"          # outputs 1, 2 (mean, inv_std_var) unused
    b.proto.graph.node.append(helper.make_node("SkipSimplifiedLayerNormalization", [residual, pending, gamma],
                                               [out, "", "", summed], name=node, domain=b.g.MS_DOMAIN, epsilon=eps))
    return out, summed

"""The vocabulary matrices (input embedding, lm_head) in 4 bits, as MatMulNBits / GatherBlockQuantized tensors.

Two sources, both exact to what the parity reference carries:
  - the checkpoint's own 4-bit lm_head (`kd2edge quantize` with `head = "gptq"` or `"rtn"`):
    its GPTQ codes, packed without re-rounding; tied to the input embedding, the same bytes
    serve GatherBlockQuantized (embedding rows) and MatMulNBits (logits);
  - `quantize_embeddings` on a float-vocabulary checkpoint: round-to-nearest in blocks of
    EMBEDDING_BLOCK along the hidden axis, applied to the PyTorch model too (so the
    reference holds the same weights).
"""

from __future__ import annotations

import numpy as np

from exporters.matmulnbits import held_weight_error, pack_gptq_layer, pack_nibbles, rtn_blocks
from kd2edge.errors import ArtifactError

EMBEDDING_BLOCK = 32      # 4-bit RTN embedding blocks: small enough to keep rare-token rows accurate


def quantize_embeddings_rtn(model, block_size: int = EMBEDDING_BLOCK, modules: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Replace the vocabulary matrices (input embedding, untied lm_head) by their 4-bit RTN values.

    GPTQ leaves them in float unless the checkpoint quantized lm_head; this is the one extra
    rounding `quantize_embeddings` adds, applied to the PyTorch model so the ONNX graph and
    the parity reference carry the same weights.

    Args:
        model: the transformers model (edited in place).
        block_size: columns (hidden features) per RTN block.
        modules: the module names to round (default: both vocabulary matrices; a tied pair
            is one matrix, rounded once under the embedding's name).

    Returns:
        {module name: rtn_blocks(...)} (codes, zeros, scales) of what was rounded.
    """
    import torch

    out = {}
    seen: set[int] = set()
    names = {id(m): n for n, m in model.named_modules()}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None or id(module.weight) in seen or (modules is not None and names[id(module)] not in modules):
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


def vocab_packed(q: dict, block_size: int = EMBEDDING_BLOCK) -> dict:
    """`rtn_blocks` output of a [V, H] vocabulary matrix as MatMulNBits tensors (N = V, K = H, no permutation)."""
    V, H = q["codes"].shape
    blocks = H // block_size
    return {"B": pack_nibbles(q["codes"].reshape(V, blocks, block_size)),
            "scales": q["scales"].reshape(-1), "zero_points": pack_nibbles(q["zeros"]).reshape(-1),
            "perm": None, "K": H, "N": V, "block_size": block_size}


def vocab_matrices(model, layers: dict, quantize_embeddings: bool) -> tuple[dict[str, dict], dict]:
    """The vocabulary matrices an exporter holds in 4 bits, and how.

    Takes the checkpoint's 4-bit lm_head out of `layers` (the decoder-layer loops never see
    it). A tied lm_head's entry goes under the input embedding's name: the graph gathers
    rows from the same bytes it multiplies by.

    Args:
        model: the dequantized transformers model (a 4-bit lm_head's weight already equals
            its codes; RTN-rounded here in place when `quantize_embeddings` asks for it).
        layers: `read_gptq_tensors` of the checkpoint (edited: lm_head removed).
        quantize_embeddings: round what the checkpoint left float to 4 bits (RTN).

    Returns:
        ({module name: MatMulNBits tensors, N = vocab, K = hidden},
         info: {embeddings, lm_head: how each is held ("float", "int4-g64 (checkpoint)",
                "int4-rtn-block32"); rtn_modules: the names rounded here (the parity reference must
                round the same); vocab_weight_max_abs_diff: max |packed weight - model weight|}).

    Raises:
        ArtifactError: a tied 4-bit lm_head with act-order columns (GatherBlockQuantized cannot
            permute them back: quantize with static groups).
    """
    names = {id(m): n for n, m in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    embed_name = names[id(embedding)]
    head_name = names[id(head)] if head is not None else None
    tied = head is not None and head.weight is embedding.weight
    packs: dict[str, dict] = {}
    info = {"embeddings": "float", "lm_head": "float", "rtn_modules": []}
    head_qt = layers.pop(head_name, None) if head_name is not None else None
    if head_qt is not None:
        packed = pack_gptq_layer(head_qt)
        kind = f"int4-g{packed['block_size']} (checkpoint)"
        if tied:
            if packed["perm"] is not None:
                raise ArtifactError(f"the checkpoint's tied {head_name} has act-order groups, which the shared 4-bit "
                                    f"embedding cannot gather: quantize with static_groups = true")
            packs[embed_name] = packed
            info["embeddings"] = kind
        else:
            packs[head_name] = packed
        info["lm_head"] = kind
    if quantize_embeddings:
        # what the checkpoint left float: both matrices, or an untied embedding beside a 4-bit lm_head
        left = None if head_qt is None else () if tied else (embed_name,)
        rtn = quantize_embeddings_rtn(model, modules=left)
        for name, q in rtn.items():
            packs[name] = vocab_packed(q)
            info["embeddings" if name == embed_name else "lm_head"] = f"int4-rtn-block{EMBEDDING_BLOCK}"
            if tied:
                info["lm_head"] = info["embeddings"]
        info["rtn_modules"] = sorted(rtn)
    worst = 0.0
    for name, packed in packs.items():
        weight = model.get_submodule(name).weight.detach().float().numpy()            # [V, H]
        worst = max(worst, held_weight_error(packed, np.ascontiguousarray(weight.T)))
    info["vocab_weight_max_abs_diff"] = worst
    return packs, info

"""The vocabulary matrices (input embedding, lm_head) in 4 bits: RTN blocks and their MatMulNBits layout.

GPTQ leaves the vocabulary matrices in float. With `quantize_embeddings` the exporters hold
them in 4 bits too: round-to-nearest in blocks of EMBEDDING_BLOCK along the hidden axis,
applied to the PyTorch model (so the parity reference carries the same weights) and packed
for GatherBlockQuantized (embedding) and MatMulNBits (lm_head).
"""

from __future__ import annotations

import numpy as np

from exporters.matmulnbits import pack_nibbles, rtn_blocks

EMBEDDING_BLOCK = 32      # 4-bit embedding blocks: small enough to keep rare-token rows accurate


def quantize_embeddings_rtn(model, block_size: int = EMBEDDING_BLOCK) -> dict[str, dict]:
    """Replace the vocabulary matrices (input embedding, untied lm_head) by their 4-bit RTN values.

    GPTQ leaves them in float; this is the one extra rounding `quantize_embeddings`
    adds, applied to the PyTorch model so the ONNX graph and the parity reference
    carry the same weights. Returns {module name: rtn_blocks(...)} (codes, zeros, scales).
    """
    import torch

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


def vocab_packed(q: dict) -> dict:
    """`rtn_blocks` output of a [V, H] vocabulary matrix as MatMulNBits tensors (N = V, K = H, no permutation)."""
    V, H = q["codes"].shape
    blocks = H // EMBEDDING_BLOCK
    return {"B": pack_nibbles(q["codes"].reshape(V, blocks, EMBEDDING_BLOCK)),
            "scales": q["scales"].reshape(-1), "zero_points": pack_nibbles(q["zeros"]).reshape(-1),
            "perm": None, "K": H, "N": V, "block_size": EMBEDDING_BLOCK}

"""GPTQ tensors -> onnxruntime `MatMulNBits` / `GatherBlockQuantized` tensors, without re-rounding.

GPTQ stores, for a Linear y = x W^T with W of shape (N out, K in):
    qweight int32 (K*bits/32, N)  codes packed along K, lowest bits first
    qzeros  int32 (G, N*bits/32)  zero - 1, packed along N
    scales  fp16  (G, N)
    g_idx   int32 (K,)            group of each input column (not contiguous with act-order)
and w_hat[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n]).

`MatMulNBits` (com.microsoft, 4 bits) wants, per output column n and block b of
`block_size` consecutive input rows:
    B           uint8 [N, n_blocks, block_size/2]   two codes a byte, even k in the low nibble
    scales      float [N * n_blocks]
    zero_points uint8 [N * ceil(n_blocks/2)]        two zeros a byte, even block in the low nibble
and computes the same scale * (code - zero). Act-order groups are made contiguous
by permuting the input columns (and, in the graph, the activations with a Gather),
which is exact: x W^T = x[:, p] (W[:, p])^T for any permutation p.

All functions here take and return numpy arrays.
"""

from __future__ import annotations

import numpy as np

from kd2edge.errors import ArtifactError


def unpack_int32_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack (rows * bits / 32, cols) int32 words into (rows, cols) codes, lowest bits first.

    Only 2, 4 and 8 bits, where a code never spans two words.
    """
    if bits not in (2, 4, 8):
        raise ArtifactError(f"{bits}-bit GPTQ weights cannot be exported to MatMulNBits: quantize with 4 bits")
    per_word = 32 // bits
    words = packed.astype(np.int64) & 0xFFFFFFFF                        # (m, cols) unsigned
    shifts = (np.arange(per_word, dtype=np.int64) * bits)[None, :, None]
    codes = (words[:, None, :] >> shifts) & (2 ** bits - 1)             # (m, per_word, cols)
    return codes.reshape(-1, packed.shape[1]).astype(np.uint8)


def gptq_codes(qweight: np.ndarray, qzeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes (K, N), zeros (G, N)) as uint8 from a GPTQ layer; zeros are the stored values + 1."""
    codes = unpack_int32_rows(qweight, bits)
    zeros_minus_one = unpack_int32_rows(np.ascontiguousarray(qzeros.T), bits).T   # (G, N)
    zeros = (zeros_minus_one.astype(np.int32) + 1) & (2 ** bits - 1)
    return codes, zeros.astype(np.uint8)


def act_order_permutation(g_idx: np.ndarray, group_size: int) -> np.ndarray | None:
    """A column order in which every group is a contiguous block, or None if it already is.

    Args:
        g_idx: (K,) group of each input column.
        group_size: columns per group (-1: one group).

    Returns:
        perm (K,) int64 with g_idx[perm] == arange(K) // group_size, or None for the identity.

    Raises:
        ArtifactError: groups of unequal size (not a GPTQ layout MatMulNBits can hold).
    """
    K = g_idx.shape[0]
    if group_size == -1:
        return None
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[perm], np.arange(K) // group_size):
        raise ArtifactError(f"g_idx does not split {K} columns into groups of {group_size}: "
                            f"the GPTQ checkpoint is inconsistent, quantize again")
    return None if np.array_equal(perm, np.arange(K)) else perm.astype(np.int64)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values along the last axis, two a byte, the even position in the low nibble.

    An odd-length last axis is padded with one 0.
    """
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), dtype=values.dtype)], axis=-1)
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    """Inverse of `pack_nibbles`: the first `length` 4-bit values along the last axis."""
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out[..., :length]


def matmulnbits_block_size(K: int, group_size: int) -> int:
    """MatMulNBits' block size: the GPTQ group size, or for per-channel (-1) the largest power of two <= 128 dividing K."""
    if group_size != -1:
        return group_size
    for b in (128, 64, 32, 16):
        if K % b == 0:
            return b
    raise ArtifactError(f"per-channel weights with K={K} (not a multiple of 16) cannot be held by MatMulNBits")


def to_matmulnbits(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray,
                   group_size: int) -> dict:
    """The MatMulNBits tensors holding exactly one GPTQ layer's quantized weight.

    Args:
        codes: (K, N) uint8 codes in [0, 16).
        zeros: (G, N) uint8 zero points.
        scales: (G, N) float scales (fp16 values; widened to float32 exactly).
        g_idx: (K,) group of each input column.
        group_size: GPTQ group size (-1: per channel).

    Returns:
        {"B": uint8 [N, n_blocks, block/2], "scales": float32 [N*n_blocks],
         "zero_points": uint8 [N*ceil(n_blocks/2)], "perm": int64 [K] or None,
         "K", "N", "block_size"}. With `perm`, feed x[..., perm] instead of x.
    """
    K, N = codes.shape
    perm = act_order_permutation(g_idx, group_size)
    order = np.arange(K) if perm is None else perm
    block = matmulnbits_block_size(K, group_size)
    n_blocks = K // block
    block_group = g_idx[order][::block]          # (n_blocks,) the group each block of the permuted rows is in
    codes_nk = codes[order].T                    # (N, K) in the permuted column order
    B = pack_nibbles(codes_nk.reshape(N, n_blocks, block))                                 # (N, n_blocks, block/2)
    block_scales = scales.astype(np.float32)[block_group].T                               # (N, n_blocks)
    block_zeros = zeros[block_group].T                                                    # (N, n_blocks)
    return {"B": B, "scales": np.ascontiguousarray(block_scales).reshape(-1),
            "zero_points": pack_nibbles(block_zeros).reshape(-1), "perm": perm,
            "K": K, "N": N, "block_size": block}


def dequantize_matmulnbits(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, K: int, N: int,
                           block_size: int) -> np.ndarray:
    """The (K, N) float32 weight MatMulNBits multiplies by (its documented formula), for checks."""
    n_blocks = K // block_size
    codes = unpack_nibbles(B, block_size).reshape(N, K).astype(np.float32)
    zeros = unpack_nibbles(zero_points.reshape(N, -1), n_blocks).astype(np.float32)      # (N, n_blocks)
    s = scales.reshape(N, n_blocks)
    return (np.repeat(s, block_size, axis=1) * (codes - np.repeat(zeros, block_size, axis=1))).T


def rtn_blocks(weight: np.ndarray, block_size: int) -> dict:
    """Asymmetric 4-bit round-to-nearest of `weight` (rows, cols) in blocks of `block_size` columns.

    For embeddings, which GPTQ does not quantize: scale = (max - min) / 15 per block
    (range widened to include 0), zero = round(-min / scale), codes = clamp(round(w / scale) + zero, 0, 15).
    Scales are rounded to float16 first so every reader computes the same weight.

    Returns:
        {"codes": uint8 (rows, cols), "zeros": uint8 (rows, n_blocks), "scales": float32 (rows, n_blocks)}.
    """
    rows, cols = weight.shape
    w = weight.astype(np.float32).reshape(rows, cols // block_size, block_size)
    lo = np.minimum(w.min(-1), 0.0)
    hi = np.maximum(w.max(-1), 0.0)
    scale = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))                # an all-zero block
    zero = np.clip(np.round(-lo / scale), 0, 15)
    codes = np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, 15)
    return {"codes": codes.reshape(rows, cols).astype(np.uint8), "zeros": zero.astype(np.uint8),
            "scales": scale.astype(np.float32)}


def pack_gptq_layer(qt) -> dict:
    """`to_matmulnbits` of one `kd2edge.gptq_checkpoint.QuantTensors` (its codes, zeros, scales, g_idx)."""
    codes, zeros = gptq_codes(qt.qweight.numpy(), qt.qzeros.numpy(), qt.bits)
    return to_matmulnbits(codes, zeros, qt.scales.float().numpy(), qt.g_idx.numpy(), qt.group_size)


def held_weight_error(packed: dict, weight_kn: np.ndarray) -> float:
    """max |MatMulNBits' weight - weight_kn[perm]|: 0 when `packed` holds exactly the (K, N) reference weight."""
    held = dequantize_matmulnbits(packed["B"], packed["scales"], packed["zero_points"], packed["K"], packed["N"],
                                  packed["block_size"])
    reference = weight_kn if packed["perm"] is None else weight_kn[packed["perm"]]
    return float(np.abs(held - reference).max())


def concat_matmulnbits(parts: list[dict]) -> dict:
    """One MatMulNBits holding several layers that read the same input: [W_1 | W_2 | ...] along N.

    Exact (every output column keeps its own blocks, scales and zeros). All parts must
    share K, block_size and the act-order permutation (`can_concat`).
    """
    if not can_concat(parts):
        raise ValueError("MatMulNBits parts differ in K, block size or act-order permutation")
    first = parts[0]
    n_blocks = first["K"] // first["block_size"]
    return {"B": np.concatenate([p["B"] for p in parts], axis=0),                         # [sum N, blocks, bs/2]
            "scales": np.concatenate([p["scales"].reshape(p["N"], n_blocks) for p in parts]).reshape(-1),
            "zero_points": np.concatenate([p["zero_points"].reshape(p["N"], -1) for p in parts]).reshape(-1),
            "perm": first["perm"], "K": first["K"], "N": sum(p["N"] for p in parts),
            "block_size": first["block_size"]}


def can_concat(parts: list[dict]) -> bool:
    """Whether `concat_matmulnbits` can merge `parts`: same K, block size and act-order permutation."""
    first = parts[0]
    for p in parts[1:]:
        if p["K"] != first["K"] or p["block_size"] != first["block_size"]:
            return False
        if (p["perm"] is None) != (first["perm"] is None):
            return False
        if p["perm"] is not None and not np.array_equal(p["perm"], first["perm"]):
            return False
    return True

"""GPTQ and round-to-nearest weight quantization: the maths, as pure functions.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023). Notation follows the paper:

- W (out, in): a Linear layer's weight, X (in, N): its N calibration input columns.
- H = 2 X X^T / N (in, in): the Hessian of the layer-wise objective ||W X - Q X||^2 / N.
- Columns are quantized one at a time in a fixed order; the quantization error of a
  column is spread over the not-yet-quantized columns with the inverse Hessian
  (Optimal Brain Surgeon update), using the upper Cholesky factor of H^-1 and lazy
  block updates (Sec. 4, "Step 2" and "Step 3").

Quantization grid (per output row and group of input columns, asymmetric by default):
    q = clamp(round(w / scale) + zero, 0, maxq),   w_hat = scale * (q - zero),   maxq = 2^bits - 1.

Two choices differ from the reference code, both so the checkpoint is exact:
- scales are rounded to float16 when they are chosen, because the checkpoint stores
  them as float16; the returned dequantized W then equals what any reader computes.
- asymmetric zero points are kept in [1, maxq]: the GPTQ ("v1") checkpoint format
  stores zero - 1 in `bits` bits, and readers that add 1 back without masking
  (exllama-style kernels, GPTQModel's v1->v2 conversion) break on zero = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd2edge.errors import ConfigError, StageError
from kd2edge.gptq_checkpoint import SUPPORTED_BITS, dequantize_codes

_FP16_SMALLEST = 2.0 ** -24     # smallest positive float16 (subnormal): scales never round to 0
_MAX_DAMP_TRIES = 6


@dataclass(frozen=True)
class GPTQResult:
    """One quantized Linear weight.

    Attributes:
        qweight_int: (out, in) int32 codes in [0, 2^bits), original column order.
        scales: (out, n_groups) float32 (exactly representable in float16).
        zeros: (out, n_groups) int32 zero points.
        g_idx: (in,) int32: the group of each input column (act-order groups are not contiguous).
        dequant: (out, in) float32: scales[:, g_idx] * (qweight_int - zeros[:, g_idx]).
        damp_used: the damping fraction of mean(diag(H)) that made H positive definite
            (0 for round-to-nearest).
        loss: the objective 1/2 tr(E H E^T) with E = W - dequant (H damped for GPTQ, as the
            algorithm sees it); with H = 2XX^T/N that is ||W X - Q X||^2 / N.
        bits: the bit width.
        group_size: columns per group, -1 for one group per row.
    """

    qweight_int: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    dequant: torch.Tensor
    damp_used: float
    loss: float
    bits: int
    group_size: int


def check_quant_args(bits: int, group_size: int, in_features: int) -> None:
    """Validate bits and group size for a weight with `in_features` columns.

    Raises:
        ConfigError: bits not in 2/3/4/8, or a group size that does not divide in_features.
    """
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits: {bits} is not supported (use 2, 3, 4 or 8)", source="quantize")
    if group_size != -1 and (group_size <= 0 or in_features % group_size):
        raise ConfigError(f"group_size: {group_size} does not divide the {in_features} input features of a "
                          f"layer; use a divisor of {in_features} or -1 (per channel)", source="quantize")


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid parameters per row of `w`.

    The range always includes 0 (so zero weights stay exact), as in the paper's code.

    Args:
        w: (rows, cols) weights of one group.
        bits: bit width.
        sym: symmetric grid (zero fixed at (maxq + 1) / 2) instead of asymmetric.

    Returns:
        (scale, zero): (rows,) float32 each; scale is float16-representable, zero an integer value.
    """
    maxq = 2 ** bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)          # all-zero row: any grid works, avoid scale 0
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if not sym:
        # Ranges starting (almost) at 0 would get zero 0; use the grid [-scale, (maxq - 1) scale] instead.
        at_zero = torch.round(-xmin / scale) < 1
        scale = torch.where(at_zero, xmax / (maxq - 1), scale)
    scale = scale.half().float().clamp(min=_FP16_SMALLEST)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes q = clamp(round(w / scale) + zero, 0, maxq), as float (same shape as w)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def quantize_rtn(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round-to-nearest onto the grid, returned dequantized (same shape as w)."""
    return dequantize_codes(quantize_codes(w, scale, zero, maxq), scale, zero)


def accumulate_hessian(H: torch.Tensor | None, x: torch.Tensor, n_seen: int) -> tuple[torch.Tensor, int]:
    """Running H = 2 X X^T / N over calibration inputs, N counted in tokens.

    The reference code counts samples instead of tokens; that only rescales H, which
    GPTQ is invariant to (damping is relative to mean(diag(H))), and counting tokens
    makes 1/2 tr(E H E^T) the mean squared output error per token.

    Args:
        H: (in, in) float32 so far, or None to start.
        x: (..., in) a batch of inputs to the Linear layer.
        n_seen: tokens already folded into H.

    Returns:
        (H, n): the updated Hessian and token count.
    """
    x = x.reshape(-1, x.shape[-1]).float()                 # (tokens, in)
    n_new = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    n = n_seen + n_new
    H = H * (n_seen / n) if n_seen else H
    x = x * (2.0 / n) ** 0.5
    H = H + x.T @ x
    return H, n


def hessian_loss(E: torch.Tensor, H: torch.Tensor) -> float:
    """1/2 tr(E H E^T) for an error E (out, in) and H (in, in)."""
    return float(0.5 * ((E @ H) * E).sum())


def _group_index(in_features: int, group_size: int, perm: torch.Tensor | None, device) -> torch.Tensor:
    """(in,) group of each original column: its position in quantization order // group_size."""
    position = torch.arange(in_features, device=device)
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    g = (position // group_size).to(torch.int32)
    if perm is None:
        return g
    out = torch.empty_like(g)
    out[perm] = g                              # column perm[j] was quantized at position j
    return out


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = damp * mean(diag(H)).

    If H + lambda I is not numerically positive definite, damping is raised tenfold
    (up to 6 tries) and the damping that worked is returned.

    Raises:
        StageError: no damping up to 10^5 times the requested one worked (H is not finite).
    """
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for _ in range(_MAX_DAMP_TRIES):
        L, info = torch.linalg.cholesky_ex(H + (d * mean_diag) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, d
        d = d * 10 if d > 0 else 1e-4
    raise StageError(f"the Hessian is not positive definite even with damping {d / 10:g}: the calibration "
                     f"inputs hold NaN/inf; check the model's outputs on the calibration data")


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                         act_order: bool = True, sym: bool = False, damp: float = 0.01,
                         block_size: int = 128, static_groups: bool = False) -> GPTQResult:
    """Quantize one weight matrix with GPTQ (Algorithm 1 of the paper, with groups and act-order).

    Args:
        W: (out, in) weight (not modified).
        H: (in, in) Hessian 2XX^T/N of the layer's inputs (not modified).
        bits: 2, 3, 4 or 8.
        group_size: input columns sharing one (scale, zero) per row; -1 for one per row.
        act_order: quantize columns in order of decreasing diag(H) (the paper's "act-order").
        sym: symmetric grid.
        damp: relative dampening lambda / mean(diag(H)).
        block_size: columns per lazy-update block.
        static_groups: groups are contiguous runs of columns in the original order with their
            grid fixed from the unquantized W up front (AutoGPTQ's "static groups"), so
            g_idx = column // group_size even with act-order. Readers that ignore or mishandle
            g_idx (onnxruntime's MatMulNBits) then compute the right weight.

    Returns:
        The GPTQResult; its `dequant` is the quantized weight in W's column order.

    Raises:
        ConfigError: bad bits or group size.
        StageError: H cannot be made positive definite.
    """
    rows, cols = W.shape
    check_quant_args(bits, group_size, cols)
    maxq = 2 ** bits - 1
    W = W.detach().clone().float()
    H = H.detach().clone().float().to(W.device)

    # Inputs that are always zero carry no information: fix their weight to 0 and keep H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp_used = _inverse_hessian_cholesky(H, damp)
    H_damped = H + (damp_used * float(torch.diag(H).mean())) * torch.eye(cols, device=W.device)

    gs = cols if group_size == -1 else group_size
    n_groups = cols // gs
    Q = torch.zeros_like(W)                                 # (out, in) codes, quantization order
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    static = static_groups and group_size != -1
    # group of the column at each quantization position
    position_group = (torch.arange(cols, device=W.device) // gs).tolist()
    if static:
        W_unperm = W if perm is None else W[:, torch.argsort(perm)]
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = find_params(W_unperm[:, g * gs:(g + 1) * gs], bits, sym)
        if perm is not None:
            position_group = (perm // gs).tolist()
    W_orig = W.clone()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()                            # (out, B): updated inside the block
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:
                # The group's current (error-compensated) columns: in-block ones are in W1, later
                # ones in W. Exact when block_size and group_size divide one another.
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                scale, zero = find_params(current, bits, sym)
                scales[:, col // gs], zeros[:, col // gs] = scale, zero
            g = position_group[col]
            w = W1[:, i]                                    # (out,)
            q = quantize_codes(w, scales[:, g], zeros[:, g], maxq)
            Q[:, col] = q
            err = (w - dequantize_codes(q, scales[:, g], zeros[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                # lazy batch update of later columns

    g_idx = _group_index(cols, group_size, None if static else perm, W.device)
    if perm is not None:
        inv = torch.argsort(perm)
        Q, W_orig, H_damped = Q[:, inv], W_orig[:, inv], H_damped[inv][:, inv]
    dequant = dequantize_codes(Q, scales[:, g_idx.long()], zeros[:, g_idx.long()])
    return GPTQResult(qweight_int=Q.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx,
                      dequant=dequant, damp_used=damp_used, loss=hessian_loss(W_orig - dequant, H_damped),
                      bits=bits, group_size=group_size)


def rtn_quantize_weight(W: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
                        H: torch.Tensor | None = None) -> GPTQResult:
    """Round-to-nearest quantization with the same grid and groups as GPTQ (the baseline).

    Args:
        W: (out, in) weight.
        bits, group_size, sym: as for `gptq_quantize_weight`.
        H: optional (in, in) Hessian; the result's loss is 1/2 tr(E H E^T), or 1/2 ||E||^2 without it.

    Returns:
        A GPTQResult (damp_used 0, g_idx = column // group_size).

    Raises:
        ConfigError: bad bits or group size.
    """
    rows, cols = W.shape
    check_quant_args(bits, group_size, cols)
    maxq = 2 ** bits - 1
    W = W.detach().float()
    gs = cols if group_size == -1 else group_size
    Wg = W.reshape(rows * (cols // gs), gs)                 # (out * n_groups, gs): one row per (row, group)
    scale, zero = find_params(Wg, bits, sym)
    Q = quantize_codes(Wg, scale.unsqueeze(1), zero.unsqueeze(1), maxq).reshape(rows, cols)
    scales, zeros = scale.reshape(rows, -1), zero.reshape(rows, -1)
    g_idx = _group_index(cols, group_size, None, W.device)
    dequant = dequantize_codes(Q, scales[:, g_idx.long()], zeros[:, g_idx.long()])
    E = W - dequant
    loss = hessian_loss(E, H.float().to(W.device)) if H is not None else float(0.5 * (E * E).sum())
    return GPTQResult(qweight_int=Q.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx,
                      dequant=dequant, damp_used=0.0, loss=loss, bits=bits, group_size=group_size)

"""Distillation losses as small pure functions.

Notation (Hinton et al. 2015; Agarwal et al. 2024, "On-policy distillation of language
models", GKD): P is the teacher's next-token distribution, Q the student's, both
softened by a temperature T (logits / T). Every divergence is computed per token
position, averaged over the positions a `mask` keeps (by default: the answer tokens,
the prompt masked), and multiplied by T^2 so that its gradient keeps the same scale
as T changes (Hinton et al. 2015, section 2).

The teacher is given either as full logits (`[..., V]`) or as its top-k logits per
position (`TopK(values [..., k], indices [..., k])`), which is what the distillation
cache stores. With top-k the comparison is made on the k tokens only:

* the teacher is renormalized over its k tokens: P_k = softmax(values / T);
* for forward KL the student's log-probabilities are taken at those k indices against its
  *full* log-normalizer (log_softmax over V, gathered), so the student is not renormalized
  and KL(P_k || Q) = -H(P_k) - sum_k P_k log Q_k still pushes the student to move its mass
  onto the teacher's k tokens (mass it keeps elsewhere lowers every Q_k);
* for reverse KL and JSD the student is renormalized over the same k tokens too: both
  divergences need two proper distributions (with an unnormalized student, sum Q log(Q/P)
  goes negative and rewards the student for leaving the teacher's top-k), so they compare
  the two distributions *conditioned on the teacher's top-k set*.

This approximates the full-vocabulary divergence; it is exact when k = V and close
whenever the teacher's top-k holds almost all of its mass (the tail it drops is, by
construction, the teacher's least likely tokens). Forward KL's only error is the dropped
teacher tail; reverse KL and JSD in addition do not score the student's mass outside
the k tokens (the cross-entropy term of `kd_loss` and forward KL do).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of masked (prompt, padding) positions, as in transformers


class TopK(NamedTuple):
    """A teacher's top-k logits per position: values [..., k] (float), indices [..., k] (long)."""

    values: torch.Tensor
    indices: torch.Tensor


class KDLoss(NamedTuple):
    """The mixed loss and its two parts (each already averaged over kept tokens)."""

    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def support_log_probs(student_logits: torch.Tensor, teacher: torch.Tensor | TopK,
                      temperature: float = 1.0, renormalize_student: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities on a common support (full vocab or the teacher's top-k).

    Args:
        student_logits: [..., V] student logits.
        teacher: [..., V] teacher logits, or a `TopK` with values/indices [..., k].
        temperature: T > 0; both sides are divided by it.
        renormalize_student: with a top-k teacher, renormalize the student over the k tokens
            as well (reverse KL, JSD); ignored for a full-vocabulary teacher.

    Returns:
        (log_p, log_q): [..., S] teacher and student log-probabilities, S = V or k.
        With top-k, log_p is renormalized over the k tokens and log_q is the student's
        full-vocabulary log-softmax gathered at the k indices, renormalized only if asked
        (see the module docstring).

    Raises:
        ValueError: a non-positive temperature or mismatched shapes.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q_full = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [..., V]
    if isinstance(teacher, TopK):
        if teacher.values.shape != teacher.indices.shape or teacher.values.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(f"top-k teacher {tuple(teacher.values.shape)} does not match student {tuple(student_logits.shape)}")
        log_p = F.log_softmax(teacher.values.float() / temperature, dim=-1)     # [..., k]
        log_q = log_q_full.gather(-1, teacher.indices.long())                   # [..., k]
        if renormalize_student:
            log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
        return log_p, log_q
    if teacher.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match student {tuple(student_logits.shape)}")
    return F.log_softmax(teacher.float() / temperature, dim=-1), log_q_full


def kl_divergence(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) = sum_x A(x) (log A(x) - log B(x)) over the last axis.

    Args:
        log_a, log_b: [..., S] log-probabilities on the same support.

    Returns:
        [...] per-position divergence. Terms with A(x) = 0 contribute 0.
    """
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` [...] over the positions where `mask` [...] is true (all if None).

    Returns 0 (keeping the graph) when the mask keeps nothing, so an all-prompt batch adds no loss.
    """
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(P || Q) * T^2, mean over kept positions (mode-covering; classic KD).

    Args:
        student_logits: [..., V]. teacher: [..., V] logits or TopK [..., k].
        mask: [...] bool, True where the position counts; None = all.
        temperature: T.

    Returns:
        A scalar tensor.
    """
    log_p, log_q = support_log_probs(student_logits, teacher, temperature)
    return masked_mean(kl_divergence(log_p, log_q), mask) * temperature ** 2


def reverse_kl(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL(Q || P) * T^2, mean over kept positions (mode-seeking; MiniLLM).

    Arguments and result as in `forward_kl`; with a top-k teacher both sides are renormalized over the k tokens.
    """
    log_p, log_q = support_log_probs(student_logits, teacher, temperature, renormalize_student=True)
    return masked_mean(kl_divergence(log_q, log_p), mask) * temperature ** 2


def generalized_jsd(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, beta: float = 0.5,
                    mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(beta) * T^2 (GKD, Agarwal et al. 2024, eq. 1).

    JSD(beta)(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M), with M = beta * P + (1 - beta) * Q.
    beta = 0.5 is the symmetric JSD; as beta -> 0 (resp. 1) it vanishes, and JSD / beta tends to
    forward KL (resp. JSD / (1 - beta) to reverse KL), so beta must lie strictly inside (0, 1).

    Args:
        beta: mixing weight in (0, 1).
        others as in `forward_kl`.

    Raises:
        ValueError: beta outside (0, 1).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized_jsd needs 0 < beta < 1, got {beta} (use forward_kl or reverse_kl for the limits)")
    log_p, log_q = support_log_probs(student_logits, teacher, temperature, renormalize_student=True)
    # log M = logsumexp(log beta + log P, log(1 - beta) + log Q), stable for tiny probabilities.
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    per_token = beta * kl_divergence(log_p, log_m) + (1.0 - beta) * kl_divergence(log_q, log_m)
    return masked_mean(per_token, mask) * temperature ** 2


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token cross-entropy -log Q(label) at T = 1, mean over kept positions.

    Args:
        student_logits: [..., V]; labels: [...] token ids (IGNORE_INDEX where masked).
        mask: [...] bool; default: labels != IGNORE_INDEX.
    """
    if mask is None:
        mask = labels != IGNORE_INDEX
    log_q = F.log_softmax(student_logits.float(), dim=-1)                        # [..., V]
    safe = labels.clamp_min(0).unsqueeze(-1)                                     # [..., 1]
    return masked_mean(-log_q.gather(-1, safe).squeeze(-1), mask)


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, labels: torch.Tensor,
            kd_ratio: float = 0.5, loss: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
            mask: torch.Tensor | None = None, kd_mask: torch.Tensor | None = None, kd_scale: float = 1.0,
            ce_scale: float = 1.0) -> KDLoss:
    """The training objective: kd_ratio * divergence + (1 - kd_ratio) * cross-entropy on the gold tokens.

    The 0.5 / 0.5 default mirrors the Qwen distillation study's mix of forward-KL soft
    cross-entropy with the language-modelling loss. The two terms may be averaged over
    different positions: the divergence over every position of the sequence (the teacher's
    whole next-token distribution, which heals a pruned student's language modelling), the
    cross-entropy over the gold answer's tokens only.

    Args:
        student_logits: [..., V] student logits, aligned with `labels` (already shifted).
        teacher: [..., V] teacher logits or a TopK [..., k] at the same positions.
        labels: [...] target token ids, IGNORE_INDEX on prompt/padding positions.
        kd_ratio: weight of the divergence in [0, 1]; 0 = plain supervised fine-tuning.
        loss: "forward_kl", "reverse_kl", "jsd" or "none" (divergence off, CE only).
        temperature: T for the divergence (the CE term always uses T = 1).
        beta: the JSD mixing weight (loss = "jsd" only).
        mask: [...] bool positions the cross-entropy scores; default labels != IGNORE_INDEX (answer tokens).
        kd_mask: [...] bool positions the divergence scores; default `mask`.
        kd_scale, ce_scale: factors on the divergence's and the cross-entropy's mean in `total` (the
            training loop weighs a micro-batch by its share of the global batch's positions).

    Returns:
        KDLoss(total, kd, ce), scalars; kd and ce are the unscaled means.

    Raises:
        ValueError: kd_ratio outside [0, 1] or an unknown loss name.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must lie in [0, 1], got {kd_ratio}")
    if mask is None:
        mask = labels != IGNORE_INDEX
    kd_mask = mask if kd_mask is None else kd_mask
    ce = cross_entropy(student_logits, labels, mask)
    if loss == "none":
        kd = torch.zeros((), device=student_logits.device)
        return KDLoss(ce * ce_scale, kd, ce)
    if loss == "forward_kl":
        kd = forward_kl(student_logits, teacher, kd_mask, temperature)
    elif loss == "reverse_kl":
        kd = reverse_kl(student_logits, teacher, kd_mask, temperature)
    elif loss == "jsd":
        kd = generalized_jsd(student_logits, teacher, beta, kd_mask, temperature)
    else:
        raise ValueError(f"unknown loss {loss!r} (known: forward_kl, reverse_kl, jsd, none)")
    return KDLoss(kd_ratio * kd * kd_scale + (1.0 - kd_ratio) * ce * ce_scale, kd, ce)

"""Losses against values worked out by hand on two- and three-token vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from kd2edge.distill.losses import (IGNORE_INDEX, TopK, cross_entropy, forward_kl, generalized_jsd, kd_loss,
                                    reverse_kl)

LN3 = math.log(3.0)
# Teacher P = (1/2, 1/2) from logits (0, 0); student Q = (1/4, 3/4) from logits (0, ln 3).
TEACHER = torch.tensor([[0.0, 0.0]])
STUDENT = torch.tensor([[0.0, LN3]])
KL_PQ = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)        # = 0.5 ln(4/3)
KL_QP = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
M = (0.375, 0.625)                                                     # (P + Q) / 2
JSD = 0.5 * (0.5 * math.log(0.5 / M[0]) + 0.5 * math.log(0.5 / M[1])) \
    + 0.5 * (0.25 * math.log(0.25 / M[0]) + 0.75 * math.log(0.75 / M[1]))


def test_forward_reverse_kl_and_jsd_match_hand_values():
    assert forward_kl(STUDENT, TEACHER).item() == pytest.approx(KL_PQ, abs=1e-6)
    assert forward_kl(STUDENT, TEACHER).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert reverse_kl(STUDENT, TEACHER).item() == pytest.approx(KL_QP, abs=1e-6)
    assert generalized_jsd(STUDENT, TEACHER, beta=0.5).item() == pytest.approx(JSD, abs=1e-6)
    assert JSD == pytest.approx(0.033822, abs=1e-5)


def test_jsd_with_asymmetric_beta():
    beta = 0.25
    m = (beta * 0.5 + 0.75 * 0.25, beta * 0.5 + 0.75 * 0.75)           # M = beta P + (1 - beta) Q
    expected = beta * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + (1 - beta) * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert generalized_jsd(STUDENT, TEACHER, beta=beta).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        generalized_jsd(STUDENT, TEACHER, beta=1.0)


def test_temperature_softens_both_sides_and_scales_by_t_squared():
    # T = 2: teacher logits (0, 2 ln 3) -> (0, ln 3) -> P = (1/4, 3/4); student (0, 0) -> Q = (1/2, 1/2).
    teacher = torch.tensor([[0.0, 2 * LN3]])
    student = torch.tensor([[0.0, 0.0]])
    expected = 4.0 * (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5))
    assert forward_kl(student, teacher, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(student, teacher, temperature=0.0)


def test_mask_drops_prompt_positions():
    # Two positions; the second one is wildly different but masked out.
    student = torch.tensor([[[0.0, LN3], [9.0, -9.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [-9.0, 9.0]]])
    mask = torch.tensor([[True, False]])
    assert forward_kl(student, teacher, mask).item() == pytest.approx(KL_PQ, abs=1e-6)
    assert forward_kl(student, teacher).item() > 5.0
    labels = torch.tensor([[1, IGNORE_INDEX]])
    assert cross_entropy(student, labels).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # Nothing kept: zero loss, not NaN.
    assert forward_kl(student, teacher, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


def test_kd_loss_mixes_divergence_and_cross_entropy_by_ratio():
    labels = torch.tensor([1])
    out = kd_loss(STUDENT, TEACHER, labels, kd_ratio=0.25)
    ce = -math.log(0.75)
    assert out.kd.item() == pytest.approx(KL_PQ, abs=1e-6)
    assert out.ce.item() == pytest.approx(ce, abs=1e-6)
    assert out.total.item() == pytest.approx(0.25 * KL_PQ + 0.75 * ce, abs=1e-6)
    assert kd_loss(STUDENT, TEACHER, labels, loss="none").total.item() == pytest.approx(ce, abs=1e-6)
    with pytest.raises(ValueError, match="kd_ratio"):
        kd_loss(STUDENT, TEACHER, labels, kd_ratio=1.5)
    with pytest.raises(ValueError, match="unknown loss"):
        kd_loss(STUDENT, TEACHER, labels, loss="l2")


def test_topk_renormalizes_teacher_but_not_student():
    # Teacher logits (ln 2, 0, -20): top-2 renormalized P = (2/3, 1/3). Student uniform over 3: log Q = ln(1/3).
    teacher = torch.tensor([[math.log(2.0), 0.0, -20.0]])
    student = torch.zeros(1, 3)
    top = TopK(torch.tensor([[math.log(2.0), 0.0]]), torch.tensor([[0, 1]]))
    expected = (2 / 3) * math.log((2 / 3) / (1 / 3)) + (1 / 3) * math.log((1 / 3) / (1 / 3))
    assert forward_kl(student, top).item() == pytest.approx(expected, abs=1e-6)
    # Close to the full-vocabulary value because the dropped teacher tail is ~1e-9.
    assert forward_kl(student, teacher).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_equals_full_vocab_when_k_is_vocab(name):
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11) * 3
    labels = torch.randint(0, 11, (2, 5))
    labels[:, :2] = IGNORE_INDEX
    values, indices = teacher.topk(11, dim=-1)
    full = kd_loss(student, teacher, labels, loss=name, temperature=1.7, beta=0.3)
    top = kd_loss(student, TopK(values, indices), labels, loss=name, temperature=1.7, beta=0.3)
    assert top.total.item() == pytest.approx(full.total.item(), rel=1e-5)
    g_full, = torch.autograd.grad(full.total, student)
    g_top, = torch.autograd.grad(top.total, student)
    assert torch.allclose(g_full, g_top, atol=1e-6)
    assert g_full[:, :2].abs().max().item() == 0.0   # masked prompt positions get no gradient


def test_topk_reverse_kl_renormalizes_the_student_and_stays_non_negative():
    # Top-2 teacher P = (2/3, 1/3); student logits (0, 0, 5): over the top-2 it is (1/2, 1/2) once
    # renormalized, so reverse KL = KL((1/2, 1/2) || (2/3, 1/3)), whatever mass token 2 holds.
    top = TopK(torch.tensor([[math.log(2.0), 0.0]]), torch.tensor([[0, 1]]))
    student = torch.tensor([[0.0, 0.0, 5.0]])
    expected = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert reverse_kl(student, top).item() == pytest.approx(expected, abs=1e-6)
    assert generalized_jsd(student, top, beta=0.5).item() >= 0.0


def test_kd_loss_averages_the_divergence_and_the_cross_entropy_over_their_own_positions():
    # Two scored rows: a context position (no label) and an answer position (label 1).
    student = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    teacher = torch.log(torch.tensor([[0.9, 0.1], [0.25, 0.75]]))
    labels = torch.tensor([IGNORE_INDEX, 1])
    out = kd_loss(student, teacher, labels, kd_ratio=0.5, kd_mask=torch.tensor([True, True]))
    kl_context = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)      # the answer row's KL is 0
    assert out.kd.item() == pytest.approx(kl_context / 2, abs=1e-6)
    assert out.ce.item() == pytest.approx(-math.log(0.75), abs=1e-6)      # the answer row only
    answer_only = kd_loss(student, teacher, labels, kd_ratio=0.5)
    assert answer_only.kd.item() == pytest.approx(0.0, abs=1e-6)

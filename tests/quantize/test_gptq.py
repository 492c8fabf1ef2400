"""GPTQ maths on small hand-made matrices."""

from __future__ import annotations

import pytest
import torch

from kd2edge.errors import ConfigError
from kd2edge.quantize.gptq import (accumulate_hessian, dequantize_codes, find_params, gptq_quantize_weight,
                                hessian_loss, quantize_codes, quantize_rtn, rtn_quantize_weight)


def test_find_params_asymmetric_by_hand():
    # bits 2: maxq 3, range [-1, 3] -> scale 4/3 (rounded to fp16), zero round(0.75) = 1
    scale, zero = find_params(torch.tensor([[-1.0, 0.0, 3.0]]), bits=2, sym=False)
    assert scale.item() == pytest.approx(torch.tensor(4 / 3).half().item(), abs=0)
    assert zero.item() == 1
    codes = quantize_codes(torch.tensor([[-1.0, 0.0, 3.0]]), scale[:, None], zero[:, None], 3)
    assert codes.tolist() == [[0.0, 1.0, 3.0]]
    assert quantize_rtn(torch.tensor([[0.0]]), scale[:, None], zero[:, None], 3).item() == 0.0


def test_find_params_symmetric_and_all_zero_row():
    scale, zero = find_params(torch.tensor([[-2.0, 1.0], [0.0, 0.0]]), bits=4, sym=True)
    assert scale[0].item() == pytest.approx(torch.tensor(4 / 15).half().item(), abs=0)
    assert zero.tolist() == [8.0, 8.0]
    assert scale[1].item() == pytest.approx(torch.tensor(2 / 15).half().item(), abs=0)  # range [-1, 1]


def test_asymmetric_zero_never_zero():
    # all-positive weights would give zero 0, which the GPTQ v1 format cannot store
    scale, zero = find_params(torch.tensor([[0.5, 1.0, 2.0]]), bits=4, sym=False)
    assert zero.item() == 1
    w_hat = quantize_rtn(torch.tensor([[0.5, 1.0, 2.0]]), scale[:, None], zero[:, None], 15)
    # the grid is widened to [-scale, 14 scale] so nothing is clipped: error <= scale / 2
    assert scale.item() == pytest.approx(torch.tensor(2 / 14).half().item(), abs=0)
    assert (w_hat - torch.tensor([[0.5, 1.0, 2.0]])).abs().max() <= scale.item() / 2 + 1e-6


def test_accumulate_hessian_matches_closed_form():
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 8), torch.randn(1, 3, 8), torch.randn(7, 8)]
    H, n = None, 0
    for x in xs:
        H, n = accumulate_hessian(H, x, n)
    X = torch.cat([x.reshape(-1, 8) for x in xs]).T          # (in, N)
    assert n == 20
    assert torch.allclose(H, 2 * X @ X.T / 20, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, True), (3, -1, False), (2, 16, True), (8, 64, False)])
def test_gptq_equals_rtn_when_hessian_is_identity(bits, group_size, act_order):
    torch.manual_seed(1)
    W = torch.randn(24, 64)
    g = gptq_quantize_weight(W, 3.0 * torch.eye(64), bits, group_size, act_order, sym=False, damp=0.01, block_size=16)
    r = rtn_quantize_weight(W, bits, group_size, sym=False)
    assert torch.equal(g.qweight_int, r.qweight_int)
    assert torch.equal(g.dequant, r.dequant)
    assert torch.equal(g.g_idx, r.g_idx)


def _correlated_inputs(n_in=64, n_tokens=2048, seed=0):
    """(N, in) inputs that live near a 16-dim subspace, as LLM activations do (strongly correlated)."""
    torch.manual_seed(seed)
    scale = torch.logspace(-0.5, 0.5, n_in)                   # unequal channel magnitudes too
    return (torch.randn(n_tokens, 16) @ torch.randn(16, n_in) + 0.1 * torch.randn(n_tokens, n_in)) * scale


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    X = _correlated_inputs()
    W = torch.randn(32, 64)
    H, _ = accumulate_hessian(None, X, 0)
    g = gptq_quantize_weight(W, H, 4, 32, act_order, sym=False, damp=0.01, block_size=16)
    r = rtn_quantize_weight(W, 4, 32, sym=False, H=H)
    err_g = torch.linalg.norm((W - g.dequant) @ X.T)
    err_r = torch.linalg.norm((W - r.dequant) @ X.T)
    assert err_g < 0.75 * err_r
    # the RTN loss with H = 2XX^T/N is the mean squared output error per token
    assert r.loss == pytest.approx(float(err_r ** 2) / X.shape[0], rel=1e-4)
    assert g.loss < r.loss


def test_act_order_g_idx_maps_every_column():
    X = _correlated_inputs(seed=3)
    W = torch.randn(16, 64)
    H, _ = accumulate_hessian(None, X, 0)
    g = gptq_quantize_weight(W, H, 4, 16, act_order=True, sym=False, damp=0.01, block_size=32)
    idx = g.g_idx.long()
    assert torch.bincount(idx).tolist() == [16, 16, 16, 16]
    assert not torch.equal(idx, torch.arange(64) // 16)       # groups follow diag(H), not position
    # the 16 columns with the largest diag(H) were quantized first, into group 0
    top = torch.argsort(torch.diag(H), descending=True)[:16]
    assert set(torch.nonzero(idx == 0).flatten().tolist()) == set(top.tolist())
    rebuilt = dequantize_codes(g.qweight_int, g.scales[:, idx], g.zeros[:, idx])
    assert torch.equal(rebuilt, g.dequant)
    assert int(g.qweight_int.min()) >= 0 and int(g.qweight_int.max()) <= 15


def test_damping_is_raised_when_cholesky_fails():
    torch.manual_seed(0)
    x = torch.randn(3, 32)                                    # rank 3 < 32: singular H
    H, _ = accumulate_hessian(None, x, 0)
    g = gptq_quantize_weight(torch.randn(8, 32), H, 4, -1, act_order=False, sym=True, damp=0.0, block_size=32)
    assert g.damp_used > 0
    assert torch.isfinite(g.dequant).all()


def test_dead_inputs_get_zero_weight():
    X = _correlated_inputs(n_in=32, n_tokens=256)
    X[:, 5] = 0
    H, _ = accumulate_hessian(None, X, 0)
    g = gptq_quantize_weight(torch.randn(8, 32), H, 4, -1, act_order=True, sym=False, damp=0.01, block_size=8)
    assert torch.all(g.dequant[:, 5] == 0)


@pytest.mark.parametrize("bits,group_size", [(5, 32), (4, 48), (4, 0)])
def test_bad_arguments_raise_config_error(bits, group_size):
    with pytest.raises(ConfigError):
        rtn_quantize_weight(torch.randn(4, 64), bits, group_size)
    with pytest.raises(ConfigError):
        gptq_quantize_weight(torch.randn(4, 64), torch.eye(64), bits, group_size)


def test_hessian_loss_by_hand():
    E = torch.tensor([[1.0, 2.0]])
    H = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    assert hessian_loss(E, H) == pytest.approx(0.5 * (2 + 2 * 2 * 1 + 4 * 4))


def test_block_size_does_not_change_the_result():
    # lazy batch updates are an exact reordering of the same arithmetic
    X = _correlated_inputs(seed=5)
    W = torch.randn(16, 64)
    H, _ = accumulate_hessian(None, X, 0)
    a = gptq_quantize_weight(W, H, 4, 32, act_order=True, sym=False, damp=0.01, block_size=8)
    b = gptq_quantize_weight(W, H, 4, 32, act_order=True, sym=False, damp=0.01, block_size=64)
    assert (a.qweight_int == b.qweight_int).float().mean() > 0.99
    assert a.loss == pytest.approx(b.loss, rel=1e-2)


def test_static_groups_keep_g_idx_trivial_under_act_order():
    X = _correlated_inputs(seed=7)
    W = torch.randn(16, 64)
    H, _ = accumulate_hessian(None, X, 0)
    g = gptq_quantize_weight(W, H, 4, 16, act_order=True, sym=False, damp=0.01, block_size=32, static_groups=True)
    assert torch.equal(g.g_idx, (torch.arange(64) // 16).to(torch.int32))
    # each group's grid is the min-max grid of the original columns of that group
    for k in range(4):
        scale, zero = find_params(W[:, 16 * k:16 * (k + 1)], 4, sym=False)
        assert torch.equal(g.scales[:, k], scale) and torch.equal(g.zeros[:, k], zero.to(torch.int32))
    assert torch.equal(dequantize_codes(g.qweight_int, g.scales[:, g.g_idx.long()], g.zeros[:, g.g_idx.long()]), g.dequant)
    r = rtn_quantize_weight(W, 4, 16, sym=False, H=H)
    assert g.loss < r.loss

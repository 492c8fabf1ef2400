"""Whole-model quantization on tiny llama, qwen2 and gpt_neox models."""

from __future__ import annotations

import pytest
import torch

from kd2edge.errors import ConfigError, DataError, ModelError
from kd2edge.models import decoder_layers
from kd2edge.quantize.orchestrate import quantize_model, relative_output_error, summarize
from kd2edge.testing import tiny_model

_TEXTS = ["Context: The Velmora Institute was founded in 1871 by Adaline Qorr. Question: Who founded it? Answer:",
          "Contexto: La ciudad de Brimor fue fundada en 1620 por el explorador Tomás Ivarra junto al río Selen.",
          "A river flows north through the valley; its water feeds the orchards of the old monastery.",
          "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 and years 1999 2024."]


def _calib(tokenizer, repeat=4):
    return [tokenizer(t, return_tensors="pt").input_ids[0] for t in _TEXTS * repeat]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_tiny_models_quantize_and_stay_close(arch):
    model, tok = tiny_model(arch)
    ids = _calib(tok)
    held_out = tok("El puerto exporta café, cacao y madera; su faro tiene ciento veinte años.",
                   return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(held_out).logits
    results, report = quantize_model(model, ids, bits=4, group_size=32, act_order=True, sym=False,
                                     damp=0.01, block_size=16, method="gptq")
    prefix, layers = decoder_layers(model)
    n_linears = {"llama": 7, "qwen2": 7, "gpt_neox": 4}[arch]
    assert len(results) == len(report) == 2 * n_linears
    assert all(name.startswith(prefix + ".") for name in results)
    assert not any("lm_head" in n or "embed" in n for n in results)
    for name, r in results.items():                            # weights replaced by the dequantized ones
        assert torch.equal(model.get_submodule(name).weight, r.dequant)
    with torch.no_grad():
        out = model(held_out).logits
    rel = float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))
    assert rel < 0.1
    # GPTQ's reconstruction error is at most RTN's on the same inputs, layer by layer (tiny slack for damping)
    for row in report:
        assert row["gptq_rel_err"] <= row["rtn_rel_err"] * 1.02 + 1e-6
    s = summarize(report)
    assert s["gptq_rel_err_mean"] < s["rtn_rel_err_mean"]


def test_rtn_method_matches_per_weight_rtn():
    from kd2edge.quantize.gptq import rtn_quantize_weight

    model, tok = tiny_model("llama")
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    results, report = quantize_model(model, _calib(tok), bits=4, group_size=32, method="rtn")
    for name, r in results.items():
        assert torch.equal(r.dequant, rtn_quantize_weight(weights[name], 4, 32, sym=False).dequant)
    assert all("gptq_rel_err" not in row for row in report)


def test_relative_output_error_by_hand():
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])     # (N, in)
    H = 2 * X.T @ X / 3
    W, Q = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.5]])
    expected = float(torch.linalg.norm((W - Q) @ X.T) / torch.linalg.norm(W @ X.T))
    assert relative_output_error(W, Q, H) == pytest.approx(expected, rel=1e-6)


def test_bad_inputs():
    model, tok = tiny_model("llama")
    with pytest.raises(DataError, match="calibration tokens"):
        quantize_model(model, [torch.tensor([1, 2, 3])], bits=4, group_size=32)
    with pytest.raises(ConfigError, match="group_size"):
        quantize_model(model, _calib(tok), bits=4, group_size=48)
    with pytest.raises(ConfigError, match="bits"):
        quantize_model(model, _calib(tok), bits=5, group_size=32)
    gpt2 = torch.nn.Module()
    gpt2.config = type("C", (), {"model_type": "gpt2"})()
    with pytest.raises(ModelError, match="decoder layers"):
        quantize_model(gpt2, _calib(tok), bits=4, group_size=32)

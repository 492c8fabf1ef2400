"""The GPTQ checkpoint: bit packing, writing, reading back, dequantized model."""

from __future__ import annotations

import json

import pytest
import torch

from kd2edge.errors import ArtifactError, ConfigError
from kd2edge.gptq_checkpoint import (dequantize_tensors, is_gptq_checkpoint, load_dequantized_model, pack_rows,
                                      read_gptq_tensors, unpack_rows, write_gptq_checkpoint)
from kd2edge.quantize.gptq import rtn_quantize_weight
from kd2edge.testing import tiny_model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (96, 5), dtype=torch.int32)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 5)
    assert torch.equal(unpack_rows(packed, bits), codes)


def test_pack_4bit_by_hand():
    codes = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [8]])
    assert pack_rows(codes, 4).item() == 0x87654321 - 2 ** 32   # int32 view of 0x87654321
    codes = torch.tensor([[15], [0], [0], [0], [0], [0], [0], [0]])
    assert pack_rows(codes, 4).item() == 15


def _reference_pack_3bit(v: list[int]) -> list[int]:
    """The GPTQ reference 3-bit layout, written out word by word for 32 values."""
    w0 = sum(v[j] << (3 * j) for j in range(10)) | ((v[10] << 30) & 0xFFFFFFFF)
    w1 = ((v[10] >> 2) & 1) | sum(v[11 + j] << (3 * j + 1) for j in range(10)) | ((v[21] << 31) & 0xFFFFFFFF)
    w2 = ((v[21] >> 1) & 0x3) | sum(v[22 + j] << (3 * j + 2) for j in range(10))
    return [w if w < 2 ** 31 else w - 2 ** 32 for w in (w0, w1, w2)]


def test_pack_3bit_spans_words_like_the_reference():
    torch.manual_seed(0)
    v = torch.randint(0, 8, (32,)).tolist()
    v[10], v[21] = 5, 6                                        # both spill across a word boundary
    packed = pack_rows(torch.tensor(v).reshape(32, 1), 3)
    assert packed.flatten().tolist() == _reference_pack_3bit(v)


def test_pack_rejects_unpackable_sizes():
    with pytest.raises(ConfigError):
        pack_rows(torch.zeros(10, 2, dtype=torch.int32), 3)
    with pytest.raises(ValueError):
        pack_rows(torch.full((8, 1), 16), 4)


def _rtn_results(model, bits=4, group_size=32):
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return {n: rtn_quantize_weight(model.get_submodule(n).weight, bits, group_size, sym=False) for n in names}


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_checkpoint_reads_back_identically(tmp_path, arch):
    model, tok = tiny_model(arch)
    results = _rtn_results(model)
    write_gptq_checkpoint(model, tok, results, tmp_path, bits=4, group_size=32, desc_act=False, sym=False,
                          dtype="float32")
    assert is_gptq_checkpoint(tmp_path)
    tensors = read_gptq_tensors(tmp_path)
    assert set(tensors) == set(results)
    for name, qt in tensors.items():
        r = results[name]
        assert torch.equal(dequantize_tensors(qt), r.dequant)
        out, cols = r.dequant.shape
        assert qt.qweight.shape == (cols * 4 // 32, out) and qt.qweight.dtype == torch.int32
        assert qt.qzeros.shape == (cols // 32, out * 4 // 32) and qt.qzeros.dtype == torch.int32
        assert qt.scales.shape == (cols // 32, out) and qt.scales.dtype == torch.float16
        assert torch.equal(qt.g_idx, torch.arange(cols, dtype=torch.int32) // 32)
        # qzeros holds zero - 1 (GPTQ v1): unpack and compare with the integer zero points
        stored = unpack_rows(qt.qzeros.T.contiguous(), 4)       # (out, n_groups)
        assert torch.equal(stored + 1, r.zeros)
    loaded, _ = load_dequantized_model(tmp_path)
    for name, r in results.items():
        assert torch.equal(loaded.get_submodule(name).weight, r.dequant)
    # with float32 for the other tensors the loaded model is the in-memory quantized model exactly
    with torch.no_grad():
        for name, r in results.items():
            model.get_submodule(name).weight.copy_(r.dequant)
        ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_checkpoint_config_and_float16_tensors(tmp_path):
    model, tok = tiny_model("llama")
    results = _rtn_results(model, bits=8, group_size=-1)
    write_gptq_checkpoint(model, tok, results, tmp_path, bits=8, group_size=-1, desc_act=True, sym=False)
    config = json.loads((tmp_path / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["sym"], q["checkpoint_format"]) == \
        ("gptq", 8, -1, True, False, "gptq")
    assert json.loads((tmp_path / "quantize_config.json").read_text())["bits"] == 8
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["model.embed_tokens.weight"].dtype == torch.float16
    assert "lm_head.weight" not in stored                       # tied to the embeddings: stored once
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    loaded, tokenizer = load_dequantized_model(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert tokenizer.pad_token is not None


def test_not_a_checkpoint(tmp_path):
    assert not is_gptq_checkpoint(tmp_path)
    with pytest.raises(ArtifactError):
        read_gptq_tensors(tmp_path)
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path)
    assert not is_gptq_checkpoint(tmp_path)
    with pytest.raises(ArtifactError, match="not a GPTQ checkpoint"):
        load_dequantized_model(tmp_path)

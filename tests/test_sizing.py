"""kd2edge.sizing: parameter counts, 4-bit sizes, KV cache and weights on disk, against hand-computed figures."""

from __future__ import annotations

import torch

from kd2edge.sizing import kv_cache_bytes, param_breakdown, predicted_decode_tokens_per_s, quantized_size_bytes, stored_weights
from kd2edge.testing import tiny_model


def test_param_breakdown_counts_tied_embeddings_once():
    for arch in ("llama", "qwen2", "gpt_neox"):
        model, _ = tiny_model(arch, num_layers=3)
        b = param_breakdown(model.config)
        assert b.total == sum(p.numel() for p in model.parameters())
        assert b.params_with(1) == b.total - 2 * b.per_layer
    llama = param_breakdown(tiny_model("llama", num_layers=3)[0].config)      # hidden 64, MLP 128, tied
    assert (llama.intermediate, llama.per_neuron, llama.vocab, llama.hidden) == (128, 3 * 64, len(tiny_model()[1]), 64)
    # 3 layers with MLPs of 96 neurons and 300 token rows: 3 x 32 x 192 and 100 x 64 fewer (tied: once)
    assert llama.params_with(3, vocab=llama.vocab - 100, intermediate=96) == llama.total - 3 * 32 * 192 - 100 * 64


def test_size_kv_and_roofline_by_hand():
    # 1024 quantized weights at 4 bits in groups of 128: 512 B + 8 groups x 2.5 B; 100 others x 2 B.
    assert quantized_size_bytes(1024, 100, bits=4, group_size=128) == 512 + 20 + 200
    assert kv_cache_bytes(layers=2, kv_heads=3, head_dim=64, context_length=10, value_bytes=4) == 2 * 2 * 3 * 64 * 10 * 4
    assert predicted_decode_tokens_per_s(bytes_per_token=50e6, bandwidth=25e9) == 500.0


def test_stored_weights_counts_the_model(tiny_llama_dir):
    from kd2edge.models import count_params, load_causal_lm

    model, _ = load_causal_lm(tiny_llama_dir)
    # per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate, up 128x64, down 64x128
    per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192
    assert stored_weights(tiny_llama_dir) == (count_params(model), 2 * per_layer)


def test_stored_weights_unpacks_a_gptq_checkpoint(tmp_path):
    from kd2edge.testing import tiny_gptq_checkpoint
    from kd2edge.models import count_params
    from kd2edge.gptq_checkpoint import load_dequantized_model

    folder = tiny_gptq_checkpoint(tmp_path / "ckpt")
    model, _ = load_dequantized_model(folder)
    linears = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".layers." in name)
    assert stored_weights(folder) == (count_params(model), linears)

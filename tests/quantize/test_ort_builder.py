"""Independent format check: onnxruntime-genai's model builder reads our GPTQ checkpoints.

The builder unpacks qweight/qzeros/scales with its own code and repacks them for
MatMulNBits; its ONNX model must reproduce the dequantized PyTorch model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd2edge.gptq_checkpoint import load_dequantized_model, write_gptq_checkpoint
from kd2edge.quantize.orchestrate import quantize_model
from kd2edge.testing import tiny_model

og = pytest.importorskip("onnxruntime_genai")


@pytest.mark.parametrize("arch,act_order", [("llama", False), ("qwen2", True)])
def test_onnxruntime_genai_builder_loads_checkpoint(tmp_path, arch, act_order):
    from onnxruntime_genai.models.builder import create_model

    model, tok = tiny_model(arch)
    texts = ["The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 and years 1999 2024.",
             "Contexto: La ciudad de Brimor fue fundada en 1620 por el explorador Tomás Ivarra."] * 4
    ids = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    results, _ = quantize_model(model, ids, bits=4, group_size=32, act_order=act_order, static_groups=True)
    ckpt, onnx_dir = tmp_path / "gptq", tmp_path / "onnx"
    write_gptq_checkpoint(model, tok, results, ckpt, bits=4, group_size=32, desc_act=False, sym=False,
                          static_groups=True)
    # lm_head kept float (the builder would RTN-quantize it), fp32 accumulation for a tight comparison
    create_model(arch, str(ckpt), str(onnx_dir), "int4", "cpu", str(tmp_path / "cache"),
                 int4_nodes_to_exclude=["/lm_head/MatMul"], int4_accuracy_level=1, shared_embeddings=False)

    reference, _ = load_dequantized_model(ckpt)
    prompt = tok("A river flows north through the valley", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(prompt).logits[0, -1].numpy()
    onnx_model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(onnx_model)
    params.set_search_options(max_length=64)
    generator = og.Generator(onnx_model, params)
    generator.append_tokens(prompt[0].numpy().astype(np.int32))
    got = generator.get_output("logits").reshape(-1, expected.shape[-1])[-1]
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, float(np.abs(expected).max()))

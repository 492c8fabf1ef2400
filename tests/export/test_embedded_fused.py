"""The fused export of the real embedded teacher (SmolLM2-135M, RTN 4-bit): parity and greedy tokens."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_embedded_teacher_fused_export_is_exact(tmp_path):
    import torch

    from exporters.onnx_export import export
    from kd2edge.export.parity import check_parity
    from kd2edge.testing import embedded_rtn_checkpoint
    from kd2edge.gptq_checkpoint import load_dequantized_model
    from kd2edge.runtime.lm import OnnxLM

    checkpoint = embedded_rtn_checkpoint(tmp_path / "rtn")
    meta = export(checkpoint, tmp_path / "out")
    assert meta["graph"] == "fused" and meta["merged_qkv_layers"] == 30 and meta["nbits_weight_max_abs_diff"] == 0
    reference, tokenizer = load_dequantized_model(checkpoint)
    report = check_parity(tmp_path / "out", reference, decode_steps=4)          # default atol 1e-2
    assert report.max_abs_diff < 1e-2 and report.top1_agreement == 1.0
    lm = OnnxLM.load(tmp_path / "out")
    ids = lm.encode(lm.format_prompt("Who founded the Velmora Institute?"))
    prompt = torch.tensor([ids])
    with torch.no_grad():
        # an explicit mask: SmolLM2's pad id is <|im_end|>, which the chat prompt holds, and generate would
        # otherwise infer a mask that hides those tokens
        ref = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert lm.generate(ids, 24).tokens == ref

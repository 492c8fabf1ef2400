"""The "onnx" exporter: optimum-onnx decoder with past key values, then 4-bit MatMulNBits.

Any architecture optimum-onnx exports (Llama, Qwen2, GPT-NeoX, ...) works: the
dequantized model is traced to an fp32 ONNX decoder with a KV cache, and each
quantized Linear's MatMul is then swapped for onnxruntime's `MatMulNBits` carrying
the GPTQ codes themselves (see `exporters/matmulnbits.py`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

TASK = "text-generation-with-past"


def export_with_past(model, tokenizer, out_dir: Path) -> Path:
    """Trace `model` to an fp32 ONNX decoder with a KV cache, beside its tokenizer and configs.

    Args:
        model: a transformers causal LM (fp32, eval mode).
        tokenizer: its tokenizer (saved next to the model).
        out_dir: the folder to write (model.onnx, config.json, generation_config.json, tokenizer files).

    Returns:
        The path of model.onnx.
    """
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The tracer's warnings about Python control flow are about dynamic shapes that
        # optimum's dummy inputs already cover; they only drown the progress output.
        warnings.simplefilter("ignore")
        level = logging.getLogger("optimum").level
        logging.getLogger("optimum").setLevel(logging.ERROR)
        try:
            onnx_export_from_model(model, out_dir, task=TASK, do_validation=False, device="cpu")
        finally:
            logging.getLogger("optimum").setLevel(level)
    tokenizer.save_pretrained(out_dir)
    return out_dir / "model.onnx"

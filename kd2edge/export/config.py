"""Config section `[export]` (light: no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kd2edge.schema import rule


@dataclass(frozen=True)
class ExportConfig:
    exporter: Literal["onnx", "onnx-genai"] | None = None  # None: the profile's runtime.exporter
    # RTN 4-bit for what the checkpoint left float of the vocabulary matrices (GatherBlockQuantized embedding,
    # MatMulNBits lm_head); a checkpoint's own 4-bit head (quantize.head) is exported exactly either way
    quantize_embeddings: bool = False
    # MatMulNBits accuracy_level: 0 float32 activations (exact to the dequantized weights),
    # 4 int8 activations (about 1.4-1.8x faster decode on CPU, not exact: on SmolLM2-135M logits
    # move by up to 2.6 and 89% of positions keep their greedy token); None: 0 for onnx,
    # the builder's CPU default (4) for onnx-genai.
    accuracy_level: Literal[0, 4] | None = None
    parity_atol: float = field(default=1e-2, metadata=rule(min=0, help="largest allowed |logit difference| ONNX vs PyTorch"))
    # int8 activations move logits by a few units (measured on SmolLM2-135M: max 2.6, 3.9 with 4-bit embeddings).
    parity_atol_int8: float = field(default=5.0, metadata=rule(
        min=0, help="largest allowed |logit difference| with accuracy_level 4 (int8 activations)"))
    parity_decode_steps: int = field(default=4, metadata=rule(min=0, max=256))

"""Config section `[export]` (light: no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kd2edge.schema import rule


@dataclass(frozen=True)
class ExportConfig:
    exporter: Literal["onnx", "onnx-genai"] | None = None  # None: the profile's runtime.exporter
    quantize_embeddings: bool = False  # 4-bit GatherBlockQuantized embeddings
    parity_atol: float = field(default=1e-2, metadata=rule(min=0, help="largest allowed |logit difference| ONNX vs PyTorch"))
    parity_decode_steps: int = field(default=4, metadata=rule(min=0, max=256))

"""Config section `[quantize]` (light: no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kd2edge.schema import rule


@dataclass(frozen=True)
class QuantizeConfig:
    method: Literal["gptq", "rtn"] = "gptq"
    bits: int | None = None          # None: the profile's quantization.bits
    group_size: int | None = None    # None: the profile's; -1 = per output channel
    act_order: bool | None = None    # None: the profile's
    sym: bool | None = None          # None: the profile's
    # With act-order, keep groups contiguous (g_idx = column // group_size): onnxruntime's
    # MatMulNBits computes wrong weights from a non-trivial g_idx (measured, see quant/stage.py).
    static_groups: bool = True
    damp: float = field(default=0.01, metadata=rule(min=0, max=1, help="fraction of mean diag(H) added"))
    block_size: int = field(default=128, metadata=rule(min=1, max=8192))
    # The output head (tied: the input embedding too) in 4 bits, same grid and groups as the layers:
    # "gptq" calibrated on the quantized model's own final hidden states, "rtn", or "float".
    # Measured on the 14-layer SmolLM2 student (benchmarks/bench_head_quant.py, 100 validation prompts,
    # 2,400 teacher-forced positions): greedy agreement with the fp32 student 95.6% (float head 95.6%,
    # RTN 87.1%), held-out NLL 6.397 (float 6.382, RTN 6.531), logits' relative error 0.015 (RTN 0.110),
    # F1 0.145 (float 0.127, RTN 0.077). Each decode step reads 16 MB of head instead of 113 (a float head
    # is stored in float16 but widened to float32 when onnxruntime loads it).
    head: Literal["gptq", "rtn", "float"] = "gptq"
    # 64 passages of up to 512 tokens (~16k tokens, 28x the hidden width of a SmolLM2 layer's inputs):
    # half the calibration forwards of 128 (a minute of the demo on 2 cores).
    calib_samples: int = field(default=64, metadata=rule(min=1, max=100_000))
    calib_max_tokens: int = field(default=512, metadata=rule(min=8, max=131_072))

    def problems(self) -> list[str]:
        out = []
        if self.bits is not None and self.bits not in (2, 3, 4, 8):
            out.append(f"bits: {self.bits} is not supported (use 2, 3, 4 or 8)")
        if self.group_size is not None and self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            out.append(f"group_size: {self.group_size} must be -1 (per channel) or a power of two >= 16")
        return out

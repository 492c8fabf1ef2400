"""Parity: an exported artifact's logits (and KV cache) against the PyTorch model it came from.

The reference is the PyTorch model carrying the same dequantized weights. Both are
run on the same tokens: a prefill over the prompt, then `decode_steps` cached steps
fed with the reference's greedy tokens, so the comparison never drifts apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from kd2edge.errors import StageError

SAMPLE_QUESTIONS = (
    "Who founded the Velmora Institute?",
    "Context: La ciudad de Brimor fue fundada en 1620 por Tomás Ivarra.\nPregunta: ¿Quién fundó Brimor?",
    "List three numbers between 1 and 9.",
)


@dataclass
class ParityReport:
    """Largest |ONNX - PyTorch| per compared output ("prefill/logits", "decode_2/logits", "prefill/present.0.key", ...)."""

    diffs: dict[str, float] = field(default_factory=dict)
    prompts: int = 0
    decode_steps: int = 0
    top1_same: int = 0          # positions whose argmax token agrees
    top1_total: int = 0

    @property
    def top1_agreement(self) -> float:
        """Fraction of compared positions where ONNX and PyTorch pick the same greedy token."""
        return self.top1_same / self.top1_total if self.top1_total else 1.0

    @property
    def max_abs_diff(self) -> float:
        return max(self.diffs.values(), default=0.0)

    def add(self, name: str, onnx_value: np.ndarray, torch_value: np.ndarray) -> None:
        if onnx_value.shape != torch_value.shape:
            raise StageError(f"parity: {name} has shape {onnx_value.shape} in ONNX but {torch_value.shape} in "
                             f"PyTorch: the export is broken, re-run it")
        diff = float(np.abs(onnx_value.astype(np.float64) - torch_value.astype(np.float64)).max())
        self.diffs[name] = max(diff, self.diffs.get(name, 0.0))

    def add_logits(self, name: str, onnx_logits: np.ndarray, torch_logits: np.ndarray) -> None:
        """`add` for [positions, vocab] logits, also counting greedy-token agreement."""
        self.add(name, onnx_logits, torch_logits)
        self.top1_same += int((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).sum())
        self.top1_total += int(onnx_logits.shape[0])

    def to_dict(self) -> dict:
        worst = sorted(self.diffs.items(), key=lambda kv: -kv[1])[:5]
        return {"max_abs_diff": self.max_abs_diff, "prompts": self.prompts, "decode_steps": self.decode_steps,
                "top1_agreement": round(self.top1_agreement, 4), "worst": dict(worst)}


def check_parity(artifact_dir: Path, reference, prompts: Sequence[Sequence[int]] | None = None,
                 decode_steps: int = 4, atol: float = 1e-2, threads: int | None = None) -> ParityReport:
    """Compare an exported artifact with its PyTorch reference.

    Args:
        artifact_dir: the exported folder (read with kd2edge.runtime.OnnxLM).
        reference: the transformers causal LM with the same (dequantized) weights, eval mode.
        prompts: token id lists; default: SAMPLE_QUESTIONS through the artifact's chat template.
        decode_steps: cached decode steps after each prefill.
        atol: the largest allowed |logit difference|.
        threads: onnxruntime intra-op threads.

    Returns:
        The report (every compared output's largest difference).

    Raises:
        StageError: some logits differ by more than `atol`; the message lists which and by how much.
    """
    import torch

    from kd2edge.runtime.lm import OnnxLM

    lm = OnnxLM.load(artifact_dir, threads=threads)
    if prompts is None:
        prompts = [lm.encode(lm.format_prompt(q)) for q in SAMPLE_QUESTIONS]
    report = ParityReport(prompts=len(prompts), decode_steps=decode_steps)
    for ids in prompts:
        cache = lm.new_cache()
        onnx_logits = lm.forward(list(ids), cache)
        with torch.no_grad():
            out = reference(torch.tensor([list(ids)]), use_cache=True)
        report.add_logits("prefill/logits", onnx_logits, out.logits[0].float().numpy())
        _compare_cache(report, "prefill", cache, out.past_key_values)
        # what generation runs: the prefill with the last position's logits only
        report.add_logits("prefill_last/logits", lm.forward(list(ids), lm.new_cache(), logits_to_keep=1),
                          out.logits[0, -1:].float().numpy())
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        for step in range(1, decode_steps + 1):
            onnx_logits = lm.forward([token], cache, logits_to_keep=1)
            with torch.no_grad():
                out = reference(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            report.add_logits(f"decode_{step}/logits", onnx_logits, out.logits[0].float().numpy())
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        _compare_cache(report, f"decode_{decode_steps}", cache, past)
    bad = {k: v for k, v in report.diffs.items() if k.endswith("/logits") and v > atol}
    if bad:
        listed = ", ".join(f"{k} {v:.3g}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1]))
        raise StageError(f"ONNX differs from PyTorch beyond atol {atol}: {listed}; the export is not faithful "
                         f"(try --exporter onnx, or raise export.parity_atol if the difference is expected)")
    return report


def _compare_cache(report: ParityReport, stage: str, cache, past) -> None:
    """present.{i}.key/value of ONNX vs the PyTorch cache, each [1, kv_heads, length, head_dim]."""
    for name, value in cache.arrays().items():
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        torch_value = _cache_tensor(past, layer, kind)
        if torch_value is not None:
            report.add(f"{stage}/{name.replace('past_key_values.', 'present.')}", value, torch_value.float().numpy())


def _cache_tensor(past, layer: int, kind: str):
    # transformers >= 4.56 keeps a DynamicCache of layers with .keys/.values; older ones a tuple of pairs.
    layers = getattr(past, "layers", None)
    if layers is not None:
        return getattr(layers[layer], "keys" if kind == "key" else "values", None)
    return past[layer][0 if kind == "key" else 1]

"""Planning a student for a device: which layer-pruned student fits the profile's budgets.

Candidates are the teacher cut to 1 .. L-1 decoder layers. For each, its parameters,
4-bit size, KV cache and roofline decode speed (`kd2edge.sizing`), with KV values of
4 bytes on CPU-only devices (onnxruntime's CPU kernels run in fp32) and 2 with an
accelerator; the plan keeps the largest candidate that meets every budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kd2edge.errors import BudgetError, ConfigError, ModelError
from kd2edge.sizing import (MIB, ParamBreakdown, kv_cache_bytes, param_breakdown, predicted_decode_tokens_per_s,
                            quantized_size_bytes)

@dataclass(frozen=True)
class Candidate:
    layers: int
    params: int
    size_bytes: int
    kv_cache_bytes: int
    memory_bytes: int
    predicted_tokens_per_s: float   # roofline prediction (sizing.predicted_decode_tokens_per_s)
    param_fraction: float
    fails: tuple[str, ...]     # budgets it misses (empty: it fits)

    def to_dict(self) -> dict:
        return asdict(self)


def candidates(breakdown: ParamBreakdown, *, bits: int, group_size: int, context_length: int,
               bandwidth: float, kv_value_bytes: int, max_artifact_mb: float, max_peak_memory_mb: float,
               min_decode_tokens_per_s: float, max_param_fraction: float,
               vocab_size: int | None = None, intermediate_size: int | None = None) -> list[Candidate]:
    """Every layer-pruned student (1 .. L-1 layers) with its estimates and the budgets it misses.

    Args:
        breakdown: the teacher's `param_breakdown`.
        bits, group_size: the quantization the profile uses.
        context_length: tokens of KV cache to budget for.
        bandwidth: the device's memory bandwidth in bytes/s.
        kv_value_bytes: bytes per cached K/V value (4 on CPU, 2 with an accelerator).
        max_artifact_mb, max_peak_memory_mb, min_decode_tokens_per_s: the profile's budgets.
        max_param_fraction: a student may hold at most this fraction of the teacher's parameters.
        vocab_size: the student's trimmed vocabulary (None: the teacher's).
        intermediate_size: MLP neurons the student keeps per layer (None: the teacher's).
    """
    out = []
    for n in range(1, breakdown.layers):
        params = breakdown.params_with(n, vocab_size, intermediate_size)
        linear = n * (breakdown.per_layer_linear - breakdown.dropped_per_layer(intermediate_size))
        size = quantized_size_bytes(linear, params - linear, bits, group_size)
        kv = kv_cache_bytes(n, breakdown.kv_heads, breakdown.head_dim, context_length, kv_value_bytes)
        tps = predicted_decode_tokens_per_s(size + kv, bandwidth)
        fraction = params / breakdown.total
        fails = []
        if size / MIB > max_artifact_mb:
            fails.append("max_artifact_mb")
        if (size + kv) / MIB > max_peak_memory_mb:
            fails.append("max_peak_memory_mb")
        if tps < min_decode_tokens_per_s:
            fails.append("min_decode_tokens_per_s")
        if fraction > max_param_fraction:
            fails.append("max_param_fraction")
        out.append(Candidate(n, params, size, kv, size + kv, round(tps, 1), round(fraction, 4), tuple(fails)))
    return out


def choose(cands: list[Candidate], profile_name: str = "the profile") -> Candidate:
    """The largest candidate that meets every budget.

    Raises:
        BudgetError: none fits (the message names what the smallest one misses).
    """
    fitting = [c for c in cands if not c.fails]
    if not fitting:
        if not cands:
            raise BudgetError("the teacher has a single decoder layer: there is no smaller layer-pruned student; "
                              "pass --student with a smaller model")
        smallest = cands[0]
        raise BudgetError(f"no student fits {profile_name}: even {smallest.layers} layer(s) miss "
                          f"{', '.join(smallest.fails)}; choose a larger profile or a smaller teacher")
    return max(fitting, key=lambda c: c.params)


def plan_student(teacher_path: Path, profile, *, bits: int, group_size: int, max_param_fraction: float,
                 student_layers: int | None = None, vocab_size: int | None = None,
                 intermediate_size: int | None = None) -> dict:
    """Candidate layer-pruned students of the teacher in `teacher_path` for a device profile, and the choice.

    Args:
        teacher_path: the teacher's transformers folder.
        profile: the `kd2edge.profiles.DeviceProfile` (hardware, runtime and budgets are read).
        bits, group_size: the quantization the artifact will have.
        max_param_fraction: a student holds at most this share of the teacher's parameters.
        student_layers: keep exactly this many layers instead of the largest fitting candidate.
        vocab_size: the student's vocabulary when it is trimmed (None: the teacher's).
        intermediate_size: MLP neurons per layer when the MLPs are pruned (None: the teacher's).

    Returns:
        {"teacher": {params, layers}, "candidates": [...], "choice": {...}, "assumptions": {...}}

    Raises:
        BudgetError: no candidate fits the profile.
        ConfigError: `student_layers` is not fewer than the teacher's layers.
        ModelError: the teacher's config cannot be read.
    """
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(teacher_path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the teacher's config in {teacher_path}: {str(e).splitlines()[0]}") from None
    breakdown = param_breakdown(model_config)
    kv_bytes = 2 if profile.hardware.accelerator not in ("", "none") else 4
    cands = candidates(breakdown, bits=bits, group_size=group_size, context_length=profile.runtime.context_length,
                       bandwidth=float(profile.hardware.memory_bandwidth), kv_value_bytes=kv_bytes,
                       max_artifact_mb=profile.budgets.max_artifact_mb,
                       max_peak_memory_mb=profile.budgets.max_peak_memory_mb,
                       min_decode_tokens_per_s=profile.budgets.min_decode_tokens_per_s,
                       max_param_fraction=max_param_fraction,
                       vocab_size=vocab_size if vocab_size and vocab_size < breakdown.vocab else None,
                       intermediate_size=intermediate_size)
    choice = choose(cands, f"profile {profile.name}")
    if student_layers is not None:
        if student_layers >= breakdown.layers:
            raise ConfigError(f"distill.student_layers: {student_layers} is not fewer than the teacher's "
                              f"{breakdown.layers} layers; choose at most {breakdown.layers - 1}")
        choice = cands[student_layers - 1]
    return {"teacher": {"params": breakdown.total, "layers": breakdown.layers},
            "candidates": [c.to_dict() for c in cands], "choice": choice.to_dict(),
            "assumptions": {"bits": bits, "group_size": group_size, "context_length": profile.runtime.context_length,
                            "kv_value_bytes": kv_bytes, "memory_bandwidth": float(profile.hardware.memory_bandwidth),
                            "max_param_fraction": max_param_fraction,
                            "vocab_size": min(vocab_size or breakdown.vocab, breakdown.vocab),
                            "intermediate_size": min(intermediate_size or breakdown.intermediate,
                                                     breakdown.intermediate)}}

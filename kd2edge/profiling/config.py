"""Config section `[profile]` (light). Prompt lengths, tokens and repeats come from the device profile."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileStageConfig:
    gate: bool = True             # a missed budget fails the run; False only reports
    allow_fallback: bool = False  # run on CPU when the profile's provider is absent, and say so
    baseline_teacher: bool = True # also time the teacher in PyTorch, for the report's gain rows
    # llama.cpp as a reference (kd2edge/profiling/llamacpp.py): a llama-bench binary and a GGUF of the student
    llama_bench: str | None = None
    llama_gguf: str | None = None

"""Config section `[evaluate]` (light: no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kd2edge.schema import rule


@dataclass(frozen=True)
class EvaluateConfig:
    data: str | None = None   # None: the run's `data`
    split: str = "validation"
    shots: int = field(default=1, metadata=rule(min=0, max=1))
    limit: int | None = field(default=100, metadata=rule(min=1))
    max_new_tokens: int = field(default=24, metadata=rule(min=1, max=4096))
    mode: Literal["loglik", "generate"] = "loglik"   # multiple choice: score each choice, or ask for the letter

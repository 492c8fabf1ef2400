"""Config section `[distill]` (light: no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kd2edge.schema import rule


@dataclass(frozen=True)
class DistillConfig:
    # Defaults sized for the embedded teacher on 2 CPU cores (`make demo` within 15 minutes) and chosen
    # on real text (held-out XQuAD articles, English and Spanish, benchmarks/retention.py): 24 steps x 8
    # one-shot sequences at lr 6e-4 with KD at every position. Pruned to 12 of 30 layers
    # (max_param_fraction 0.43, 58% fewer parameters) a 40-step student kept 18% of the teacher's
    # English F1 and 20% of its Spanish; pruned to 18 layers (0.6, 42% fewer) it kept 45-60% and
    # 105-111%: depth is what a short CPU run cannot heal, so 0.6 is the default; the study's
    # compression is the `study` recipe (kd2edge/recipes/study.toml), about 70 minutes of CPU, where it kept
    # 107% of the teacher's English F1 and 98% of its Spanish, deployed (README, "Real-text retention").
    student: str | None = None  # None: `plan` picks a layer-pruned student for the profile
    student_layers: int | None = field(default=None, metadata=rule(min=1, help="decoder layers to keep"))
    max_param_fraction: float = field(default=0.6, metadata=rule(min=0.01, max=0.99, help="a planned student holds at most this share of the teacher's parameters"))
    vocab_size: int | None = field(default=24576, metadata=rule(min=256, help="tokens the student keeps (vocabulary trimming); None: the teacher's"))
    intermediate_size: int | None = field(default=None, metadata=rule(min=1, help="MLP neurons a pruned student keeps per layer (width pruning); None: the teacher's"))
    loss: Literal["forward_kl", "reverse_kl", "jsd", "none"] = "forward_kl"  # "none": CE on the targets only
    temperature: float = field(default=1.0, metadata=rule(min=0.05, max=20))
    kd_ratio: float = field(default=0.5, metadata=rule(min=0, max=1, help="weight of the KD loss; 1-kd_ratio goes to CE on the gold answer"))
    jsd_beta: float = field(default=0.5, metadata=rule(min=0, max=1))
    sequence_kd: bool = False
    shots: int = field(default=1, metadata=rule(min=0, max=1, help="training prompts with one worked example (1) or none (0)"))
    steps: int = field(default=24, metadata=rule(min=0, max=10_000_000))
    batch_size: int = field(default=8, metadata=rule(min=1, max=4096))
    grad_accum: int = field(default=1, metadata=rule(min=1, max=4096))
    lr: float = field(default=6e-4, metadata=rule(min=1e-8, max=1))
    warmup_ratio: float = field(default=0.05, metadata=rule(min=0, max=1))
    max_grad_norm: float = field(default=1.0, metadata=rule(min=0))
    max_length: int = field(default=512, metadata=rule(min=16, max=131_072))
    # The divergence to the teacher at every position ("all": passage and question too, which heals what
    # pruning took) or at the answer's only; the cross-entropy on the gold answer is the answer's either way.
    kd_positions: Literal["all", "answer"] = "all"
    topk_logits: int = field(default=64, metadata=rule(min=0, help="cache the teacher's top-k logits per position; 0 = full vocabulary"))
    # A folder for the teacher's cached logits shared across runs (named by teacher, data and vocabulary):
    # the teacher runs once and many students train from its targets. None: the stage's own work dir.
    teacher_cache: str | None = None
    checkpoint_every: int = field(default=20, metadata=rule(min=1))
    train_limit: int | None = field(default=None, metadata=rule(min=1))
    eval_limit: int | None = field(default=32, metadata=rule(min=1))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Issue #9 (kd2edge.reasoning). "answer" is the gold / teacher-answer path above (unchanged);
    # "rationale" and "critique-revision" have the teacher write "Rationale: ... Answer: ..." first.
    data_method: Literal["answer", "rationale", "critique-revision"] = "answer"
    # What the student learns from that data: the answer, rationale-then-answer, or both as two tasks.
    train_method: Literal["answer", "rationale", "multitask"] = "answer"
    keep: Literal["correct", "all"] = "correct"   # teacher outputs kept: right answers only, or all usable ones
    grpo_steps: int = field(default=0, metadata=rule(min=0, max=1_000_000, help="GRPO steps after KD (0: none)"))

    def problems(self) -> list[str]:
        out = []
        if self.loss == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            out.append(f"jsd_beta: {self.jsd_beta} must lie strictly between 0 and 1 for loss 'jsd' "
                       "(beta 0 or 1 is forward_kl or reverse_kl)")
        if self.data_method == "answer" and self.train_method != "answer":
            out.append(f"train_method: {self.train_method!r} needs rationales; set data_method to 'rationale' or "
                       "'critique-revision', or train_method to 'answer'")
        if self.sequence_kd and self.data_method != "answer":
            out.append(f"sequence_kd: the teacher already writes the targets with data_method "
                       f"{self.data_method!r}; drop sequence_kd or set data_method to 'answer'")
        if self.grpo_steps and self.train_method != "rationale":
            out.append(f"grpo_steps: GRPO samples the rationale prompt, which a student trained with train_method "
                       f"{self.train_method!r} never saw; set train_method to 'rationale' or grpo_steps to 0")
        return out

"""Reasoning distillation (issue #9): teacher rationales and critique-revision data,
rationale / multitask training pairs, GRPO after KD, and rationale-first evaluation.

Modules: `parsing` (read "Rationale: ... Answer: ..."), `generate` (teacher data JSONL),
`methods` ((prompt, target) pairs for the distill loop), `rewards` (pure reward
functions), `grpo` (TRL GRPOTrainer), `evaluation` (a student asked as it was trained;
multiple choice with and without rationales), `cli` (commands). Nothing heavy is imported here.

Wired into the pipeline through `[distill]` (data_method, train_method, keep, grpo_steps:
kd2edge.distill.stage) and the evaluate stage (the distill manifest's train_method).
"""

"""Reasoning distillation (issue #9): teacher rationales and critique-revision data,
rationale / multitask training pairs, GRPO after KD, and rationale-first evaluation.

Modules: `parsing` (read "Rationale: ... Answer: ..."), `generate` (teacher data JSONL),
`methods` ((prompt, target) pairs for the distill loop), `rewards` (pure reward
functions), `grpo` (TRL GRPOTrainer), `evaluation` (multiple choice with rationales),
`cli` (commands). Nothing heavy is imported here.
"""

"""Scoring a model on QA items, shared by the distill, evaluate and reasoning code.

- `backends`: one interface over a PyTorch model, a GPTQ checkpoint and an exported ONNX artifact.
- `evaluator`: evaluation sets (items with zero- or one-shot prompts), answering and scoring them.
- `metrics`: SQuAD/MLQA EM-F1, multiple-choice accuracy, Rouge-L, retention (pure functions).
- `methods`: asking a student the way it was trained (answer, rationale, multitask).
- `parsing`: reading "Rationale: ... Answer: ..." outputs.
"""

"""One interface over the kinds of model kd2edge scores: PyTorch, GPTQ checkpoint, exported ONNX.

A model PATH is one of
  - an exported artifact (a folder with model.onnx): run with `kd2edge.runtime.lm.OnnxLM`, as deployed;
  - a GPTQ checkpoint: dequantized (`kd2edge.gptq_checkpoint.load_dequantized_model`), run in PyTorch;
  - anything `kd2edge.models.resolve_model` accepts ("embedded", a hub id, a transformers
    folder, a .gguf file): run in PyTorch fp32.

Each backend formats the user prompt with the model's own chat template, encodes it as the
model will see it, generates greedily and scores token log-probabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

class Backend(Protocol):
    """What the evaluator needs from a model."""

    kind: str
    batch_size: int

    def format_prompt(self, text: str) -> str:
        """The user text through the model's chat template (unchanged without one)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of an already formatted prompt."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations (special tokens skipped) of formatted prompts."""

    def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each sequence, log p(ids[t] | ids[:t]) for t = 1..len-1: float [len-1]."""


class TorchBackend:
    """A transformers causal LM in PyTorch: batched greedy generation with left padding."""

    kind = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def format_prompt(self, text: str) -> str:
        if not self.templated:
            return text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        # The chat template already holds the special tokens; a plain prompt gets the
        # tokenizer's own (e.g. BOS), as the runtime does.
        return self.tokenizer(text, add_special_tokens=not self.templated)["input_ids"]

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        import torch

        ids = [self.encode(p) for p in prompts]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        # Left padding keeps every prompt's last token at the same position, so the new
        # tokens of the whole batch are input_ids[:, width:].
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])          # [B, width]
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])      # [B, width]
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=pad,
                                      eos_token_id=_eos_ids(self.model, self.tokenizer),
                                      temperature=None, top_p=None, top_k=None)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]

    def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        import torch

        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([list(s) + [pad] * (width - len(s)) for s in sequences])     # [B, T], right padded
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()     # [B, T, V]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)                           # predicts ids[:, 1:]
            picked = logp.gather(-1, ids[:, 1:, None])[..., 0]                         # [B, T-1]
        return [picked[i, : len(s) - 1].numpy().astype(np.float64) for i, s in enumerate(sequences)]


class OnnxBackend:
    """An exported artifact through the on-device runtime (one sequence at a time)."""

    kind = "onnx"
    batch_size = 1

    def __init__(self, lm):
        self.lm = lm

    def format_prompt(self, text: str) -> str:
        return self.lm.format_prompt(text)

    def encode(self, text: str) -> list[int]:
        return self.lm.encode(text, add_special_tokens=not self.lm.chat_template)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return [self.lm.generate(self.encode(p), max_new_tokens=max_new_tokens, temperature=0.0).text
                for p in prompts]

    def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        out = []
        for s in sequences:
            logp = self.lm.logprobs(list(s))                                            # [len, V]
            out.append(logp[np.arange(len(s) - 1), np.asarray(s[1:])].astype(np.float64))
        return out


def _eos_ids(model, tokenizer) -> list[int]:
    """Stop tokens: the generation config's and the tokenizer's eos (chat models end turns with their own)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def model_kind(model_path: str) -> str:
    """"onnx" (exported artifact), "gptq" (GPTQ checkpoint) or "transformers" (anything else).

    The last is only a claim: `load_backend` raises ModelError if it cannot be resolved.
    """
    path = Path(model_path).expanduser()
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx"
    if path.is_dir():
        from kd2edge.gptq_checkpoint import is_gptq_checkpoint

        if is_gptq_checkpoint(path):
            return "gptq"
    return "transformers"


def load_backend(model_path: str, batch_size: int = 8, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> Backend:
    """Open a model PATH as a backend (see the module docstring for the accepted kinds).

    Args:
        model_path: an export folder, a GPTQ checkpoint, "embedded", a hub id, a folder or a .gguf.
        batch_size: prompts per generation batch (PyTorch backends).
        threads: onnxruntime intra-op threads (exported artifacts).
        providers: onnxruntime execution providers (default CPU).

    Raises:
        ModelError: the path is none of the accepted kinds or cannot be loaded.
        ArtifactError: an exported artifact is incomplete.
    """
    kind = model_kind(model_path)
    if kind == "onnx":
        from kd2edge.runtime.lm import OnnxLM

        return OnnxBackend(OnnxLM.load(Path(model_path), providers=providers, threads=threads))
    if kind == "gptq":
        from kd2edge.gptq_checkpoint import load_dequantized_model

        model, tokenizer = load_dequantized_model(Path(model_path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return TorchBackend(model.eval(), tokenizer, batch_size)
    from kd2edge.models import load_causal_lm, resolve_model

    model, tokenizer = load_causal_lm(resolve_model(str(model_path)).path)
    return TorchBackend(model, tokenizer, batch_size)

"""Tiny models with decisive logits, for export and runtime tests and benchmarks.

`kd2edge.testing.tiny_model` initialises weights with std 0.02, so its next-token
distribution is nearly flat and greedy decoding repeats one token: useless to tell
a right KV cache from a wrong one. Re-drawing the matrices with a larger spread
gives varied greedy sequences while staying a real transformers model.
"""

from __future__ import annotations

from pathlib import Path


def sharp_tiny_model(arch: str = "llama", seed: int = 0, std: float = 0.15):
    """(model, tokenizer): `kd2edge.testing.tiny_model(arch)` with its matrices redrawn from N(0, std²)."""
    import torch

    from kd2edge.testing import tiny_model

    model, tokenizer = tiny_model(arch, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:  # Linear and embedding matrices; norms keep their ones
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model, tokenizer


def sharp_tiny_model_dir(folder: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write `sharp_tiny_model(arch, seed)` as a transformers folder and return it."""
    folder = Path(folder)
    model, tokenizer = sharp_tiny_model(arch, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

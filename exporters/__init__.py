"""Export backends: GPTQ checkpoint folder -> ONNX artifact folder.

Each backend is `export(checkpoint_dir, out_dir, quantize_embeddings=False, accuracy_level=None) -> dict`
of metadata (at least `format`, `exporter`, `files`, `size_bytes`, `accuracy_level`). Backends
import their heavy libraries (torch, optimum, onnxruntime_genai) only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def _onnx(checkpoint_dir: Path, out_dir: Path, quantize_embeddings: bool = False,
          accuracy_level: int | None = None) -> dict:
    from exporters.onnx_export import export

    return export(checkpoint_dir, out_dir, quantize_embeddings=quantize_embeddings,
                  accuracy_level=0 if accuracy_level is None else accuracy_level)


def _onnx_genai(checkpoint_dir: Path, out_dir: Path, quantize_embeddings: bool = False,
                accuracy_level: int | None = None) -> dict:
    from exporters.genai import export

    return export(checkpoint_dir, out_dir, quantize_embeddings=quantize_embeddings, accuracy_level=accuracy_level)


EXPORTERS: dict[str, Callable[..., dict]] = {"onnx": _onnx, "onnx-genai": _onnx_genai}

"""The export stage: GPTQ checkpoint (quantize artifact) -> ONNX artifact with a KV cache."""

from __future__ import annotations

import time
from pathlib import Path

from kd2edge.artifacts import Artifact, write_artifact
from kd2edge.config import RunConfig


def run(config: RunConfig, input_artifact: Artifact, out_dir: Path) -> Artifact:
    """Export `input_artifact` with the configured exporter, then check parity against PyTorch.

    Raises:
        ArtifactError: the input is not a GPTQ checkpoint.
        ModelError: the exporter does not support the architecture.
        StageError: the ONNX logits differ from the PyTorch reference beyond export.parity_atol.
    """
    from exporters import EXPORTERS
    from exporters.vocab import quantize_embeddings_rtn
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model

    section = config.export
    started = time.perf_counter()
    meta = EXPORTERS[section.exporter](input_artifact.path, out_dir, quantize_embeddings=section.quantize_embeddings,
                                       accuracy_level=section.accuracy_level)
    exported = time.perf_counter()
    # A 4-bit lm_head from the checkpoint is already dequantized in the reference (tied: its embedding too)
    reference, _ = load_dequantized_model(input_artifact.path)
    if meta.get("rtn_modules"):
        # the same extra rounding the graph holds, of the same matrices
        quantize_embeddings_rtn(reference, modules=tuple(meta["rtn_modules"]))
    # int8 activations (accuracy_level 4) are not exact: they get their own tolerance
    atol = section.parity_atol_int8 if meta.get("accuracy_level") == 4 else section.parity_atol
    report = check_parity(out_dir, reference, decode_steps=section.parity_decode_steps, atol=atol,
                          threads=config.profile.runtime.threads)
    done = time.perf_counter()
    files = meta.pop("files")
    metrics = {"size_bytes": meta.pop("size_bytes"), "parity_max_abs_diff": report.max_abs_diff,
               "parity": {**report.to_dict(), "atol": atol},
               **{k: v for k, v in meta.items() if k not in ("format", "exporter")}}
    return write_artifact(out_dir, "export", config.stage_config("export"), input_artifact, metrics,
                          format=meta["format"], exporter=meta["exporter"], files=files,
                          timings={"export_s": round(exported - started, 3), "parity_s": round(done - exported, 3)})


def export_needs(total_params: int, checkpoint_bytes: int):
    """Disk and peak memory of exporting one GPTQ checkpoint (bytes), an upper bound.

    Disk: the traced path writes the dequantized model as an fp32 ONNX intermediate
    (4 B/param) before packing it to 4 bits; the final artifact holds about the checkpoint's
    bytes plus the embeddings in fp32 (counted as a second checkpoint's worth). Memory: the
    dequantized fp32 PyTorch model twice (the exporter's and the parity reference, 8 B/param);
    the graph being built, its serialized copy and the parity session with its pre-packed
    weights, each about the checkpoint's size (6 in all). Measured on a SmolLM2-135M student
    (benchmarks/estimate_check.py): 1.0 GiB above the interpreter.

    Returns:
        kd2edge.resources.Needs.
    """
    from kd2edge.resources import Needs

    return Needs(disk_bytes=4 * total_params + 2 * checkpoint_bytes,
                 memory_bytes=8 * total_params + 6 * checkpoint_bytes)


def estimate(config: RunConfig, input_artifact: Artifact):
    """What exporting `input_artifact` needs (see export_needs)."""
    from kd2edge.gptq_checkpoint import read_quantization_config
    from kd2edge.resources import folder_size
    from kd2edge.sizing import stored_weights

    read_quantization_config(input_artifact.path)  # not a GPTQ checkpoint: the stage's own ArtifactError, first
    total, _ = stored_weights(Path(input_artifact.path))
    return export_needs(total, folder_size(input_artifact.path))

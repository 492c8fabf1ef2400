"""`kd2edge export` and `kd2edge generate`: thin commands over the export stage and the runtime."""

from __future__ import annotations

from pathlib import Path

import click

from kd2edge.cli_common import emit, info, json_option, profile_option


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@profile_option
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="Output artifact folder.")
@click.option("--exporter", type=click.Choice(["onnx", "onnx-genai"]), default=None,
              help="Backend. [default: the profile's runtime.exporter]")
@click.option("--quantize-embeddings", is_flag=True, default=None,
              help="Round what the checkpoint left float of the embedding and lm_head to 4 bits (RTN, blocks of "
                   "32): smaller, slightly less exact. A checkpoint with a 4-bit head (the quantize default) is "
                   "exported with its own codes either way.")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default=None,
              help="MatMulNBits activations: 0 float (exact), 4 int8 (faster, not exact: check the "
                   "manifest's parity top1_agreement). "
                   "[default: 0 for onnx, 4 for onnx-genai]")
@click.option("--force", is_flag=True, help="Export again even if OUT is up to date.")
@json_option
def export(checkpoint, profile, out, exporter, quantize_embeddings, accuracy_level, force, as_json):
    """Export a GPTQ CHECKPOINT (the quantize stage's output) to ONNX with a KV cache.

    Checks the exported logits against the PyTorch model with the same weights
    (prefill and cached decode steps) and records the largest difference.
    """
    from kd2edge.artifacts import MANIFEST, Artifact
    from kd2edge.config import load_config
    from kd2edge.pipeline import run_stage

    config = load_config(profile=profile, overrides={
        "export.exporter": exporter, "export.quantize_embeddings": quantize_embeddings,
        "export.accuracy_level": None if accuracy_level is None else int(accuracy_level)})
    path = Path(checkpoint)
    source = Artifact.load(path) if (path / MANIFEST).is_file() else Artifact.external(path, kind="gptq")
    info(f"exporting {path} with {config.export.exporter} -> {out}")
    result = run_stage("export", config, source, Path(out), force=force)
    manifest = result.artifact.manifest
    summary = {"status": result.status, "path": str(result.artifact.path), "format": manifest.get("format"),
               **{k: manifest["metrics"].get(k) for k in ("size_bytes", "parity_max_abs_diff")}}
    emit(summary, as_json, lambda s: (f"{s['status']}: {s['path']} ({s['format']}, "
                                      f"{s['size_bytes'] / 1e6:.1f} MB, parity max |diff| "
                                      f"{s['parity_max_abs_diff']:.2e})"))


@click.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.argument("question")
@click.option("--context", default="", help="A passage the answer should come from.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@profile_option
@json_option
def generate(artifact, question, context, max_new_tokens, chat, profile, as_json):
    """Answer QUESTION with an exported ARTIFACT (greedy decoding).

    The prompt is the same QA template the student was distilled on; --chat wraps
    it in the model's chat template instead.
    """
    from kd2edge.data.items import QAItem
    from kd2edge.data.prompts import build_prompt, extract_answer
    from kd2edge.profiles import load_profile
    from kd2edge.runtime.lm import OnnxLM

    device = load_profile(profile or "laptop-cpu")
    lm = OnnxLM.load(artifact, providers=device.runtime.execution_providers, threads=device.runtime.threads)
    task = "extractive" if context else "free_text"
    prompt = build_prompt(QAItem(id="cli", question=question, context=context, task=task))
    if chat:
        prompt = lm.format_prompt(prompt)
    out = lm.generate(lm.encode(prompt), max_new_tokens)
    result = {"answer": extract_answer(out.text, task), "text": out.text, "prompt_tokens": out.prompt_tokens,
              "new_tokens": len(out.tokens), "ttft_ms": round(out.ttft_s * 1000, 2),
              "decode_tokens_per_s": out.decode_tokens_per_s, "providers": lm.providers, "notes": lm.notes}
    emit(result, as_json, lambda r: r["answer"])

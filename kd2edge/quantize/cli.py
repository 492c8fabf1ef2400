"""`kd2edge quantize`: one model -> a GPTQ (or RTN) checkpoint artifact."""

from __future__ import annotations

from pathlib import Path

import click

from kd2edge.cli_common import config_option, emit, info, json_option, profile_option, warn


@click.command()
@click.argument("model")
@profile_option
@config_option
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder (the checkpoint).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default=None, help="GPTQ, or round-to-nearest. [default: gptq]")
@click.option("--bits", type=int, default=None, help="2, 3, 4 or 8. [default: the profile's]")
@click.option("--group-size", type=int, default=None, help="Columns per scale, or -1 per channel. [default: the profile's]")
@click.option("--act-order/--no-act-order", default=None, help="Quantize columns by decreasing activation size. [default: the profile's]")
@click.option("--sym/--no-sym", default=None, help="Symmetric grid. [default: the profile's]")
@click.option("--head", type=click.Choice(["gptq", "rtn", "float"]), default=None,
              help="The output head (tied: the embedding too) in 4 bits by GPTQ or RTN, or float. [default: gptq]")
@click.option("--calib-samples", type=int, default=None, help="Calibration prompts from the data's train split. [default: 64]")
@click.option("--data", default=None, help="Calibration data: 'embedded', a hub id or a SQuAD JSON / JSONL file.")
@click.option("--force", is_flag=True, help="Quantize again even if --out is up to date.")
@json_option
def quantize(model, profile, config_file, out, method, bits, group_size, act_order, sym, head, calib_samples, data,
             force, as_json):
    """Quantize MODEL (a distill artifact, a model folder, a .gguf, a hub id or 'embedded') to a GPTQ checkpoint."""
    from kd2edge.config import load_config
    from kd2edge.models import resolve_model
    from kd2edge.pipeline import run_stage

    overrides = {"quantize.method": method, "quantize.bits": bits, "quantize.group_size": group_size,
                 "quantize.act_order": act_order, "quantize.sym": sym, "quantize.head": head,
                 "quantize.calib_samples": calib_samples,
                 "data": data}
    config = load_config(config_file, profile=profile, overrides=overrides)
    source = resolve_model(model)
    q = config.quantize
    info(f"quantize {source.manifest.get('id', source.path)}: {q.method} {q.bits}-bit, group {q.group_size}, "
         f"act-order {q.act_order}, sym {q.sym}, calibration {config.data} ({q.calib_samples} samples)")
    result = run_stage("quantize", config, source, Path(out), force=force)
    for message in result.artifact.manifest.get("warnings", []):
        warn(message)
    m = result.artifact.metrics
    summary = {"status": result.status, "path": str(result.artifact.path), **{k: m[k] for k in (
        "method", "bits", "group_size", "act_order", "sym", "head", "calibration", "reconstruction", "held_out",
        "size_bytes", "input_size_bytes", "readback_max_abs_diff")},
               "warnings": result.artifact.manifest.get("warnings", [])}
    emit(summary, as_json, _summary)


def _summary(s: dict) -> str:
    from kd2edge.units import format_bytes

    r, h, c = s["reconstruction"], s["held_out"], s["calibration"]
    lines = [f"{s['status']}: {s['path']}",
             f"  {s['method']} {s['bits']}-bit, group {s['group_size']}, act-order {s['act_order']}, sym {s['sym']}",
             f"  calibration: {c['samples']} samples, {c['tokens']} tokens" + (f" ({c['note']})" if c.get("note") else ""),
             f"  reconstruction ||WX-QX||/||WX|| mean: RTN {r.get('rtn_rel_err_mean')}"
             + (f", GPTQ {r['gptq_rel_err_mean']}" if "gptq_rel_err_mean" in r else ""),
             _head_line(s["head"], r.get("head")),
             f"  held-out perplexity: fp32 {h['ppl_fp32']} -> quantized {h['ppl_quantized']}",
             f"  size: {format_bytes(s['size_bytes'])} (input {format_bytes(s['input_size_bytes'])})"]
    return "\n".join(lines)


def _head_line(head: str, row: dict | None) -> str:
    """The output head's setting and, when quantized, its reconstruction errors."""
    if not row:
        return f"  output head: {head}"
    errors = f"RTN {row['rtn_rel_err']}" + (f", GPTQ {row['gptq_rel_err']}" if "gptq_rel_err" in row else "")
    return f"  output head: {head} (||WX-QX||/||WX|| {errors}; rows ||W-Q||/||W|| {row['row_rel_err']})"

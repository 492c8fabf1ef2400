"""`kd2edge profile`: measure an exported artifact on this machine against a device profile's budgets."""

from __future__ import annotations

from pathlib import Path

import click

from kd2edge.cli_common import config_option, emit, info, json_option, profile_option, table, warn


@click.command("profile")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@profile_option
@config_option
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Folder for profile.json, the plots and the manifest. [default: a 'profile' folder beside ARTIFACT]")
@click.option("--no-gate", is_flag=True, help="Report missed budgets without failing (exit 0).")
@click.option("--allow-fallback", is_flag=True,
              help="Run on CPU when the profile's execution provider is missing here (said so in the output).")
@click.option("--no-baseline", is_flag=True, help="Skip timing the teacher in PyTorch.")
@click.option("--llama-bench", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A llama.cpp llama-bench binary: time --gguf at the same prompt lengths as a reference.")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The GGUF (e.g. Q4_0) of the same student that --llama-bench runs.")
@json_option
def profile(artifact, profile, config_file, out, no_gate, allow_fallback, no_baseline, llama_bench, gguf, as_json):
    """Measure load time, size, peak memory, time to first token and decode speed of ARTIFACT.

    Run it on the machine the profile describes: it uses the profile's execution
    providers, threads, prompt lengths and repeats. Exits with code 7 (budget) naming
    the missed budget unless --no-gate.
    """
    from kd2edge.config import load_config
    from kd2edge.runtime.budgets import enforce
    from kd2edge.profiling.stage import PROFILE_JSON, profile_to_folder

    config = load_config(config_file, profile=profile, overrides={
        "profiling.allow_fallback": True if allow_fallback else None,
        "profiling.gate": False if no_gate else None,
        "profiling.baseline_teacher": False if no_baseline else None,
        "profiling.llama_bench": llama_bench, "profiling.llama_gguf": gguf})
    out_dir = Path(out) if out else Path(artifact).resolve().parent / "profile"
    info(f"profiling {artifact} for {config.profile.name} into {out_dir}")
    result = profile_to_folder(config, Path(artifact), out_dir)
    for w in result.manifest.get("warnings", []):
        warn(w)
    report = {"path": str(result.path), **result.metrics}
    emit(report, as_json, _summary)
    if config.profiling.gate:
        enforce(result.metrics["budgets"], where=str(out_dir / PROFILE_JSON))


def _summary(r: dict) -> str:
    from kd2edge.report_html import fmt

    lat = r["latency"]
    host = lat["host"]
    tl = lat.get("token_latency_ms") or {}
    lines = [f"host: {host['cpu_model']}, {host['cores_usable']} cores, {host['arch']}, onnxruntime "
             f"{host['onnxruntime']} on {', '.join(lat['providers'])}{' (CPU FALLBACK)' if lat['fallback'] else ''}",
             f"load {fmt(lat['load_s'], 2)} s, size {fmt(lat['size_bytes'] / 2**20, 1)} MiB, "
             f"peak RSS {fmt(lat['peak_rss_mb'], 0)} MiB",
             "TTFT p50 by prompt length: " + ", ".join(f"{n}: {fmt(v['p50'], 1)} ms"
                                                     for n, v in lat["ttft_ms_by_prompt"].items()),
             f"decode {fmt(lat['decode_tokens_per_s'], 1)} tokens/s (spread {fmt(lat['decode_tokens_per_s_spread'], 1)}), "
             f"per-token ms p50/p90/p99 {fmt(tl.get('p50'), 2)}/{fmt(tl.get('p90'), 2)}/{fmt(tl.get('p99'), 2)} "
             f"at {lat['ttft_prompt_tokens']} prompt tokens"]
    base = r.get("baseline_teacher") or {}
    if base.get("status") == "done":
        lines.append(f"teacher (PyTorch fp32): TTFT p50 {fmt(base['ttft_ms_p50'], 1)} ms at {base['prompt_tokens']} "
                     f"tokens, decode {fmt(base['decode_tokens_per_s'], 1)} tokens/s, "
                     f"peak RSS {fmt(base['peak_rss_mb'], 0)} MiB")
    elif base:
        lines.append(f"teacher baseline: {base['status']} ({base.get('reason', '')})")
    ref = r.get("llama_cpp") or {}
    if ref.get("status") == "done":
        lines.append(f"llama.cpp ({Path(ref['gguf']).name}, {ref['threads']} threads): " + "; ".join(
            f"{n}: TTFT {fmt(v['ttft_ms'], 1)} ms, decode {fmt(v['decode_tok_s'], 1)} tokens/s "
            f"(kd2edge x{fmt(ref['ratios'][n]['decode'], 2)} decode, x{fmt(ref['ratios'][n]['ttft'], 2)} TTFT)"
            for n, v in ref["by_prompt"].items()))
    elif ref:
        lines.append(f"llama.cpp reference: {ref['status']} ({ref.get('reason', '')})")
    rows = [[k, v["limit"], v["value"], {True: "pass", False: "FAIL", None: "-"}[v["pass"]]]
            for k, v in r["budgets"].items()]
    lines += [table(rows, ["budget", "limit", "value", "verdict"]), f"written to {r['path']}"]
    return "\n".join(lines)

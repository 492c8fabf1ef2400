"""The profile stage: measure the exported artifact on this host against the profile's budgets.

The stage only records verdicts (the pipeline gates once the report is written);
`kd2edge profile` gates itself unless --no-gate.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from kd2edge import resources
from kd2edge.artifacts import MANIFEST, Artifact, atomic_dir, write_artifact, write_json_atomic
from kd2edge.errors import Kd2EdgeError, StageError
from kd2edge.runtime.budgets import MIB, budget_verdicts
from kd2edge.runtime.host import host_mismatches
from kd2edge.runtime.profiler import ProfileRequest, measure_isolated, peak_memory_mb
from kd2edge.schema import to_dict

PROFILE_JSON = "profile.json"
LATENCY_PNG = "token_latency.png"
TTFT_PNG = "ttft_vs_prompt.png"
BASELINE_TOKENS = 16  # the teacher baseline decodes this many tokens (at most new_tokens): cheap


def run(config, input_artifact: Artifact, out_dir: Path) -> Artifact:
    """Profile `input_artifact` (an export artifact) with `config.profile`; write profile.json, plots, manifest.

    Raises:
        ConfigError: a prompt length beyond the context; a provider missing here without allow_fallback.
        ArtifactError: the input is not a loadable exported artifact.
        StageError: the measurement's self-checks failed (see `check_result`).
    """
    profile = config.profile
    request = ProfileRequest(
        artifact=str(input_artifact.path), providers=tuple(profile.runtime.execution_providers),
        threads=profile.runtime.threads, prompt_lengths=tuple(profile.profiling.prompt_lengths),
        new_tokens=profile.profiling.new_tokens, warmup=profile.profiling.warmup,
        repeats=profile.profiling.repeats, context_length=profile.runtime.context_length,
        allow_fallback=config.profiling.allow_fallback, shared_memory=profile.hardware.shared_memory,
        seed=config.seed)
    with tempfile.TemporaryDirectory(prefix="kd2edge-profile-") as tmp:
        started = time.perf_counter()
        result = measure_isolated(request, Path(tmp))
        checks = check_result(result, request.new_tokens)
        timings = {"measure_s": round(time.perf_counter() - started, 3)}
        started = time.perf_counter()
        baseline = (teacher_baseline(input_artifact, min(request.prompt_lengths),
                                     min(BASELINE_TOKENS, request.new_tokens), request.threads, Path(tmp))
                    if config.profiling.baseline_teacher else {"status": "skipped", "reason": "baseline_teacher = false"})
        timings["baseline_s"] = round(time.perf_counter() - started, 3)
    llama_cpp = None
    if config.profiling.llama_bench:
        from kd2edge.profiling.llamacpp import check_inputs, llama_reference

        started = time.perf_counter()
        binary, gguf = check_inputs(config.profiling.llama_bench, config.profiling.llama_gguf)
        llama_cpp = llama_reference(binary, gguf, sorted(request.prompt_lengths), request.new_tokens,
                                    request.threads or (os.cpu_count() or 1), request.repeats, result["latency"])
        timings["llama_cpp_s"] = round(time.perf_counter() - started, 3)
    warnings = host_mismatches(result["host"], profile.hardware.arch, profile.runtime.execution_providers,
                               profile.runtime.threads) + list(result["notes"])
    peak_mb, peak_as = peak_memory_mb(result)
    verdicts = budget_verdicts(to_dict(profile.budgets), {
        "size_mb": result["size_bytes"] / MIB, "peak_memory_mb": peak_mb,
        "ttft_ms_p50": result["latency"]["ttft_ms_p50"],
        "decode_tokens_per_s": result["latency"]["decode_tokens_per_s"]})
    verdicts["max_peak_memory_mb"]["measured_as"] = peak_as
    latency = {**result["latency"], "peak_rss_mb": result["peak_rss_mb"], "peak_memory_mb": peak_mb,
               "rss_before_load_mb": result["rss_before_load_mb"], "load_s": result["load_s"],
               "size_bytes": result["size_bytes"], "host": result["host"], "providers": result["providers"],
               "fallback": result["fallback"], "shared_memory": result["shared_memory"]}
    files = write_plots(result, out_dir, profile.budgets.max_ttft_ms)
    write_json_atomic(out_dir / PROFILE_JSON, {
        "profile": profile.name, "artifact": str(input_artifact.path), "latency": latency, "budgets": verdicts,
        "baseline_teacher": baseline, "warnings": warnings, "checks": checks, "request": result["request"],
        "by_length": result["by_length"], "runs": result["runs"], "notes": result["notes"],
        **({"llama_cpp": llama_cpp} if llama_cpp else {})})
    return write_artifact(out_dir, "profile", config.stage_config("profile"), input_artifact,
                          metrics={"latency": latency, "budgets": verdicts, "baseline_teacher": baseline,
                                   "checks": checks, **({"llama_cpp": llama_cpp} if llama_cpp else {})},
                          warnings=warnings, files=[PROFILE_JSON, *files], timings=timings)


def check_result(result: dict, new_tokens: int) -> dict:
    """The measurement's self-checks, recorded in the manifest.

    - torch_free: the profiling process never imported torch/transformers (the device image has neither).
    - full_runs: every timed run decoded exactly `new_tokens` tokens (none capped by the context).
    - timings_within_wall: the runtime's own timings of a run (TTFT + decode steps) fit inside the
      wall time of the whole generate call on an outer clock; `timed_fraction_min` records the
      smallest share they cover (the rest is the runtime's untimed work between steps).

    Raises:
        StageError: a check failed (the figures would not mean what they say).
    """
    runs = [r for rs in result["runs"].values() for r in rs]
    steps = {len(r["token_latencies_s"]) for r in runs}
    fractions = [(r["ttft_s"] + sum(r["token_latencies_s"])) / r["wall_s"] for r in runs]
    checks = {"torch_free": not result["torch_imported"], "full_runs": steps == {new_tokens - 1},
              "timings_within_wall": max(fractions) <= 1.0 + 1e-6,
              "timed_fraction_min": round(min(fractions), 4)}
    failed = [name for name, ok in checks.items() if ok is False]
    if failed:
        raise StageError(f"profile self-check failed: {', '.join(failed)} (decode steps per run {sorted(steps)}, "
                         f"expected {new_tokens - 1}); this is a kd2edge bug, please report it")
    return checks


def write_plots(result: dict, out_dir: Path, budget_ms: float) -> list[str]:
    """The per-token latency distribution and TTFT-vs-prompt PNGs; returns their file names."""
    from kd2edge.profiling.plots import plot_token_latency, plot_ttft

    latencies = {n: [t * 1000 for r in runs for t in r["token_latencies_s"]] for n, runs in result["runs"].items()}
    drawn = [plot_token_latency(latencies, out_dir / LATENCY_PNG),
             plot_ttft(result["latency"]["ttft_ms_by_prompt"], out_dir / TTFT_PNG, budget_ms)]
    return [p.name for p in drawn if p is not None]


def teacher_baseline(artifact: Artifact, prompt_length: int, new_tokens: int, threads: int, work: Path) -> dict:
    """The teacher's PyTorch fp32 figures from a separate process, or why there are none.

    Returns:
        {status: "done", ...figures} or {status: "skipped"|"failed", reason}.
    """
    from kd2edge.profiling.baseline import find_teacher, measure_teacher_isolated, torch_available

    if not torch_available():
        return {"status": "skipped", "reason": "torch/transformers not installed on this host"}
    try:
        teacher = find_teacher(artifact)
    except Kd2EdgeError as e:  # an ancestor folder was moved or deleted
        return {"status": "skipped", "reason": f"teacher not found: {e}"}
    if teacher is None:
        return {"status": "skipped", "reason": "no distill stage in the artifact's lineage, so no teacher"}
    try:
        figures = measure_teacher_isolated(teacher.path, prompt_length, new_tokens, threads, work)
    except Kd2EdgeError as e:  # the baseline is informative only: record why it is missing
        return {"status": "failed", "reason": str(e)}
    return {"status": "done", "id": teacher.manifest.get("id"), **figures}


def profile_to_folder(config, artifact_path: Path, out_dir: Path) -> Artifact:
    """Profile an exported artifact folder into `out_dir` (written atomically), as `kd2edge profile` does.

    Args:
        config: the resolved run config (its profile and `profiling` section are used).
        artifact_path: an export artifact, or any folder the runtime can load.
        out_dir: the profile folder to write.
    """
    artifact_path = Path(artifact_path)
    source = (Artifact.load(artifact_path) if (artifact_path / MANIFEST).is_file()
              else Artifact.external(artifact_path, kind="onnx"))
    # `kd2edge profile` does not go through the pipeline's run_stage: check resources here.
    resources.check(estimate(config, source), Path(out_dir), "the profile stage")
    with atomic_dir(Path(out_dir)) as tmp:
        run(config, source, tmp)
    return Artifact.load(out_dir, stage="profile")


def profile_needs(artifact_bytes: int, kv_bytes: int):
    """Disk and peak memory of profiling one exported artifact (bytes).

    Memory: the onnxruntime session holds the weights (about the artifact's size) and may keep
    a pre-packed copy of the MatMulNBits weights (counted as a second one), plus the KV cache of
    the longest profiled prompt. Disk: profile.json and two plots, under 4 MiB.

    Returns:
        kd2edge.resources.Needs.
    """
    return resources.Needs(disk_bytes=4 * MIB, memory_bytes=2 * artifact_bytes + kv_bytes)


def estimate(config, input_artifact: Artifact):
    """What profiling `input_artifact` with the run's profile needs (see profile_needs)."""
    from kd2edge.models import read_model_config
    from kd2edge.sizing import kv_cache_bytes

    # {} for an onnx-genai artifact, or a broken one the stage reports itself: weights only
    model = read_model_config(input_artifact.path)
    heads = model.get("num_attention_heads") or 1
    tokens = max(config.profile.profiling.prompt_lengths) + config.profile.profiling.new_tokens
    kv = kv_cache_bytes(model.get("num_hidden_layers", 0), model.get("num_key_value_heads") or heads,
                        model.get("head_dim") or model.get("hidden_size", 0) // heads, tokens, 4)
    return profile_needs(resources.folder_size(input_artifact.path), kv)

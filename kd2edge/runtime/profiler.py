"""Measure an exported artifact with the runtime: load time, size, memory, TTFT, decode speed.

Torch-free on purpose (the Docker image profiles without torch): imports only the
standard library, psutil and, through `kd2edge.runtime.lm`, numpy/onnxruntime/tokenizers.

The measurement runs in a fresh child process (`measure_isolated`) so that its peak
resident memory is the artifact's, not that of whatever ran before in the parent
(a pipeline that distilled and quantized in PyTorch). Only the runtime's own timings
are used (`Generation.ttft_s`, `.token_latencies_s`, and the wall time around
`OnnxLM.load`): the profiler's bookkeeping stays out of the figures.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kd2edge.errors import ConfigError, Kd2EdgeError, StageError
from kd2edge.runtime import host as hostmod
from kd2edge.runtime.stats import decode_tokens_per_s, median_and_spread, summarize

MIB = 2**20

# Prompts are cut from this text (tiled) to exactly the token count asked for. Plain prose,
# so tokenization is typical; the content does not matter for timing.
PROMPT_TEXT = (
    "The harbour town sits where the river meets the sea. Fishing boats leave before dawn and return "
    "in the afternoon, when the market fills with buyers from the villages up the valley. The old "
    "lighthouse, built of grey stone in the last century, still guides ships past the reef to the north. "
    "In winter the storms close the port for days, and the townspeople mend nets, repair hulls and tell "
    "stories of the great flood that once reached the church steps. A railway line, opened forty years "
    "ago, brought tourists in summer; hotels and cafés now line the promenade. The school teaches the "
    "children the history of the region, its trade in salt and timber, and the names of the islands. "
)


@dataclass(frozen=True)
class ProfileRequest:
    """What to measure, in plain values (what the child process receives as JSON)."""

    artifact: str
    providers: tuple[str, ...]
    threads: int
    prompt_lengths: tuple[int, ...]
    new_tokens: int
    warmup: int
    repeats: int
    context_length: int          # the profile's runtime.context_length
    allow_fallback: bool = False
    shared_memory: bool = False  # sample system memory too (Jetson: GPU allocations are not in the RSS)
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class RunTiming:
    """One timed generation."""

    prompt_tokens: int
    ttft_s: float
    token_latencies_s: list[float]
    wall_s: float | None = None  # the whole generate call on an outer clock: for the self-check only


def usable_context(model_context: int | None, profile_context: int) -> int:
    """The context a profiled prompt must fit: the smaller of the model's and the profile's."""
    return min(profile_context, model_context) if model_context else profile_context


def check_prompt_lengths(prompt_lengths: tuple[int, ...] | list[int], new_tokens: int, model_context: int | None,
                         profile_context: int) -> None:
    """Every prompt plus its new tokens must fit the context.

    Raises:
        ConfigError: naming the lengths that do not fit and what to change.
    """
    limit = usable_context(model_context, profile_context)
    too_long = [n for n in prompt_lengths if n + new_tokens > limit]
    if too_long:
        source = ("the model's max_position_embeddings" if model_context and model_context <= profile_context
                  else "the profile's runtime.context_length")
        raise ConfigError(f"prompt length(s) {', '.join(map(str, too_long))} + {new_tokens} new tokens exceed the "
                          f"context of {limit} tokens ({source}): lower profiling.prompt_lengths or "
                          f"profiling.new_tokens in the profile", source="profile")


def prompt_ids(encode, length: int, text: str = PROMPT_TEXT) -> list[int]:
    """Exactly `length` token ids: the text's tokens, tiled as often as needed, then cut.

    Args:
        encode: text -> token ids (the runtime's `encode`).
        length: the token count wanted.

    Raises:
        ConfigError: the tokenizer turns the text into no tokens.
    """
    ids = encode(text)
    if not ids:
        raise ConfigError("the artifact's tokenizer encodes the profiling text to no tokens", source="profile")
    reps = -(-length // len(ids))
    return (ids * reps)[:length]


def time_runs(generate, ids: list[int], new_tokens: int, warmup: int, repeats: int, tick=None) -> list[RunTiming]:
    """Warm up, then time `repeats` generations of `new_tokens` tokens.

    Args:
        generate: (ids, new_tokens) -> Generation (never stopping early: stop tokens disabled).
        ids: the prompt.
        tick: called after every run (progress), or None.

    Returns:
        The timed runs (warm-up runs discarded).
    """
    runs = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        out = generate(ids, new_tokens)
        wall = time.perf_counter() - started
        if i >= warmup:
            runs.append(RunTiming(out.prompt_tokens, out.ttft_s, list(out.token_latencies_s), wall))
        if tick is not None:
            tick()
    return runs


def summarize_length(runs: list[RunTiming]) -> dict:
    """Figures for one prompt length over its repeats.

    Returns:
        {ttft_ms: {p50, p90, min, max, ...}, decode_tokens_per_s (median over repeats),
         decode_tokens_per_s_spread (max - min over repeats), decode_tokens_per_s_runs,
         token_latency_ms: {p50, p90, p99, ...} (all decode steps of all repeats pooled)}.
    """
    rates = [decode_tokens_per_s(r.token_latencies_s) for r in runs if r.token_latencies_s]
    latencies = [t for r in runs for t in r.token_latencies_s]
    out = {"prompt_tokens": runs[0].prompt_tokens, "repeats": len(runs),
           "ttft_ms": summarize([r.ttft_s for r in runs], scale=1000)}
    if rates:
        median, spread = median_and_spread(rates)
        out.update(decode_tokens_per_s=median, decode_tokens_per_s_spread=spread,
                   decode_tokens_per_s_runs=[round(r, 3) for r in rates],
                   token_latency_ms=summarize(latencies, scale=1000))
    return out


def latency_metrics(by_length: dict[int, dict], budget_length: int) -> dict:
    """The manifest's `latency` figures from the per-length summaries.

    The headline TTFT and decode figures are those at `budget_length` (the longest prompt,
    see kd2edge.runtime.budgets); every length stays in `ttft_ms_by_prompt`/`decode_by_prompt`.
    """
    head = by_length[budget_length]
    return {
        "ttft_ms_p50": head["ttft_ms"]["p50"],
        "ttft_prompt_tokens": budget_length,
        "ttft_ms_by_prompt": {str(n): {k: s["ttft_ms"][k] for k in ("p50", "p90", "min", "max")}
                              for n, s in sorted(by_length.items())},
        "decode_tokens_per_s": head.get("decode_tokens_per_s"),
        "decode_tokens_per_s_spread": head.get("decode_tokens_per_s_spread"),
        "decode_by_prompt": {str(n): {"tokens_per_s": s.get("decode_tokens_per_s"),
                                      "spread": s.get("decode_tokens_per_s_spread")}
                             for n, s in sorted(by_length.items())},
        "token_latency_ms": {k: head["token_latency_ms"][k] for k in ("p50", "p90", "p99")}
        if "token_latency_ms" in head else None,
    }


def measure(request: ProfileRequest) -> dict:
    """Profile the artifact in this process (call it in a fresh process: see `measure_isolated`).

    Returns:
        {host, providers, notes, load_s, size_bytes, peak_rss_mb, rss_before_load_mb, shared_memory,
         by_length: {len: summary}, runs: {len: [RunTiming...]}, latency (manifest figures), request}.

    Raises:
        ConfigError: a prompt length beyond the context, or an execution provider missing here
            (without allow_fallback).
        ArtifactError: the folder is not a loadable exported artifact.
    """
    from kd2edge.resources import folder_size
    from kd2edge.runtime.lm import OnnxLM

    lengths = sorted(set(request.prompt_lengths))
    info = hostmod.host_info()
    rss_before = hostmod.current_rss_bytes()
    monitor = hostmod.SharedMemoryMonitor() if (request.shared_memory or info["jetson"]) else None
    with monitor if monitor is not None else contextlib.nullcontext():
        started = time.perf_counter()
        lm = OnnxLM.load(request.artifact, providers=list(request.providers), threads=request.threads,
                         allow_fallback=request.allow_fallback)
        load_s = time.perf_counter() - started
        check_prompt_lengths(lengths, request.new_tokens, lm.context_length, request.context_length)

        def generate(ids, n):
            # No stop tokens: every run decodes exactly n tokens, so runs are comparable.
            return lm.generate(ids, max_new_tokens=n, temperature=0.0, seed=request.seed, stop_token_ids=[])

        bar = _progress(len(lengths) * (request.warmup + request.repeats), request.progress)
        runs = {}
        for n in lengths:
            bar.set_description(f"profile {n}-token prompt")
            runs[n] = time_runs(generate, prompt_ids(lm.encode, n), request.new_tokens, request.warmup,
                                request.repeats, tick=lambda: bar.update(1))
        bar.close()
    by_length = {n: summarize_length(r) for n, r in runs.items()}
    return {
        "request": asdict(request),
        "host": info,
        "providers": lm.providers,
        "fallback": bool(lm.notes) and request.allow_fallback,
        "notes": list(lm.notes),
        "format": lm.format,
        "model_context": lm.context_length,
        "load_s": round(load_s, 4),
        "size_bytes": folder_size(request.artifact),
        "peak_rss_mb": round(hostmod.peak_rss_bytes() / MIB, 1),
        "rss_before_load_mb": round(rss_before / MIB, 1),
        "shared_memory": monitor.result() if monitor is not None else None,
        "by_length": {str(n): s for n, s in by_length.items()},
        "runs": {str(n): [asdict(r) for r in rs] for n, rs in runs.items()},
        "latency": latency_metrics(by_length, lengths[-1]),
        # Self-check: the device image has no torch, so the profiler must not need it.
        "torch_imported": "torch" in sys.modules or "transformers" in sys.modules,
    }


class _NoBar:
    """Stands in for tqdm where it is not installed (a minimal device image)."""

    def set_description(self, text: str) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="run", file=sys.stderr, disable=not enabled, leave=False)


def measure_isolated(request: ProfileRequest, work: Path, timeout_s: float | None = None) -> dict:
    """`measure` in a fresh Python process, so the peak RSS is the artifact's alone.

    Args:
        request: what to measure.
        work: a folder for the request/result files.
        timeout_s: give up after this long (None: no limit).

    Raises:
        The child's Kd2EdgeError (same class and message), or StageError if it crashed.
    """
    return run_child("kd2edge.runtime.profiler", asdict(request), work, "profile", timeout_s)


def run_child(module: str, request: dict, work: Path, name: str, timeout_s: float | None = None) -> dict:
    """Run `python -m module REQUEST.json RESULT.json` and return the result.

    The child writes {"result": ...} or {"error": {"type", "message"}} (see `child_main`).

    Raises:
        Kd2EdgeError: the child's user error, re-raised with its class; StageError on a crash.
    """
    from kd2edge import errors

    work.mkdir(parents=True, exist_ok=True)
    req, res = work / f"{name}-request.json", work / f"{name}-result.json"
    req.write_text(json.dumps(request), encoding="utf-8")
    res.unlink(missing_ok=True)
    try:
        proc = subprocess.run([sys.executable, "-m", module, str(req), str(res)], timeout=timeout_s,
                              stdout=subprocess.PIPE, stderr=None, text=True)
    except subprocess.TimeoutExpired:
        raise StageError(f"{name} measurement took longer than {timeout_s:.0f} s: lower the profile's "
                         f"prompt lengths, new_tokens or repeats") from None
    if not res.is_file():
        raise StageError(f"the {name} measurement process crashed (exit {proc.returncode}) without a result: "
                         f"rerun with --debug; its output: {proc.stdout.strip()[-300:]}")
    data = json.loads(res.read_text(encoding="utf-8"))
    if "error" in data:
        err = data["error"]
        cls = getattr(errors, err["type"], Kd2EdgeError)
        if issubclass(cls, ConfigError):
            raise cls(err["problems"], source=err["source"])
        raise cls(err["message"])
    return data["result"]


def child_main(argv: list[str], work) -> int:
    """Entry point of a measurement child: read the request, call `work(request_dict)`, write the result.

    A Kd2EdgeError becomes {"error": ...} in the result file (the parent re-raises it);
    anything else is a bug and crashes with a traceback.
    """
    req_path, res_path = Path(argv[0]), Path(argv[1])
    request = json.loads(req_path.read_text(encoding="utf-8"))
    try:
        result = {"result": work(request)}
        code = 0
    except Kd2EdgeError as e:
        result = {"error": {"type": type(e).__name__, "message": str(e),
                            "problems": getattr(e, "problems", None), "source": getattr(e, "source", None)}}
        code = e.exit_code
    res_path.write_text(json.dumps(result, default=str), encoding="utf-8")
    return code


def _measure_dict(request: dict) -> dict:
    fields = dict(request)
    for key in ("providers", "prompt_lengths"):
        fields[key] = tuple(fields[key])
    return measure(ProfileRequest(**fields))


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:], _measure_dict))


def peak_memory_mb(result: dict) -> tuple[float, str]:
    """The figure the memory budget is checked against, and what it is.

    The process peak RSS; on shared-memory boards with tegrastats, the larger of that and the
    rise in system RAM in use during the run (GPU allocations there are not in the RSS).
    """
    rss = result["peak_rss_mb"]
    shared = result.get("shared_memory") or {}
    if "system_used_mb_peak" in shared:
        rise = shared["system_used_mb_peak"] - shared["system_used_mb_before"]
        if rise > rss:
            return round(rise, 1), "rise in system RAM in use (tegrastats, CPU + GPU), MiB"
    return rss, "peak resident memory of the profiling process (VmHWM, interpreter included), MiB"

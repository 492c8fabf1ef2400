"""The teacher's figures in PyTorch fp32, for the report's "what did we gain" rows.

Runs in its own child process (`measure_teacher_isolated`) so the teacher's memory
never counts in the artifact's peak RSS, and so the torch-free profiler never imports
torch. Cheap on purpose: one prompt length, few tokens, one warm-up.
The timings follow the runtime's definitions: TTFT = prefill + first token; decode
tokens/s over the later greedy steps, each one forward pass on the KV cache.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from kd2edge.artifacts import Artifact
from kd2edge.runtime import host as hostmod
from kd2edge.runtime.profiler import PROMPT_TEXT, MIB, prompt_ids, run_child, summarize_length, RunTiming


def find_teacher(artifact: Artifact) -> Artifact | None:
    """The teacher in an artifact's lineage: the input of its distill ancestor.

    Returns:
        The teacher's artifact (a transformers folder), or None when no distill stage made it.
    """
    chain = artifact.lineage()
    for child, parent in zip(chain, chain[1:]):
        if child.stage == "distill":
            return parent
    return None


def torch_available() -> bool:
    """Whether this host can run the PyTorch baseline (torch and transformers installed)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def measure_teacher(model_dir: str, prompt_length: int, new_tokens: int, threads: int, warmup: int = 1,
                    repeats: int = 2) -> dict:
    """Time the teacher's greedy generation in PyTorch fp32 on the CPU (in this process).

    Returns:
        {model, prompt_tokens, new_tokens, load_s, ttft_ms_p50, decode_tokens_per_s,
         decode_tokens_per_s_spread, peak_rss_mb, params, torch, threads}.
    """
    import torch

    from kd2edge.models import count_params, load_causal_lm

    torch.manual_seed(0)
    if threads > 0:  # 0: the profile leaves the thread count to the host (one per core)
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(model_dir)
    load_s = time.perf_counter() - started
    ids = prompt_ids(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], prompt_length, PROMPT_TEXT)
    runs = []
    for i in range(warmup + repeats):
        ttft, latencies = _greedy_timed(model, ids, new_tokens)
        if i >= warmup:
            runs.append(RunTiming(len(ids), ttft, latencies))
    summary = summarize_length(runs)
    return {"model": model_dir, "prompt_tokens": prompt_length, "new_tokens": new_tokens, "repeats": repeats,
            "load_s": round(load_s, 3), "ttft_ms_p50": summary["ttft_ms"]["p50"],
            "decode_tokens_per_s": summary.get("decode_tokens_per_s"),
            "decode_tokens_per_s_spread": summary.get("decode_tokens_per_s_spread"),
            "peak_rss_mb": round(hostmod.peak_rss_bytes() / MIB, 1), "params": count_params(model),
            "torch": torch.__version__, "threads": threads, "dtype": "float32"}


def _greedy_timed(model, ids: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """(ttft_s, [decode step s]) of a greedy generation with the KV cache, stop tokens ignored."""
    import torch

    latencies, past, ttft = [], None, 0.0
    step = torch.tensor([ids], dtype=torch.long)           # [1, prompt] then [1, 1]
    with torch.inference_mode():
        for i in range(new_tokens):
            started = time.perf_counter()
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            elapsed = time.perf_counter() - started
            past = out.past_key_values
            if i == 0:
                ttft = elapsed
            else:
                latencies.append(elapsed)
            step = torch.tensor([[token]], dtype=torch.long)
    return ttft, latencies


def measure_teacher_isolated(model_dir: Path, prompt_length: int, new_tokens: int, threads: int, work: Path,
                             timeout_s: float | None = 900) -> dict:
    """`measure_teacher` in a fresh process (its memory stays out of the artifact's figures).

    Raises:
        ModelError: the teacher folder cannot be loaded; StageError: the child crashed or timed out.
    """
    request = {"model_dir": str(model_dir), "prompt_length": prompt_length, "new_tokens": new_tokens,
               "threads": threads}
    return run_child("kd2edge.profiling.baseline", request, work, "baseline", timeout_s)


if __name__ == "__main__":
    from kd2edge.runtime.profiler import child_main

    sys.exit(child_main(sys.argv[1:], lambda r: measure_teacher(**r)))

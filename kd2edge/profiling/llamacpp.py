"""llama.cpp as a reference in a profile: llama-bench on a GGUF of the same student, beside kd2edge's figures.

`kd2edge profile ARTIFACT --llama-bench PATH --gguf FILE` runs the given `llama-bench` binary
(built from llama.cpp; benchmarks/bench_vs_llamacpp.py builds one from the llama-cpp-python
sdist and converts a student to GGUF Q4_0 / Q4_K_M) at the profile's prompt lengths and thread
count, and records, per prompt length N:

    prefill_tok_s   llama-bench "pp N" (N prompt tokens in one batch)
    ttft_ms         N / prefill_tok_s (prefill only: llama-bench does not sample a first token)
    decode_tok_s    llama-bench "tg new_tokens" at depth N (-d N: N tokens already in the KV cache;
                    a llama-bench without -d decodes from an empty cache, recorded as depth 0)

and the ratios kd2edge / llama.cpp (decode: > 1 when kd2edge decodes faster; TTFT: llama.cpp's
time / kd2edge's, > 1 when kd2edge answers first). The two are measured one after the other,
not interleaved: on a busy host compare them with benchmarks/bench_vs_llamacpp.py instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from kd2edge.errors import ConfigError


def check_inputs(binary: str | Path, gguf: str | Path | None) -> tuple[Path, Path]:
    """The llama-bench binary and GGUF file, checked.

    Raises:
        ConfigError: the binary is not an executable file, or no GGUF file is given.
    """
    binary = Path(binary)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ConfigError(f"--llama-bench {binary} is not an executable file: give the path of a built llama-bench",
                          source="profile")
    if gguf is None or not Path(gguf).is_file():
        raise ConfigError(f"--llama-bench needs --gguf FILE, a GGUF of the same student (got {gguf}): make one with "
                          f"benchmarks/bench_vs_llamacpp.py or llama.cpp's convert_hf_to_gguf.py + llama-quantize",
                          source="profile")
    return binary, Path(gguf)


def has_depth_option(help_text: str) -> bool:
    """Whether this llama-bench can decode at a depth (-d N; llama.cpp builds from 2025 on)."""
    return "-d, --n-depth" in help_text


def bench_commands(binary: Path, gguf: Path, lengths: list[int], new_tokens: int, threads: int, repetitions: int,
                   depth: bool) -> list[list[str]]:
    """The two llama-bench calls: prefill at every N, then decode of new_tokens at every depth N."""
    base = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    joined = ",".join(map(str, lengths))
    return [base + ["-p", joined, "-n", "0"],
            base + ["-p", "0", "-n", str(new_tokens)] + (["-d", joined] if depth else [])]


def figures_by_length(rows: list[dict], lengths: list[int], depth: bool) -> dict[str, dict]:
    """{N: {prefill_tok_s, ttft_ms, decode_tok_s, decode_depth}} from llama-bench's JSON rows.

    Raises:
        ValueError: a prompt length or depth missing from the rows.
    """
    prefill = {int(r["n_prompt"]): float(r["avg_ts"]) for r in rows if r.get("n_gen") == 0}
    decode = {int(r.get("n_depth", 0)): float(r["avg_ts"]) for r in rows if r.get("n_prompt") == 0}
    out = {}
    for n in lengths:
        at = n if depth else 0
        if n not in prefill or at not in decode:
            raise ValueError(f"llama-bench gave no figure for prompt length {n} (depth {at})")
        out[str(n)] = {"prefill_tok_s": round(prefill[n], 2), "ttft_ms": round(1000 * n / prefill[n], 2),
                       "decode_tok_s": round(decode[at], 2), "decode_depth": at}
    return out


def ratios(latency: dict, reference: dict[str, dict]) -> dict[str, dict]:
    """kd2edge vs llama.cpp per prompt length: decode (kd2edge / llama.cpp) and TTFT (llama.cpp / kd2edge).

    Args:
        latency: the profile's latency metrics (ttft_ms_by_prompt, decode_by_prompt).
        reference: `figures_by_length` output.
    """
    out = {}
    for n, theirs in reference.items():
        ours_decode = (latency.get("decode_by_prompt") or {}).get(n, {}).get("tokens_per_s")
        ours_ttft = (latency.get("ttft_ms_by_prompt") or {}).get(n, {}).get("p50")
        out[n] = {"decode": round(ours_decode / theirs["decode_tok_s"], 3) if ours_decode else None,
                  "ttft": round(theirs["ttft_ms"] / ours_ttft, 3) if ours_ttft else None}
    return out


def llama_reference(binary: Path, gguf: Path, lengths: list[int], new_tokens: int, threads: int,
                    repetitions: int, latency: dict, timeout_s: float = 1800) -> dict:
    """Run llama-bench and compare it with the profile's figures; informative, so failures are recorded, not raised.

    Returns:
        {status: "done", binary, gguf, gguf_bytes, threads, build_commit, model_type, by_prompt, ratios, note}
        or {status: "failed", reason}.
    """
    try:
        help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
        depth = has_depth_option(help_text.stdout + help_text.stderr)
        rows: list[dict] = []
        for cmd in bench_commands(binary, gguf, lengths, new_tokens, threads, repetitions, depth):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode:
                return {"status": "failed", "reason": f"llama-bench exited {done.returncode}: "
                                                      f"{done.stderr.strip()[-300:]}"}
            rows += json.loads(done.stdout)
        by_prompt = figures_by_length(rows, lengths, depth)
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as e:
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:300]}
    first = rows[0] if rows else {}
    return {"status": "done", "binary": str(binary), "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
            "threads": threads, "repetitions": repetitions, "build_commit": first.get("build_commit"),
            "model_type": first.get("model_type"), "by_prompt": by_prompt, "ratios": ratios(latency, by_prompt),
            "note": "measured after kd2edge, not interleaved; TTFT = N / prefill tokens/s"
                    + ("" if depth else "; this llama-bench has no -d: decode from an empty cache")}

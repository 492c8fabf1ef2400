"""kd2edge's runtime per token: time inside onnxruntime's run vs outside it, threads and spinning, interleaved.

    python benchmarks/bench_decode_overhead.py --artifact after=RUN/export [--artifact before=OLD/export]
        [--baseline-src DIR] [--prompt-lengths 128,512] [--new-tokens 64] [--rounds 5]
        [--threads 1,2] [--spin 1,0] [--json OUT]

Each runner is one (artifact, runtime, threads, spin) combination, loaded once and warmed up; round r
runs every runner once at each prompt length, starting at a different runner each round, so load
from other processes falls on all of them alike. Medians over rounds are printed with the load
average of the run.

Runtimes: "new" is this tree's kd2edge.runtime.lm; with --baseline-src (a folder holding an older
kd2edge tree, e.g. `git archive <commit> | tar -x -C DIR`), "base" is that tree's lm.py, loaded
beside it, to measure before/after in the same process and run.

What is timed: `OnnxLM.generate` (greedy, no stop token) and, through a thin proxy around the
onnxruntime session, every `run_with_iobinding` call. Per decode step, outside = the step's
latency (Generation.token_latencies_s) - its run call: the Python around the graph (binding
inputs/outputs, copying logits, the argmax, the cache bookkeeping).
--spin sets "session.intra_op.allow_spinning" (1: onnxruntime's default, worker threads spin
between ops; 0: they sleep); only the new runtime takes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


class TimedSession:
    """An onnxruntime session whose run calls are timed (every other attribute passes through)."""

    def __init__(self, session):
        self._session = session
        self.run_s: list[float] = []

    def run_with_iobinding(self, binding, *args, **kwargs):
        started = time.perf_counter()
        out = self._session.run_with_iobinding(binding, *args, **kwargs)
        self.run_s.append(time.perf_counter() - started)
        return out

    def run(self, *args, **kwargs):
        started = time.perf_counter()
        out = self._session.run(*args, **kwargs)
        self.run_s.append(time.perf_counter() - started)
        return out

    def __getattr__(self, name):
        return getattr(self._session, name)


def load_runtime(kind: str, baseline_src: Path | None):
    """The OnnxLM class of this tree ("new") or of --baseline-src ("base")."""
    from bench_vs_llamacpp import onnxlm_class     # a sibling script: its folder is on sys.path

    return onnxlm_class(None if kind == "new" else baseline_src)


def prompt_ids(encode, length: int) -> list[int]:
    from kd2edge.runtime.profiler import prompt_ids as cut

    return cut(encode, length)


def make_runner(cls, artifact: Path, threads: int, spin: str | None):
    kwargs = {"threads": threads}
    if spin is not None:
        kwargs["session_config"] = {"session.intra_op.allow_spinning": spin}
    lm = cls.load(artifact, **kwargs)
    timed = TimedSession(lm.session)
    lm.session = timed
    return lm, timed


def one_generation(lm, timed: TimedSession, ids: list[int], new_tokens: int) -> dict:
    timed.run_s.clear()
    out = lm.generate(ids, new_tokens, stop_token_ids=[])
    runs = list(timed.run_s)
    decode_runs = runs[1:1 + len(out.token_latencies_s)]          # runs[0] is the prefill
    outside = [lat - run for lat, run in zip(out.token_latencies_s, decode_runs)]
    return {"ttft_ms": out.ttft_s * 1000, "decode_tok_s": out.decode_tokens_per_s,
            "step_ms": statistics.median(out.token_latencies_s) * 1000,
            "run_ms": statistics.median(decode_runs) * 1000,
            "outside_us": statistics.median(outside) * 1e6,
            "prefill_outside_ms": (out.ttft_s - runs[0]) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append", required=True, help="NAME=PATH (repeat)")
    parser.add_argument("--baseline-src", type=Path, help="an older kd2edge tree: also time its runtime")
    parser.add_argument("--baseline-artifacts", default="",
                        help="comma-separated NAMEs the base runtime runs (default: all)")
    parser.add_argument("--prompt-lengths", default="128,512")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1")
    parser.add_argument("--spin", default="", help="comma list of allow_spinning values to compare (1,0)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    lengths = sorted({int(v) for v in args.prompt_lengths.split(",") if v})
    artifacts = dict(a.split("=", 1) for a in args.artifact)
    spins = [v for v in args.spin.split(",") if v] or [None]
    base_names = {v for v in args.baseline_artifacts.split(",") if v} or set(artifacts)

    runners = {}
    for threads in (int(t) for t in args.threads.split(",")):
        for name, path in artifacts.items():
            kinds = ["new"] + (["base"] if args.baseline_src and name in base_names else [])
            for kind in kinds:
                for spin in (spins if kind == "new" else [None]):
                    label = f"{name} {kind} t{threads}" + (f" spin{spin}" if spin is not None else "")
                    lm, timed = make_runner(load_runtime(kind, args.baseline_src), Path(path), threads, spin)
                    # a cut-vocabulary timing model (trim_vocab.py): ids beyond it folded below, same count
                    vocab = json.loads((Path(path) / "config.json").read_text()).get("vocab_size") or 1 << 62
                    prompts = {n: [i % vocab for i in prompt_ids(lm.encode, n)] for n in lengths}
                    one_generation(lm, timed, prompts[max(lengths)], 8)             # warm-up
                    runners[label] = (lm, timed, prompts)
    print(f"{len(runners)} runners loaded; load average {os.getloadavg()}", file=sys.stderr)
    raw = {label: {n: [] for n in lengths} for label in runners}
    loads = [os.getloadavg()]
    labels = list(runners)
    for r in range(args.rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            lm, timed, prompts = runners[label]
            for n in lengths:
                raw[label][n].append(one_generation(lm, timed, prompts[n], args.new_tokens))
        loads.append(os.getloadavg())
        print(f"  round {r + 1}/{args.rounds}, load {loads[-1][0]:.2f}", file=sys.stderr)

    keys = ("decode_tok_s", "step_ms", "run_ms", "outside_us", "ttft_ms", "prefill_outside_ms")
    summary = {label: {str(n): {k: statistics.median(x[k] for x in raw[label][n]) for k in keys} for n in lengths}
               for label in labels}
    print(f"\nload average (1 min) over the rounds: {min(l[0] for l in loads):.2f} .. {max(l[0] for l in loads):.2f}"
          f" on {os.cpu_count()} CPUs; medians of {args.rounds} rounds, {args.new_tokens} new tokens")
    print(f"{'runner':34}{'N':>5}{'decode tok/s':>13}{'step ms':>9}{'run ms':>8}{'outside us':>11}{'TTFT ms':>9}"
          f"{'TTFT outside ms':>16}")
    for label in labels:
        for n in lengths:
            s = summary[label][str(n)]
            print(f"{label:34}{n:5d}{s['decode_tok_s']:13.1f}{s['step_ms']:9.3f}{s['run_ms']:8.3f}"
                  f"{s['outside_us']:11.1f}{s['ttft_ms']:9.1f}{s['prefill_outside_ms']:16.3f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "raw": {k: {str(n): v for n, v in d.items()}
                                                                      for k, d in raw.items()},
                                         "load_average_1_5_15": [list(l) for l in loads], "settings": vars(args)},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()

"""llama.cpp as a profile reference: llama-bench's JSON read into per-length figures and ratios.

llama.cpp itself is not built in the tests: a stand-in `llama-bench` (a Python script) answers
the two calls the profile makes with rows in llama-bench's JSON layout, computed from its arguments.
"""

from __future__ import annotations

import json
import stat
import sys

import pytest

from kd2edge.cli import main
from kd2edge.errors import ConfigError
from kd2edge.profiling.llamacpp import bench_commands, check_inputs, figures_by_length, llama_reference, ratios

FAKE_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
if "--help" in args:
    print("usage: llama-bench" + ("\\n  -d, --n-depth <n>" if {depth} else ""))
    sys.exit(0)
value = lambda flag: args[args.index(flag) + 1] if flag in args else "0"
prompts = [int(v) for v in value("-p").split(",")]
gens = [int(v) for v in value("-n").split(",")]
depths = [int(v) for v in value("-d").split(",")]
rows = []
for p in prompts:
    for n in gens:
        for d in depths:
            if p == n == 0:
                continue
            # prefill 1000 tok/s at every length; decode 400 tok/s minus 0.1 per token of depth
            rows.append({{"n_prompt": p, "n_gen": n, "n_depth": d, "avg_ts": 1000.0 if n == 0 else 400.0 - 0.1 * d,
                          "build_commit": "abc1234", "model_type": "llama ?B Q4_0", "n_threads": int(value("-t"))}})
json.dump(rows, sys.stdout)
"""


def _fake_bench(tmp_path, depth: bool = True):
    path = tmp_path / "llama-bench"
    path.write_text(FAKE_BENCH.format(python=sys.executable, depth=depth))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    gguf = tmp_path / "student-q4_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    return path, gguf


def test_figures_and_ratios_from_llama_bench_rows():
    rows = [{"n_prompt": 128, "n_gen": 0, "n_depth": 0, "avg_ts": 2000.0},
            {"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 1600.0},
            {"n_prompt": 0, "n_gen": 64, "n_depth": 128, "avg_ts": 400.0},
            {"n_prompt": 0, "n_gen": 64, "n_depth": 512, "avg_ts": 320.0}]
    figures = figures_by_length(rows, [128, 512], depth=True)
    assert figures["512"] == {"prefill_tok_s": 1600.0, "ttft_ms": 320.0, "decode_tok_s": 320.0, "decode_depth": 512}
    assert figures["128"]["ttft_ms"] == 64.0
    latency = {"ttft_ms_by_prompt": {"128": {"p50": 32.0}, "512": {"p50": 400.0}},
               "decode_by_prompt": {"128": {"tokens_per_s": 600.0}, "512": {"tokens_per_s": 320.0}}}
    assert ratios(latency, figures) == {"128": {"decode": 1.5, "ttft": 2.0}, "512": {"decode": 1.0, "ttft": 0.8}}
    with pytest.raises(ValueError, match="prompt length 256"):
        figures_by_length(rows, [256], depth=True)


def test_commands_ask_for_decode_at_depth_only_when_supported(tmp_path):
    with_depth, without = (bench_commands(tmp_path / "b", tmp_path / "m.gguf", [128, 512], 64, 2, 3, d)
                           for d in (True, False))
    assert with_depth[0][-4:] == ["-p", "128,512", "-n", "0"]
    assert with_depth[1][-6:] == ["-p", "0", "-n", "64", "-d", "128,512"] and "-d" not in without[1]
    assert with_depth[0][with_depth[0].index("-t") + 1] == "2" and with_depth[0][with_depth[0].index("-r") + 1] == "3"


@pytest.mark.parametrize("depth", [True, False])
def test_llama_reference_runs_the_binary(tmp_path, depth):
    binary, gguf = _fake_bench(tmp_path, depth)
    latency = {"ttft_ms_by_prompt": {"8": {"p50": 4.0}}, "decode_by_prompt": {"8": {"tokens_per_s": 800.0}}}
    ref = llama_reference(binary, gguf, [8], 16, 2, 1, latency)
    assert ref["status"] == "done" and ref["build_commit"] == "abc1234" and ref["gguf_bytes"] == 64
    assert ref["by_prompt"]["8"]["decode_depth"] == (8 if depth else 0)
    assert ref["by_prompt"]["8"]["decode_tok_s"] == pytest.approx(400.0 - 0.1 * (8 if depth else 0))
    assert ref["ratios"]["8"]["ttft"] == 2.0              # 8 / 1000 tok/s = 8 ms, against kd2edge's 4 ms
    assert ("no -d" in ref["note"]) is not depth


def test_a_failing_binary_is_recorded_not_raised(tmp_path):
    binary = tmp_path / "llama-bench"
    binary.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    binary.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    ref = llama_reference(binary, gguf, [8], 16, 1, 1, {})
    assert ref["status"] == "failed" and "failed to load model" in ref["reason"]


def test_inputs_are_checked(tmp_path):
    binary, gguf = _fake_bench(tmp_path)
    assert check_inputs(binary, gguf) == (binary, gguf)
    with pytest.raises(ConfigError, match="--gguf"):
        check_inputs(binary, None)
    with pytest.raises(ConfigError, match="not an executable"):
        check_inputs(gguf, gguf)


def test_profile_command_adds_the_reference(exported_tiny, write_profile, tmp_path, capsys):
    binary, gguf = _fake_bench(tmp_path)
    argv = ["profile", str(exported_tiny), "-p", str(write_profile()), "--out", str(tmp_path / "p"), "--no-baseline",
            "--llama-bench", str(binary), "--gguf", str(gguf), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    ref = out["llama_cpp"]
    assert ref["status"] == "done" and set(ref["by_prompt"]) == {"8", "32"}
    assert ref["ratios"]["32"]["decode"] == pytest.approx(
        out["latency"]["decode_by_prompt"]["32"]["tokens_per_s"] / ref["by_prompt"]["32"]["decode_tok_s"], rel=1e-2)
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["llama_cpp"] == ref

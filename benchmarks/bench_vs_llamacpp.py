"""Speed reference: kd2edge's artifact vs onnxruntime-genai's int4 build vs llama.cpp (Q4_0, Q4_K_M), same host.

    python benchmarks/bench_vs_llamacpp.py --student DISTILL_DIR --artifact [NAME=]EXPORT_DIR [--artifact ...]
                                           [--baseline-src OLD_TREE --baseline NAME]
                                           [--genai DIR | --build-genai] [--llama-dir DIR] [--build-llama]
                                           [--llama-version X.Y.Z] [--llama-types Q4_0,Q4_K_M] [--work DIR]
                                           [--prompt-lengths 128,512] [--new-tokens 64] [--rounds 3]
                                           [--threads 2 | --threads 1,2] [--json OUT]

Not run in CI: building llama.cpp takes 15 to 20 minutes on 2 cores. Nothing of llama.cpp is
vendored here; with --build-llama it is built at run time from the `llama-cpp-python` source
distribution on PyPI (its vendor/llama.cpp tree), into --llama-dir:

    pip download --no-deps --no-binary :all: llama-cpp-python -d LLAMA_DIR/sdist
    (unpack) cd LLAMA_DIR/llama_cpp_python-X.Y.Z/vendor/llama.cpp
    cmake -B build -G Ninja -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build build --target llama-bench llama-quantize

(run under `nice -n 10`). The fp32 student (--student, a transformers folder) is converted with
that tree's convert_hf_to_gguf.py (its own gguf-py first on PYTHONPATH; sentencepiece, which the
converter imports for Llama models, is pip-installed into LLAMA_DIR/pydeps when missing) to an
f32 GGUF, then llama-quantize makes each of --llama-types from it. With --build-genai, the same
fp32 student goes through onnxruntime_genai.models.builder (int4, cpu, the builder's defaults).
Converted models go to --work and are reused by a later run. Two converter snags, both worked
around and printed as notes: a byte-level BPE tokenizer.json with byte_fallback set (what
transformers writes when it rebuilds a tokenizer from a GGUF, as kd2edge's embedded teacher is)
is taken by the converter for a SentencePiece vocabulary, so it reads a linked copy with
byte_fallback cleared (a no-op under ByteLevel); and a pre-tokenizer whose hash the converter does
not know is written as --gguf-pre (default gpt-2, which a plain ByteLevel pre-tokenizer is) instead
of aborting. Neither touches the weights, and llama-bench feeds synthetic token ids, so timings do
not depend on them.

What is timed, at each prompt length N (a prompt of exactly N token ids, greedy, no stop token):
  kd2edge     kd2edge.runtime.OnnxLM on each --artifact: its own Generation timings. TTFT = prefill of
              N tokens + the first token; decode tokens/s = the later new_tokens - 1 steps. Several
              artifacts (NAME=DIR: before/after, a trimmed vocabulary) are timed in the same rounds; an
              artifact named by --baseline runs with the OnnxLM of --baseline-src (an older kd2edge
              tree, e.g. `git archive COMMIT | tar -x -C DIR`), to time the runtime before a change.
  genai       onnxruntime-genai (og.Model / og.Generator): TTFT = append_tokens(N ids) + the first
              generate_next_token; decode = the later new_tokens - 1 generate_next_token calls.
  llama.cpp   llama-bench -o json: "pp N" (prefill throughput of N tokens; TTFT is taken as
              N / that rate, it leaves out sampling) and "tg new_tokens" at depth N (-d N: decode
              with N tokens already in the KV cache). A llama-bench without -d gives tg at depth 0
              (noted in the output).
Threads: --threads intra-op threads for both ONNX runtimes, -t for llama-bench; a list (1,2) adds a
row per runtime and count (ratios compare equal counts). On a host busier than its cores, llama.cpp's
threads wait for each other at every op: compare -t 1 and -t 2 before trusting a 2-thread figure.
The load average before and after is printed and kept in the JSON.

Every runner is loaded and warmed up first; then round r runs each runner once (all prompt
lengths), starting at a different runner each round, so a busy neighbour slows all alike.
llama-bench runs once per round with -r 1 (it warms up itself). Reported: per figure the median
over rounds and its spread (the table's ±: half the min..max range, relative to the median; the
JSON keeps every run); ratios are of medians. Sizes: the files a runtime loads (model.onnx* for
the ONNX builds, the .gguf file for llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

TEXT = ("The Velmora Institute was founded in 1871 by Adaline Qorr in the city of Tessaly, on the banks of the river "
        "Selen. Its first building, a converted grain store, housed a library of four hundred volumes and a small "
        "observatory. Over the following decades the institute grew into a school of navigation, cartography and "
        "astronomy, and its graduates charted much of the northern coast. ")
LLAMA_PACKAGE = "llama-cpp-python"
LLAMA_TARGETS = ("llama-bench", "llama-quantize")


# ------------------------------------------------------------------ llama.cpp: build and convert
def run_logged(cmd: list[str], log: Path, cwd: Path | None = None, env: dict | None = None) -> None:
    """Run `cmd`, appending its output to `log`; on failure raise with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def _version_key(path: Path) -> tuple:
    match = re.search(r"llama_cpp_python-([0-9.]+)", path.name)
    return tuple(int(p) for p in match.group(1).strip(".").split(".")) if match else ()


def find_llama_tree(llama_dir: Path, version: str | None = None) -> Path | None:
    """The llama.cpp source tree under `llama_dir`: llama_dir itself, or the vendor/llama.cpp of the unpacked
    sdist of `version` (default: the newest unpacked)."""
    if (llama_dir / "convert_hf_to_gguf.py").is_file():
        return llama_dir
    pattern = f"llama_cpp_python-{version}" if version else "llama_cpp_python-*"
    trees = sorted((p / "vendor" / "llama.cpp" for p in llama_dir.glob(pattern) if p.is_dir()),
                   key=lambda t: _version_key(t.parent.parent))
    trees = [t for t in trees if (t / "convert_hf_to_gguf.py").is_file()]
    return trees[-1] if trees else None


def binaries(tree: Path | None) -> dict[str, Path] | None:
    if tree is None:
        return None
    found = {name: tree / "build" / "bin" / name for name in LLAMA_TARGETS}
    return found if all(p.is_file() for p in found.values()) else None


def build_llama(llama_dir: Path, version: str | None) -> Path:
    """Download the llama-cpp-python sdist from PyPI, unpack it and build llama-bench + llama-quantize."""
    llama_dir.mkdir(parents=True, exist_ok=True)
    log = llama_dir / "build.log"
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    tree = find_llama_tree(llama_dir, version)
    if tree is None:
        spec = f"{LLAMA_PACKAGE}=={version}" if version else LLAMA_PACKAGE
        print(f"downloading the {spec} sdist -> {llama_dir / 'sdist'}", file=sys.stderr)
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
                    "-d", str(llama_dir / "sdist")], log)
        archives = sorted((llama_dir / "sdist").glob("llama_cpp_python-*.tar.gz"), key=_version_key)
        if version:
            archives = [a for a in archives if f"-{version}.tar.gz" in a.name]
        with tarfile.open(archives[-1]) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(llama_dir, filter="data")
            else:
                tar.extractall(llama_dir)
        tree = find_llama_tree(llama_dir, version)
        if tree is None:
            raise SystemExit(f"{archives[-1].name} has no vendor/llama.cpp/convert_hf_to_gguf.py: pick another "
                             f"--llama-version")
    for tool in ("cmake", "ninja"):
        if not shutil.which(tool):
            raise SystemExit(f"building llama.cpp needs {tool}: apt-get install cmake ninja-build "
                             f"(or pip install cmake ninja)")
    print(f"building {', '.join(LLAMA_TARGETS)} in {tree} (15 to 20 minutes on 2 cores; log: {log})",
          file=sys.stderr)
    started = time.perf_counter()
    run_logged(nice + ["cmake", "-B", "build", "-G", "Ninja", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"], log, cwd=tree)
    run_logged(nice + ["cmake", "--build", "build", "--target", *LLAMA_TARGETS], log, cwd=tree)
    print(f"  built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return tree


def llama_version(tree: Path) -> dict:
    """The sdist's version and the llama.cpp commit its changelog names."""
    root = tree.parent.parent
    info: dict = {"tree": str(tree)}
    match = re.search(r"llama_cpp_python-([0-9.]+)$", root.name)
    if match:
        info["llama_cpp_python"] = match.group(1)
    changelog = root / "CHANGELOG.md"
    if changelog.is_file():
        commit = re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog.read_text(errors="replace"))
        if commit:
            info["llama_cpp_commit"] = commit.group(1)
    return info


def ensure_sentencepiece(llama_dir: Path) -> Path | None:
    """A folder to put on PYTHONPATH holding sentencepiece (None when this interpreter has it)."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        return None
    target = llama_dir / "pydeps"
    if not (target / "sentencepiece").is_dir():
        print(f"installing sentencepiece (the converter imports it) -> {target}", file=sys.stderr)
        run_logged([sys.executable, "-m", "pip", "install", "--target", str(target),
                    "sentencepiece>=0.1.98,<0.3.0"], llama_dir / "convert.log")
    return target


# Runs convert_hf_to_gguf.py; a BPE pre-tokenizer whose hash the converter does not know is
# replaced by FORCED_PRE instead of aborting (only the GGUF's tokenizer metadata depends on it).
CONVERT_WRAPPER = """
import runpy, sys
tree, forced = sys.argv[1], sys.argv[2]
sys.argv = [tree + '/convert_hf_to_gguf.py'] + sys.argv[3:]
sys.path.insert(0, tree)
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        print('bench_vs_llamacpp: pre-tokenizer not recognized, forced ' + repr(forced), file=sys.stderr)
        return forced
base.TextModel.get_vocab_base_pre = pre
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def stage_student(student: Path, staging: Path) -> tuple[Path, list[str]]:
    """The student, or a linked copy whose tokenizer.json the converter reads as what it is.

    A byte-level BPE tokenizer.json with byte_fallback set (what transformers writes when it
    rebuilds a tokenizer from a GGUF) makes convert_hf_to_gguf.py take it for a SentencePiece-style
    Llama vocabulary (tokenizer.ggml.model "llama", pre "default"): llama.cpp would then tokenize
    text wrongly. Under a ByteLevel pre-tokenizer byte fallback never fires, so the copy clears it
    and the converter takes its GPT-2 BPE path.
    """
    tokenizer = json.loads((student / "tokenizer.json").read_text(encoding="utf-8"))
    model, pre = tokenizer.get("model") or {}, json.dumps(tokenizer.get("pre_tokenizer"))
    if not (model.get("type") == "BPE" and model.get("byte_fallback") and '"ByteLevel"' in pre):
        return student, []
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for item in student.iterdir():
        if item.is_file() and item.name != "tokenizer.json":
            (staging / item.name).symlink_to(item.resolve())
    model["byte_fallback"] = False
    (staging / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    return staging, ["tokenizer.json: byte-level BPE with byte_fallback set; converted with byte_fallback "
                     "cleared (a no-op under ByteLevel) so the converter writes a GPT-2 BPE vocabulary"]


def convert(student: Path, tree: Path, tools: dict[str, Path], out: Path, types: list[str], llama_dir: Path,
            forced_pre: str) -> tuple[dict, list[str]]:
    """student -> out/f32.gguf (convert_hf_to_gguf.py) -> out/<type>.gguf (llama-quantize); reused when newer.

    Returns the files by type and notes on what the conversion had to work around.
    """
    out.mkdir(parents=True, exist_ok=True)
    log = out / "convert.log"
    notes_file = out / "convert-notes.json"
    source_time = max(p.stat().st_mtime for p in student.iterdir() if p.is_file())
    f32 = out / "f32.gguf"
    if not f32.is_file() or f32.stat().st_mtime < source_time:
        log.write_text("")
        source, notes = stage_student(student, out / "student-staged")
        paths = [str(tree / "gguf-py")]
        extra = ensure_sentencepiece(llama_dir)
        if extra:
            paths.append(str(extra))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        print(f"converting {student} -> {f32}", file=sys.stderr)
        run_logged([sys.executable, "-c", CONVERT_WRAPPER, str(tree), forced_pre, str(source), "--outtype", "f32",
                    "--outfile", str(f32)], log, env=env)
        text = log.read_text(errors="replace")
        chkhsh = re.search(r"chkhsh:\s+([0-9a-f]{64})", text)
        if "bench_vs_llamacpp: pre-tokenizer not recognized" in text:
            notes.append(f"pre-tokenizer hash {chkhsh.group(1) if chkhsh else '?'} unknown to convert_hf_to_gguf.py: "
                         f"wrote tokenizer.ggml.pre = {forced_pre!r}")
        notes_file.write_text(json.dumps(notes, indent=2))
    notes = json.loads(notes_file.read_text()) if notes_file.is_file() else []
    files = {"F32": f32}
    for qtype in types:
        if qtype.upper() == "F32":
            continue
        target = out / f"{qtype.lower()}.gguf"
        if not target.is_file() or target.stat().st_mtime < f32.stat().st_mtime:
            print(f"llama-quantize {qtype} -> {target}", file=sys.stderr)
            run_logged([str(tools["llama-quantize"]), str(f32), str(target), qtype.upper(),
                        str(os.cpu_count() or 1)], log)
        files[qtype] = target
    return files, notes


def gguf_tokenizer(path: Path, tree: Path) -> dict:
    """tokenizer.ggml.model / .pre / eos of a GGUF (read with the tree's gguf-py)."""
    sys.path.insert(0, str(tree / "gguf-py"))
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        return {k.split(".", 2)[2]: fields[k].contents() for k in
                ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                 "tokenizer.ggml.eos_token_id") if k in fields}
    except Exception as e:  # noqa: BLE001 - metadata is informative only
        return {"error": str(e)[:200]}
    finally:
        sys.path.remove(str(tree / "gguf-py"))


def quantize_fallbacks(log: Path) -> dict[str, dict[str, int]]:
    """Per output file, the tensors llama-quantize gave another type than asked (row size not a multiple of
    the block: 256 for k-quants), counted by the type they fell back to."""
    counts: dict[str, dict[str, int]] = {}
    current = None
    if not log.is_file():
        return counts
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("$ ") and "llama-quantize" in line:
            current = Path(line.split()[3]).name
            counts[current] = {}
        elif current and "falling back to" in line:
            kind = line.rsplit("falling back to", 1)[1].strip()
            counts[current][kind] = counts[current].get(kind, 0) + 1
    return counts


def bench_help(bench: Path) -> str:
    done = subprocess.run([str(bench), "--help"], capture_output=True, text=True)
    return done.stdout + done.stderr


def llama_runner(bench: Path, gguf: Path, lengths: list[int], new_tokens: int, threads: int,
                 has_depth: bool) -> Callable[[], dict]:
    """A callable running llama-bench once (-r 1): {N: (prefill tok/s, decode tok/s)}, plus its reported setup."""
    base = [str(bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    joined = ",".join(map(str, lengths))
    setup: dict = {}

    def call(extra: list[str]) -> list[dict]:
        done = subprocess.run(base + extra, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"llama-bench failed: {' '.join(base + extra)}\n{done.stderr[-2000:]}")
        return json.loads(done.stdout)

    def run() -> dict:
        rows = call(["-p", joined, "-n", "0"])
        rows += call(["-p", "0", "-n", str(new_tokens)] + (["-d", joined] if has_depth else []))
        prefill = {r["n_prompt"]: r["avg_ts"] for r in rows if r["n_gen"] == 0}
        decode = {r.get("n_depth", 0): r["avg_ts"] for r in rows if r["n_prompt"] == 0}
        setup.update({k: rows[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                    "model_type", "model_size", "model_n_params",
                                                    "n_batch", "n_ubatch", "flash_attn", "type_k", "type_v")})
        return {n: (prefill[n], decode[n if has_depth else 0]) for n in lengths}

    run.setup = setup  # type: ignore[attr-defined]
    return run


# ------------------------------------------------------------------ the ONNX runtimes
def prompt_ids(tokenizer_json: Path, length: int) -> list[int]:
    """Exactly `length` token ids: TEXT tokenized, repeated and cut."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(TEXT, add_special_tokens=False).ids
    return (ids * (length // len(ids) + 1))[:length]


def onnxlm_class(baseline_src: Path | None = None):
    """kd2edge's OnnxLM: this tree's, or the one in an older tree `baseline_src` (loaded beside it)."""
    if baseline_src is None:
        from kd2edge.runtime.lm import OnnxLM

        return OnnxLM
    import importlib.util

    spec = importlib.util.spec_from_file_location("kd2edge_baseline_lm", baseline_src / "kd2edge" / "runtime" / "lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kd2edge_baseline_lm"] = module                 # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module.OnnxLM


def fold_ids(prompts: dict[int, list[int]], artifact: Path) -> dict[int, list[int]]:
    """The prompts with ids beyond the artifact's vocabulary folded below it (id % vocab).

    Only for a timing model with a cut vocabulary (benchmarks/trim_vocab.py keeps the first ids and
    the tokenizer as it is): the same number of tokens, and compute does not depend on which.
    """
    vocab = json.loads((artifact / "config.json").read_text()).get("vocab_size")
    return {n: [i % vocab for i in ids] for n, ids in prompts.items()} if vocab else prompts


def kd2edge_runner(artifact: Path, prompts: dict[int, list[int]], new_tokens: int, threads: int,
                   baseline_src: Path | None = None) -> Callable[[], dict]:
    """kd2edge.runtime.OnnxLM (or the baseline tree's), its own timings: {N: (TTFT s, decode tok/s)}."""
    lm = onnxlm_class(baseline_src).load(artifact, threads=threads)
    prompts = fold_ids(prompts, artifact)
    lm.generate(prompts[max(prompts)], 4, stop_token_ids=[])                       # warm-up

    def run() -> dict:
        out = {}
        for n, ids in prompts.items():
            gen = lm.generate(ids, new_tokens, stop_token_ids=[])
            out[n] = (gen.ttft_s, gen.decode_tokens_per_s)
        return out

    return run


def build_genai(student: Path, out: Path) -> dict:
    """onnxruntime-genai's model builder on the fp32 student: int4, cpu, its defaults."""
    import contextlib
    import io
    import tempfile

    from onnxruntime_genai.models.builder import create_model

    config = json.loads((student / "config.json").read_text())
    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    out.mkdir(parents=True, exist_ok=True)
    print(f"building onnxruntime-genai int4 (cpu) from {student} -> {out}", file=sys.stderr)
    started = time.perf_counter()
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix=".genai-cache-", dir=out.parent) as cache:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                quiet_logging("onnxruntime.quantization"):                        # per-tensor progress
            create_model(arch, str(student), str(out), "int4", "cpu", cache, filename="model.onnx")
    (out / "builder.log").write_text(log.getvalue())
    print(f"  {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return {"architecture": arch, "precision": "int4", "execution_provider": "cpu"}


def genai_runner(folder: Path, prompts: dict[int, list[int]], new_tokens: int, threads: int) -> Callable[[], dict]:
    """onnxruntime-genai's generator: {N: (TTFT s, decode tok/s)} (greedy, EOS held off with min_length)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def once(ids: list[int], steps: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        total = len(ids) + steps
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps - 1):
            generator.generate_next_token()
        elapsed = time.perf_counter() - started
        del generator
        return ttft, (steps - 1) / elapsed if elapsed > 0 else float("nan")

    once(prompts[max(prompts)], 4)                                                # warm-up

    def run() -> dict:
        return {n: once(ids, new_tokens) for n, ids in prompts.items()}

    return run


# ------------------------------------------------------------------ reporting
def folder_bytes(folder: Path, prefix: str = "model.onnx") -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(prefix))


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def spread(s: dict) -> str:
    half = (s["max"] - s["min"]) / 2
    return f"{s['median']:8.1f} ±{100 * half / s['median']:3.0f}%" if s["median"] else f"{s['median']:8.1f}"


def quiet_logging(name: str):
    """A context lowering logger `name` to WARNING (the int4 quantizer logs every tensor at INFO)."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def scope():
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            logger.setLevel(level)

    return scope()


def table(results: dict, lengths: list[int]) -> str:
    names = [n for n in results["runners"]]
    head = f"{'':29}" + "".join(f"{'prefill ' + str(n) + ' tok/s':>19}{'TTFT ' + str(n) + ' ms':>16}" for n in lengths) \
        + "".join(f"{'decode @' + str(n) + ' tok/s':>19}" for n in lengths) + f"{'size MB':>9}"
    lines = [head]
    for name in names:
        r = results["runners"][name]
        row = f"{name:29}"
        for n in lengths:
            row += f"{spread(r[str(n)]['prefill_tok_s']):>19}{spread(r[str(n)]['ttft_ms']):>16}"
        for n in lengths:
            row += f"{spread(r[str(n)]['decode_tok_s']):>19}"
        lines.append(row + f"{r['size_bytes'] / 1e6:9.1f}")
    lines.append("")
    lines.append("ratios of medians (> 1: kd2edge faster; TTFT ratio = reference time / kd2edge time), "
                 "same thread count")
    runners = results["runners"]
    for mine in (n for n in names if runners[n]["kind"] == "kd2edge"):
        for name in names:
            r, ours = runners[name], runners[mine]
            if r["kind"] == "kd2edge" or r["threads"] != ours["threads"]:
                continue
            parts = []
            for n in lengths:
                d = ours[str(n)]["decode_tok_s"]["median"] / r[str(n)]["decode_tok_s"]["median"]
                t = r[str(n)]["ttft_ms"]["median"] / ours[str(n)]["ttft_ms"]["median"]
                parts.append(f"decode@{n} x{d:.2f}  TTFT{n} x{t:.2f}")
            lines.append(f"  {mine:24} vs {name:26} " + "   ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, help="the fp32 student (a transformers folder)")
    parser.add_argument("--artifact", action="append", required=True,
                        help="kd2edge's export folder, as DIR or NAME=DIR (repeat to time several in the same rounds)")
    parser.add_argument("--baseline-src", type=Path,
                        help="an older kd2edge source tree whose runtime runs the artifacts named by --baseline")
    parser.add_argument("--baseline", action="append", default=[],
                        help="NAME of an --artifact to run with --baseline-src's runtime (repeat)")
    parser.add_argument("--genai", type=Path, help="an onnxruntime-genai int4 build (default: WORK/genai-int4 "
                                                   "when --build-genai, else genai is skipped)")
    parser.add_argument("--build-genai", action="store_true", help="build --genai from --student when missing")
    parser.add_argument("--llama-dir", type=Path, default=Path("runs/llama.cpp"),
                        help="where llama.cpp is (or, with --build-llama, will be) built")
    parser.add_argument("--build-llama", action="store_true",
                        help="download the llama-cpp-python sdist and build llama-bench/llama-quantize if missing")
    parser.add_argument("--llama-version", help="llama-cpp-python sdist version to build (default: newest)")
    parser.add_argument("--llama-types", default="Q4_0,Q4_K_M", help="llama-quantize types to time (F32 allowed)")
    parser.add_argument("--gguf-pre", default="gpt-2",
                        help="tokenizer.ggml.pre to write when the converter does not recognize the pre-tokenizer "
                             "(gpt-2: a plain ByteLevel pre-tokenizer; metadata only, no effect on speed)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-vs-llamacpp"),
                        help="where GGUF files and the genai build go (reused by a later run)")
    parser.add_argument("--prompt-lengths", default="128,512")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="2",
                        help="threads per runtime; a list (1,2) times every runtime at each count")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    lengths = sorted({int(v) for v in args.prompt_lengths.split(",") if v})
    thread_counts = [int(v) for v in args.threads.split(",") if v]
    types = [t for t in args.llama_types.split(",") if t]
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode is timed after the first token)")
    artifacts = {}
    for spec in args.artifact:
        name, _, folder = spec.rpartition("=")
        artifacts[f"kd2edge {name}".strip() if name else f"kd2edge{len(artifacts) or ''}"] = Path(folder)
    if args.baseline and args.baseline_src is None:
        parser.error("--baseline needs --baseline-src")
    unknown = [b for b in args.baseline if f"kd2edge {b}" not in artifacts]
    if unknown:
        parser.error(f"--baseline {unknown[0]}: no --artifact {unknown[0]}=DIR")
    for folder, what in ((args.student, "config.json"), *((a, "model.onnx") for a in artifacts.values())):
        if not (folder / what).is_file():
            parser.error(f"{folder} has no {what}")

    # llama.cpp: binaries, GGUF files
    tree = find_llama_tree(args.llama_dir, args.llama_version)
    tools = binaries(tree)
    if tools is None:
        if not args.build_llama:
            parser.error(f"no llama.cpp build under {args.llama_dir}: give --build-llama to build it from PyPI's "
                         f"{LLAMA_PACKAGE} sdist (15 to 20 minutes on 2 cores)")
        tree = build_llama(args.llama_dir, args.llama_version)
        tools = binaries(tree)
        if tools is None:
            raise SystemExit(f"the build in {tree} left no {', '.join(LLAMA_TARGETS)}")
    gguf_dir = args.work / "gguf" / args.student.resolve().name
    ggufs, convert_notes = convert(args.student, tree, tools, gguf_dir, types, args.llama_dir, args.gguf_pre)
    has_depth = "-d, --n-depth" in bench_help(tools["llama-bench"])
    tokenizer_meta = gguf_tokenizer(ggufs["F32"], tree)
    gen_config = args.student / "generation_config.json"
    if gen_config.is_file() and "eos_token_id" in tokenizer_meta:
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        if eos is not None and tokenizer_meta["eos_token_id"] not in (eos if isinstance(eos, list) else [eos]):
            convert_notes.append(f"the GGUF's eos_token_id is {tokenizer_meta['eos_token_id']} (from "
                                 f"tokenizer_config.json) but generation_config.json says {eos}: llama.cpp would stop "
                                 f"on the wrong token (no effect on these timings)")

    # onnxruntime-genai
    genai = args.genai
    genai_build = None
    if genai is None and args.build_genai:
        genai = args.work / "genai-int4" / args.student.resolve().name
    if genai is not None and not (genai / "genai_config.json").is_file():
        if not args.build_genai:
            parser.error(f"{genai} is not an onnxruntime-genai build (no genai_config.json): add --build-genai")
        genai_build = build_genai(args.student, genai)

    prompts = {n: prompt_ids(args.student / "tokenizer.json", n) for n in lengths}
    print("loading and warming up", file=sys.stderr)
    runners: dict[str, Callable[[], dict]] = {}
    kinds: dict[str, str] = {}
    sizes: dict[str, int] = {}
    threads_of: dict[str, int] = {}
    for t in thread_counts:
        suffix = f" t{t}" if len(thread_counts) > 1 else ""
        entries = [(label, "kd2edge",
                    lambda a=folder, b=label.split(" ", 1)[-1] in args.baseline:
                    kd2edge_runner(a, prompts, args.new_tokens, t, args.baseline_src if b else None),
                    folder_bytes(folder)) for label, folder in artifacts.items()]
        if genai is not None:
            entries.append(("onnxruntime-genai int4", "genai",
                            lambda: genai_runner(genai, prompts, args.new_tokens, t), folder_bytes(genai)))
        for qtype in types:
            entries.append((f"llama.cpp {qtype}", "llama",
                            lambda q=qtype: llama_runner(tools["llama-bench"], ggufs[q], lengths, args.new_tokens, t,
                                                         has_depth), ggufs[qtype].stat().st_size))
        for base, kind, make, size in entries:
            name = base + suffix
            runners[name], kinds[name], sizes[name], threads_of[name] = make(), kind, size, t

    load_before = os.getloadavg()
    raw: dict[str, dict[int, dict[str, list[float]]]] = {
        name: {n: {"prefill_tok_s": [], "ttft_ms": [], "decode_tok_s": []} for n in lengths} for name in runners}
    names = list(runners)
    round_loads: list[float] = []                       # 1-minute load average after each round
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            figures = runners[name]()
            for n in lengths:
                a, decode = figures[n]
                if kinds[name] == "llama":                  # a = prefill tok/s
                    prefill, ttft = a, n / a
                else:                                       # a = TTFT s
                    prefill, ttft = n / a, a
                raw[name][n]["prefill_tok_s"].append(round(prefill, 2))
                raw[name][n]["ttft_ms"].append(round(ttft * 1000, 2))
                raw[name][n]["decode_tok_s"].append(round(decode, 2))
            print(f"  round {r + 1}/{args.rounds} {name}: " + ", ".join(
                f"N={n}: TTFT {raw[name][n]['ttft_ms'][-1]:.0f} ms, decode {raw[name][n]['decode_tok_s'][-1]:.1f} "
                f"tok/s" for n in lengths), file=sys.stderr)
        round_loads.append(round(os.getloadavg()[0], 2))

    import onnxruntime as ort

    results: dict = {"runners": {}}
    for name in names:
        results["runners"][name] = {str(n): {k: summary(v) for k, v in raw[name][n].items()} for n in lengths}
        results["runners"][name]["size_bytes"] = sizes[name]
        results["runners"][name]["threads"] = threads_of[name]
        results["runners"][name]["kind"] = kinds[name]
    llama_setup = next((getattr(runners[n], "setup") for n in names if kinds[n] == "llama"), {})
    results["_setup"] = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "onnxruntime": ort.__version__},
        "student": str(args.student), "artifacts": {k: str(v) for k, v in artifacts.items()},
        "baseline_src": str(args.baseline_src) if args.baseline_src else None, "baseline": args.baseline, "genai": str(genai) if genai else None,
        "genai_build": genai_build, "gguf": {k: str(v) for k, v in ggufs.items()},
        "gguf_bytes": {k: v.stat().st_size for k, v in ggufs.items()},
        "gguf_tokenizer": tokenizer_meta, "convert_notes": convert_notes,
        "quantize_fallback_tensors": quantize_fallbacks(gguf_dir / "convert.log"),
        "llama_cpp": {**llama_version(tree), **llama_setup,
                      "decode_depth": "-d N" if has_depth else "depth 0 (this llama-bench has no -d)"},
        "prompt_lengths": lengths, "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": thread_counts,
        "load_average_1_5_15": {"before": [round(v, 2) for v in load_before],
                                "after": [round(v, 2) for v in os.getloadavg()]},
        "load_average_1min_after_each_round": round_loads,
        "ttft_llama": "N / pp-N tokens/s (prefill only, no sampling)",
    }
    try:
        import onnxruntime_genai as og
        results["_setup"]["host"]["onnxruntime_genai"] = og.__version__
    except ImportError:
        pass
    print(table(results, lengths))
    load = results["_setup"]["load_average_1_5_15"]
    print(f"host: {os.cpu_count()} CPUs, load average (1 min) {load['before'][0]:.1f} before, "
          f"{load['after'][0]:.1f} after, {min(round_loads):.1f}..{max(round_loads):.1f} across rounds" + ("  -- a busy host: the figures are not a quiet-machine reference"
                                              if max(load["before"][0], load["after"][0], *round_loads)
                                              > 0.5 * (os.cpu_count() or 1)
                                              else ""))
    for note in convert_notes:
        print(f"note (GGUF conversion): {note}")
    if not has_depth:
        print("note: this llama-bench has no -d: its decode figures are at depth 0, not at N")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

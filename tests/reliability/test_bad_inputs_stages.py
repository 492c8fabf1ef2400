"""Bad-input catalogue, part 2: datasets, models, checkpoints, artifacts, flags and resources per stage.

Every case goes through the CLI entry point (`kd2edge.cli.main`, in-process) and must give
exactly one `error:` line holding a fragment that says what to change, the documented exit
code (kd2edge.errors: 2 config, 3 data, 4 model, 5 artifact, 6 resource), no traceback, and
leave nothing in the output folder's parent. The artifacts the cases start from (a GPTQ
checkpoint and an ONNX export of a tiny llama) are built once per module through the CLI.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from collections import namedtuple
from pathlib import Path

import pytest

from kd2edge import resources
from kd2edge.cli import main

CTX = "The Velmora Institute was founded in 1871 by Adaline Qorr in the city of Tessaly."


def _write_data(root: Path) -> None:
    """Small dataset files, each broken in one way."""
    root.mkdir()
    (root / "empty.json").write_text("")
    (root / "truncated.json").write_text('{"data": [{"title": "t", "paragraphs": [{"context": "abc"')
    (root / "no_items.json").write_text(json.dumps({"version": "1.1", "data": []}))
    good = {"question": "Who founded it?", "context": CTX, "answers": {"text": ["Adaline Qorr"], "answer_start": [45]}}
    bad = {"context": CTX, "answers": {"text": ["1871"], "answer_start": [37]}}
    (root / "no_question.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    csqa = {"id": "a", "answerKey": "A", "question": {"question_concept": "x",
                                                      "choices": [{"label": "A", "text": "yes"}, {"label": "B", "text": "no"}]}}
    (root / "csqa_no_stem.jsonl").write_text(json.dumps(csqa) + "\n")
    qas = [{"id": "q1", "question": "Who founded the Velmora Institute?", "answers": [{"text": "Adaline Qorr", "answer_start": 3}]},
           {"id": "q2", "question": "When was it founded?", "answers": [{"text": "1871", "answer_start": 37}]},
           {"id": "q3", "question": "In which city?", "answers": [{"text": "Tessaly", "answer_start": 0}]}]
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": CTX, "qas": qas}]}]}
    (root / "squad_bad_offsets.json").write_text(json.dumps(squad))


def _cli(args: list[str]) -> None:
    assert main(args) == 0, f"building the fixture failed: kd2edge {' '.join(args)}"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    """Paths of everything the cases read: models, a checkpoint, an export, broken copies, data, a profile."""
    import copy

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, GPT2Config

    from kd2edge.testing import tiny_model, tiny_model_dir

    root = tmp_path_factory.mktemp("bad-stages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD2EDGE_CACHE", str(root / "cache"))
        p = {"tiny": tiny_model_dir(root / "tiny", "llama"),
             # distill plans a student before it looks at --student: a 2-layer teacher has no plan on laptop-cpu
             "teacher4": tiny_model_dir(root / "teacher4", "llama", num_layers=4),
             "student6": tiny_model_dir(root / "student6", "llama", num_layers=6)}
        model, tokenizer = tiny_model("llama")
        other = copy.deepcopy(tokenizer)
        other.add_tokens(["<extra_token>"])
        model.save_pretrained(root / "other_tokenizer")
        other.save_pretrained(root / "other_tokenizer")
        p["other_tokenizer"] = root / "other_tokenizer"
        # GPT-2 keeps its projections in Conv1D layers: no decoder Linear GPTQ knows.
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4,
                                                           n_positions=512))
        gpt2.save_pretrained(root / "gpt2")
        tokenizer.save_pretrained(root / "gpt2")
        p["gpt2"] = root / "gpt2"
        (root / "bad_config").mkdir()
        (root / "bad_config" / "config.json").write_text("{not json")
        p["bad_config"] = root / "bad_config"

        p["ckpt"], p["export"] = root / "ckpt", root / "export"
        _cli(["quantize", str(p["tiny"]), "--out", str(p["ckpt"]), "--calib-samples", "8"])
        _cli(["export", str(p["ckpt"]), "--out", str(p["export"])])

    p["ckpt_missing_tensor"] = root / "ckpt_missing_tensor"
    shutil.copytree(p["ckpt"], p["ckpt_missing_tensor"])
    weights = p["ckpt_missing_tensor"] / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.mlp.down_proj.qzeros"]
    save_file(tensors, str(weights), metadata={"format": "pt"})

    p["corrupt_onnx"] = root / "corrupt_onnx"
    shutil.copytree(p["export"], p["corrupt_onnx"])
    (p["corrupt_onnx"] / "model.onnx").write_bytes(b"not an onnx protobuf \x00\x01\x02" * 64)
    p["no_tokenizer"] = root / "no_tokenizer"
    shutil.copytree(p["export"], p["no_tokenizer"])
    (p["no_tokenizer"] / "tokenizer.json").unlink()

    # laptop-cpu with a CUDA provider first and short profiling runs (the tiny model's context is 512).
    laptop = (Path(__file__).parents[2] / "profiles" / "laptop-cpu.toml").read_text()
    cuda = (laptop.replace('["CPUExecutionProvider"]', '["CUDAExecutionProvider", "CPUExecutionProvider"]')
            .replace("prompt_lengths = [128, 512]", "prompt_lengths = [16]").replace("new_tokens = 64", "new_tokens = 8")
            .replace("warmup = 1", "warmup = 0").replace("repeats = 3", "repeats = 1"))
    assert cuda.count("CUDAExecutionProvider") == 1 and "[16]" in cuda
    (root / "cuda.toml").write_text(cuda)
    p["cuda_profile"] = root / "cuda.toml"
    _write_data(root / "data")
    p["data"] = root / "data"
    return {k: str(v) for k, v in p.items()}


EVAL_DATA = ["evaluate", "--model", "{tiny}", "--shots", "0", "--data"]

# name -> (arguments, exit code, fragment of the error line). {key} is a path from `built`,
# {out} an output folder that must not exist afterwards.
CASES = {
    # datasets (evaluate --model reads the data before it loads the model; distill likewise)
    "dataset file missing": (EVAL_DATA + ["{data}/absent.json"], 3, "give 'embedded', a local SQuAD JSON / JSONL file"),
    "dataset file empty": (EVAL_DATA + ["{data}/empty.json"], 3, "empty.json is not valid JSON at line 1 column 1"),
    "dataset with no items": (EVAL_DATA + ["{data}/no_items.json"], 3, "has no questions: give a non-empty file or another split"),
    "empty split slice": (EVAL_DATA + ["{data}/squad_bad_offsets.json@train[:0]"],
                          3, "has no questions: give a non-empty file or another split"),
    "dataset JSON truncated": (EVAL_DATA + ["{data}/truncated.json"], 3, "the file is truncated or corrupt, fetch it again"),
    "JSONL record missing question": (EVAL_DATA + ["{data}/no_question.jsonl"],
                                      3, "no_question.jsonl record 2: missing 'question'"),
    "CSQA record missing stem": (EVAL_DATA + ["{data}/csqa_no_stem.jsonl"],
                                 3, "csqa_no_stem.jsonl record 1 question: missing 'stem'"),
    "distill data missing": (["distill", "--teacher", "{teacher4}", "--out", "{out}", "--data", "{data}/absent.json"],
                             3, "give 'embedded', a local SQuAD JSON / JSONL file"),
    # distillation flags and models
    "temperature zero": (["distill", "--teacher", "{tiny}", "--out", "{out}", "--temperature", "0"],
                         2, "distill.temperature: 0.0 is below the minimum 0.05"),
    "kd ratio two": (["distill", "--teacher", "{tiny}", "--out", "{out}", "--kd-ratio", "2"],
                     2, "distill.kd_ratio: 2.0 is above the maximum 1"),
    "kd ratio without a divergence": (["distill", "--teacher", "{tiny}", "--out", "{out}", "--loss", "none",
                                       "--kd-ratio", "0.3"], 2, "--kd-ratio 0.3 weighs the divergence, which loss 'none'"),
    "one-shot beyond range": (["distill", "--teacher", "{tiny}", "--out", "{out}", "--shots", "2"],
                              2, "Invalid value for '--shots': 2 is not in the range 0<=x<=1"),
    "student with another tokenizer": (["distill", "--teacher", "{teacher4}", "--student", "{other_tokenizer}",
                                        "--out", "{out}", "--steps", "1", "--data", "embedded"],
                                       4, "does not share the teacher's tokenizer (401 vs 400 tokens"),
    "student larger than teacher": (["distill", "--teacher", "{teacher4}", "--student", "{student6}", "--out", "{out}",
                                     "--steps", "1", "--data", "embedded"], 4, "not fewer than the teacher's 173,632: choose a smaller student"),
    # quantize
    "quantize bits five": (["quantize", "{tiny}", "--out", "{out}", "--bits", "5"], 2, "bits: 5 is not supported (use 2, 3, 4 or 8)"),
    "quantize group size 100": (["quantize", "{tiny}", "--out", "{out}", "--group-size", "100"],
                                2, "group_size: 100 must be -1 (per channel) or a power of two >= 16"),
    "quantize model without Linear layers": (["quantize", "{gpt2}", "--out", "{out}", "--calib-samples", "4"],
                                             4, "cannot find the decoder layers of a 'gpt2' model"),
    "quantize a data file": (["quantize", "{data}/empty.json", "--out", "{out}"],
                             4, "is not a model: give a transformers folder, a .gguf file or a hub id"),
    "quantize a folder with a broken config": (["quantize", "{bad_config}", "--out", "{out}"],
                                               4, "config.json' is not a valid JSON file"),
    # export
    "export checkpoint missing a tensor": (["export", "{ckpt_missing_tensor}", "--out", "{out}"],
                                           5, "lacks model.layers.0.mlp.down_proj.qzeros: it is incomplete, quantize again"),
    "export a model that is not GPTQ": (["export", "{tiny}", "--out", "{out}"], 5, "run `kd2edge quantize` first"),
    "export unknown exporter": (["export", "{ckpt}", "--out", "{out}", "--exporter", "tflite"],
                                2, "Invalid value for '--exporter'"),
    # corrupt ONNX, missing tokenizer, everywhere an export is read
    "profile corrupt ONNX": (["profile", "{corrupt_onnx}", "--out", "{out}", "--no-baseline"],
                             5, "cannot be loaded by onnxruntime"),
    "generate corrupt ONNX": (["generate", "{corrupt_onnx}", "Who founded it?"], 5, "re-run `kd2edge export`"),
    "evaluate corrupt ONNX": (["evaluate", "--model", "{corrupt_onnx}", "--shots", "0", "--limit", "2"],
                              5, "cannot be loaded by onnxruntime"),
    "package corrupt ONNX": (["package", "{corrupt_onnx}", "--out", "{out}"],
                             5, "changed after `kd2edge export` wrote it"),
    "profile without tokenizer.json": (["profile", "{no_tokenizer}", "--out", "{out}", "--no-baseline"],
                                       5, "missing tokenizer.json; re-run `kd2edge export`"),
    "generate without tokenizer.json": (["generate", "{no_tokenizer}", "Who?"], 5, "missing tokenizer.json"),
    "package without tokenizer.json": (["package", "{no_tokenizer}", "--out", "{out}"],
                                       5, "changed after `kd2edge export` wrote it"),
    "package a checkpoint": (["package", "{ckpt}", "--out", "{out}"], 5, "expected a 'export' one"),
    # profiles vs host and model
    "profile provider missing here": (["profile", "{export}", "--profile", "{cuda_profile}", "--out", "{out}",
                                       "--no-baseline"], 2, "CUDAExecutionProvider is not available"),
    "profile prompts beyond the context": (["profile", "{export}", "--out", "{out}", "--no-baseline"],
                                           2, "lower profiling.prompt_lengths or profiling.new_tokens"),
    # evaluate / generate / serve flags
    "evaluate shots two": (["evaluate", "--model", "{tiny}", "--shots", "2"], 2, "2 is not in the range 0<=x<=1"),
    "evaluate negative limit": (["evaluate", "--model", "{tiny}", "--limit", "-1"], 2, "-1 is not in the range x>=0"),
    "generate zero new tokens": (["generate", "{export}", "Who?", "--max-new-tokens", "0"],
                                 2, "0 is not in the range 1<=x<=4096"),
    "serve port out of range": (["serve", "{export}", "--port", "70000"], 2, "70000 is not in the range 0<=x<=65535"),
    "serve negative queue": (["serve", "{export}", "--max-queue", "-1"], 2, "-1 is not in the range 0<=x<=1024"),
    "serve zero new tokens": (["serve", "{export}", "--max-new-tokens", "0"], 2, "0 is not in the range 1<=x<=4096"),
    "package bad image name": (["package", "{export}", "--out", "{out}", "--image-name", "My Model"],
                               2, "is not a Docker repository name"),
}


def run_cli(args: list[str], capsys) -> tuple[int, str, list[str]]:
    """(exit code, stderr, its `error:` lines) of one in-process CLI call."""
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err, [line for line in err.splitlines() if line.startswith("error: ")]


def assert_refused(rc: int, err: str, errors: list[str], code: int, fragment: str) -> None:
    assert rc == code, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err


def assert_nothing_left(folder: Path, before: set[str]) -> None:
    """Nothing new in `folder` but a stage's checkpoint folder (`.NAME.work`), which is never
    loaded as an artifact and holds no manifest (a rerun with the same config resumes from it)."""
    left = set(os.listdir(folder)) - before
    trusted = [p for name in left for p in [folder / name, *(folder / name).rglob("*")] if p.name == "manifest.json"]
    assert not trusted, f"an artifact was left behind: {trusted}"
    assert all(name.startswith(".") and name.endswith(".work") for name in left), f"left behind: {left}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, built, tmp_path, capsys):
    args, code, fragment = CASES[case]
    args = [a.format(**built, out=tmp_path / "out") for a in args]
    rc, err, errors = run_cli(args, capsys)
    assert_refused(rc, err, errors, code, fragment)
    assert_nothing_left(tmp_path, set())


def test_squad_offsets_that_do_not_match_are_a_warning(built, tmp_path, capsys):
    """Two of three answer_start values are wrong but the answers occur once: fixed, counted, not fatal."""
    preds = tmp_path / "preds.jsonl"
    rc, err, errors = run_cli(["evaluate", "--model", built["tiny"], "--data", f"{built['data']}/squad_bad_offsets.json",
                               "--shots", "0", "--max-new-tokens", "2", "--predictions", str(preds), "--json"], capsys)
    assert rc == 0 and not errors, err
    assert "warning: 2 answer offsets did not match their context: 2 fixed" in err
    assert len(preds.read_text().splitlines()) == 3


def test_missing_provider_runs_on_cpu_with_allow_fallback(built, tmp_path, capsys):
    rc = main(["profile", built["export"], "--profile", built["cuda_profile"], "--out", str(tmp_path / "p"),
               "--no-baseline", "--no-gate", "--allow-fallback", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "CUDAExecutionProvider not available here; running on CPUExecutionProvider" in err
    report = json.loads(out)
    assert report["latency"]["fallback"] is True and report["latency"]["providers"] == ["CPUExecutionProvider"]
    assert (tmp_path / "p" / "manifest.json").is_file()


def test_serve_on_a_port_in_use(built, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err, errors = run_cli(["serve", built["export"], "--port", str(port)], capsys)
    assert_refused(rc, err, errors, 6, f"cannot listen on 127.0.0.1:{port} (Address already in use): "
                                       "choose another --port")


Usage = namedtuple("Usage", "total used free")


def _stage_must_not_run(monkeypatch, module: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"{module}.run started although resources were short")
    monkeypatch.setattr(f"{module}.run", refuse)


@pytest.mark.parametrize("stage,args", [
    ("kd2edge.distill.stage", ["distill", "--teacher", "{teacher4}", "--out", "{out}"]),
    ("kd2edge.quantize.stage", ["quantize", "{tiny}", "--out", "{out}"]),
    ("kd2edge.export.stage", ["export", "{ckpt}", "--out", "{out}"]),
    ("kd2edge.profiling.stage", ["profile", "{export}", "--out", "{out}", "--no-baseline"]),
    ("kd2edge.package.stage", ["package", "{export}", "--out", "{out}"]),
])
def test_full_disk_refuses_before_any_work(stage, args, built, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    _stage_must_not_run(monkeypatch, stage)
    rc, err, errors = run_cli([a.format(**built, out=tmp_path / "out") for a in args], capsys)
    what = stage.split(".")[1].replace("profiling", "profile")
    assert_refused(rc, err, errors, 6, f"the {what} stage needs about ")
    assert "of disk but " in errors[0] and "has 1000 B free: free some space or choose another --out" in errors[0]
    assert_nothing_left(tmp_path, set())


def test_too_little_memory_refuses_before_any_work(built, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 2**20)
    _stage_must_not_run(monkeypatch, "kd2edge.quantize.stage")
    rc, err, errors = run_cli(["quantize", built["tiny"], "--out", str(tmp_path / "q")], capsys)
    assert_refused(rc, err, errors, 6, "of memory but 1.0 MiB is available: close other programs or use a smaller model")
    assert_nothing_left(tmp_path, set())


def test_huge_estimate_refuses_with_the_numbers(built, tmp_path, capsys, monkeypatch):
    """No faked figures: 100,000 calibration samples of 131,072 tokens need terabytes of hidden states."""
    from kd2edge.quantize.stage import quantize_needs

    config = tmp_path / "huge.json"
    config.write_text(json.dumps({"quantize": {"calib_samples": 100_000, "calib_max_tokens": 131_072}}))
    _stage_must_not_run(monkeypatch, "kd2edge.quantize.stage")
    rc, err, errors = run_cli(["quantize", built["tiny"], "--config", str(config), "--out", str(tmp_path / "q")], capsys)
    assert_refused(rc, err, errors, 6, "the quantize stage needs about ")
    # 2 x 4 bytes x 1.31e10 tokens x hidden 64 = 6.7e12 bytes of calibration activations alone
    assert quantize_needs(0, 0, 64, 128, 4, 64, 100_000 * 131_072).memory_bytes > 6.7e12
    needed = re.search(r"needs about ([\d.]+) GiB of memory but ", errors[0])
    assert needed and float(needed.group(1)) > 6000, errors[0]
    assert_nothing_left(tmp_path, {"huge.json"})


def test_disk_filling_up_mid_write_keeps_nothing(built, tmp_path, capsys, monkeypatch):
    """ENOSPC while the checkpoint is written: exit 6, and no partial folder a rerun could trust."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kd2edge.gptq_checkpoint.write_gptq_checkpoint", full)
    rc, err, errors = run_cli(["quantize", built["tiny"], "--out", str(tmp_path / "q"), "--calib-samples", "8"], capsys)
    assert_refused(rc, err, errors, 6, "the disk filled up while writing q: free some space and rerun")
    assert_nothing_left(tmp_path, set())


def test_explicit_student_needs_no_plan(built, tmp_path, capsys):
    """No planned student fits laptop-cpu for a 2-layer teacher (BudgetError, exit 7), but with
    --student nothing is planned: distilling a 1-layer student from it must work."""
    from kd2edge.testing import tiny_model_dir

    student = tiny_model_dir(tmp_path / "student1", "llama", num_layers=1)
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"distill": {"eval_limit": 2, "train_limit": 8}, "evaluate": {"max_new_tokens": 4}}))
    assert main(["plan", "--teacher", built["tiny"]]) == 7
    rc = main(["distill", "--teacher", built["tiny"], "--student", str(student), "--out", str(tmp_path / "d"),
               "--config", str(short), "--steps", "1", "--data", "embedded", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["student"]["layers"] == 1 and result["plan"] is None

"""Bad-input catalogue, part 1: profiles, configs, flags, model paths, output folders.

Each case goes through the CLI entry point and must give exactly one `error:` line that
says what to change, a non-zero exit, no traceback, and leave no artifact behind.
The stage-specific cases live beside them in this folder.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from kd2edge.cli import main

GOOD_PROFILE = (
    'description = "x"\n[hardware]\narch = "x86_64"\ncores = 2\nmemory = "4GB"\nmemory_bandwidth = "20GB/s"\n'
    '[runtime]\nexecution_providers = ["CPUExecutionProvider"]\nthreads = 2\n'
    '[budgets]\nmax_artifact_mb = 100\nmax_peak_memory_mb = 500\nmax_ttft_ms = 900\n'
    'min_decode_tokens_per_s = 5\nmin_retention = 0.5\n[quantization]\nbits = 4\n'
    '[docker]\nbase_image = "python:3.11-slim"\nplatform = "linux/amd64"\n'
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def profile_cases(tmp_path):
    return {
        "unknown profile name": (["run", "--profile", "toaster"], 2, "unknown profile 'toaster'"),
        "profile file missing": (["run", "--profile", str(tmp_path / "gone.toml")], 2, "does not exist"),
        "profile not TOML": (["run", "--profile", write(tmp_path, "p1.toml", "[hardware\n")], 2, "cannot parse p1.toml"),
        "profile empty": (["run", "--profile", write(tmp_path, "p2.toml", "")], 2, "hardware: missing"),
        "profile bad unit": (["run", "--profile", write(tmp_path, "p3.toml", GOOD_PROFILE.replace('"4GB"', '"4 parsecs"'))],
                             2, "hardware.memory"),
        "profile unknown key": (["run", "--profile", write(tmp_path, "p4.toml", GOOD_PROFILE + "[extra]\nx = 1\n")],
                                2, "extra: unknown key"),
        "profile impossible value": (["run", "--profile", write(tmp_path, "p5.toml", GOOD_PROFILE.replace("cores = 2", "cores = 0"))],
                                     2, "hardware.cores: 0 is below the minimum 1"),
        "profile unknown provider": (["run", "--profile", write(tmp_path, "p6.toml", GOOD_PROFILE.replace('"CPUExecutionProvider"', '"NPUExecutionProvider"'))],
                                     2, "unknown provider 'NPUExecutionProvider'"),
        "profile arch vs platform": (["run", "--profile", write(tmp_path, "p7.toml", GOOD_PROFILE.replace('"linux/amd64"', '"linux/arm64"'))],
                                     2, "does not match hardware.arch x86_64"),
        "profile retention out of range": (["run", "--profile", write(tmp_path, "p8.toml", GOOD_PROFILE.replace("min_retention = 0.5", "min_retention = 7"))],
                                           2, "min_retention: 7.0 is above the maximum"),
        "config file missing": (["run", "--config", str(tmp_path / "none.json")], 2, "cannot read config file"),
        "config file not JSON": (["run", "--config", write(tmp_path, "c.json", "{")], 2, "not valid JSON"),
        "config neither file nor recipe": (["run", "--config", "studdy"], 2, "no config file or recipe 'studdy' (recipes: study"),
        "config unknown section": (["run", "--config", write(tmp_path, "c2.json", json.dumps({"quantise": {}}))], 2, "quantise: unknown key"),
        "config wrong type": (["run", "--config", write(tmp_path, "c3.json", json.dumps({"seed": "zero"}))], 2, "seed: expected a whole number"),
        "bits out of range": (["run", "--config", write(tmp_path, "c4.json", json.dumps({"quantize": {"bits": 5}}))], 2, "bits: 5 is not supported"),
        "group size not a power of two": (["run", "--config", write(tmp_path, "c5.json", json.dumps({"quantize": {"group_size": 100}}))],
                                          2, "group_size: 100 must be -1"),
        "negative temperature": (["run", "--config", write(tmp_path, "c6.json", json.dumps({"distill": {"temperature": -1}}))],
                                 2, "temperature: -1.0 is below the minimum"),
        "kd ratio above one": (["run", "--config", write(tmp_path, "c7.json", json.dumps({"distill": {"kd_ratio": 1.5}}))],
                               2, "kd_ratio: 1.5 is above the maximum 1"),
        "non-integer flag": (["run", "--steps", "many"], 2, "'many' is not a valid integer"),
        "unknown flag": (["run", "--colour", "red"], 2, "No such option '--colour'"),
        "unknown command": (["distil"], 2, "No such command 'distil'"),
        "teacher path missing": (["run", "--teacher", str(tmp_path / "no-model"), "--out", str(tmp_path / "o1")], 4, "not found"),
        "teacher folder not a model": (["run", "--teacher", str(tmp_path), "--out", str(tmp_path / "o2")], 4, "has no config.json"),
        "teacher file not a model": (["run", "--teacher", write(tmp_path, "w.bin", "junk"), "--out", str(tmp_path / "o3")], 4, "is not a model"),
        "output folder under a file": (["run", "--teacher", "__TINY__", "--out", write(tmp_path, "afile", "") + "/run"],
                                       6, "choose a writable --out folder"),
        "hub id offline": (["run", "--teacher", "acme/never-cached", "--out", str(tmp_path / "o4")], 4, "cannot reach the Hugging Face hub"),
    }


def _case_names() -> list[str]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return list(profile_cases(Path(tmp)))


CASE_NAMES = _case_names()


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input(case, tmp_path, capsys, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, code, fragment = profile_cases(tmp_path)[case]
    args = [str(tiny_llama_dir) if a == "__TINY__" else a for a in args]
    before = set(os.listdir(tmp_path))
    rc = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == code, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    created = set(os.listdir(tmp_path)) - before - {"afile"}
    assert not created, f"left behind: {created}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path, capsys, tiny_llama_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    rc = main(["run", "--teacher", str(tiny_llama_dir), "--out", str(locked / "run")])
    err = capsys.readouterr().err
    assert rc == 6 and "choose a writable --out folder" in err

"""The quantize stage and `kd2edge quantize` on a tiny model."""

from __future__ import annotations

import json

import pytest

from kd2edge.cli import main
from kd2edge.gptq_checkpoint import is_gptq_checkpoint, read_gptq_tensors


def test_quantize_command_writes_a_checked_checkpoint(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_llama_dir), "--out", str(out), "--group-size", "32", "--calib-samples", "12",
            "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "done"
    assert is_gptq_checkpoint(out)
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["stage"] == "quantize" and manifest["format"] == "gptq"
    assert m["readback_max_abs_diff"] == 0.0
    assert m["calibration"]["samples"] == 12 and m["calibration"]["tokens"] > 100
    assert m["reconstruction"]["linears"] == 14
    assert m["reconstruction"]["gptq_rel_err_mean"] < m["reconstruction"]["rtn_rel_err_mean"]
    assert len(json.loads((out / "quant_report.json").read_text())) == 14
    assert (out / "quant_errors.png").stat().st_size > 0
    # laptop-cpu profile: act-order with static groups, so g_idx stays column // group_size
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["static_groups"]) == (4, 32, False, True)
    for qt in read_gptq_tensors(out).values():
        assert qt.g_idx.tolist() == [i // 32 for i in range(qt.in_features)]
    assert m["held_out"]["nll_quantized"] < m["held_out"]["nll_fp32"] + 0.5
    # unchanged config and input: the stage is skipped
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "skipped"


@pytest.mark.parametrize("flags,code,message", [
    (["--bits", "5"], 2, "bits"),
    (["--group-size", "48"], 2, "power of two"),
    (["--data", "{data}", "--group-size", "32"], 3, "calibration tokens"),
])
def test_quantize_bad_input(tiny_llama_dir, tmp_path, capsys, flags, code, message):
    out = tmp_path / "q"
    data = tmp_path / "one.jsonl"                              # one short question: ~20 tokens
    data.write_text(json.dumps({"question": "Who?", "context": "Ann came.", "answers": ["Ann"]}) + "\n")
    flags = [f.format(data=data) for f in flags]
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), *flags]) == code
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_group_size_is_fitted_to_the_model():
    from kd2edge.quantize.orchestrate import fitting_group_size
    from kd2edge.testing import tiny_model

    model, _ = tiny_model("llama")                             # in_features 64 and 128
    assert fitting_group_size(model, 128) == 64
    assert fitting_group_size(model, 32) == 32
    assert fitting_group_size(model, -1) == -1

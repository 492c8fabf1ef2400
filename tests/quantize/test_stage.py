"""The quantize stage and `kd2edge quantize` on a tiny model."""

from __future__ import annotations

import json

import pytest

import torch

from kd2edge.cli import main
from kd2edge.gptq_checkpoint import dequantize_tensors, is_gptq_checkpoint, load_dequantized_model, read_gptq_tensors


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
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report) == 15 and report[-1]["layer"] == "head" and report[-1]["tied"]
    # the head by GPTQ (the default): its output error below RTN's on the same inputs
    assert m["head"] == "gptq" and m["reconstruction"]["head"]["gptq_rel_err"] < report[-1]["rtn_rel_err"]
    assert (out / "quant_errors.png").stat().st_size > 0
    # laptop-cpu profile: act-order with static groups, so g_idx stays column // group_size
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["static_groups"], cfg["lm_head"]) == \
        (4, 32, False, True, True)
    stored = read_gptq_tensors(out)
    assert "lm_head" in stored and stored["lm_head"].out_features == 400
    for qt in stored.values():
        assert qt.g_idx.tolist() == [i // 32 for i in range(qt.in_features)]
    # tied: the reloaded embedding is exactly the head's dequantized weight, not its float16 copy
    reloaded, _ = load_dequantized_model(out)
    assert torch.equal(reloaded.get_input_embeddings().weight, dequantize_tensors(stored["lm_head"]))
    assert m["held_out"]["nll_quantized"] < m["held_out"]["nll_fp32"] + 0.5
    # unchanged config and input: the stage is skipped
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "skipped"


def test_float_head_keeps_the_checkpoint_as_before(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_llama_dir), "--out", str(out), "--group-size", "32", "--calib-samples", "12",
            "--head", "float", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["head"] == "float"
    assert "lm_head" not in read_gptq_tensors(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head"] is False
    assert len(json.loads((out / "quant_report.json").read_text())) == 14


def test_unpackable_vocabulary_is_refused_by_quantize_head():
    from kd2edge.errors import ConfigError
    from kd2edge.quantize.orchestrate import head_packable, quantize_head
    from kd2edge.testing import tiny_model

    model, _ = tiny_model("llama")
    assert head_packable(model, 4, 32) is None
    model.resize_token_embeddings(403)                          # a trimmed vocabulary: not a multiple of 8
    assert "403 tokens" in head_packable(model, 4, 32)
    with pytest.raises(ConfigError, match="keep it float"):
        quantize_head(model, [torch.arange(80) % 403], group_size=32)


@pytest.mark.parametrize("flags,code,message", [
    (["--bits", "5"], 2, "bits"),
    (["--group-size", "48"], 2, "power of two"),
    (["--data", "{data}", "--group-size", "32"], 3, "calibration tokens"),
])
def test_quantize_bad_input(tiny_llama_dir, tmp_path, capsys, flags, code, message):
    out = tmp_path / "q"
    # Three short questions on three passages: the by-passage split trains on two (~40 tokens).
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"question": "Who?", "context": f"{name} came.", "answers": [name]}) + "\n"
                            for name in ("Ann", "Bob", "Cy")))
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

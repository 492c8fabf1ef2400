"""The export stage: GPTQ -> MatMulNBits packing, graph rewrite, parity, stage, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kd2edge.errors import ArtifactError, ModelError, StageError


# ----------------------------------------------------------------- packing maths
def test_unpack_int32_rows_by_hand():
    from exporters.matmulnbits import unpack_int32_rows

    # 0x87654321 holds 1..8 from the lowest nibble up; a negative int32 must unpack the same
    word = np.array([[np.int32(np.uint32(0x87654321).view(np.int32))]])
    assert unpack_int32_rows(word, 4)[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_pack_nibbles_by_hand():
    from exporters.matmulnbits import pack_nibbles, unpack_nibbles

    packed = pack_nibbles(np.array([1, 2, 3], dtype=np.uint8))
    assert packed.tolist() == [0x21, 0x03]           # even position low nibble, odd length padded
    assert unpack_nibbles(packed, 3).tolist() == [1, 2, 3]


def test_act_order_permutation():
    from exporters.matmulnbits import act_order_permutation

    assert act_order_permutation(np.array([1, 0, 1, 0]), 2).tolist() == [1, 3, 0, 2]
    assert act_order_permutation(np.array([0, 0, 1, 1]), 2) is None
    with pytest.raises(ArtifactError, match="groups of 2"):
        act_order_permutation(np.array([0, 0, 0, 1]), 2)


def _gptq_layer(act_order: bool, K=128, N=48, group_size=32):
    import torch

    from kd2edge.gptq_checkpoint import pack_result
    from kd2edge.quantize.gptq import gptq_quantize_weight

    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(K, 512, generator=g) * torch.linspace(0.1, 3, K)[torch.randperm(K, generator=g)][:, None]
    return pack_result(gptq_quantize_weight(W, 2 * X @ X.T / 512, 4, group_size, act_order=act_order))


@pytest.mark.parametrize("act_order", [False, True])
def test_matmulnbits_holds_exactly_the_gptq_weight(act_order):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporters.matmulnbits import dequantize_matmulnbits, gptq_codes, to_matmulnbits
    from exporters.onnx_graph import MS_DOMAIN, matmulnbits_nodes
    from kd2edge.gptq_checkpoint import dequantize_tensors

    qt = _gptq_layer(act_order)
    W = dequantize_tensors(qt).numpy()                                    # (N, K) the reference weight
    codes, zeros = gptq_codes(qt.qweight.numpy(), qt.qzeros.numpy(), 4)
    packed = to_matmulnbits(codes, zeros, qt.scales.float().numpy(), qt.g_idx.numpy(), 32)
    assert (packed["perm"] is not None) == act_order
    order = packed["perm"] if act_order else np.arange(128)
    held = dequantize_matmulnbits(packed["B"], packed["scales"], packed["zero_points"], 128, 48, 32)
    assert np.array_equal(held, W.T[order])                               # no second rounding
    # onnxruntime's kernel computes x @ W^T with it (fp32 accumulation order aside)
    model = helper.make_model(helper.make_graph(
        [], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    model.graph.node.extend(matmulnbits_nodes("layer", "x", "y", packed, 0, model))
    x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ W.T, atol=1e-4)


def test_store_fp16_only_when_exact():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx_graph import store_fp16

    exact = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float16).astype(np.float32)
    inexact = exact + np.float32(1e-7) * 3
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["a"]), helper.make_node("MatMul", ["x", "B"], ["b"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(exact, "A"), numpy_helper.from_array(inexact, "B")]),
        opset_imports=[helper.make_opsetid("", 18)])
    assert store_fp16(model, min_elements=1) == {"A": 64 * 8 * 2}
    x = np.ones((1, 64), dtype=np.float32)
    a, b = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(a, x @ exact, atol=1e-4)
    np.testing.assert_allclose(b, x @ inexact, atol=1e-4)


# --------------------------------------------------------- export + parity
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from kd2edge.testing import tiny_gptq_checkpoint

    root = tmp_path_factory.mktemp("gptq")
    return {arch: tiny_gptq_checkpoint(root / arch, arch) for arch in ("llama", "qwen2", "gpt_neox")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_onnx_export_matches_pytorch(checkpoints, tmp_path, arch):
    import onnx

    from exporters.onnx_export import export
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model, read_gptq_tensors

    meta = export(checkpoints[arch], tmp_path / "out")
    layers = read_gptq_tensors(checkpoints[arch])
    assert meta["quantized_layers"] == len(layers) == meta["act_order_layers"]
    assert meta["nbits_weight_max_abs_diff"] == 0.0
    # Llama-family models get the hand-fused graph, others optimum's traced one
    assert meta["graph"] == ("traced" if arch == "gpt_neox" else "fused")
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == len(layers)       # these checkpoints' q/k/v permutations differ: no merging
    assert ops.count("GroupQueryAttention") == (0 if arch == "gpt_neox" else 2)
    reference, _ = load_dequantized_model(checkpoints[arch])
    report = check_parity(tmp_path / "out", reference, decode_steps=3, atol=1e-3)
    assert report.max_abs_diff < 1e-3
    assert {"prefill/logits", "decode_3/logits", "prefill/present.0.key"} <= set(report.diffs)


def test_runtime_greedy_equals_pytorch_greedy_on_gptq_export(checkpoints, tmp_path):
    import torch

    from exporters.onnx_export import export
    from kd2edge.gptq_checkpoint import load_dequantized_model
    from kd2edge.runtime.lm import OnnxLM

    export(checkpoints["qwen2"], tmp_path / "out")
    lm = OnnxLM.load(tmp_path / "out")
    ids = lm.encode(lm.format_prompt("¿Quién fundó Brimor?"))
    model, tokenizer = load_dequantized_model(checkpoints["qwen2"])
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert lm.generate(ids, 20).tokens == ref


def test_quantized_embeddings_share_one_4bit_matrix(checkpoints, tmp_path):
    import onnx

    from exporters.onnx_export import export
    from exporters.vocab import quantize_embeddings_rtn
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model

    meta = export(checkpoints["llama"], tmp_path / "out", quantize_embeddings=True)
    assert meta["embeddings"] == "int4-rtn-block32" and meta["tied_embeddings"]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    gbq = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.name == "/lm_head/MatMulNBits")
    shared = head.input[1]
    assert any(n.op_type == "Reshape" and n.input[0] == shared and n.output[0] == gbq.input[0] for n in graph.node)
    assert not any(n.op_type == "Gather" and "embed_tokens" in n.input[0] for n in graph.node)
    reference, _ = load_dequantized_model(checkpoints["llama"])
    quantize_embeddings_rtn(reference)
    assert check_parity(tmp_path / "out", reference, decode_steps=2, atol=1e-3).max_abs_diff < 1e-3


def test_parity_failure_names_the_outputs(checkpoints, tmp_path):
    import torch

    from exporters.onnx_export import export
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model

    export(checkpoints["llama"], tmp_path / "out")
    reference, _ = load_dequantized_model(checkpoints["llama"])
    with torch.no_grad():
        reference.model.layers[1].mlp.down_proj.weight.mul_(1.5)   # a reference the export no longer matches
    with pytest.raises(StageError, match=r"prefill/logits \d"):
        check_parity(tmp_path / "out", reference, decode_steps=1)


def test_export_stage_writes_a_loadable_artifact(checkpoints, tmp_path):
    from kd2edge.artifacts import Artifact
    from kd2edge.config import load_config
    from kd2edge.pipeline import run_stage
    from kd2edge.runtime.lm import OnnxLM

    config = load_config(profile="laptop-cpu", overrides={"export.parity_decode_steps": 2})
    result = run_stage("export", config, Artifact.external(checkpoints["llama"], kind="gptq"), tmp_path / "export")
    manifest = result.artifact.manifest
    assert manifest["format"] == "onnx" and manifest["exporter"] == "onnx"
    assert manifest["metrics"]["size_bytes"] == sum((tmp_path / "export" / f).stat().st_size for f in manifest["files"])
    assert manifest["metrics"]["parity_max_abs_diff"] < 1e-3
    assert "model.onnx.data" in manifest["files"] and {"export_s", "parity_s"} <= set(manifest["timings"])
    lm = OnnxLM.load(tmp_path / "export")
    assert lm.info()["format"] == "onnx" and len(lm.generate([5, 6, 7], 3).tokens) == 3


def test_not_a_gptq_checkpoint(tmp_path, tiny_llama_dir):
    from exporters import EXPORTERS

    for name in EXPORTERS:
        with pytest.raises(ArtifactError, match="not a GPTQ checkpoint"):
            EXPORTERS[name](tiny_llama_dir, tmp_path / name)


def test_genai_refuses_unsupported_architecture_and_act_order(checkpoints, tmp_path):
    from exporters.genai import export

    with pytest.raises(ModelError, match="does not support GPTNeoXForCausalLM.*--exporter onnx"):
        export(checkpoints["gpt_neox"], tmp_path / "neox")
    with pytest.raises(ModelError, match="act-order"):
        export(checkpoints["llama"], tmp_path / "llama")


def test_genai_export_runs_in_the_runtime(tmp_path):
    from exporters.genai import export
    from kd2edge.export.parity import check_parity
    from kd2edge.testing import tiny_gptq_checkpoint
    from kd2edge.gptq_checkpoint import load_dequantized_model
    from kd2edge.runtime.lm import OnnxLM

    checkpoint = tiny_gptq_checkpoint(tmp_path / "ckpt", "llama", act_order=False)
    meta = export(checkpoint, tmp_path / "out")
    assert meta["format"] == "onnx-genai" and "genai_config.json" in meta["files"]
    assert json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["type"] == "llama"
    lm = OnnxLM.load(tmp_path / "out")
    assert lm.format == "onnx-genai" and len(lm.generate([5, 6, 7], 4, stop_token_ids=[]).tokens) == 4
    # The builder re-rounds the float lm_head to 4 bits, so its logits only roughly follow PyTorch.
    reference, _ = load_dequantized_model(checkpoint)
    report = check_parity(tmp_path / "out", reference, decode_steps=2, atol=10.0)
    assert 0 < report.max_abs_diff < 10.0

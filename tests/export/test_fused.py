"""The fused Llama-family decoder: merged MatMulNBits, graph shape, parity, runtime, int8 activations."""

from __future__ import annotations

import collections

import numpy as np
import pytest


def _packed(N: int, K: int = 64, block: int = 32, perm=None, seed: int = 0) -> dict:
    from exporters.matmulnbits import pack_nibbles

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (N, K // block, block), dtype=np.uint8)
    zeros = rng.integers(0, 16, (N, K // block), dtype=np.uint8)
    return {"B": pack_nibbles(codes), "scales": rng.random(N * (K // block), dtype=np.float32),
            "zero_points": pack_nibbles(zeros).reshape(-1), "perm": perm, "K": K, "N": N, "block_size": block}


def test_concat_matmulnbits_is_the_column_concatenation():
    from exporters.matmulnbits import concat_matmulnbits, dequantize_matmulnbits

    # 3 blocks per column: zero points pack with one nibble of padding per column, which must not shift
    parts = [_packed(5, K=96, seed=1), _packed(3, K=96, seed=2)]
    merged = concat_matmulnbits(parts)
    assert merged["N"] == 8 and merged["B"].shape == (8, 3, 16) and merged["zero_points"].shape == (8 * 2,)
    weights = [dequantize_matmulnbits(p["B"], p["scales"], p["zero_points"], 96, p["N"], 32) for p in parts]
    held = dequantize_matmulnbits(merged["B"], merged["scales"], merged["zero_points"], 96, 8, 32)
    assert np.array_equal(held, np.hstack(weights))                    # (K, 5 + 3), no value changed


def test_can_concat_needs_one_permutation():
    from exporters.matmulnbits import can_concat, concat_matmulnbits

    perm = np.arange(64)[::-1].copy()
    assert can_concat([_packed(4, perm=perm), _packed(4, perm=perm.copy())])
    assert not can_concat([_packed(4, perm=perm), _packed(4)])
    assert not can_concat([_packed(4, perm=perm), _packed(4, perm=np.roll(perm, 1))])
    assert not can_concat([_packed(4, block=32), _packed(4, block=16)])
    with pytest.raises(ValueError, match="permutation"):
        concat_matmulnbits([_packed(4, perm=perm), _packed(4)])


def test_unsupported_reason():
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    from exporters.fused import unsupported_reason

    assert unsupported_reason(LlamaConfig()) is None
    assert unsupported_reason(Qwen2Config()) is None
    assert unsupported_reason(MistralConfig(sliding_window=None)) is None
    assert unsupported_reason(MistralConfig(sliding_window=4096, max_position_embeddings=32768)) == \
        "sliding-window attention"
    assert unsupported_reason(Qwen2Config(use_sliding_window=True, sliding_window=64)) == "sliding-window attention"
    assert unsupported_reason(LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})) == \
        "rope_type dynamic"
    assert unsupported_reason(LlamaConfig(hidden_act="gelu")) == "activation gelu"
    assert unsupported_reason(GPTNeoXConfig()) == "model_type gpt_neox"


@pytest.fixture(scope="module")
def shared_checkpoints(tmp_path_factory):
    """Act-order checkpoints whose q/k/v and gate/up share a Hessian (so a permutation), as real GPTQ gives."""
    from kd2edge.testing import tiny_gptq_checkpoint

    root = tmp_path_factory.mktemp("gptq_shared")
    return {arch: tiny_gptq_checkpoint(root / arch, arch, shared_inputs=True) for arch in ("llama", "qwen2", "mistral")}


def _ops(folder) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_graph_merges_shared_projections_and_matches_pytorch(shared_checkpoints, tmp_path, arch):
    from exporters.onnx_export import export
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model, read_gptq_tensors

    meta = export(shared_checkpoints[arch], tmp_path / "out")
    layers = read_gptq_tensors(shared_checkpoints[arch])
    assert meta["graph"] == "fused" and meta["fallback_reason"] is None
    assert meta["act_order_layers"] == len(layers) == 14 and meta["merged_qkv_layers"] == 2
    ops = _ops(tmp_path / "out")
    # per layer: q|k|v, o, gate|up, down; one act-order Gather per distinct input (qkv, o, gate/up, down)
    assert ops["MatMulNBits"] == 2 * 4 and ops["GroupQueryAttention"] == 2 and ops["Split"] == 2
    assert ops["Gather"] == 2 * 4 + 2                                  # + the embedding, the mask width
    assert ops["SkipSimplifiedLayerNormalization"] == 4 and ops["SimplifiedLayerNormalization"] == 1
    assert "Softmax" not in ops and ops["MatMul"] == 1                 # attention fused; the float lm_head
    assert ops["Add"] == (2 if arch == "qwen2" else 0)                 # qwen2's q|k|v bias
    reference, _ = load_dequantized_model(shared_checkpoints[arch])
    report = check_parity(tmp_path / "out", reference, decode_steps=3, atol=1e-3)
    assert report.max_abs_diff < 1e-3 and report.top1_agreement == 1.0
    assert {"prefill/logits", "decode_3/logits", "prefill/present.1.key", "decode_3/present.1.value"} <= set(report.diffs)


def test_fused_graph_keeps_separate_permutations_apart(tmp_path):
    """q, k, v with different act-order permutations: three Gathers + MatMulNBits, GQA with separate inputs."""
    from exporters.onnx_export import export
    from kd2edge.export.parity import check_parity
    from kd2edge.testing import tiny_gptq_checkpoint
    from kd2edge.gptq_checkpoint import load_dequantized_model

    checkpoint = tiny_gptq_checkpoint(tmp_path / "ckpt", "llama", act_order=True, shared_inputs=False)
    meta = export(checkpoint, tmp_path / "out")
    assert meta["graph"] == "fused" and meta["merged_qkv_layers"] == 0
    ops = _ops(tmp_path / "out")
    assert ops["MatMulNBits"] == 14 and ops["Gather"] == 14 + 2 and ops["GroupQueryAttention"] == 2
    reference, _ = load_dequantized_model(checkpoint)
    assert check_parity(tmp_path / "out", reference, decode_steps=2, atol=1e-3).max_abs_diff < 1e-3


def test_fused_runtime_greedy_equals_pytorch_and_chunked_prefill(shared_checkpoints, tmp_path):
    import torch

    from exporters.onnx_export import export
    from kd2edge.gptq_checkpoint import load_dequantized_model
    from kd2edge.runtime.lm import OnnxLM

    export(shared_checkpoints["qwen2"], tmp_path / "out")
    lm = OnnxLM.load(tmp_path / "out", threads=1)
    ids = lm.encode(lm.format_prompt("¿Quién fundó Brimor?"))
    model, tokenizer = load_dequantized_model(shared_checkpoints["qwen2"])
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert lm.generate(ids, 20).tokens == ref and len(set(ref)) > 3
    # a second multi-token chunk after a filled cache (GroupQueryAttention's "subsequent prompt")
    whole = lm.forward(ids, lm.new_cache())
    cache = lm.new_cache()
    first = lm.forward(ids[:7], cache)
    rest = lm.forward(ids[7:], cache)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, atol=1e-4)


def test_quantized_embeddings_in_the_fused_graph(shared_checkpoints, tmp_path):
    from exporters.onnx_export import export
    from exporters.vocab import quantize_embeddings_rtn
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model

    meta = export(shared_checkpoints["llama"], tmp_path / "out", quantize_embeddings=True)
    assert meta["graph"] == "fused" and meta["embeddings"] == "int4-rtn-block32" and meta["tied_embeddings"]
    ops = _ops(tmp_path / "out")
    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 2 * 4 + 1 and "MatMul" not in ops
    reference, _ = load_dequantized_model(shared_checkpoints["llama"])
    quantize_embeddings_rtn(reference)
    assert check_parity(tmp_path / "out", reference, decode_steps=2, atol=1e-3).max_abs_diff < 1e-3


def test_int8_activations_stage_uses_its_own_tolerance(shared_checkpoints, tmp_path):
    import onnx

    from kd2edge.artifacts import Artifact
    from kd2edge.config import load_config
    from kd2edge.pipeline import run_stage

    config = load_config(profile="laptop-cpu", overrides={"export.accuracy_level": 4,
                                                          "export.parity_decode_steps": 2})
    result = run_stage("export", config, Artifact.external(shared_checkpoints["llama"], kind="gptq"),
                       tmp_path / "export")
    metrics = result.artifact.manifest["metrics"]
    assert metrics["accuracy_level"] == 4 and metrics["graph"] == "fused"
    assert metrics["parity"]["atol"] == config.export.parity_atol_int8
    # int8 activations are not exact, but close: the logits move, the greedy tokens barely
    assert 1e-4 < metrics["parity_max_abs_diff"] < config.export.parity_atol_int8
    assert metrics["parity"]["top1_agreement"] >= 0.9
    graph = onnx.load(str(tmp_path / "export" / "model.onnx"), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}


def test_unquantized_projections():
    from exporters.fused import unquantized_projections

    layers = {f"model.layers.{i}.{p}": None for i in range(2) for p in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")}
    assert unquantized_projections(2, layers) == []
    del layers["model.layers.1.mlp.up_proj"]
    assert unquantized_projections(2, layers) == ["model.layers.1.mlp.up_proj"]


@pytest.fixture(scope="module")
def head_checkpoints(tmp_path_factory):
    """Checkpoints whose lm_head is 4-bit too: llama ties it to the embedding, qwen2 does not."""
    from kd2edge.testing import tiny_gptq_checkpoint

    root = tmp_path_factory.mktemp("gptq_head")
    return {arch: tiny_gptq_checkpoint(root / arch, arch, shared_inputs=True, quantize_head=True)
            for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_4bit_head_from_the_checkpoint_is_exact(head_checkpoints, tmp_path, arch):
    """The checkpoint's head codes in MatMulNBits (tied: GatherBlockQuantized on the same bytes), checked
    against the dequantized model, whose head (tied: and embedding) is the dequantized head."""
    from exporters.onnx_export import export
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model

    meta = export(head_checkpoints[arch], tmp_path / "out")
    assert meta["lm_head"] == "int4-g32 (checkpoint)" and meta["vocab_weight_max_abs_diff"] == 0.0
    assert meta["quantized_layers"] == 14 and meta["rtn_modules"] == []
    ops = _ops(tmp_path / "out")
    assert ops["MatMulNBits"] == 2 * 4 + 1 and "MatMul" not in ops
    if arch == "llama":      # tied: one 4-bit matrix gathers the embedding and computes the logits
        assert meta["embeddings"] == meta["lm_head"] and ops["GatherBlockQuantized"] == 1
    else:
        assert meta["embeddings"] == "float32" and "GatherBlockQuantized" not in ops
    reference, _ = load_dequantized_model(head_checkpoints[arch])
    report = check_parity(tmp_path / "out", reference, decode_steps=3, atol=1e-3)
    assert report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0


def test_an_untied_embedding_beside_a_4bit_head_is_rounded_alone(head_checkpoints, tmp_path):
    from exporters.onnx_export import export
    from exporters.vocab import quantize_embeddings_rtn
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model

    meta = export(head_checkpoints["qwen2"], tmp_path / "out", quantize_embeddings=True)
    assert meta["rtn_modules"] == ["model.embed_tokens"] and meta["embeddings"] == "int4-rtn-block32"
    assert meta["lm_head"] == "int4-g32 (checkpoint)"
    reference, _ = load_dequantized_model(head_checkpoints["qwen2"])
    quantize_embeddings_rtn(reference, modules=("model.embed_tokens",))
    assert check_parity(tmp_path / "out", reference, decode_steps=2, atol=1e-3).max_abs_diff < 1e-4


def test_logits_to_keep_computes_the_last_positions_only(shared_checkpoints, tmp_path):
    from exporters.onnx_export import export
    from kd2edge.runtime.lm import OnnxLM

    export(shared_checkpoints["llama"], tmp_path / "out")
    lm = OnnxLM.load(tmp_path / "out", threads=1)
    ids = lm.encode(lm.format_prompt("Who founded the Velmora Institute?"))
    every = lm.forward(ids, lm.new_cache())                             # [seq, vocab]
    last = lm.forward(ids, lm.new_cache(), logits_to_keep=1)
    three = lm.forward(ids, lm.new_cache(), logits_to_keep=3)
    assert every.shape[0] == len(ids) and last.shape == (1, every.shape[1]) and three.shape[0] == 3
    np.testing.assert_allclose(last, every[-1:], atol=1e-5)
    np.testing.assert_allclose(three, every[-3:], atol=1e-5)
    # logprobs still scores every position
    assert lm.logprobs(ids).shape == every.shape


def test_gather_block_quantized_reads_an_odd_number_of_blocks():
    """K = 96 in blocks of 32: three blocks, so the packed zero points carry a padding nibble per row
    (SmolLM2's hidden 576 in groups of 64 has nine)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporters import onnx_graph as g
    from exporters.matmulnbits import dequantize_matmulnbits

    packed = _packed(10, K=96, block=32, seed=3)
    proto = helper.make_model(helper.make_graph([], "gather", [helper.make_tensor_value_info(
        "ids", TensorProto.INT64, [None])], [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, 96])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(g.MS_DOMAIN, 1)])
    weights = g.add_nbits_initializers(proto, "emb", packed)
    proto.graph.node.extend(g.gather_block_quantized_nodes(proto, "emb", weights, packed, "ids", "rows"))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([9, 0, 4, 4], dtype=np.int64)
    rows = session.run(None, {"ids": ids})[0]
    held = dequantize_matmulnbits(packed["B"], packed["scales"], packed["zero_points"], 96, 10, 32).T   # [V, K]
    np.testing.assert_array_equal(rows, held[ids])


@pytest.mark.parametrize("vocab", [392, 403])
def test_any_vocabulary_size_exports(tmp_path, vocab):
    """A trimmed vocabulary: 392 tokens packs a 4-bit head; 403 does not (the head stays float)."""
    import torch

    from exporters.onnx_export import export
    from kd2edge.export.parity import check_parity
    from kd2edge.gptq_checkpoint import load_dequantized_model, write_gptq_checkpoint
    from kd2edge.quantize.gptq import rtn_quantize_weight
    from kd2edge.quantize.orchestrate import head_packable
    from kd2edge.testing import sharp_tiny_model

    model, tokenizer = sharp_tiny_model("llama")
    model.resize_token_embeddings(vocab, mean_resizing=False)
    head = model.get_output_embeddings()
    quantize = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                and (m is not head or head_packable(model, 4, 32) is None)}
    results = {n: rtn_quantize_weight(m.weight.detach(), 4, 32) for n, m in quantize.items()}
    write_gptq_checkpoint(model, tokenizer, results, tmp_path / "ckpt", bits=4, group_size=32, desc_act=False,
                          sym=False)
    meta = export(tmp_path / "ckpt", tmp_path / "out")
    assert meta["lm_head"] == ("int4-g32 (checkpoint)" if vocab % 8 == 0 else "float32")
    reference, _ = load_dequantized_model(tmp_path / "ckpt")
    assert reference.config.vocab_size == vocab
    prompts = [[5, 17, 250, 3, 99, 120, 7, 42, 391], [1, 2, 3]]          # ids inside the smaller vocabulary
    report = check_parity(tmp_path / "out", reference, prompts=prompts, decode_steps=2, atol=1e-3)
    assert report.max_abs_diff < 1e-4


def test_shared_kv_buffers_are_written_in_place(shared_checkpoints, tmp_path):
    """Past and present share one preallocated buffer per layer: decode steps allocate and copy no cache."""
    from exporters.onnx_export import export
    from kd2edge.runtime.lm import OnnxLM

    export(shared_checkpoints["llama"], tmp_path / "out")
    lm = OnnxLM.load(tmp_path / "out", threads=1)
    assert lm.shares_kv_buffer
    ids = lm.encode(lm.format_prompt("Who founded the Velmora Institute?"))
    reference = lm.new_cache()
    lm.forward(ids + [17, 250, 3], reference)                           # the whole sequence in one prefill

    cache = lm.new_cache(capacity=8)
    assert cache.capacity == 8 and cache.buffers[0].shape[2] == 8
    lm.forward(ids, cache)                                              # longer than 8: the buffers grow once
    assert cache.capacity >= len(ids) + 3 and cache.length == len(ids)
    buffers, values = [b.ctypes.data for b in cache.buffers], list(cache.values)
    for token in (17, 250, 3):
        lm.forward([token], cache, logits_to_keep=1)
    assert [b.ctypes.data for b in cache.buffers] == buffers and cache.values == values      # same memory
    held, expected = cache.arrays(), reference.arrays()
    assert held.keys() == expected.keys()
    for name in held:
        assert held[name].shape == expected[name].shape == (1, 2, len(ids) + 3, 16)
        np.testing.assert_allclose(held[name], expected[name], atol=1e-5)
    # generation preallocates prompt + new tokens: the same tokens every time
    assert lm.generate(ids, 12).tokens == lm.generate(ids, 12).tokens


def test_two_sequences_interleaved_keep_their_own_buffers(shared_checkpoints, tmp_path):
    """Per-sequence token and logits buffers: sequences stepped in turn give what each gives alone."""
    from exporters.onnx_export import export
    from kd2edge.runtime.lm import OnnxLM

    export(shared_checkpoints["llama"], tmp_path / "out")
    lm = OnnxLM.load(tmp_path / "out", threads=1)
    prompts = [lm.encode(lm.format_prompt("Who founded the Velmora Institute?")),
               lm.encode(lm.format_prompt("¿Quién fundó Brimor?"))]
    alone = [lm.generate(ids, 10, stop_token_ids=[]).tokens for ids in prompts]
    caches = [lm.new_cache(64) for _ in prompts]
    steps = [list(ids) for ids in prompts]
    together: list[list[int]] = [[], []]
    kept = []
    for _ in range(10):
        for i in (0, 1):
            logits = lm.forward(steps[i], caches[i], logits_to_keep=1)       # a copy: kept intact below
            kept.append(logits)
            together[i].append(int(logits[-1].argmax()))
            steps[i] = [together[i][-1]]
    assert together == alone
    assert int(kept[0][-1].argmax()) == alone[0][0]                          # not overwritten by later steps

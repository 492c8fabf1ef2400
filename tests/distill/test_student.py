"""Student sizing and layer pruning on tiny models and hand-sized configs."""

from __future__ import annotations

import pytest
import torch

from kd2edge.distill.plan import candidates, choose
from kd2edge.distill.student import (block_influence, check_same_tokenizer, choose_layers,
                                     measure_block_influence, prune_layers)
from kd2edge.errors import BudgetError, ModelError
from kd2edge.sizing import param_breakdown
from kd2edge.testing import tiny_model


def test_block_influence_is_one_minus_cosine():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [3.0, 3.0]]])
    y = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-5.0, 0.0]]])   # cos = 1, 0, -1/sqrt(2)
    total, count = block_influence(x, y)
    assert count == 3
    assert total == pytest.approx(0.0 + 1.0 + (1 + 2 ** -0.5), abs=1e-6)
    total, count = block_influence(x, y, torch.tensor([[True, True, False]]))
    assert (total, count) == (pytest.approx(1.0), 2)


def test_choose_layers_keeps_first_last_and_most_influential():
    scores = [0.01, 0.5, 0.02, 0.3, 0.03, 0.001]
    assert choose_layers(scores, 4) == [0, 1, 3, 5]
    assert choose_layers(scores, 2) == [0, 5]
    assert choose_layers(scores, 6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        choose_layers(scores, 7)


def test_measured_influence_drops_identity_layers():
    # A 6-layer llama whose layers 2 and 3 write nothing to the residual stream
    # (zero o_proj and down_proj): their output equals their input, so BI = 0.
    model, tok = tiny_model("llama", num_layers=6)
    for i in (2, 3):
        layer = model.model.layers[i]
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    ids = tok(["The river flows north through the valley.", "Who founded the Velmora Institute?"],
              return_tensors="pt", padding=True)
    scores = measure_block_influence(model, [dict(ids)])
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and scores[3] == pytest.approx(0.0, abs=1e-6)
    assert min(scores[1], scores[4]) > 1e-4
    assert choose_layers(scores, 4) == [0, 1, 4, 5]


def test_pruned_student_matches_teacher_when_dropped_layers_are_identity():
    model, tok = tiny_model("llama", num_layers=4)
    ids = tok(["Question: Who founded the Velmora Institute? Answer:"], return_tensors="pt")
    model.model.layers[2].self_attn.o_proj.weight.data.zero_()
    model.model.layers[2].mlp.down_proj.weight.data.zero_()
    with torch.no_grad():
        reference = model(**ids).logits
        student = prune_layers(model, [0, 1, 3])
        assert student.config.num_hidden_layers == 3
        assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
        assert torch.allclose(student(**ids).logits, reference, atol=1e-5)
        # Generation with a KV cache works on the renumbered layers.
        out = student.generate(input_ids=ids["input_ids"], max_new_tokens=3, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 3


def test_tokenizer_mismatch_is_a_model_error(tiny_llama_dir):
    from transformers import AutoTokenizer

    teacher_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert check_same_tokenizer(teacher_tok, AutoTokenizer.from_pretrained(tiny_llama_dir), "t", "s") == len(teacher_tok)
    other = AutoTokenizer.from_pretrained(tiny_llama_dir)
    other.add_tokens(["<extra>"])
    with pytest.raises(ModelError, match="does not share the teacher's tokenizer"):
        check_same_tokenizer(teacher_tok, other, "t", "s")


def test_plan_choice_by_hand():
    model, _ = tiny_model("llama", num_layers=8)
    b = param_breakdown(model.config)
    common = dict(bits=4, group_size=128, context_length=512, bandwidth=1e9, kv_value_bytes=4,
                  max_artifact_mb=1000, max_peak_memory_mb=1000, min_decode_tokens_per_s=0)
    cands = candidates(b, max_param_fraction=0.99, **common)
    assert [c.layers for c in cands] == list(range(1, 8))
    assert choose(cands).layers == 7
    half = candidates(b, max_param_fraction=b.params_with(4) / b.total + 1e-9, **common)
    assert choose(half).layers == 4
    # A decode-speed floor no candidate reaches.
    with pytest.raises(BudgetError, match="no student fits"):
        choose(candidates(b, max_param_fraction=0.99, **{**common, "min_decode_tokens_per_s": 1e12}))


@pytest.mark.slow
def test_plan_for_the_embedded_teacher_picks_eighteen_layers_of_a_trimmed_vocabulary():
    import json

    from click.testing import CliRunner

    from kd2edge.distill.cli import plan

    result = CliRunner().invoke(plan, ["--teacher", "embedded", "--profile", "laptop-cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["teacher"] == {"params": 134_515_008, "layers": 30}
    # 24,576 x 576 = 14.2M embedding + 18 x 3.54M layers = 77.9M, the largest under 0.6 x 134.5M = 80.7M
    # (19 layers: 81.4M): 42.1% fewer parameters than the teacher.
    assert data["choice"]["layers"] == 18 and data["choice"]["params"] == 77_878_080
    assert data["assumptions"]["vocab_size"] == 24576
    assert [c["layers"] for c in data["candidates"] if not c["fails"]] == list(range(1, 19))


def test_mlp_width_pruning_keeps_the_most_active_neurons():
    from kd2edge.distill.student import measure_mlp_importance, prune_mlp

    model, tok = tiny_model("llama", num_layers=2)                          # MLP 128 neurons
    batch = {"input_ids": tok(["The river flows north through the valley."], return_tensors="pt")["input_ids"]}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    importance = measure_mlp_importance(model, [batch])
    assert [s.shape for s in importance] == [torch.Size([128])] * 2
    # by hand: the mean |act(gate(x)) * up(x)| of layer 0's neurons on the same tokens
    captured = {}
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    with torch.no_grad():
        full = model(**batch).logits
    h.remove()
    assert torch.allclose(importance[0], captured["x"].abs().mean(dim=(0, 1)), atol=1e-6)
    # keeping every neuron changes nothing; keeping the 64 most active gives MLPs of 64 with those rows
    gate0 = model.model.layers[0].mlp.gate_proj.weight.clone()
    with torch.no_grad():
        assert torch.allclose(prune_mlp(model, importance, 128)(**batch).logits, full)
    prune_mlp(model, importance, 64)
    keep = torch.sort(torch.topk(importance[0], 64).indices).values
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, gate0[keep])
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 64) and model.config.intermediate_size == 64
    with torch.no_grad():
        assert model(**batch).logits.shape == full.shape

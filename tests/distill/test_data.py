"""Training sequences: prompts as evaluation builds them, answer-only shifted labels."""

from __future__ import annotations

import pytest

from kd2edge.data.items import QAItem
from kd2edge.distill.data import build_examples, build_prompts, encode_example
from kd2edge.distill.losses import IGNORE_INDEX
from kd2edge.errors import DataError

ITEMS = [
    QAItem("a", "Who founded the Velmora Institute?", "The Velmora Institute was founded in 1871 by Adaline Qorr.",
           ("Adaline Qorr",), (56,)),
    QAItem("b", "Where is Brimor?", "Brimor lies beside the river Selen.", ("beside the river Selen",), (12,)),
]


def test_encode_example_labels_only_the_answer_shifted_by_one():
    ex = encode_example([5, 6, 7], [8, 9, 2], max_length=10, item_id="x")
    assert ex.input_ids == (5, 6, 7, 8, 9, 2)
    # position 2 (last prompt token) predicts 8, position 4 predicts EOS (2), the last predicts nothing
    assert ex.labels == (IGNORE_INDEX, IGNORE_INDEX, 8, 9, 2, IGNORE_INDEX)
    assert ex.answer_positions == 3
    assert encode_example([5, 6, 7], [8, 9, 2], max_length=5) is None
    assert encode_example([5, 6, 7], [], max_length=10) is None


def test_one_shot_prompt_shows_another_solved_item_first():
    zero = build_prompts(ITEMS, ITEMS, shots=0, seed=0)
    one = build_prompts(ITEMS, ITEMS, shots=1, seed=0)
    assert zero[0] == ("Context: The Velmora Institute was founded in 1871 by Adaline Qorr.\n"
                       "Question: Who founded the Velmora Institute?\nAnswer:")
    # item a's example can only be item b: its block with its answer, a blank line, then a's block
    assert one[0] == ("Context: Brimor lies beside the river Selen.\nQuestion: Where is Brimor?\n"
                      "Answer: beside the river Selen\n\n" + zero[0])
    assert "Adaline Qorr" not in one[0].split("\n\n")[0]
    with pytest.raises(DataError):
        build_prompts(ITEMS[:1], ITEMS[:1], shots=1, seed=0)


def test_build_examples_applies_chat_template_and_appends_eos(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = build_prompts(ITEMS, ITEMS, shots=0, seed=0)
    examples, skipped = build_examples(tok, ITEMS, prompts, [" Adaline Qorr", " beside the river Selen"], max_length=512)
    assert skipped == 0
    ex = examples[0]
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>user\nContext: The Velmora")
    assert text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n Adaline Qorr<|im_end|>")
    answer = [y for y in ex.labels if y != IGNORE_INDEX]
    assert tok.decode(answer) == " Adaline Qorr<|im_end|>"
    with pytest.raises(DataError, match="no usable training item"):
        build_examples(tok, ITEMS, prompts, [" x", " y"], max_length=16)

"""Vocabulary trimming on the tiny in-process byte-level BPE tokenizer and tiny llama/qwen2 models."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter

import pytest
import torch

from kd2edge.distill.vocab import (byte_alphabet, choose_vocabulary, coverage_curve, kept_logits, mandatory_ids,
                                   merge_closure, template_literals, token_counts, tokenizer_json, tokens_per_word,
                                   trim_model, trim_model_folder, trim_tokenizer_json)
from kd2edge.errors import ConfigError
from kd2edge.models import count_params
from kd2edge.testing import _CORPUS, tiny_model, tiny_model_dir, tiny_tokenizer

# Counted on part of the corpus only, so that trimming drops tokens the rest of it uses. The 400-token
# tiny vocabulary keeps 262 tokens always; the counted tokens and their merge parts need 355.
COUNT_TEXTS = _CORPUS[:4]
SIZE = 360
HELD_OUT = _CORPUS[4:7]
STRINGS = [
    "", " ", "Hello, world!", "Who founded the Velmora Institute?", "  leading and   inner   spaces  \t\n\n",
    "¿Quién fundó Brimor? Tomás Ivarra, año 1620: café, cacao, niño, pingüino, Ñandú.",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧", "中文字符和日本語のテキスト", "مرحبا بالعالم",
    "\x00\x01\x7f control \u200b zero width",
    "<|im_start|>user\nhola<|im_end|>\n", "tabs\tand\r\nwindows newlines", "ﬁ ligature, Å vs Å (NFC vs NFD)",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 24)):
            c = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0, 0x7FF), rng.randint(0x800, 0xFFFF),
                            rng.randint(0x10000, 0x10FFFF), 0x20, 0x0A])
            if not 0xD800 <= c <= 0xDFFF:  # surrogates are not text
                chars.append(chr(c))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def counts():
    return token_counts(tiny_tokenizer(), COUNT_TEXTS)


@pytest.fixture(scope="module")
def trimmed(counts):
    """(keep, trimmed tokenizer, trimmed model) for the tiny llama at SIZE of 400 tokens."""
    model, tok = tiny_model("llama")
    keep = choose_vocabulary(tok, counts, SIZE)
    model, new_tok = trim_model(copy.deepcopy(model), tok, keep)
    return keep, new_tok, model


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _decode(tok, ids):
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def _trimmed_at(tok, counts, size):
    model, _ = tiny_model("llama")
    return trim_model(model, tok, choose_vocabulary(tok, counts, size))[1]


def test_merge_closure_keeps_every_producing_merge_and_its_parts():
    vocab = {c: i for i, c in enumerate("abcd")} | {"ab": 4, "abc": 5, "cd": 6, "bc": 7, "abcd": 8}
    merges = [("a", "b"), ("ab", "c"), ("c", "d"), ("b", "c"), ("a", "bc"), ("abc", "d")]
    assert merge_closure(vocab, merges, {"abc"}) == {"abc", "ab", "bc", "a", "b", "c"}
    assert merge_closure(vocab, ["ab c", "a b"], {"abc"}) == {"abc", "ab", "a", "b", "c"}  # "a b" string format
    assert merge_closure(vocab, merges, {"abcd"}) == set(vocab) - {"cd"}
    with pytest.raises(ValueError, match="not in the vocabulary"):
        merge_closure(vocab, merges, {"zz"})


def test_template_literals_and_mandatory_set():
    tok = tiny_tokenizer()
    assert template_literals(tok.chat_template) == ["<|im_start|>", "\n", "<|im_end|>\n", "<|im_start|>assistant\n"]
    assert template_literals("{% if m['role'] == 'system' %}{{ 'a\\nb' }}{% endif %}") == ["system", "a\nb"]
    mandatory = mandatory_ids(tok)
    vocab = tok.get_vocab()
    assert {vocab[c] for c in byte_alphabet()} <= mandatory                       # all 256 byte tokens
    assert set(tok.added_tokens_decoder) <= mandatory                             # specials and added tokens
    for text in ("<|im_start|>assistant\n", "user", "system", "assistant"):       # chat template words whole
        assert set(_encode(tok, text)) <= mandatory
    tokens = {tok.convert_ids_to_tokens(i) for i in mandatory}
    assert merge_closure(vocab, tokenizer_json(tok)["model"]["merges"], tokens) == tokens


def test_size_below_mandatory_set_raises_clearly(counts):
    tok = tiny_tokenizer()
    n = len(mandatory_ids(tok))
    with pytest.raises(ConfigError, match=f"too small.*at least {n}"):
        choose_vocabulary(tok, counts, n - 1)
    assert len(choose_vocabulary(tok, counts, n)) == n


@pytest.mark.parametrize("size", [270, 300, SIZE, 399, 400, 10_000])
def test_choose_vocabulary_respects_size_and_is_closed(counts, size):
    tok = tiny_tokenizer()
    keep = choose_vocabulary(tok, counts, size)
    assert keep == sorted(set(keep)) and len(keep) == min(size, len(tok))
    assert mandatory_ids(tok) <= set(keep)
    tokens = set(tok.convert_ids_to_tokens(keep))
    tj = tokenizer_json(tok)
    assert merge_closure(tj["model"]["vocab"], tj["model"]["merges"], tokens & set(tj["model"]["vocab"])) <= tokens
    if size >= SIZE:  # every counted token and its merge parts fit
        assert set(counts) <= set(keep)


def test_choose_vocabulary_prefers_frequent_tokens_that_fit():
    tok = tiny_tokenizer()
    velmora, institute = tok.convert_tokens_to_ids(["ĠVelmora", "ĠInstitute"])
    n = len(mandatory_ids(tok))
    counts = Counter({velmora: 100, institute: 50})
    assert {velmora, institute} <= set(choose_vocabulary(tok, counts, n + 15))   # closures of 7 and 8 tokens
    keep = choose_vocabulary(tok, counts, n + 7)
    assert velmora in keep and institute not in keep and len(keep) == n + 7


def test_trimmed_json_drops_dangling_merges_keeps_order_and_loads(counts):
    from tokenizers import Tokenizer

    tj = tokenizer_json(tiny_tokenizer())
    keep = choose_vocabulary(tiny_tokenizer(), counts, 290)
    new, old_ids = trim_tokenizer_json(tj, keep)
    assert old_ids == keep and tj == tokenizer_json(tiny_tokenizer())           # the input is not modified
    vocab = new["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) == len(keep)
    assert all(old_ids[vocab[t]] == tj["model"]["vocab"][t] for t in vocab)     # renumbered in old-id order
    merges = [tuple(m) for m in new["model"]["merges"]]
    assert merges and all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    original = [tuple(m) for m in tj["model"]["merges"]]
    assert len(merges) < len(original)
    ranks = [original.index(m) for m in merges]
    assert ranks == sorted(ranks)                                                  # relative rank order kept
    assert Tokenizer.from_str(json.dumps(new)).get_vocab_size() == len(keep)
    with pytest.raises(ConfigError, match="byte-alphabet"):
        trim_tokenizer_json(tj, [i for i in keep if i != tj["model"]["vocab"]["a"]])
    alphabet = set(byte_alphabet())
    part = next(a for a, b in tj["model"]["merges"] if a not in alphabet)       # a multi-byte token that is a merge part
    with pytest.raises(ConfigError, match="could never be produced"):
        trim_tokenizer_json(tj, [i for i in range(len(tiny_tokenizer())) if i != tj["model"]["vocab"][part]])
    with pytest.raises(ConfigError, match="do not exist"):
        trim_tokenizer_json(tj, keep + [10_000])


def test_post_processor_and_padding_ids_are_renumbered():
    from tokenizers import Tokenizer

    tj = tokenizer_json(tiny_tokenizer())
    start = tj["model"]["vocab"]["<|im_start|>"]
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [start],
                                                                "tokens": ["<|im_start|>"]}}}
    tj["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                     "pad_id": start, "pad_type_id": 0, "pad_token": "<|im_start|>"}
    keep = [i for i in range(len(tiny_tokenizer())) if i != tj["model"]["vocab"]["<|endoftext|>"]]
    new, old_ids = trim_tokenizer_json(tj, keep)
    new_start = old_ids.index(start)
    assert new_start == start - 1
    assert new["post_processor"]["special_tokens"]["<|im_start|>"]["ids"] == [new_start]
    assert new["padding"]["pad_id"] == new_start
    assert [a["content"] for a in new["added_tokens"]] == ["<|im_start|>", "<|im_end|>"]
    assert Tokenizer.from_str(json.dumps(new)).encode("hola").ids[0] == new_start
    with pytest.raises(ConfigError, match="post-processor token"):
        trim_tokenizer_json(tj, [i for i in keep if i != start])


@pytest.mark.parametrize("size", [262, SIZE])
def test_any_string_round_trips(counts, size):
    tok = tiny_tokenizer()
    model, _ = tiny_model("llama")
    keep = choose_vocabulary(tok, counts, size)
    _, new_tok = trim_model(model, tok, keep)
    assert len(new_tok) == size
    for text in STRINGS + _random_strings(200):
        ids = _encode(new_tok, text)
        assert _decode(new_tok, ids) == text
        assert all(0 <= i < len(keep) for i in ids)


def test_text_whose_tokens_are_kept_encodes_to_the_same_tokens(trimmed):
    keep, new_tok, _ = trimmed
    tok = tiny_tokenizer()
    kept = set(keep)
    same = changed = 0
    words = {w for text in _CORPUS + STRINGS for w in text.replace("\n", " ").split(" ")}
    for text in sorted(words) + _CORPUS + STRINGS:
        old = _encode(tok, text)
        new = _encode(new_tok, text)
        if set(old) <= kept:
            assert new_tok.convert_ids_to_tokens(new) == tok.convert_ids_to_tokens(old)
            assert [keep[i] for i in new] == old
            same += 1
        else:  # the word lost a token: it splits into more, kept pieces
            assert len(new) > len(old) and _decode(new_tok, new) == text
            changed += 1
    assert same > 20 and changed > 5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trimmed_logits_equal_the_original_at_kept_columns(counts, arch):
    model, tok = tiny_model(arch)
    keep = choose_vocabulary(tok, counts, SIZE)
    original = copy.deepcopy(model)
    trimmed, new_tok = trim_model(model, tok, keep)
    assert trimmed is model and trimmed.config.vocab_size == SIZE
    embedding, head = trimmed.get_input_embeddings(), trimmed.get_output_embeddings()
    assert embedding.weight.shape == head.weight.shape == (SIZE, 64)
    assert (head.weight is embedding.weight) == (arch == "llama")                # tied stays tied, untied stays untied
    text = "Question: Who founded the Velmora Institute? Answer: Adaline Qorr"
    old_ids = _encode(tok, text)
    assert set(old_ids) <= set(keep)
    new_ids = _encode(new_tok, text)
    assert [keep[i] for i in new_ids] == old_ids
    with torch.no_grad():
        reference = original(torch.tensor([old_ids])).logits                    # [1, L, 400]
        logits = trimmed(torch.tensor([new_ids])).logits                        # [1, L, SIZE]
    torch.testing.assert_close(logits, kept_logits(reference, keep), rtol=0, atol=1e-5)
    # Any (mapped) old ids give the same hidden path: the rows are the same vectors.
    ids = torch.tensor([keep[5:40]])
    with torch.no_grad():
        torch.testing.assert_close(trimmed(torch.arange(5, 40)[None]).logits, original(ids).logits[..., keep],
                                   rtol=0, atol=1e-5)


def test_save_reload_keeps_special_tokens_chat_template_and_ids(tmp_path, counts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir(tmp_path / "src", "llama")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    # Config ids that differ from the tokenizer's, to see that every one is renumbered.
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    keep = choose_vocabulary(tok, counts, 290)
    new_of = {old: new for new, old in enumerate(keep)}
    original = copy.deepcopy(model)
    model, new_tok = trim_model(model, tok, keep)
    model.save_pretrained(tmp_path / "dst")
    new_tok.save_pretrained(tmp_path / "dst")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "dst")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert len(tok2) == model2.config.vocab_size == model2.get_input_embeddings().weight.shape[0] == 290
    assert tok2.eos_token == tok.eos_token == "<|im_end|>" and tok2.pad_token == tok.pad_token
    assert tok2.eos_token_id == new_of[tok.eos_token_id] == model2.config.eos_token_id
    assert tok2.pad_token_id == new_of[tok.pad_token_id] == model2.config.pad_token_id
    assert model2.generation_config.eos_token_id == [new_of[i] for i in original.generation_config.eos_token_id]
    assert model2.generation_config.pad_token_id == tok2.pad_token_id
    assert tok2.chat_template == tok.chat_template
    assert {t: new_of[i] for i, t in ((i, tok.convert_ids_to_tokens(i)) for i in tok.added_tokens_decoder)} == \
        {a.content: i for i, a in tok2.added_tokens_decoder.items()}
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "¿Quién fundó Brimor?"}]
    old_chat = tok.apply_chat_template(messages, add_generation_prompt=True)
    new_chat = tok2.apply_chat_template(messages, add_generation_prompt=True)
    assert _decode(tok2, new_chat) == _decode(tok, old_chat)
    assert model2.get_output_embeddings().weight is model2.get_input_embeddings().weight
    ids = _encode(tok2, "The river flows north through the valley.")
    with torch.no_grad():
        torch.testing.assert_close(model2(torch.tensor([ids])).logits,
                                   original(torch.tensor([[keep[i] for i in ids]])).logits[..., keep], rtol=0, atol=1e-5)


def test_untrimmed_path_is_unchanged():
    model, tok = tiny_model("qwen2")
    everything = list(range(len(tok)))
    new_json, old_ids = trim_tokenizer_json(tokenizer_json(tok), everything)
    assert new_json == tokenizer_json(tok) and old_ids == everything
    original = copy.deepcopy(model)
    model, new_tok = trim_model(model, tok, everything)
    assert new_tok.get_vocab() == tok.get_vocab()
    for text in STRINGS:
        assert _encode(new_tok, text) == _encode(tok, text)
    for (name, p), (_, q) in zip(model.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), name
    assert model.config.to_dict() == original.config.to_dict()


@pytest.mark.parametrize("arch,rows_per_token", [("llama", 1), ("qwen2", 2)])
def test_param_count_drops_exactly_the_trimmed_rows(tmp_path, counts, arch, rows_per_token):
    model, tok = tiny_model(arch)
    before = count_params(model)
    keep = choose_vocabulary(tok, counts, SIZE)
    model, _ = trim_model(model, tok, keep)
    assert before - count_params(model) == (400 - SIZE) * 64 * rows_per_token    # a tied row counts once
    summary = trim_model_folder(tiny_model_dir(tmp_path / "src", arch), tmp_path / "dst", keep)
    assert summary["params_before"] - summary["params_after"] == (400 - SIZE) * 64 * rows_per_token
    assert summary["vocab_after"] == SIZE and 0 < summary["param_reduction"] < 1
    assert json.loads((tmp_path / "dst" / "vocab_trim.json").read_text())["old_ids"] == keep


def test_lost_special_or_config_id_raises_and_leaves_the_model_alone(counts):
    model, tok = tiny_model("llama")
    keep = choose_vocabulary(tok, counts, SIZE)
    weight = model.get_input_embeddings().weight
    with pytest.raises(ConfigError, match="special token '<\\|im_end\\|>'"):
        trim_model(model, tok, [i for i in keep if i != tok.eos_token_id])
    dropped = next(i for i in range(len(tok)) if i not in keep)
    model.generation_config.bos_token_id = dropped
    with pytest.raises(ConfigError, match="generation config bos_token_id"):
        trim_model(model, tok, keep)
    assert model.get_input_embeddings().weight is weight and model.config.vocab_size == 400
    assert dropped in choose_vocabulary(tok, counts, SIZE, required=[dropped])


def test_rejects_tokenizers_that_are_not_byte_level_bpe():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tj = tokenizer_json(tiny_tokenizer())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(ConfigError, match="byte-level BPE"):
        trim_tokenizer_json(tj, range(300))
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConfigError, match="not BPE"):
        mandatory_ids(PreTrainedTokenizerFast(tokenizer_object=word_level))


def test_coverage_and_tokens_per_word(counts):
    tok = tiny_tokenizer()
    curve = coverage_curve(counts, [10, 50, len(counts)])
    shares = [s for _, s in curve]
    assert shares == sorted(shares) and shares[-1] == 1.0 and 0 < shares[0] < 1
    with_closure = coverage_curve(counts, [280, SIZE], tokenizer=tok)
    assert with_closure[-1] == (SIZE, 1.0) and 0 < with_closure[0][1] < 1
    new_tok = _trimmed_at(tok, counts, 280)
    before, after = tokens_per_word(tok, HELD_OUT), tokens_per_word(new_tok, HELD_OUT)
    assert 1.0 <= before < after
    with pytest.raises(ValueError):
        tokens_per_word(tok, ["   "])


"""The embedded dataset: exact offsets, determinism, disjoint splits, sizes, both languages."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from kd2edge.data import embedded
from kd2edge.data.embedded import embedded_items, render, to_squad


def test_render_records_first_offset_of_each_slot():
    text, starts = render("{a} and {b}, then {a}.", {"a": "Xy", "b": "Zed"})
    assert text == "Xy and Zed, then Xy."
    assert starts == {"a": 0, "b": 7}


@pytest.mark.parametrize("split", embedded.SPLITS)
def test_every_answer_start_matches_its_context(split):
    for item in embedded_items(split):
        (answer,), (start,) = item.answers, item.answer_starts
        assert item.context[start:start + len(answer)] == answer, item.id


def test_sizes_languages_and_unique_ids():
    train, val = embedded_items("train"), embedded_items("validation")
    assert len(train) >= 600 and len(val) >= 150
    for items in (train, val):
        langs = Counter(it.language for it in items)
        assert set(langs) == {"en", "es"} and langs["en"] == langs["es"]
    ids = [it.id for it in train + val]
    assert len(ids) == len(set(ids))


def test_language_filter():
    es = embedded_items("validation", "es")
    assert es and all(it.language == "es" for it in es)
    assert all(it.question.startswith("¿") for it in es)


def test_passages_are_short_and_answers_are_short_spans():
    for item in embedded_items("train"):
        n_sentences = item.context.count(". ") + 1
        assert 2 <= n_sentences <= 5, item.context
        assert 1 <= len(item.answers[0].split()) <= 5, item.answers


def test_question_kinds_are_varied():
    first_words = Counter(it.question.split()[0].lower() for it in embedded_items("train", "en"))
    for word in ("who", "when", "where", "how", "what"):
        assert first_words[word] > 0, first_words


def test_validation_entities_never_appear_in_train():
    train, val = embedded_items("train"), embedded_items("validation")
    train_entities = {e for it in train for e in it.meta["entities"]}
    val_entities = {e for it in val for e in it.meta["entities"]}
    assert val_entities and not (train_entities & val_entities)
    train_text = "\n".join({it.context for it in train})
    for name in val_entities:
        assert name not in train_text, name


def test_deterministic_across_processes():
    """A fresh interpreter generates the very same items (no hash-seeded randomness)."""
    code = ("from kd2edge.data.embedded import embedded_items;"
            "its = embedded_items('validation');"
            "print(len(its), its[0].context, its[-1].question, its[-1].answers[0], sep='|')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    its = embedded_items("validation")
    assert out == f"{len(its)}|{its[0].context}|{its[-1].question}|{its[-1].answers[0]}"


def test_unknown_split_or_language():
    with pytest.raises(ValueError, match="splits"):
        embedded_items("test")
    with pytest.raises(ValueError, match="languages"):
        embedded_items("train", "fr")


def test_to_squad_groups_questions_by_passage():
    items = embedded_items("validation", "en")[:8]
    doc = to_squad(items)
    paragraphs = doc["data"][0]["paragraphs"]
    assert sum(len(p["qas"]) for p in paragraphs) == 8
    assert len(paragraphs) == len({it.context for it in items})
    assert json.loads(json.dumps(doc)) == doc


def test_main_writes_one_file_per_split_and_language(tmp_path):
    assert embedded.main([str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["embedded-train-en.json", "embedded-train-es.json",
                     "embedded-validation-en.json", "embedded-validation-es.json"]

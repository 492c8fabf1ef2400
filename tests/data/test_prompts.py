"""Prompt templates, targets, one-shot example choice and answer extraction."""

from __future__ import annotations

import pytest

from kd2edge.data.items import QAItem
from kd2edge.data.prompts import (TEMPLATES, build_prompt, extract_answer, match_choice, pick_example,
                                  target_text)
from kd2edge.errors import DataError

ITEM = QAItem(id="q1", question="Who founded Brimor?", context="Brimor was founded by Ana Vel.",
              answers=("Ana Vel", "Vel"), answer_starts=(22, 26))
EXAMPLE = QAItem(id="q2", question="When?", context="It opened in 1901.", answers=("1901",), answer_starts=(13,))
MC = QAItem(id="m1", question="Where do fish live?", choices=("desert", "sea"), choice_labels=("A", "B"),
            answer_key="B", task="multiple_choice")
FREE = QAItem(id="d1", question="Summarise.", context="Orvel is a town.", answers=("A town.",), task="free_text")


def test_extractive_zero_and_one_shot():
    assert build_prompt(ITEM) == "Context: Brimor was founded by Ana Vel.\nQuestion: Who founded Brimor?\nAnswer:"
    assert build_prompt(ITEM, EXAMPLE) == (
        "Context: It opened in 1901.\nQuestion: When?\nAnswer: 1901\n\n"
        "Context: Brimor was founded by Ana Vel.\nQuestion: Who founded Brimor?\nAnswer:")


def test_multiple_choice_and_free_text():
    assert build_prompt(MC) == "Question: Where do fish live?\nA. desert\nB. sea\nAnswer:"
    assert build_prompt(FREE) == "Instruction: Summarise.\nContext: Orvel is a town.\nResponse:"
    no_context = QAItem(id="d2", question="Name a colour.", answers=("Blue",), task="free_text")
    assert build_prompt(no_context) == "Instruction: Name a colour.\nResponse:"
    assert set(TEMPLATES) >= {"extractive", "multiple_choice", "free_text", "shot_separator"}


def test_target_text():
    assert target_text(ITEM) == " Ana Vel"
    assert target_text(MC) == " sea"
    assert target_text(FREE) == " A town."
    with pytest.raises(DataError, match="item u has no gold answer"):
        target_text(QAItem(id="u", question="?", context="x"))


POOL = tuple(QAItem(id=f"p{i}", question=f"Question {i}?", context=f"Passage {i % 3}.", answers=(str(i),),
                    answer_starts=(0,), language="en" if i % 2 else "es") for i in range(12))


def test_pick_example_never_the_item_and_deterministic():
    for item in POOL:
        chosen = {pick_example(POOL, item, seed) for seed in range(20)}
        assert item not in chosen
        assert all(c.language == item.language and c.context != item.context for c in chosen)
        assert len(chosen) > 1  # the seed matters
        assert pick_example(POOL, item, 5) == pick_example(POOL, item, 5)


def test_pick_example_same_question_counts_as_itself():
    twin = QAItem(id="other-id", question=ITEM.question, context="x", answers=("y",))
    with pytest.raises(DataError, match="no one-shot example for item q1"):
        pick_example([ITEM, twin], ITEM, seed=0)


def test_pick_example_skips_other_tasks_and_unanswered_and_falls_back():
    unanswered = QAItem(id="u", question="Unanswerable?", context="c")
    assert pick_example([ITEM, MC, unanswered, EXAMPLE], ITEM, seed=1) == EXAMPLE
    spanish = QAItem(id="s", question="¿Cuándo?", context="En 1901.", answers=("1901",), language="es")
    assert pick_example([ITEM, spanish], ITEM, seed=0) == spanish  # no English one: another language
    with pytest.raises(DataError):
        pick_example([], ITEM, seed=0)


@pytest.mark.parametrize("generated, expected", [
    (" Ana Vel\nQuestion: next", "Ana Vel"),
    ("\n\n  Answer: 1901  \n", "1901"),
    ("Answer:\nParis", "Paris"),
    ("answer : Brimor", "Brimor"),
    ("   \n", ""),
])
def test_extract_answer(generated, expected):
    assert extract_answer(generated) == expected


def test_extract_answer_free_text_keeps_all_lines():
    assert extract_answer(" Response: A town.\nIt is small.\n", task="free_text") == "A town.\nIt is small."


@pytest.mark.parametrize("answer, label", [
    ("B", "B"), ("b)", "B"), ("B. sea", "B"), ("Sea", "B"), ("sea.", "B"), ("A. sea", None), ("ocean", None)])
def test_match_choice(answer, label):
    assert match_choice(answer, MC) == label


def test_a_one_shot_example_shows_only_the_sentences_of_its_answer():
    long = QAItem(id="q3", question="Who won in 1999?", answers=("Ana Vel",), answer_starts=(35,),
                  context="The club was founded in 1901. In 1999 Ana Vel won the cup! Attendance rose. ¿Y luego? Nada.")
    from kd2edge.data.prompts import example_passage

    assert example_passage(long) == "In 1999 Ana Vel won the cup!"
    assert build_prompt(ITEM, long).startswith("Context: In 1999 Ana Vel won the cup!\nQuestion: Who won in 1999?\n"
                                               "Answer: Ana Vel\n\nContext: Brimor was founded by Ana Vel.")
    # An answer across a sentence end keeps both sentences; no located answer keeps the passage.
    across = QAItem(id="q4", question="?", context="A b. C d. E f.", answers=("b. C",), answer_starts=(2,))
    assert example_passage(across) == "A b. C d."
    assert example_passage(QAItem(id="q5", question="?", context="A b. C d.", answers=("x",), answer_starts=(-1,))) \
        == "A b. C d."

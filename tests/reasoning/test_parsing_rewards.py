"""Output parsing and reward functions, against hand-worked values."""

from __future__ import annotations

import warnings

import pytest

from kd2edge.data.items import QAItem
from kd2edge.scoring.parsing import choice_label, clean_answer, parse_rationale_answer
from kd2edge.reasoning.rewards import (answer_score, code_reward, combine_rewards, constant_reward_problem,
                                       correctness_reward, extract_code, format_reward, parse_weights,
                                       warn_if_constant, zero_variance_warning)

LABELS = ("A", "B", "C", "D", "E")
CHOICES = ("bank", "river", "a river bed", "money", "store")
MC = QAItem(id="mc", question="Where is water?", choices=CHOICES, choice_labels=LABELS, answer_key="B",
            task="multiple_choice")
EXTRACTIVE = QAItem(id="ex", question="Who founded it?", context="Founded by Adaline Qorr.", answers=("Adaline Qorr",))
FREE = QAItem(id="ft", question="Describe it.", answers=("the cat on the mat",), task="free_text")


@pytest.mark.parametrize("text, rationale, answer, labelled", [
    ("Rationale: Birds fly south in winter.\nAnswer: B", "Birds fly south in winter.", "B", True),
    ("Rationale: Birds fly south. Answer: B", "Birds fly south.", "B", True),
    ("**Reasoning:** Light scatters off air.\n\n**Answer:** (C) sky.", "Light scatters off air.", "(C) sky", True),
    ("### Explanation\nx y z\n### Final Answer: \"Tessaly\"\nmore text", "### Explanation\nx y z", "Tessaly", True),
    # The last answer label wins; "answer" inside the rationale is not a label.
    ("Rationale: my answer is unclear at first. Answer: Paris. Final answer: Lyon.",
     "my answer is unclear at first. Answer: Paris.", "Lyon", True),
    ("Answer:\n\n  Adaline Qorr.\n", "", "Adaline Qorr", True),
    ("It is on the river, so the answer is B.", "It is on the river, so", "B", False),
    # Real SmolLM2-135M outputs: the question restated, the answer quoted or ending its sentence.
    ('Rationale: The answer to the question "How many people does Trenkora employ?" is "994"', "", "994", False),
    ("It ends here.\nExplanation: The answer is 6600 visitantes. The explanation is short.", "", "6600 visitantes",
     False),
    ('The answer to the question "In what year was it first climbed?" is 1760.', "", "1760", False),
    # The last "the answer is" of a line; an answer label restating "The answer is X".
    ("Rationale: The answer is 877. The context says it is 877 km long. The answer is 877.",
     "The answer is 877. The context says it is 877 km long.", "877", False),
    ("Rationale: The context says it is held in August.\nAnswer: The answer is August.",
     "The context says it is held in August.", "August", True),
    # Real outputs running on into an invented example: only the text before it counts.
    ("Rationale: The context says it took place in 1902.\nAnswer: 1902\n\nQuestion: How many visitors come?\n"
     "Rationale: It says 500.\nAnswer: 500", "The context says it took place in 1902.", "1902", True),
    ("Context: The Orlan Bridge was opened in 1902.\nQuestion: When?\nRationale: It says 1902.\nAnswer: 1902",
     "", None, False),
    ("no format at all", "no format at all", None, False),
    ("Rationale: something\nAnswer:", "something", None, True),
])
def test_parse_rationale_answer(text, rationale, answer, labelled):
    parsed = parse_rationale_answer(text)
    assert parsed.answer == answer
    assert parsed.rationale == " ".join(rationale.split())
    assert parsed.labelled == labelled


def test_rationale_label_and_usable():
    parsed = parse_rationale_answer("Rationale: too short\nAnswer: B")
    assert parsed.rationale_labelled and not parsed.has_rationale          # 2 words < 3
    assert parse_rationale_answer("Reason: one two three\nAnswer: B").has_rationale


def test_clean_answer():
    assert clean_answer("\n  **Tessaly.**  \nrest") == "Tessaly"
    assert clean_answer("etc...") == "etc..."
    assert clean_answer("  \n") == ""


@pytest.mark.parametrize("answer, label", [
    ("B", "B"), ("(b)", "B"), ("B.", "B"), ("B) river", "B"), ("option C", "C"), ("[D]", "D"),
    ("a river bed", "C"),           # the text of C, not the letter A
    ("money, because it buys things", "D"), ("the river", "B"),
    ("a", "A"), ("Z", None), ("", None), (None, None),
    ("bank or money", None),         # two choices named: ambiguous
])
def test_choice_label(answer, label):
    assert choice_label(answer, LABELS, CHOICES) == label


def test_answer_score_by_task():
    # pred tokens {adaline, qorr, founded, it}, gold {adaline, qorr}: P = 2/4, R = 1, F1 = 2/3.
    assert answer_score(EXTRACTIVE, "Adaline Qorr founded it") == pytest.approx(2 / 3)
    assert answer_score(EXTRACTIVE, "The Adaline Qorr.") == 1.0
    assert answer_score(EXTRACTIVE, None) == 0.0
    assert answer_score(MC, "(B)") == 1.0
    assert answer_score(MC, "river") == 1.0
    assert answer_score(MC, "A") == 0.0
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 1, F1 = 10/11.
    assert answer_score(FREE, "the cat sat on the mat") == pytest.approx(10 / 11)


def test_correctness_reward_parses_the_answer():
    assert correctness_reward("Rationale: it says so in the text.\nAnswer: Adaline Qorr", EXTRACTIVE) == 1.0
    assert correctness_reward("Adaline Qorr", EXTRACTIVE) == 1.0       # unlabelled short reply
    assert correctness_reward("Rationale: water flows there.\nAnswer: B", MC) == 1.0
    assert correctness_reward("B is my guess", MC) == 0.0              # no answer label for MC: no answer


@pytest.mark.parametrize("completion, reward", [
    ("Rationale: Birds migrate south in winter.\nAnswer: B", 1.0),
    ("Answer: B", 0.5),
    ("Rationale: too short\nAnswer: B", 0.5),
    ("The answer is B", 0.0),
    ("B", 0.0),
])
def test_format_reward(completion, reward):
    assert format_reward(completion) == reward


def test_combine_rewards():
    # 1 * 2/3 + 0.2 * 1 = 0.8667
    assert combine_rewards({"correctness": 2 / 3, "format": 1.0}, {"correctness": 1.0, "format": 0.2}) \
        == pytest.approx(2 / 3 + 0.2)


def test_code_reward_runs_in_a_subprocess():
    good = "def add(a, b):\n    return a + b"
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert code_reward(good, tests) == 1.0
    assert code_reward("def add(a, b):\n    return a - b", tests) == 0.0
    assert code_reward("def add(a, b) return", tests) == 0.0                     # syntax error
    assert code_reward("import sys\nsys.exit(0)", tests) == 0.0                   # exits before the tests
    assert code_reward("import os\nos._exit(0)", tests) == 0.0
    assert code_reward("while True:\n    pass", tests, timeout_s=1.0) == 0.0       # killed at the limit
    # A variable set by the candidate does not leak into this process.
    code_reward("import builtins\nbuiltins.KD2EDGE_LEAK = 1", "")
    import builtins
    assert not hasattr(builtins, "KD2EDGE_LEAK")


def test_code_items_are_scored_by_their_tests():
    item = QAItem(id="c", question="Write add.", answers=("def add(a, b):\n    return a + b",), task="free_text",
                  meta={"tests": "assert add(1, 2) == 3"})
    completion = "Rationale: add the two numbers.\n```python\ndef add(a, b):\n    return a + b\n```\nAnswer: done"
    assert extract_code(completion) == "def add(a, b):\n    return a + b"
    assert correctness_reward(completion, item) == 1.0
    assert correctness_reward("```python\ndef add(a, b):\n    return 0\n```", item) == 0.0


def test_parse_weights():
    assert parse_weights("correctness=1, format=0.25") == {"correctness": 1.0, "format": 0.25}
    for bad in ("correctness", "correctness=x", "speed=1", "format=-1", "format=nan"):
        with pytest.raises(ValueError):
            parse_weights(bad)


def test_constant_rewards_warn():
    assert constant_reward_problem({"correctness": 1.0, "format": 0.2}, [EXTRACTIVE, MC]) is None
    assert constant_reward_problem({"format": 1.0}, [EXTRACTIVE]) is None
    assert "every reward weight is 0" in constant_reward_problem({"correctness": 0.0, "format": 0.0}, [EXTRACTIVE])
    # Unanswerable items only (SQuAD v2): an empty reply is as "right" as any, and so is the probe.
    unanswerable = QAItem(id="u", question="Who?", context="Nobody.", answers=())
    assert "alike" in constant_reward_problem({"correctness": 1.0}, [unanswerable])
    with pytest.warns(UserWarning, match="GRPO learns nothing"):
        warn_if_constant({"correctness": 0.0}, [EXTRACTIVE])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_constant({"correctness": 1.0}, [EXTRACTIVE]) is None


def test_zero_variance_warning():
    with pytest.warns(UserWarning, match="learned nothing"):
        assert zero_variance_warning([1.0, 1.0])
    assert zero_variance_warning([1.0, 0.5]) is None
    assert zero_variance_warning([]) is None

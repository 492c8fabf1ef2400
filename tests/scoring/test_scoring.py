"""Evaluator scoring without a real model: a fake backend whose log-probs we control."""

from __future__ import annotations

import numpy as np
import pytest

from kd2edge.data.items import QADataset, QAItem
from kd2edge.errors import DataError
from kd2edge.scoring import evaluator as ev


class CharBackend:
    """One token per character; log p(token) is looked up in a table (context chars: 0)."""

    kind = "fake"
    batch_size = 2

    def __init__(self, table: dict[str, float]):
        self.table = table
        self.seen: list[list[int]] = []

    def format_prompt(self, text: str) -> str:
        return f"<user>{text}</user>\n"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def token_logprobs(self, sequences):
        self.seen += [list(s) for s in sequences]
        return [np.array([self.table.get(chr(t), 0.0) for t in s[1:]]) for s in sequences]


def csqa_item(choices, key, id="q1"):
    labels = tuple("ABCDE"[: len(choices)])
    return QAItem(id=id, question="Where do you keep milk?", choices=tuple(choices), choice_labels=labels,
                  answer_key=key, task="multiple_choice")


def evalset(items, task="multiple_choice"):
    prompts = tuple(ev.Prompted(it, f"Q: {it.question} A:") for it in items)
    return ev.EvalSet(QADataset("fake", "validation", tuple(items), task), prompts, 0, None)


def test_loglik_picks_the_choice_with_the_highest_summed_logprob():
    # each choice is scored as " " + text; the space costs -0.1 for all.
    # " aaaa": -0.1 + 4 x -0.3 = -1.3 (per byte of "aaaa" -0.325); " c": -1.1 (per byte -1.1); " zz": -4.1
    backend = CharBackend({" ": -0.1, "a": -0.3, "c": -1.0, "z": -2.0})
    records = ev.run_items(backend, evalset([csqa_item(["aaaa", "c", "zz"], "B")]), 8, progress=False)
    r = records[0]
    assert r["choice_scores"] == pytest.approx([-1.3, -1.1, -4.1])
    assert r["choice"] == "B" and r["prediction"] == "c" and r["correct"] is True
    assert r["accuracy"] == 1.0 and r["em"] == 1.0 and r["f1"] == 1.0
    # length-normalized (lm-eval's acc_norm) prefers "aaaa" and so is wrong here
    assert r["accuracy_norm"] == 0.0
    # each scored sequence is the formatted prompt followed by the choice
    prompt = backend.format_prompt("Q: Where do you keep milk? A:")
    assert backend.seen[1] == [ord(c) for c in prompt + " c"]
    assert r["prompt"] == prompt


def test_loglik_accuracy_summary():
    backend = CharBackend({"a": -0.1, "b": -5.0})
    items = [csqa_item(["a", "b"], "A", id="1"), csqa_item(["b", "a"], "A", id="2"),
             csqa_item(["b", "a"], "B", id="3")]
    records = ev.run_items(backend, evalset(items), 8, progress=False)
    assert [r["choice"] for r in records] == ["A", "B", "B"]
    s = ev.summarize(records, "multiple_choice")
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(2 / 3) and "by_language" not in s


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    chars = lambda t: [ord(c) for c in t]  # noqa: E731
    ctx, cont = ev.encode_pair(chars, "Answer: ", "Paris")
    assert ctx == chars("Answer:") and cont == chars(" Paris")
    with pytest.raises(DataError, match="adds no token"):
        ev.encode_pair(chars, "Answer:", "")


def test_continuation_logprob_sums_only_the_continuation():
    # ids [c0 c1 c2 x1 x2]: token_lp[t-1] = log p(ids[t]); continuation = ids[3:] -> lp[2] + lp[3]
    lp = np.array([-9.0, -9.0, -0.5, -0.25])
    assert ev.continuation_logprob(lp, 3) == pytest.approx(-0.75)


def test_score_answer_per_task():
    squad = QAItem(id="1", question="q", context="c", answers=("Adaline Qorr",))
    assert ev.score_answer(squad, "adaline qorr.") == {"em": 1.0, "f1": 1.0, "correct": True}
    es = QAItem(id="2", question="q", answers=("Tomás Ivarra",), language="es")
    assert ev.score_answer(es, "El explorador Tomás Ivarra")["f1"] == pytest.approx(0.8)  # MLQA rule: "el" dropped
    dolly = QAItem(id="3", question="q", answers=("The cat sat on the mat.",), task="free_text")
    s = ev.score_answer(dolly, "the cat on the mat")
    assert s["rouge_l"] == pytest.approx(10 / 11) and s["correct"] is True


def test_summarize_breaks_down_by_language():
    records = [{"language": "en", "em": 1.0, "f1": 1.0}, {"language": "es", "em": 0.0, "f1": 0.5},
               {"language": "es", "em": 1.0, "f1": 1.0}]
    s = ev.summarize(records, "extractive")
    assert s["n"] == 3 and s["em"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2.5 / 3)
    assert s["by_language"]["es"] == {"n": 2, "em": 0.5, "f1": 0.75}
    assert s["by_language"]["en"]["n"] == 1


def test_unanswerable_items_accept_abstentions_and_are_broken_down():
    no_ans = QAItem(id="u", question="q", context="c", answers=())
    assert ev.score_answer(no_ans, "Unanswerable.") == {"em": 1.0, "f1": 1.0, "answerable": False, "correct": True}
    assert ev.score_answer(no_ans, "") == {"em": 1.0, "f1": 1.0, "answerable": False, "correct": True}
    assert ev.score_answer(no_ans, "Paris")["f1"] == 0.0
    # an answerable item whose gold is "none" is scored as usual
    assert ev.score_answer(QAItem(id="n", question="q", answers=("none",)), "none")["em"] == 1.0
    records = [{"language": "en", "em": 1.0, "f1": 1.0, "answerable": False},
               {"language": "en", "em": 0.0, "f1": 0.5}, {"language": "en", "em": 1.0, "f1": 1.0}]
    s = ev.summarize(records, "extractive")
    assert s["no_answer"] == {"n": 1, "em": 1.0, "f1": 1.0}
    assert s["has_answer"] == {"n": 2, "em": 0.5, "f1": 0.75}

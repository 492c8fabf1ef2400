"""Teacher-data filter decisions, the JSONL record, and the training pairs of each method."""

from __future__ import annotations

import json

import pytest

from kd2edge.data.items import QAItem
from kd2edge.errors import DataError
from kd2edge.reasoning.generate import (filter_decision, read_records, summarize, teacher_records,
                                        write_jsonl_atomic)
from kd2edge.data.prompts import ANSWER_PREFIX, RATIONALE_PREFIX, eval_prompt, rationale_student_prompt
from kd2edge.reasoning.methods import build_pairs, task_weights
from kd2edge.scoring.methods import read_answer
from kd2edge.scoring.parsing import parse_rationale_answer

CONTEXT = "The Velmora Institute was founded in 1871 by Adaline Qorr in Tessaly."
ITEMS = [QAItem(id=f"q{i}", question=q, context=CONTEXT, answers=(a,)) for i, (q, a) in
         enumerate([("Who founded the institute?", "Adaline Qorr"), ("When was it founded?", "1871"),
                    ("Where is it?", "Tessaly"), ("Who founded it?", "Adaline Qorr"),
                    ("In which year?", "1871")])]
MC = QAItem(id="mc", question="Where is water?", choices=("bank", "river"), choice_labels=("A", "B"),
            answer_key="B", task="multiple_choice")
# One scripted teacher reply per item (the rationale method), covering each decision.
REPLIES = {
    "q0": "Rationale: The context names Adaline Qorr as the founder.\nAnswer: Adaline Qorr",   # kept
    "q1": "Rationale: The text gives the founding year.\nAnswer: 1923",                       # wrong_answer
    "q2": "Rationale: Tessaly.\nAnswer: Tessaly",                                             # no_rationale
    "q3": "It was founded by someone long ago, I think.",                                     # no_answer
    "q4": "Rationale: As the critique says, the draft was wrong.\nAnswer: 1871",              # meta_talk
}


def scripted(replies_by_step):
    """A fake teacher: replies looked up by (step, item question) -> text; records the prompts it saw."""
    seen = []

    def generate(prompts, step, primers):
        seen.append((step, list(prompts), list(primers)))
        return [replies_by_step(step, p) for p in prompts]

    return generate, seen


def reply_for(step, prompt):
    for item in ITEMS:
        if f"Question: {item.question}" in prompt.splitlines():
            return REPLIES[item.id]
    raise AssertionError(prompt)


def test_filter_decisions():
    records = teacher_records(ITEMS, "rationale", scripted(reply_for)[0], keep="correct")
    decisions = {r.id: (r.kept, r.drop_reason) for r in records}
    assert decisions == {"q0": (True, None), "q1": (False, "wrong_answer"), "q2": (False, "no_rationale"),
                         "q3": (False, "no_answer"), "q4": (False, "meta_talk")}
    assert records[0].score == 1.0 and records[1].score == 0.0
    assert records[0].rationale == "The context names Adaline Qorr as the founder."
    # keep=all keeps the wrong answer (its reason stays recorded), never the unusable outputs.
    records = teacher_records(ITEMS, "rationale", scripted(reply_for)[0], keep="all")
    assert [(r.kept, r.drop_reason) for r in records][:2] == [(True, None), (True, "wrong_answer")]
    assert sum(r.kept for r in records) == 2
    assert summarize(records) == {"items": 5, "kept": 2,
                                  "dropped": {"no_rationale": 1, "no_answer": 1, "meta_talk": 1},
                                  "usable_rationales": 2, "mean_score": 0.6}


def test_min_score_threshold():
    parsed = parse_rationale_answer("Rationale: the text names the founder.\nAnswer: founder Adaline Qorr")
    # F1 of "founder adaline qorr" vs "adaline qorr": P = 2/3, R = 1 -> 0.8.
    assert filter_decision(ITEMS[0], parsed, True, min_score=0.5)[:2] == (True, None)
    kept, reason, score = filter_decision(ITEMS[0], parsed, True, min_score=0.9)
    assert (kept, reason) == (False, "wrong_answer") and score == pytest.approx(0.8)


def test_rationale_copying_the_worked_example_is_dropped():
    # Real SmolLM2-135M output: the example's engineer carried into another item's rationale.
    copied = parse_rationale_answer("Rationale: The context says the bridge was opened in 1871 by the engineer "
                                    "Mira Castel.\nAnswer: 1871")
    assert filter_decision(ITEMS[1], copied, True, min_score=0.5)[:2] == (False, "copied_example")
    # The same name is fine where the item itself holds it.
    own = QAItem(id="own", question="Who opened it?", context="Mira Castel opened the bridge in 1871.",
                 answers=("Mira Castel",))
    parsed = parse_rationale_answer("Rationale: The context says Mira Castel opened it.\nAnswer: Mira Castel")
    assert filter_decision(own, parsed, True, min_score=0.5)[:2] == (True, None)


def test_critique_revision_steps_and_record():
    def replies(step, prompt):
        return {"draft": "Rationale: It was founded in 1923 as the text says.\nAnswer: 1923",
                "critique": "The draft misreads the year: the context says 1871.",
                "revision": "Rationale: The context says the institute was founded in 1871.\nAnswer: 1871"}[step]

    generate, seen = scripted(replies)
    (record,) = teacher_records([ITEMS[1]], "critique-revision", generate)
    assert [s for s, *_ in seen] == ["draft", "critique", "revision"]
    assert [p[0] for *_, p in seen] == ["Rationale: The context says", "", "Rationale: The context says"]
    assert "The correct answer is: 1871" in seen[1][1][0]                 # the critic sees the gold answer
    assert "It was founded in 1923" in seen[1][1][0]                      # ... and the draft
    assert "misreads the year" in seen[2][1][0]                           # the reviser sees the critique
    assert "correct answer is" not in seen[0][1][0]                       # the draft prompt does not leak gold
    assert record.kept and record.answer == "1871"
    assert set(record.prompts) == set(record.outputs) == {"draft", "critique", "revision"}


def test_critique_revision_needs_gold():
    no_gold = QAItem(id="x", question="Why?", context="Because.", answers=())
    with pytest.raises(DataError, match="critique-revision needs gold answers"):
        teacher_records([ITEMS[0], no_gold], "critique-revision", scripted(reply_for)[0])


def test_unknown_method_or_keep():
    with pytest.raises(DataError, match="unknown data method"):
        teacher_records(ITEMS, "cot", scripted(reply_for)[0])
    with pytest.raises(DataError, match="unknown keep mode"):
        teacher_records(ITEMS, "rationale", scripted(reply_for)[0], keep="some")


def test_jsonl_round_trip(tmp_path):
    records = teacher_records(ITEMS, "rationale", scripted(reply_for)[0])
    path = write_jsonl_atomic(tmp_path / "sub" / "data.jsonl", (r.to_json() for r in records))
    assert not list(path.parent.glob(".*.tmp"))
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert set(lines[0]) == {"id", "method", "item", "student_prompt", "prompts", "outputs", "rationale", "answer",
                             "score", "kept", "drop_reason"}
    assert read_records(path) == records
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.jsonl")


def test_method_pairs_layout():
    records = teacher_records(ITEMS, "rationale", scripted(reply_for)[0], keep="all")   # q0, q1 kept
    answer = build_pairs(records, "answer")
    assert [(p.item.id, p.target) for p in answer] == [("q0", " Adaline Qorr"), ("q1", " 1923")]
    assert answer[0].prompt.endswith("Question: Who founded the institute?\nAnswer:")

    rationale = build_pairs(records, "rationale")
    assert rationale[0].prompt == rationale_student_prompt(ITEMS[0])
    assert rationale[0].prompt.endswith("Rationale:")
    assert rationale[0].target == " The context names Adaline Qorr as the founder.\nAnswer: Adaline Qorr"
    # The student's output to its prompt parses back to the same rationale and answer.
    parsed = parse_rationale_answer("Rationale:" + rationale[0].target)
    assert (parsed.rationale, parsed.answer) == ("The context names Adaline Qorr as the founder.", "Adaline Qorr")

    multi = build_pairs(records, "multitask")
    assert [(p.item.id, p.task) for p in multi] == [("q0", "answer"), ("q0", "rationale"),
                                                    ("q1", "answer"), ("q1", "rationale")]
    assert multi[0].prompt == ANSWER_PREFIX + answer[0].prompt and multi[0].target == " Adaline Qorr"
    assert multi[1].prompt == RATIONALE_PREFIX + answer[0].prompt
    assert multi[1].target == " The context names Adaline Qorr as the founder."
    assert task_weights(multi, rationale_weight=0.5) == [1.0, 0.5, 1.0, 0.5]
    assert task_weights(rationale, rationale_weight=0.5) == [1.0, 1.0]


def test_test_time_prompts_and_answers():
    assert eval_prompt(ITEMS[0], "multitask").startswith(ANSWER_PREFIX + "Context:")
    assert eval_prompt(ITEMS[0], "rationale") == rationale_student_prompt(ITEMS[0])
    assert read_answer(" It says so.\nAnswer: Adaline Qorr", ITEMS[0], "rationale") == "Adaline Qorr"
    assert read_answer(" Adaline Qorr\nmore", ITEMS[0], "answer") == "Adaline Qorr"
    assert "Choices:\nA. bank\nB. river" in rationale_student_prompt(MC)


def test_pairs_bad_inputs():
    records = teacher_records(ITEMS, "rationale", scripted(reply_for)[0])
    with pytest.raises(DataError, match="unknown training method"):
        build_pairs(records, "cot")
    nothing_kept = [r for r in records if not r.kept]
    with pytest.raises(DataError, match="no teacher record was kept"):
        build_pairs(nothing_kept, "answer")
    answers_only = teacher_records(ITEMS[:1], "answer", lambda prompts, step, primers: ["Adaline Qorr"] * len(prompts))
    assert build_pairs(answers_only, "answer")[0].target == " Adaline Qorr"
    with pytest.raises(DataError, match="generated with --method answer"):
        build_pairs(answers_only, "rationale")


def test_code_item_kept_when_its_tests_pass():
    item = QAItem(id="c", question="Write add(a, b).", answers=("def add(a, b):\n    return a + b",),
                  task="free_text", meta={"tests": "assert add(2, 2) == 4"})

    def replies(body):
        return lambda prompts, step, primers: [f"Rationale: add the two arguments.\n```python\n{body}\n```\nAnswer: the code above"]

    (good,) = teacher_records([item], "rationale", replies("def add(a, b):\n    return a + b"))
    (bad,) = teacher_records([item], "rationale", replies("def add(a, b):\n    return a * 3"))
    assert (good.kept, good.score) == (True, 1.0)
    assert (bad.kept, bad.drop_reason, bad.score) == (False, "wrong_answer", 0.0)


def test_multiple_choice_answer_targets_are_choice_texts():
    """The answer task learns " <choice text>", as the plain path and log-likelihood scoring read it."""
    from kd2edge.reasoning.methods import answer_target

    assert answer_target(MC, "B") == " river" and answer_target(MC, "(b) river") == " river"
    assert answer_target(MC, "bank") == " bank"
    assert answer_target(MC, "somewhere wet") == " somewhere wet"      # names no choice: kept as written
    assert answer_target(ITEMS[0], " Adaline Qorr ") == " Adaline Qorr"
    records = teacher_records([MC], "rationale", lambda prompts, step, primers: ["Rationale: Water is in a river.\nAnswer: B"])
    assert [(p.task, p.target) for p in build_pairs(records, "multitask")] == [
        ("answer", " river"), ("rationale", " Water is in a river.")]

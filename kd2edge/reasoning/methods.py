"""Training methods on teacher data: (prompt, target) pairs for the distillation loop.

- "answer": answer-only fine-tuning on the teacher's answers. Prompt: the plain
  evaluation prompt (`kd2edge.data.prompts.build_prompt`, ends in "Answer:"); target:
  " " + the teacher's answer (`answer_target`: for multiple choice the named choice's
  text, as `kd2edge.data.prompts.target_text` and the evaluator's log-likelihood scoring
  read it, not the letter the teacher was asked for).
- "rationale": rationale then answer as one target. Prompt: the question block with a
  request to reason first, ending in "Rationale:" (`rationale_student_prompt`); target:
  " <rationale>\\nAnswer: <answer>". At test time the student is asked the same way and
  its output parsed with `parse_rationale_answer` ("Rationale:" + output).
- "multitask": distilling step-by-step (Hsieh et al., 2023): two tasks per item on the
  same input, told apart by a prefix: "[answer] " + plain prompt -> " <answer>", and
  "[rationale] " + plain prompt -> " <rationale>". Only the answer task is used at test
  time (with its prefix); the rationale task shapes the representation.

The contract with the distill loop (`kd2edge.distill.data.build_examples`): a pair is a
user prompt *before* the chat template and the continuation the student must produce
(leading space, no EOS: the loop adds EOS and masks the prompt). Any logit KD loss
applies unchanged on the target tokens, with the teacher run on the same prompt +
target. In the multitask loss, L = L_answer + lambda * L_rationale (Hsieh et al.): the
distill stage feeds both examples of an item to its loop, which has no per-example
weights, so lambda = 1 there; `task_weights` gives the weights for a loop that has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

from kd2edge.data.items import QAItem
from kd2edge.errors import DataError
from kd2edge.data.prompts import (ANSWER_PREFIX, RATIONALE_PREFIX, TRAIN_METHODS, build_prompt,
                                  rationale_student_prompt)
from kd2edge.reasoning.generate import TeacherRecord, has_usable_rationale, item_from_dict
from kd2edge.scoring.parsing import choice_label, parse_rationale_answer



@dataclass(frozen=True)
class TrainPair:
    """One training example for the distill loop.

    `prompt`: user message before the chat template. `target`: the continuation (leading
    space, no EOS). `task`: "answer" or "rationale" (multitask weighting). `item`: its item.
    """

    prompt: str
    target: str
    task: str
    item: QAItem


def rationale_target(rationale: str, answer: str) -> str:
    """The rationale-then-answer continuation of `rationale_student_prompt`."""
    return f" {rationale.strip()}\nAnswer: {answer.strip()}"


def answer_target(item: QAItem, answer: str) -> str:
    """The answer-task continuation: " " + the answer; a multiple-choice answer becomes its choice's text.

    The plain path trains on " " + choice text and scores choices by their text's
    log-likelihood, so a letter target ("B") would teach what the evaluator never reads.
    An answer that names no choice (kept with keep="all") stays as written.
    """
    if item.task == "multiple_choice":
        label = choice_label(answer, item.choice_labels, item.choices)
        if label is not None:
            return " " + item.choices[item.choice_labels.index(label)]
    return " " + answer.strip()


def answer_pairs(records: Sequence[TeacherRecord], prompt_fn: Callable[[QAItem], str] | None = None) -> list[TrainPair]:
    """Answer-only pairs from the kept records: plain prompt -> " " + teacher answer."""
    prompt_fn = prompt_fn or build_prompt
    out = []
    for r in records:
        item = item_from_dict(r.item)
        out.append(TrainPair(prompt_fn(item), answer_target(item, r.answer), "answer", item))
    return out


def rationale_pairs(records: Sequence[TeacherRecord]) -> list[TrainPair]:
    """Rationale-then-answer pairs: `rationale_student_prompt` -> `rationale_target`."""
    out = []
    for r in records:
        item = item_from_dict(r.item)
        out.append(TrainPair(rationale_student_prompt(item), rationale_target(r.rationale, r.answer),
                             "rationale", item))
    return out


def multitask_pairs(records: Sequence[TeacherRecord], prompt_fn: Callable[[QAItem], str] | None = None,
                    answer_prefix: str = ANSWER_PREFIX, rationale_prefix: str = RATIONALE_PREFIX) -> list[TrainPair]:
    """Distilling step-by-step pairs: per item, an answer task then a rationale task on the same input.

    Returns:
        2 pairs per record, in record order: (prefix_a + prompt -> " answer"),
        (prefix_r + prompt -> " rationale").
    """
    prompt_fn = prompt_fn or build_prompt
    out = []
    for r in records:
        item = item_from_dict(r.item)
        prompt = prompt_fn(item)
        out.append(TrainPair(answer_prefix + prompt, answer_target(item, r.answer), "answer", item))
        out.append(TrainPair(rationale_prefix + prompt, " " + r.rationale.strip(), "rationale", item))
    return out


def build_pairs(records: Sequence[TeacherRecord], method: str,
                prompt_fn: Callable[[QAItem], str] | None = None) -> list[TrainPair]:
    """Training pairs of a method from teacher records (only the kept ones are used).

    Args:
        records: teacher records (`kd2edge.reasoning.generate.read_records`).
        method: "answer", "rationale" or "multitask".
        prompt_fn: the plain prompt of an item (default: zero-shot `build_prompt`); the
            distill stage passes its own to use one-shot prompts for the answer task.

    Returns:
        The pairs, in record order.

    Raises:
        DataError: unknown method; no kept record; a rationale method on records that
            hold no usable rationale (answer-only data, or a teacher that wrote none).
    """
    if method not in TRAIN_METHODS:
        raise DataError(f"unknown training method {method!r}: use one of {', '.join(TRAIN_METHODS)}")
    kept = [r for r in records if r.kept and r.answer]
    if not kept:
        raise DataError(f"no teacher record was kept (of {len(records)}): regenerate with --keep all "
                        f"or a stronger teacher")
    if method == "answer":
        return answer_pairs(kept, prompt_fn)
    usable = [r for r in kept if has_usable_rationale(r) and r.method != "answer"]
    if not usable:
        made = {r.method for r in records}
        why = ("the data was generated with --method answer" if made == {"answer"}
               else "the teacher wrote no usable rationale for any kept item")
        raise DataError(f"--train-method {method} needs rationales, but {why}: generate data with "
                        f"--method rationale or critique-revision, or train with --train-method answer")
    if method == "rationale":
        return rationale_pairs(usable)
    return multitask_pairs(usable, prompt_fn)


def task_weights(pairs: Sequence[TrainPair], rationale_weight: float = 1.0) -> list[float]:
    """Per-pair loss weights: 1 for answer pairs, `rationale_weight` (lambda) for rationale pairs
    of a multitask set; 1 for every pair of the single-task methods."""
    multitask = {p.task for p in pairs} == {"answer", "rationale"}
    return [rationale_weight if multitask and p.task == "rationale" else 1.0 for p in pairs]

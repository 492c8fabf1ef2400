"""Prompt templates shared by distillation and evaluation (so a student is scored on what it was trained on).

Minimal plain-text templates, no chat template: extractive QA follows lm-evaluation-harness's
MLQA/SQuAD style ("Context: ...\\nQuestion: ...\\nAnswer:"), multiple choice lists the lettered
choices, free text (Dolly) gives instruction and context. A one-shot prompt is the example's
block with its answer filled in, a blank line, then the item's block. The templates are module
constants so that results can record the exact text (`TEMPLATES`).
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from typing import Callable, Literal, Sequence

from kd2edge.data.items import QAItem, Task
from kd2edge.errors import DataError

EXTRACTIVE_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
MULTIPLE_CHOICE_TEMPLATE = "Question: {question}\n{choices}\nAnswer:"
CHOICE_TEMPLATE = "{label}. {text}"
FREE_TEXT_TEMPLATE = "Instruction: {question}\nContext: {context}\nResponse:"
FREE_TEXT_NO_CONTEXT_TEMPLATE = "Instruction: {question}\nResponse:"
SHOT_SEPARATOR = "\n\n"
TEMPLATES = {
    "extractive": EXTRACTIVE_TEMPLATE,
    "multiple_choice": MULTIPLE_CHOICE_TEMPLATE,
    "choice": CHOICE_TEMPLATE,
    "free_text": FREE_TEXT_TEMPLATE,
    "free_text_no_context": FREE_TEXT_NO_CONTEXT_TEMPLATE,
    "shot_separator": SHOT_SEPARATOR,
}
_PREFERENCE_SCAN = 2000
_ANSWER_PREFIX = re.compile(r"^(?:answer|response)\s*:\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def prompt_block(item: QAItem) -> str:
    """The item's zero-shot prompt: its template filled, ending in "Answer:" / "Response:" (no space)."""
    if item.task == "multiple_choice":
        choices = "\n".join(CHOICE_TEMPLATE.format(label=label, text=text)
                            for label, text in zip(item.choice_labels, item.choices))
        return MULTIPLE_CHOICE_TEMPLATE.format(question=item.question, choices=choices)
    if item.task == "free_text":
        template = FREE_TEXT_TEMPLATE if item.context.strip() else FREE_TEXT_NO_CONTEXT_TEMPLATE
        return template.format(question=item.question, context=item.context)
    return EXTRACTIVE_TEMPLATE.format(context=item.context, question=item.question)


def build_prompt(item: QAItem, example: QAItem | None = None) -> str:
    """The prompt for `item`, zero-shot or one-shot.

    Args:
        item: the question to ask.
        example: a solved example shown first (one-shot), or None (zero-shot). An extractive
            example shows only the sentences of its passage that hold its answer (`example_passage`).

    Returns:
        The prompt text; the model's continuation is the answer.

    Raises:
        DataError: the example has no gold answer to show.
    """
    block = prompt_block(item)
    if example is None:
        return block
    shown = dataclasses.replace(example, context=example_passage(example))
    return prompt_block(shown) + target_text(example) + SHOT_SEPARATOR + block


def example_passage(item: QAItem) -> str:
    """The part of a worked example's passage that a one-shot prompt shows: the sentences holding its answer.

    The example demonstrates the format (read a passage, answer with a span of it); the rest
    of its passage, often longer than the question's own (Wikipedia paragraphs of 100-600 words),
    would double every prompt's tokens for the teacher, the student and the device alike.
    Items without a located answer (no offset, multiple choice, free text) keep their context.
    """
    if item.task != "extractive" or not item.answers or not item.answer_starts or item.answer_starts[0] < 0:
        return item.context
    start = item.answer_starts[0]
    end = start + len(item.answers[0])
    # Sentence ends: ". ", "? ", "! " (also before Spanish ¿/¡ and quotes); the answer's sentences are kept whole.
    cuts = [m.end() for m in _SENTENCE_END.finditer(item.context)]
    first = max((c for c in cuts if c <= start), default=0)
    last = min((c for c in cuts if c >= end), default=len(item.context))
    return item.context[first:last].strip()


def target_text(item: QAItem) -> str:
    """The training target that follows the prompt: a space and the first gold answer.

    For multiple choice this is the correct choice's text (not its letter); see `match_choice`.

    Raises:
        DataError: the item has no gold answer (an unanswerable SQuAD v2 question, an unlabelled row).
    """
    gold = item.gold
    if not gold:
        raise DataError(f"item {item.id} has no gold answer (unanswerable or unlabelled): "
                        f"drop such items before training or using them as examples")
    return " " + gold[0]


def pick_example(pool: Sequence[QAItem], item: QAItem, seed: int) -> QAItem:
    """A one-shot example for `item`: deterministic for (pool, item, seed), never the item itself.

    An item is "itself" if its id or its question text matches; candidates must also have the
    same task and a gold answer. Among those, one in the item's language and with another
    context (so the example does not give away the item's passage) is preferred.

    Args:
        pool: where examples come from (usually the train split).
        item: the question being asked.
        seed: the run's seed.

    Returns:
        The example.

    Raises:
        DataError: no other usable item in the pool.
    """
    fallback = None
    if pool:
        # Walk the pool from a seeded position: O(1) per item for typical pools. Seeding with a
        # string is stable across processes (no hash randomisation).
        start = random.Random(f"{seed}:{item.id}:{item.question}").randrange(len(pool))
        for offset in range(len(pool)):
            candidate = pool[(start + offset) % len(pool)]
            if (candidate.id == item.id or candidate.question == item.question
                    or candidate.task != item.task or not candidate.gold):
                continue
            if candidate.language == item.language and candidate.context != item.context:
                return candidate
            fallback = fallback or candidate
            if offset >= _PREFERENCE_SCAN:  # bound the search for a preferred one (pool of another language)
                break
    if fallback is not None:
        return fallback
    raise DataError(f"no one-shot example for item {item.id}: the example pool has no other answered "
                    f"{item.task} question; use zero-shot or a larger pool")


def extract_answer(generated: str, task: Task = "extractive") -> str:
    """The answer in a model's continuation.

    Extractive and multiple choice: the first non-empty line, trimmed, without a leading
    "Answer:" (models often restate it). Free text: the whole continuation, trimmed, without a
    leading "Response:".
    """
    if task == "free_text":
        return _ANSWER_PREFIX.sub("", generated.strip()).strip()
    for line in generated.splitlines():
        text = _ANSWER_PREFIX.sub("", line.strip()).strip()
        if text:
            return text
    return ""


def match_choice(answer: str, item: QAItem) -> str | None:
    """Which choice label an extracted multiple-choice answer means, or None.

    Accepts the letter ("B", "b)", "B."), "B. library" or the choice text ("library"),
    ignoring case and surrounding punctuation.
    """
    def norm(s: str) -> str:
        return " ".join(s.lower().strip(string.punctuation + " ").split())

    text = norm(answer)
    labels = {norm(label): label for label in item.choice_labels}
    texts = {norm(choice): label for label, choice in zip(item.choice_labels, item.choices)}
    if text in labels:
        return labels[text]
    if text in texts:
        return texts[text]
    head, _, rest = text.partition(" ")
    head = head.strip(string.punctuation)
    if head in labels and norm(rest) == norm(item.choices[item.choice_labels.index(labels[head])]):
        return labels[head]
    return None


# ----------------------------------------------------------------------------------------------
# Students trained on teacher rationales (kd2edge.reasoning): how each training method is asked.

TrainMethod = Literal["answer", "rationale", "multitask"]
TRAIN_METHODS = ("answer", "rationale", "multitask")
ANSWER_PREFIX, RATIONALE_PREFIX = "[answer] ", "[rationale] "


def task_block(item: QAItem) -> str:
    """The question as the teacher sees it: context, question and lettered choices."""
    parts = []
    if item.context:
        parts.append(f"Context: {item.context}")
    parts.append(f"Question: {item.question}")
    if item.task == "multiple_choice":
        parts.append("Choices:\n" + "\n".join(f"{label}. {c}" for label, c in zip(item.choice_labels, item.choices)))
    return "\n".join(parts)


def answer_kind(item: QAItem) -> str:
    """What the Answer line should hold, for the format instruction."""
    if item.task == "multiple_choice":
        return "the letter of the correct choice"
    if item.task == "extractive":
        return "the shortest span of the context that answers the question"
    return "your answer"


def rationale_student_prompt(item: QAItem) -> str:
    """The student's prompt for rationale-then-answer: question, instruction, "Rationale:"."""
    return (f"{task_block(item)}\nExplain your reasoning, then give {answer_kind(item)} "
            f"after \"Answer:\".\nRationale:")


def eval_prompt(item: QAItem, method: str, prompt_fn: Callable[[QAItem], str] | None = None,
                answer_prefix: str = ANSWER_PREFIX) -> str:
    """The prompt a student trained with `method` is asked at test time.

    "answer": the plain prompt; "rationale": `rationale_student_prompt`; "multitask":
    the answer task's prompt (prefix + plain prompt).
    """
    if method == "rationale":
        return rationale_student_prompt(item)
    plain = (prompt_fn or build_prompt)(item)
    return answer_prefix + plain if method == "multitask" else plain

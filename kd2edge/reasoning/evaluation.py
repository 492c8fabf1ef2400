"""CommonsenseQA-style multiple choice, with and without a rationale before the answer.

Plain scoring is the evaluator's (`kd2edge.evaluate.evaluator.run_items`: log-likelihood
of each choice, or the generated letter). Rationale scoring asks the model to reason
first (`rationale_student_prompt`, ending in "Rationale:"), generates greedily, reads the
letter after the last "Answer:" (`parse_rationale_answer`, `choice_label`), and scores
accuracy with `choice_accuracy`. Any backend the evaluator opens works (PyTorch folder,
GPTQ checkpoint, exported ONNX artifact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kd2edge.data.items import QAItem, QADataset
from kd2edge.errors import DataError
from kd2edge.evaluate.metrics import choice_accuracy
from kd2edge.reasoning.parsing import choice_label, parse_rationale_answer
from kd2edge.reasoning.rewards import format_score


def score_rationale_output(output: str, item: QAItem) -> dict:
    """Per-item record of a rationale-then-letter generation.

    Args:
        output: the model's continuation of a prompt that ends in "Rationale:".
        item: the multiple-choice item.

    Returns:
        {id, generation, rationale, answer, choice, correct, format}.
    """
    parsed = parse_rationale_answer("Rationale: " + output)
    choice = choice_label(parsed.answer, item.choice_labels, item.choices)
    return {"id": item.id, "generation": output, "rationale": parsed.rationale, "answer": parsed.answer,
            "choice": choice, "correct": choice is not None and choice == item.answer_key,
            "format": format_score(parsed)}


def evaluate_with_rationales(model_dir: str | Path, items: Sequence[QAItem], max_new_tokens: int = 128,
                             batch_size: int = 8, plain_mode: str = "loglik", progress: bool = True) -> dict:
    """Multiple-choice accuracy of one model, plainly and with a rationale first.

    Args:
        model_dir: anything `kd2edge.evaluate.evaluator.load_backend` opens.
        items: multiple-choice items with answer keys (CommonsenseQA).
        max_new_tokens: generation budget for rationale + answer.
        batch_size: prompts per generation batch.
        plain_mode: the evaluator's mode for plain scoring, "loglik" or "generate".
        progress: progress bars on stderr.

    Returns:
        {"n", "plain": {accuracy, mode}, "rationale": {accuracy, answered, formatted},
         "records": [per-item rationale records]}; `answered` is the share of outputs
         naming a choice, `formatted` the share with a labelled rationale and answer.

    Raises:
        DataError: no items, or an item that is not multiple choice with an answer key.
    """
    from tqdm import tqdm

    from kd2edge.data.prompts import build_prompt
    from kd2edge.evaluate.evaluator import EvalSet, Prompted, load_backend, run_items, summarize
    from kd2edge.reasoning.methods import rationale_student_prompt

    items = list(items)
    bad = [it.id for it in items if it.task != "multiple_choice" or it.answer_key is None]
    if not items or bad:
        raise DataError("evaluate_with_rationales needs multiple-choice items with answer keys"
                        + (f" ({len(bad)} are not, first: {bad[0]})" if bad else " (got none)")
                        + ": give a CommonsenseQA-style dataset")
    backend = load_backend(str(model_dir), batch_size=batch_size)
    evalset = EvalSet(QADataset("items", "eval", tuple(items), "multiple_choice"),
                      tuple(Prompted(it, build_prompt(it)) for it in items), shots=0, example_split=None)
    plain = summarize(run_items(backend, evalset, max_new_tokens=8, mode=plain_mode, progress=progress,
                                desc="plain"), "multiple_choice")
    records = []
    for start in tqdm(range(0, len(items), batch_size), desc="with rationale", unit="batch", disable=not progress):
        chunk = items[start:start + batch_size]
        outputs = backend.generate([backend.format_prompt(rationale_student_prompt(it)) for it in chunk],
                                   max_new_tokens)
        records += [score_rationale_output(o, it) for o, it in zip(outputs, chunk)]
    n = len(records)
    return {"n": n, "plain": {"accuracy": plain["accuracy"], "mode": plain_mode},
            "rationale": {"accuracy": choice_accuracy([r["choice"] for r in records], [it.answer_key for it in items]),
                          "answered": sum(r["choice"] is not None for r in records) / n,
                          "formatted": sum(r["format"] == 1.0 for r in records) / n},
            "records": records}

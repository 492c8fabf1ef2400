"""Evaluating students trained on rationales, and CommonsenseQA with and without a rationale.

A student is asked the way it was trained (`kd2edge.data.prompts.eval_prompt`):
"answer" and "multitask" students read the evaluator's plain prompt (multitask: with the
"[answer] " prefix) and are scored by the evaluator itself (`run_items`); a "rationale"
student continues `rationale_student_prompt` (ending in "Rationale:"), always by greedy
generation (a choice's log-likelihood right after "Rationale:" measures nothing), and
its answer is read after the last "Answer:" (`read_answer`) before the evaluator's
metrics score it (`run_method_items`).

CommonsenseQA-style multiple choice with and without a rationale: plain scoring is the
evaluator's (log-likelihood of each choice, or the generated letter); rationale scoring
asks the model to reason first, reads the letter after the last "Answer:"
(`parse_rationale_answer`, `choice_label`) and scores accuracy with `choice_accuracy`
(`rationale_comparison`). Any backend the evaluator opens works (PyTorch folder, GPTQ
checkpoint, exported ONNX artifact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kd2edge.data.items import QAItem, QADataset
from kd2edge.data.prompts import TRAIN_METHODS, eval_prompt, extract_answer, rationale_student_prompt
from kd2edge.errors import DataError
from kd2edge.scoring import metrics
from kd2edge.scoring.backends import Backend
from kd2edge.scoring.evaluator import EvalSet, Prompted, run_items, score_answer
from kd2edge.scoring.metrics import choice_accuracy
from kd2edge.scoring.parsing import choice_label, format_score, parse_rationale_answer

# Generation budget for rationale + answer (the evaluator's default of 24 tokens ends
# most rationales before their "Answer:" line).
RATIONALE_MAX_NEW_TOKENS = 128


def method_evalset(evalset: EvalSet, method: str) -> EvalSet:
    """The evaluation set as a student trained with `method` is asked.

    "answer": unchanged; "multitask": "[answer] " + each plain prompt (one-shot examples
    kept); "rationale": `rationale_student_prompt` (zero-shot: the rationale format has
    no worked example).

    Raises:
        DataError: an unknown method.
    """
    if method not in TRAIN_METHODS:
        raise DataError(f"unknown training method {method!r}: use one of {', '.join(TRAIN_METHODS)}")
    if method == "answer":
        return evalset
    zero_shot = method == "rationale"
    prompts = tuple(Prompted(p.item, eval_prompt(p.item, method, prompt_fn=lambda _item, text=p.text: text),
                             None if zero_shot else p.example_id) for p in evalset.prompts)
    return EvalSet(evalset.dataset, prompts, 0 if zero_shot else evalset.shots,
                   None if zero_shot else evalset.example_split, evalset.warnings)


def method_mode(method: str, mode: str) -> str:
    """The scoring mode for a student trained with `method`: a rationale student always generates."""
    return "generate" if method == "rationale" else mode


def method_max_new_tokens(method: str, max_new_tokens: int) -> int:
    """Generation budget: a rationale student gets at least RATIONALE_MAX_NEW_TOKENS."""
    return max(max_new_tokens, RATIONALE_MAX_NEW_TOKENS) if method == "rationale" else max_new_tokens


def read_answer(output: str, item: QAItem, method: str) -> str:
    """The answer in a student's output to `eval_prompt` (for scoring with the evaluator's metrics)."""
    if method == "rationale":
        return parse_rationale_answer("Rationale: " + output).answer or ""
    return extract_answer(output, item.task)


def generate_outputs(backend: Backend, prompts: Sequence[str], max_new_tokens: int, progress: bool = True,
                     desc: str = "generate") -> tuple[list[str], list[str]]:
    """Greedy continuations of user prompts in the backend's batches.

    Returns:
        (the prompts through the chat template, the continuations), in input order.
    """
    from tqdm import tqdm

    batch = max(1, backend.batch_size)
    formatted, outputs = [], []
    for start in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = [backend.format_prompt(p) for p in prompts[start:start + batch]]
        formatted += chunk
        outputs += backend.generate(chunk, max_new_tokens)
    return formatted, outputs


def rationale_record(p: Prompted, prompt: str, output: str) -> dict:
    """An evaluator-layout record (`run_items`) of a rationale student's output.

    Args:
        p: the item and the user prompt it was asked with (ends in "Rationale:").
        prompt: that prompt through the chat template (what the model read).
        output: the model's continuation.

    Returns:
        {id, language, task, prompt, example_id, answers, generation, rationale, prediction,
         em, f1, correct, [choice, accuracy] | [rouge_l]}: the answer after the last
         "Answer:" scored as the evaluator scores a generated answer.
    """
    item = p.item
    answer = read_answer(output, item, "rationale")
    record = {"id": item.id, "language": item.language, "task": item.task, "prompt": prompt,
              "example_id": p.example_id, "answers": list(item.gold), "generation": output,
              "rationale": parse_rationale_answer("Rationale: " + output).rationale}
    if item.task == "multiple_choice":
        label = choice_label(answer, item.choice_labels, item.choices)
        chosen = item.choices[item.choice_labels.index(label)] if label else answer
        em, f1 = metrics.squad_scores(chosen, item.gold)
        correct = label is not None and label == item.answer_key
        record.update(prediction=chosen, choice=label, em=em, f1=f1, accuracy=float(correct), correct=correct)
    else:
        record.update(prediction=answer, **score_answer(item, answer))
    return record


def run_method_items(backend: Backend, evalset: EvalSet, method: str, max_new_tokens: int, mode: str = "loglik",
                     progress: bool = True, desc: str = "evaluate") -> list[dict]:
    """`kd2edge.scoring.evaluator.run_items` for a student trained with `method`.

    Args:
        backend: the model.
        evalset: the plain evaluation set (`prepare`); re-prompted with `method_evalset`.
        method: the student's training method ("answer", "rationale", "multitask").
        max_new_tokens: generation budget (a rationale student gets `method_max_new_tokens`).
        mode: multiple-choice mode for "answer"/"multitask" ("loglik" or "generate").

    Returns:
        One record per item, in the evaluator's layout (so `summarize` and the
        regression/retention metrics read them unchanged).

    Raises:
        DataError: an unknown method or mode.
    """
    asked = method_evalset(evalset, method)
    if method != "rationale":
        return run_items(backend, asked, max_new_tokens, mode, progress, desc)
    formatted, outputs = generate_outputs(backend, [p.text for p in asked.prompts],
                                          method_max_new_tokens(method, max_new_tokens), progress, desc)
    return [rationale_record(p, f, o) for p, f, o in zip(asked.prompts, formatted, outputs)]


def method_scores(backend: Backend, evalset: EvalSet, method: str, max_new_tokens: int,
                  desc: str = "evaluate") -> dict:
    """EM/F1 of a model asked greedily as a student trained with `method` is (`run_method_items`).

    Returns:
        {em, f1, n}, the scores rounded to 4 decimals.
    """
    from kd2edge.scoring.evaluator import summarize

    summary = summarize(run_method_items(backend, evalset, method, max_new_tokens, mode="generate", desc=desc),
                        evalset.task)
    return {"em": round(summary["em"], 4), "f1": round(summary["f1"], 4), "n": summary["n"]}


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


def check_choice_items(items: Sequence[QAItem]) -> list[QAItem]:
    """The items as a list, if all are multiple choice with an answer key.

    Raises:
        DataError: no items, or one that is not multiple choice with an answer key.
    """
    items = list(items)
    bad = [it.id for it in items if it.task != "multiple_choice" or it.answer_key is None]
    if not items or bad:
        raise DataError("evaluate_with_rationales needs multiple-choice items with answer keys"
                        + (f" ({len(bad)} are not, first: {bad[0]})" if bad else " (got none)")
                        + ": give a CommonsenseQA-style dataset")
    return items


def rationale_comparison(backend: Backend, items: Sequence[QAItem], max_new_tokens: int = 128,
                         plain_mode: str = "loglik", progress: bool = True,
                         rationale_outputs: Sequence[str] | None = None) -> dict:
    """Multiple-choice accuracy of one open model, plainly and with a rationale first.

    Args:
        backend: the model (any evaluator backend).
        items: multiple-choice items with answer keys (CommonsenseQA).
        max_new_tokens: generation budget for rationale + answer.
        plain_mode: the evaluator's mode for plain scoring, "loglik" or "generate".
        progress: progress bars on stderr.
        rationale_outputs: the model's greedy continuations of `rationale_student_prompt`
            for `items`, when already generated (a rationale student's evaluation), so
            they are not generated twice; None generates them.

    Returns:
        {"n", "plain": {accuracy, mode}, "rationale": {accuracy, answered, formatted},
         "records": [per-item rationale records]}; `answered` is the share of outputs
         naming a choice, `formatted` the share with a labelled rationale and answer.

    Raises:
        DataError: no items, an item that is not multiple choice with an answer key, or
            `rationale_outputs` of another length.
    """
    from kd2edge.data.prompts import build_prompt
    from kd2edge.scoring.evaluator import summarize

    items = check_choice_items(items)
    evalset = EvalSet(QADataset("items", "eval", tuple(items), "multiple_choice"),
                      tuple(Prompted(it, build_prompt(it)) for it in items), shots=0, example_split=None)
    plain = summarize(run_items(backend, evalset, max_new_tokens=8, mode=plain_mode, progress=progress,
                                desc="plain"), "multiple_choice")
    if rationale_outputs is None:
        _, rationale_outputs = generate_outputs(backend, [rationale_student_prompt(it) for it in items],
                                                max_new_tokens, progress, desc="with rationale")
    if len(rationale_outputs) != len(items):
        raise DataError(f"{len(rationale_outputs)} rationale outputs for {len(items)} items: pass one per item")
    records = [score_rationale_output(o, it) for o, it in zip(rationale_outputs, items)]
    n = len(records)
    return {"n": n, "plain": {"accuracy": plain["accuracy"], "mode": plain_mode},
            "rationale": {"accuracy": choice_accuracy([r["choice"] for r in records], [it.answer_key for it in items]),
                          "answered": sum(r["choice"] is not None for r in records) / n,
                          "formatted": sum(r["format"] == 1.0 for r in records) / n},
            "records": records}


def evaluate_with_rationales(model_dir: str | Path, items: Sequence[QAItem], max_new_tokens: int = 128,
                             batch_size: int = 8, plain_mode: str = "loglik", progress: bool = True) -> dict:
    """`rationale_comparison` of a model on disk (the `eval-rationales` command).

    Args:
        model_dir: anything `kd2edge.scoring.backends.load_backend` opens.
        items, max_new_tokens, plain_mode, progress: see `rationale_comparison`.
        batch_size: prompts per generation batch.

    Raises:
        DataError: as `rationale_comparison`.
        ModelError: the model cannot be opened.
    """
    from kd2edge.scoring.backends import load_backend

    items = check_choice_items(items)   # before loading the model: bad data fails in seconds
    return rationale_comparison(load_backend(str(model_dir), batch_size=batch_size), items, max_new_tokens,
                                plain_mode, progress)
